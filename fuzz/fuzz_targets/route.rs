//! The route parser: `parse_path`, `query_param` and `resolve` against a small fixed upstream
//! table. Properties: the endpoint rebuilds the path it came from; a routed request only ever
//! names a configured upstream and a valid repository name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::reference::Name;
use ocicache::route::{self, Endpoint, UpstreamNames};

/// (name, URL authority, Docker Hub)
const TABLE: &[(&str, &str, bool)] = &[
    ("docker.io", "registry-1.docker.io", true),
    ("ghcr.io", "ghcr.io", false),
    ("local", "127.0.0.1:5000", false),
];

struct Ups {
    default: Option<usize>,
}

impl UpstreamNames for Ups {
    fn count(&self) -> usize {
        TABLE.len()
    }
    fn answers_to(&self, i: usize, host: &str) -> bool {
        TABLE[i].0 == host || TABLE[i].1 == host
    }
    fn is_docker_hub(&self, i: usize) -> bool {
        TABLE[i].2
    }
    fn default_upstream(&self) -> Option<usize> {
        self.default
    }
}

fn check_resolve(ups: &Ups, ns: Option<&str>, name: &str) {
    let find = |host: &str| (0..ups.count()).find(|&i| ups.answers_to(i, host));
    match route::resolve(ups, ns, name) {
        Ok(t) => {
            assert!(t.upstream < ups.count());
            assert_eq!(Name::parse(t.name.as_str()).as_ref(), Ok(&t.name));
            for c in t.name.components() {
                assert!(c != "." && c != ".." && !c.is_empty());
            }
            match ns {
                Some(ns) => {
                    assert!(ups.answers_to(t.upstream, ns), "ns {ns:?} routed to {}", t.upstream);
                    assert_eq!(t.namespace.as_deref(), Some(ns));
                }
                None => {
                    assert!(t.namespace.is_none());
                    let by_prefix = name.split_once('/').and_then(|(f, _)| find(f));
                    match by_prefix {
                        Some(i) => assert_eq!(t.upstream, i),
                        None => assert_eq!(Some(t.upstream), ups.default_upstream()),
                    }
                }
            }
            if ups.is_docker_hub(t.upstream) {
                assert!(t.name.as_str().contains('/'), "hub name without namespace: {t:?}");
            }
        }
        Err(_) => {
            // Never fails for a configured registry with a valid plain name.
            if let Some(ns) = ns {
                if find(ns).is_some() && Name::parse(name).is_ok() && name.contains('/') {
                    panic!("refused ns={ns:?} name={name:?}");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 4096 {
        return;
    }
    let ups = Ups {
        default: if data[0] & 1 == 1 { Some(0) } else { None },
    };
    let s = String::from_utf8_lossy(&data[1..]);
    let (path, query) = match s.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (s.as_ref(), None),
    };
    let ns = route::query_param(query, "ns");
    let _ = route::query_param(query, "n");
    let _ = route::query_param(query, "last");

    let Ok(ep) = route::parse_path(path) else {
        return;
    };
    let name = match &ep {
        Endpoint::Manifest { name, reference } => {
            assert_eq!(format!("/v2/{name}/manifests/{reference}"), path);
            if let Ok(r) = route::reference(reference) {
                assert_eq!(&r.to_string(), reference);
            }
            name
        }
        Endpoint::Blob { name, digest } => {
            assert_eq!(format!("/v2/{name}/blobs/{digest}"), path);
            if let Ok(d) = route::digest(digest) {
                assert_eq!(&d.to_string(), digest);
            }
            name
        }
        Endpoint::Referrers { name, digest } => {
            assert_eq!(format!("/v2/{name}/referrers/{digest}"), path);
            let _ = route::digest(digest);
            name
        }
        Endpoint::Tags { name } => {
            assert_eq!(format!("/v2/{name}/tags/list"), path);
            name
        }
        Endpoint::Upload => {
            assert!(path.starts_with("/v2/") && path.contains("/blobs/uploads"));
            return;
        }
        Endpoint::Base => {
            assert!(path == "/v2" || path == "/v2/");
            return;
        }
        Endpoint::Metrics | Endpoint::Healthz | Endpoint::Readyz => return,
    };
    assert!(!name.is_empty() && !name.split('/').any(str::is_empty), "{name:?}");
    check_resolve(&ups, ns.as_deref(), name);
    // And the same name with no ns, routed by prefix or default.
    check_resolve(&ups, None, name);
});
