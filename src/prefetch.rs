//! `ocicache prefetch`: warms a cache by pulling images through an ocicache, every platform
//! of an index or those asked for. With `--server` it talks to a running ocicache; with
//! `--config` the caller starts one in-process on a loopback port first, so both modes share
//! this one path (and every byte is verified by the proxy as on any pull, and here again).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::reference::{Digest, DigestHasher, Name, Reference};
use crate::upstream::MANIFEST_TYPES;

/// Why a prefetch stopped.
#[derive(Debug, thiserror::Error)]
pub enum PrefetchError {
    /// The image as written is not an image reference.
    #[error("{image}: {problem}")]
    Image { image: String, problem: String },
    /// The server answered with an error.
    #[error("{url}: {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    /// Bytes that do not match their digest (checked here again).
    #[error("{0}: the content does not match its digest")]
    Mismatch(Digest),
    /// A manifest that is not the JSON of one, or a digest in it that is not one.
    #[error("{0}")]
    Manifest(String),
    /// The connection to the server failed.
    #[error("{0}")]
    Http(String),
}

impl From<hyper_util::client::legacy::Error> for PrefetchError {
    fn from(e: hyper_util::client::legacy::Error) -> Self {
        PrefetchError::Http(e.to_string())
    }
}

impl From<hyper::Error> for PrefetchError {
    fn from(e: hyper::Error) -> Self {
        PrefetchError::Http(e.to_string())
    }
}

impl From<http::Error> for PrefetchError {
    fn from(e: http::Error) -> Self {
        PrefetchError::Http(e.to_string())
    }
}

impl From<serde_json::Error> for PrefetchError {
    fn from(e: serde_json::Error) -> Self {
        PrefetchError::Manifest(format!("not a manifest: {e}"))
    }
}

impl From<crate::reference::ReferenceError> for PrefetchError {
    fn from(e: crate::reference::ReferenceError) -> Self {
        PrefetchError::Manifest(e.to_string())
    }
}

/// An image as users write it: `nginx`, `nginx:1.27`, `ghcr.io/owner/app@sha256:...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub name: Name,
    pub reference: Reference,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, PrefetchError> {
        let s = s.trim();
        let bad = |problem: String| PrefetchError::Image {
            image: s.to_string(),
            problem,
        };
        let (rest, reference) = match s.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => match s.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n, t.to_string()),
                _ => (s, "latest".to_string()),
            },
        };
        let (registry, repo) = match rest.split_once('/') {
            Some((first, repo))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), repo.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        let host_ok = !registry.is_empty()
            && registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
        if !host_ok {
            return Err(PrefetchError::Image {
                image: s.to_string(),
                problem: format!("{registry:?} is not a registry host[:port]"),
            });
        }
        let repo = if registry == "docker.io" && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo
        };
        Ok(ImageRef {
            name: Name::parse(&repo).map_err(|e| bad(e.to_string()))?,
            reference: Reference::parse(&reference).map_err(|e| bad(e.to_string()))?,
            registry,
        })
    }
}

#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub manifests: u64,
    pub blobs: u64,
    /// Bytes the proxy fetched from upstreams for us.
    pub fetched_bytes: u64,
    /// Bytes it already had.
    pub cached_bytes: u64,
}

/// A content descriptor, as far as prefetch reads it.
#[derive(Debug, Deserialize)]
pub struct Descriptor {
    pub digest: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

/// An image manifest or an index, as far as prefetch reads it (untrusted JSON: fuzzed).
#[derive(Debug, Deserialize)]
pub struct ManifestDoc {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// An artifact manifest's parts (`application/vnd.oci.artifact.manifest.v1+json`).
    #[serde(default)]
    pub blobs: Vec<Descriptor>,
}

impl ManifestDoc {
    /// Is this an index (a list of platforms' manifests), served as `media_type`?
    pub fn is_index(&self, media_type: &str) -> bool {
        media_type.contains("index")
            || media_type.contains("manifest.list")
            || !self.manifests.is_empty()
    }

    /// The blobs of an image manifest: its config, then its layers (an artifact manifest's
    /// `blobs` after them).
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(&self.layers).chain(&self.blobs)
    }
}

/// Is a manifest of `platform` wanted, given `platforms` (`os/arch[/variant]`; empty: all)?
/// `linux/arm64` takes every variant of it; an entry without a platform only when all are.
pub fn platform_wanted(platforms: &[String], platform: Option<&Platform>) -> bool {
    if platforms.is_empty() {
        return true;
    }
    let Some(p) = platform else { return false };
    let os_arch = format!("{}/{}", p.os, p.architecture);
    let full = match &p.variant {
        Some(v) => format!("{os_arch}/{v}"),
        None => os_arch.clone(),
    };
    platforms.iter().any(|w| *w == full || *w == os_arch)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

pub struct Prefetcher {
    server: String,
    platforms: Vec<String>,
    client: HttpClient,
    bars: Option<MultiProgress>,
    pub summary: Summary,
}

impl Prefetcher {
    /// `server`: base URL of an ocicache (`http://127.0.0.1:5000`). `platforms`:
    /// `os/arch[/variant]`, empty for all. `progress`: draw bars (on a terminal).
    pub fn new(server: &str, platforms: Vec<String>, progress: bool) -> Prefetcher {
        Prefetcher {
            server: server.trim_end_matches('/').to_string(),
            platforms,
            client: Client::builder(TokioExecutor::new()).build_http(),
            bars: progress.then(MultiProgress::new),
            summary: Summary::default(),
        }
    }

    fn say(&self, line: String) {
        match &self.bars {
            Some(b) => {
                let _ = b.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Pulls one image (all its platforms' manifests and blobs) through the server.
    pub async fn image(&mut self, image: &ImageRef) -> Result<(), PrefetchError> {
        let (bytes, media_type) = self.manifest(image, &image.reference).await?;
        let doc: ManifestDoc = serde_json::from_slice(&bytes)?;
        if doc.is_index(&media_type) {
            for m in &doc.manifests {
                if !platform_wanted(&self.platforms, m.platform.as_ref()) {
                    continue;
                }
                let d = Reference::parse(&m.digest)?;
                let (child, _) = self.manifest(image, &d).await?;
                let child: ManifestDoc = serde_json::from_slice(&child)?;
                self.blobs(image, &child).await?;
            }
        } else {
            self.blobs(image, &doc).await?;
        }
        Ok(())
    }

    fn url(&self, image: &ImageRef, kind: &str, reference: &str) -> String {
        let ns: String = url::form_urlencoded::byte_serialize(image.registry.as_bytes()).collect();
        format!(
            "{}/v2/{}/{kind}/{reference}?ns={ns}",
            self.server, image.name
        )
    }

    async fn manifest(
        &mut self,
        image: &ImageRef,
        reference: &Reference,
    ) -> Result<(Bytes, String), PrefetchError> {
        let url = self.url(image, "manifests", &reference.to_string());
        let req = Request::get(&url)
            .header(header::ACCEPT, HeaderValue::from_static(MANIFEST_TYPES))
            .body(Empty::new())?;
        let resp = self.client.request(req).await?;
        let status = resp.status();
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            return Err(PrefetchError::Status {
                url,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        if let Reference::Digest(d) = reference {
            verify(d, &body)?;
        }
        self.summary.manifests += 1;
        Ok((body, media_type))
    }

    async fn blobs(&mut self, image: &ImageRef, doc: &ManifestDoc) -> Result<(), PrefetchError> {
        for d in doc.blobs() {
            self.blob(image, d).await?;
        }
        Ok(())
    }

    async fn blob(&mut self, image: &ImageRef, d: &Descriptor) -> Result<(), PrefetchError> {
        let digest = Digest::parse(&d.digest)?;
        let url = self.url(image, "blobs", &d.digest);
        let resp = self
            .client
            .request(Request::get(&url).body(Empty::new())?)
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(PrefetchError::Status {
                url,
                status: resp.status(),
                body: String::new(),
            });
        }
        let hit = resp.headers().get("x-cache").is_some_and(|v| v == "HIT");
        let bar = self.bars.as_ref().map(|b| {
            let bar = b.add(ProgressBar::new(d.size));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(digest.hex()[..12].to_string());
            bar
        });
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut len = 0u64;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                hasher.update(&data);
                len += data.len() as u64;
                if let Some(b) = &bar {
                    b.set_position(len);
                }
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        if hasher.finalize() != digest {
            return Err(PrefetchError::Mismatch(digest));
        }
        self.summary.blobs += 1;
        if hit {
            self.summary.cached_bytes += len;
        } else {
            self.summary.fetched_bytes += len;
        }
        self.say(format!(
            "{} {digest} {} ({})",
            if hit { "cached " } else { "fetched" },
            human(len),
            image.name
        ));
        Ok(())
    }
}

fn verify(d: &Digest, bytes: &[u8]) -> Result<(), PrefetchError> {
    if !d.matches(bytes) {
        return Err(PrefetchError::Mismatch(d.clone()));
    }
    Ok(())
}

/// `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    crate::config::ByteSize(bytes).to_string()
}

/// How long the in-process server gets to finish after the prefetch.
pub const SHUTDOWN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_chosen_by_os_arch_and_variant() {
        let p = |os: &str, arch: &str, variant: Option<&str>| Platform {
            os: os.into(),
            architecture: arch.into(),
            variant: variant.map(String::from),
        };
        let want = |list: &[&str], platform: Option<&Platform>| {
            let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
            platform_wanted(&list, platform)
        };
        let arm64 = p("linux", "arm64", Some("v8"));
        assert!(want(&["linux/arm64"], Some(&arm64)), "any variant of it");
        assert!(want(&["linux/arm64/v8"], Some(&arm64)));
        assert!(!want(&["linux/arm64/v7"], Some(&arm64)));
        assert!(!want(&["linux/amd64"], Some(&arm64)));
        assert!(!want(
            &["linux/arm/v7"],
            Some(&p("linux", "arm", Some("v6")))
        ));
        assert!(want(&[], None), "no list: everything");
        assert!(!want(&["linux/amd64"], None), "an entry without a platform");
    }

    #[test]
    fn image_references_normalize_like_docker() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.name.as_str(),
                r.reference.to_string().as_str()
            ),
            ("docker.io", "library/nginx", "latest")
        );
        let r = ImageRef::parse("bitnami/redis:7").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.name.as_str(),
                r.reference.to_string().as_str()
            ),
            ("docker.io", "bitnami/redis", "7")
        );
        let r = ImageRef::parse("ghcr.io/owner/app:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.name.as_str()),
            ("ghcr.io", "owner/app")
        );
        let r = ImageRef::parse("localhost:5000/app").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.name.as_str(),
                r.reference.to_string().as_str()
            ),
            ("localhost:5000", "app", "latest")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("quay.io/x/y@{d}")).unwrap();
        assert_eq!(r.reference.to_string(), d);
        assert!(ImageRef::parse("UPPER/case").is_err());
        for bad in ["a.b#x/c", "a.b&ns=docker.io/c", "exa mple.com/c"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
