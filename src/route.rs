//! The route parser: a request's path and query to an endpoint of the read API, and the
//! upstream that serves it (`?ns=`, then a first path component naming an upstream, then the
//! default upstream).
//!
//! Everything here runs before any disk or network I/O, on untrusted input: the path is taken
//! as raw bytes (no percent-decoding: no valid name, tag or digest contains `%`, so an encoded
//! `..` or `/` is simply invalid), split on `/`, and each part validated by `reference`.

use crate::error::{Error, ErrorCode, Result};
use crate::reference::{Digest, Name, Reference};

/// An endpoint of the read API, with its repository name as the client wrote it (parts of
/// the request's path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint<'a> {
    /// `/v2/`
    Base,
    Manifest {
        name: &'a str,
        reference: &'a str,
    },
    Blob {
        name: &'a str,
        digest: &'a str,
    },
    Tags {
        name: &'a str,
    },
    Referrers {
        name: &'a str,
        digest: &'a str,
    },
    /// `/v2/<name>/blobs/uploads/...`: only ever written to.
    Upload,
    /// `/metrics`, `/healthz`, `/readyz`
    Metrics,
    Healthz,
    Readyz,
}

/// Splits the path into an endpoint; names and references are checked later, once the
/// upstream (and with it the Docker Hub `library/` rule) is known. Nothing is allocated: the
/// parts are slices of `path` (this runs on every request).
pub fn parse_path(path: &str) -> Result<Endpoint<'_>> {
    match path {
        "/v2" | "/v2/" => return Ok(Endpoint::Base),
        "/metrics" => return Ok(Endpoint::Metrics),
        "/healthz" => return Ok(Endpoint::Healthz),
        "/readyz" => return Ok(Endpoint::Readyz),
        _ => {}
    }
    let not_found = || Error::client(ErrorCode::NameUnknown, "no such endpoint");
    let rest = path.strip_prefix("/v2/").ok_or_else(not_found)?;
    if rest.len() > 1024 {
        return Err(Error::client(ErrorCode::NameInvalid, "path too long"));
    }
    // The last two parts, and the name before them (`None` with fewer than three parts).
    let (head, last) = rest.rsplit_once('/').unwrap_or(("", rest));
    let tail = head.rsplit_once('/');
    if let Some((name, "tags")) = tail.filter(|_| last == "list") {
        return Ok(Endpoint::Tags {
            name: name_of(name)?,
        });
    }
    if is_upload(rest) {
        return Ok(Endpoint::Upload);
    }
    match tail {
        Some((name, "manifests")) => Ok(Endpoint::Manifest {
            name: name_of(name)?,
            reference: last,
        }),
        Some((name, "blobs")) => Ok(Endpoint::Blob {
            name: name_of(name)?,
            digest: last,
        }),
        Some((name, "referrers")) => Ok(Endpoint::Referrers {
            name: name_of(name)?,
            digest: last,
        }),
        _ => Err(not_found()),
    }
}

/// `name` if none of its `/`-separated parts is empty. (Bytes, not `str::split`: its char
/// searcher cost more than the rest of the parse on paths this short.)
fn name_of(name: &str) -> Result<&str> {
    let b = name.as_bytes();
    let empty_part = b.first().map_or(true, |&c| c == b'/')
        || b.last() == Some(&b'/')
        || b.windows(2).any(|w| w[0] == b'/' && w[1] == b'/');
    if empty_part {
        return Err(Error::client(
            ErrorCode::NameInvalid,
            "invalid repository name",
        ));
    }
    Ok(name)
}

/// Is the last `uploads` part of `rest` preceded by `blobs` and a name (a blob upload)?
fn is_upload(rest: &str) -> bool {
    let mut upload = false;
    let mut before: [Option<&[u8]>; 2] = [None, None];
    for part in rest.as_bytes().split(|&c| c == b'/') {
        if part == b"uploads" {
            upload = before[1] == Some(b"blobs") && before[0].is_some();
        }
        before = [before[1], Some(part)];
    }
    upload
}

/// The value of query parameter `key`, percent-decoded.
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Which upstream a request means, and the repository name to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index into the configured upstreams.
    pub upstream: usize,
    /// The name on the upstream (`library/` added for Docker Hub one-component names).
    pub name: Name,
    /// The `ns` value to echo in `OCI-Namespace`, when the request was routed by it.
    pub namespace: Option<String>,
}

/// What the router needs to know of an upstream.
pub trait UpstreamNames {
    fn count(&self) -> usize;
    /// Does upstream `i` answer to registry host `host` (its name, or its URL's host)?
    fn answers_to(&self, i: usize, host: &str) -> bool;
    fn is_docker_hub(&self, i: usize) -> bool;
    fn default_upstream(&self) -> Option<usize>;
}

/// Routes `name` (as in the path) with the `ns` parameter to a configured upstream.
/// A registry that is not configured is `NAME_UNKNOWN`: it is never contacted.
pub fn resolve(upstreams: &impl UpstreamNames, ns: Option<&str>, name: &str) -> Result<Target> {
    let find = |host: &str| (0..upstreams.count()).find(|&i| upstreams.answers_to(i, host));
    let (upstream, repo, namespace) = if let Some(ns) = ns {
        let i = find(ns).ok_or_else(|| {
            Error::client(
                ErrorCode::NameUnknown,
                format!("registry {ns:?} is not configured on this mirror"),
            )
        })?;
        (i, name, Some(ns.to_string()))
    } else {
        match name
            .split_once('/')
            .and_then(|(first, rest)| Some((find(first)?, rest)))
        {
            Some((i, rest)) => (i, rest, None),
            None => {
                let i = upstreams.default_upstream().ok_or_else(|| {
                    Error::client(
                        ErrorCode::NameUnknown,
                        "no default upstream: name a registry with ?ns= or a path prefix",
                    )
                })?;
                (i, name, None)
            }
        }
    };
    let mut name = Name::parse(repo)?;
    if upstreams.is_docker_hub(upstream) && !repo.contains('/') {
        name = Name::parse(&format!("library/{repo}"))?;
    }
    Ok(Target {
        upstream,
        name,
        namespace,
    })
}

/// Parses a manifest reference (tag or digest) from the path.
pub fn reference(s: &str) -> Result<Reference> {
    Ok(Reference::parse(s)?)
}

/// Parses a digest from the path.
pub fn digest(s: &str) -> Result<Digest> {
    Ok(Digest::parse(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Ups(Vec<(&'static str, &'static str, bool)>);
    impl UpstreamNames for Ups {
        fn count(&self) -> usize {
            self.0.len()
        }
        fn answers_to(&self, i: usize, host: &str) -> bool {
            self.0[i].0 == host || self.0[i].1 == host
        }
        fn is_docker_hub(&self, i: usize) -> bool {
            self.0[i].0 == "docker.io"
        }
        fn default_upstream(&self) -> Option<usize> {
            self.0.iter().position(|u| u.2)
        }
    }
    fn ups() -> Ups {
        Ups(vec![
            ("docker.io", "registry-1.docker.io", true),
            ("ghcr.io", "ghcr.io", false),
        ])
    }

    #[test]
    fn endpoints() {
        assert_eq!(parse_path("/v2/").unwrap(), Endpoint::Base);
        assert_eq!(
            parse_path("/v2/library/nginx/manifests/1.27").unwrap(),
            Endpoint::Manifest {
                name: "library/nginx",
                reference: "1.27"
            }
        );
        assert_eq!(
            parse_path("/v2/a/blobs/b/blobs/sha256:x").unwrap(),
            Endpoint::Blob {
                name: "a/blobs/b",
                digest: "sha256:x"
            }
        );
        assert_eq!(
            parse_path("/v2/a/b/tags/list").unwrap(),
            Endpoint::Tags { name: "a/b" }
        );
        assert_eq!(
            parse_path("/v2/a/referrers/sha256:x").unwrap(),
            Endpoint::Referrers {
                name: "a",
                digest: "sha256:x"
            }
        );
        assert_eq!(
            parse_path("/v2/a/blobs/uploads/").unwrap(),
            Endpoint::Upload
        );
        assert_eq!(
            parse_path("/v2/a/blobs/uploads/123").unwrap(),
            Endpoint::Upload
        );
        for bad in [
            "/v1/",
            "/v2/manifests/x",
            "/v2/a/b",
            "/",
            "/v2/a/tags",
            "/v2//manifests/x",
        ] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routing_order() {
        let u = ups();
        // ns first, even when the path starts with another upstream's name
        let t = resolve(&u, Some("ghcr.io"), "docker.io/x").unwrap();
        assert_eq!((t.upstream, t.name.as_str()), (1, "docker.io/x"));
        assert_eq!(t.namespace.as_deref(), Some("ghcr.io"));
        // docker.io and its API host both mean Docker Hub
        let t = resolve(&u, Some("registry-1.docker.io"), "nginx").unwrap();
        assert_eq!((t.upstream, t.name.as_str()), (0, "library/nginx"));
        // a path prefix
        let t = resolve(&u, None, "ghcr.io/owner/app").unwrap();
        assert_eq!(
            (t.upstream, t.name.as_str(), t.namespace),
            (1, "owner/app", None)
        );
        let t = resolve(&u, None, "docker.io/nginx").unwrap();
        assert_eq!((t.upstream, t.name.as_str()), (0, "library/nginx"));
        // the default, with library/ for one component
        let t = resolve(&u, None, "nginx").unwrap();
        assert_eq!((t.upstream, t.name.as_str()), (0, "library/nginx"));
        let t = resolve(&u, None, "bitnami/redis").unwrap();
        assert_eq!((t.upstream, t.name.as_str()), (0, "bitnami/redis"));
        // ghcr one-component names stay as they are
        let t = resolve(&u, Some("ghcr.io"), "app").unwrap();
        assert_eq!(t.name.as_str(), "app");
    }

    #[test]
    fn unconfigured_registries_are_name_unknown() {
        let e = resolve(&ups(), Some("evil.example"), "x").unwrap_err();
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
        let no_default = Ups(vec![("ghcr.io", "ghcr.io", false)]);
        let e = resolve(&no_default, None, "quay.io/x").unwrap_err();
        assert_eq!(e.status(), http::StatusCode::NOT_FOUND);
    }

    #[test]
    fn traversal_and_invalid_names_are_rejected() {
        for bad in [
            "..", "a/../b", "%2e%2e/x", "a%2fb", "A", "a//b", "a/", "ghcr.io/", "",
        ] {
            let e = resolve(&ups(), None, bad).unwrap_err();
            assert!(e.status().is_client_error(), "{bad}");
        }
    }

    #[test]
    fn query_params_are_decoded() {
        assert_eq!(
            query_param(Some("ns=docker.io&n=2"), "ns").as_deref(),
            Some("docker.io")
        );
        assert_eq!(
            query_param(Some("last=a%2Bb"), "last").as_deref(),
            Some("a+b")
        );
        assert_eq!(query_param(None, "ns"), None);
    }

    /// The parser as it was before it stopped allocating: the path split into a vector, the
    /// name joined again. The model `parse_path` is held to below, as `Debug` text.
    fn parse_path_model(path: &str) -> Result<String> {
        let fixed = match path {
            "/v2" | "/v2/" => Some("Base"),
            "/metrics" => Some("Metrics"),
            "/healthz" => Some("Healthz"),
            "/readyz" => Some("Readyz"),
            _ => None,
        };
        if let Some(f) = fixed {
            return Ok(f.to_string());
        }
        let not_found = || Error::client(ErrorCode::NameUnknown, "no such endpoint");
        let rest = path.strip_prefix("/v2/").ok_or_else(not_found)?;
        if rest.len() > 1024 {
            return Err(Error::client(ErrorCode::NameInvalid, "path too long"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let n = parts.len();
        let name_of = |k: usize| -> Result<String> {
            if k == 0 || parts[..k].iter().any(|p| p.is_empty()) {
                return Err(Error::client(
                    ErrorCode::NameInvalid,
                    "invalid repository name",
                ));
            }
            Ok(parts[..k].join("/"))
        };
        if n >= 3 && parts[n - 2] == "tags" && parts[n - 1] == "list" {
            return Ok(format!("Tags {{ name: {:?} }}", name_of(n - 2)?));
        }
        if let Some(i) = parts.iter().rposition(|p| *p == "uploads") {
            if i >= 2 && parts[i - 1] == "blobs" {
                return Ok("Upload".to_string());
            }
        }
        if n >= 3 {
            let (kind, field) = match parts[n - 2] {
                "manifests" => ("Manifest", "reference"),
                "blobs" => ("Blob", "digest"),
                "referrers" => ("Referrers", "digest"),
                _ => return Err(not_found()),
            };
            let name = name_of(n - 2)?;
            return Ok(format!(
                "{kind} {{ name: {name:?}, {field}: {:?} }}",
                parts[n - 1]
            ));
        }
        Err(not_found())
    }

    /// The parts the parser looks for, a name's and a reference's, and empty ones.
    const PARTS: [&str; 10] = [
        "a",
        "b.c",
        "",
        "blobs",
        "uploads",
        "tags",
        "list",
        "manifests",
        "referrers",
        "sha256:x",
    ];

    /// `parse_path`'s answer and the model's for `path`, as comparable values.
    fn both(path: &str) -> [std::result::Result<String, (http::StatusCode, String)>; 2] {
        let show = |r: Result<String>| r.map_err(|e| (e.status(), e.to_string()));
        [
            show(parse_path(path).map(|e| format!("{e:?}"))),
            show(parse_path_model(path)),
        ]
    }

    /// Every path of up to five of [`PARTS`] parses as the model parses it.
    #[test]
    fn short_paths_parse_as_the_model_parses_them() {
        let mut paths = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> = paths
                .iter()
                .flat_map(|p| PARTS.iter().map(move |part| format!("{p}/{part}")))
                .collect();
            for path in &longer {
                let path = format!("/v2{path}");
                let [got, model] = both(&path);
                assert_eq!(got, model, "{path}");
            }
            paths = longer;
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any path: no panic; whatever resolves names a valid repository on a configured
            /// upstream, and a name that resolves contains no traversal.
            #[test]
            fn any_path_routes_safely(path in "/v2/[a-zA-Z0-9./%_:-]{0,60}(/(manifests|blobs|tags|referrers)/[a-zA-Z0-9.:_-]{0,70})?", ns in proptest::option::of("[a-z0-9.:-]{0,20}")) {
                if let Ok(Endpoint::Manifest { name, .. } | Endpoint::Blob { name, .. } | Endpoint::Tags { name } | Endpoint::Referrers { name, .. }) = parse_path(&path) {
                    if let Ok(t) = resolve(&ups(), ns.as_deref(), name) {
                        prop_assert!(t.upstream < 2);
                        prop_assert!(Name::parse(t.name.as_str()).is_ok());
                        prop_assert!(!t.name.as_str().split('/').any(|c| c == ".." || c == "." || c.is_empty()));
                        prop_assert!(!t.name.as_str().contains('%'));
                    }
                }
            }

            /// Longer paths of [`PARTS`], behind any prefix, parse as the model parses them:
            /// the same endpoint, or the same error.
            #[test]
            fn paths_parse_as_the_model_parses_them(parts in proptest::collection::vec(proptest::sample::select(PARTS.to_vec()), 0..12), prefix in proptest::sample::select(vec!["/v2/", "/v2", "/v1/", ""])) {
                let path = format!("{prefix}{}", parts.join("/"));
                let [got, model] = both(&path);
                prop_assert_eq!(got, model, "{}", path);
            }

            /// Valid names route back to themselves (with `library/` for Docker Hub).
            #[test]
            fn valid_names_round_trip(name in "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,3}") {
                let t = resolve(&ups(), Some("ghcr.io"), &name).unwrap();
                prop_assert_eq!(t.name.as_str(), name.as_str());
                let path = format!("/v2/{name}/manifests/latest");
                prop_assert_eq!(parse_path(&path).unwrap(), Endpoint::Manifest { name: &name, reference: "latest" });
            }
        }
    }
}
