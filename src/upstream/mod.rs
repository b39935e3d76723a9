//! The upstream registries, as the rest of ocicache sees them: a client that speaks the
//! domain. [`Upstream::blob`], [`Upstream::blob_size`], [`Upstream::manifest`],
//! [`Upstream::manifest_digest`], [`Upstream::tags`] and [`Upstream::referrers`] return our
//! types (a body stream with its length, a manifest's bytes, a list, our [`Error`]), and
//! `Upstream::refusal` is the one place that turns an upstream's answer that is not a
//! success into our error type, keeping the upstream's own code and message.
//!
//! The HTTP underneath (pooled connections, TLS, tokens, redirects, timeouts) is in
//! `client`; token auth in [`auth`], its challenge parser in [`challenge`].

pub mod auth;
pub mod challenge;
mod client;
pub(crate) use client::error_chain;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use url::Url;

use crate::config::UpstreamConfig;
use crate::error::{Error, ErrorCode, Rejection, UpstreamError};
use crate::metrics::Metrics;
use crate::reference::{Digest, Name, Reference, Tag};
pub use client::{read_body, HttpClient};

/// Every manifest and index media type, asked for when the client sends no `Accept`.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.artifact.manifest.v1+json";

/// Bound on tag list pages followed upstream.
const MAX_TAG_PAGES: usize = 100;
/// Bound on an error body read for its message.
const MAX_ERROR_BODY: u64 = 64 << 10;

/// One configured upstream registry.
pub struct Upstream {
    /// The registry host clients mean (`docker.io`).
    pub name: String,
    /// Scheme, host and port of the registry API; the only origin that sees credentials.
    pub base: Url,
    pub tag_ttl: Duration,
    pub read_timeout: Duration,
    /// Docker Hub gets `library/` for one-component names.
    pub docker_hub: bool,
    pub default: bool,
    client: HttpClient,
    auth: auth::Auth,
    metrics: Arc<Metrics>,
    /// What this upstream said of its rate limit, for the sync scheduler's back-off.
    rate: client::RateNotes,
    /// Its answers as the status page shows them.
    pub health: crate::status::Health,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("base", &self.base.as_str())
            .finish()
    }
}

/// Why an upstream could not be set up from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("upstream {0}: url: {1}")]
    Url(String, url::ParseError),
    #[error("upstream {0}: {1}")]
    Io(String, io::Error),
    #[error("upstream {0}: TLS: {1}")]
    Tls(String, rustls::Error),
}

/// What an upstream said of its rate limit (see [`Upstream::rate_signals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateSignals {
    /// The last `ratelimit-remaining`, if it ever sent one.
    pub remaining: Option<i64>,
    /// How many `ratelimit-remaining` headers it sent: tells a fresh reading from an old one.
    pub readings: u64,
    /// How many 429 answers it gave.
    pub throttled: u64,
    /// The `Retry-After` (in seconds) of the last 429, if it sent one.
    pub retry_after: Option<Duration>,
}

/// A blob body streaming from an upstream.
pub struct BlobBody {
    /// The announced length (`Content-Length`), if any.
    pub size: Option<u64>,
    pub chunks: BoxStream<'static, io::Result<Bytes>>,
}

/// A manifest as the upstream sent it: not yet verified.
pub struct UpstreamManifest {
    pub bytes: Bytes,
    /// `Content-Type`, if the upstream sent one.
    pub media_type: Option<String>,
    /// `Docker-Content-Digest`, if the upstream sent one (a claim to verify).
    pub digest: Option<Digest>,
}

/// What a request was for, to name what is unknown when the upstream says 404 without an
/// error body.
#[derive(Clone, Copy)]
enum Asked {
    Blob,
    Manifest,
    Repository,
}

impl Upstream {
    pub fn new(cfg: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Upstream, SetupError> {
        let base = Url::parse(&cfg.url).map_err(|e| SetupError::Url(cfg.name.clone(), e))?;
        let client = client::http_client(cfg)?;
        let host = base.host_str().unwrap_or_default();
        let docker_hub = cfg.name == "docker.io" || host == "registry-1.docker.io";
        let password = cfg
            .password()
            .map_err(|e| SetupError::Io(cfg.name.clone(), e))?;
        let creds = cfg.username.clone().zip(password);
        Ok(Upstream {
            name: cfg.name.clone(),
            tag_ttl: cfg.tag_ttl.0,
            read_timeout: cfg.read_timeout.0,
            docker_hub,
            default: cfg.default,
            auth: auth::Auth::new(
                cfg.name.clone(),
                creds,
                client.clone(),
                cfg.read_timeout.0,
                metrics.clone(),
            ),
            metrics,
            client,
            base,
            rate: client::RateNotes::default(),
            health: Default::default(),
        })
    }

    /// The last `ratelimit-remaining` this upstream sent, how many it has sent, and how many
    /// 429 answers it gave, since start.
    pub fn rate_signals(&self) -> RateSignals {
        self.rate.signals()
    }

    /// Does this upstream answer to registry host `host` (its name or its URL's host)?
    pub fn answers_to(&self, host: &str) -> bool {
        if self.name == host {
            return true;
        }
        // Compared in place: this runs for every request routed by name (nothing allocated).
        match (self.base.host_str(), self.base.port()) {
            (Some(h), Some(p)) => host
                .strip_prefix(h)
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|port| {
                    // The port as `{p}` writes it: digits, no leading zero.
                    port.bytes().all(|b| b.is_ascii_digit())
                        && !(port.len() > 1 && port.starts_with('0'))
                        && port.parse() == Ok(p)
                }),
            (Some(h), None) => h == host,
            _ => false,
        }
    }

    /// A blob's body, whole or the bytes `range.0..=range.1` of it.
    pub async fn blob(
        &self,
        name: &Name,
        digest: &Digest,
        range: Option<(u64, u64)>,
    ) -> Result<BlobBody, Error> {
        use futures_util::{StreamExt, TryStreamExt};
        let mut headers = HeaderMap::new();
        if let Some((first, last)) = range {
            let value = HeaderValue::from_str(&format!("bytes={first}-{last}")).expect("ascii");
            headers.insert(header::RANGE, value);
        }
        let path = format!("/v2/{name}/blobs/{digest}");
        let resp = self.ask(Method::GET, &path, name, &headers).await?;
        let expected = match range {
            None => StatusCode::OK,
            Some(_) => StatusCode::PARTIAL_CONTENT,
        };
        if resp.status() != expected {
            return Err(self.refusal(resp, Asked::Blob).await);
        }
        let size = content_length(resp.headers());
        let chunks = http_body_util::BodyStream::new(resp.into_body())
            .try_filter_map(|frame| async move { Ok(frame.into_data().ok()) })
            .map_err(io::Error::other)
            .boxed();
        Ok(BlobBody { size, chunks })
    }

    /// A blob's size, by a `HEAD` (which starts no download).
    pub async fn blob_size(&self, name: &Name, digest: &Digest) -> Result<u64, Error> {
        let path = format!("/v2/{name}/blobs/{digest}");
        let resp = self
            .ask(Method::HEAD, &path, name, &HeaderMap::new())
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.refusal(resp, Asked::Blob).await);
        }
        content_length(resp.headers()).ok_or_else(|| {
            self.error(UpstreamError::Protocol(
                "HEAD without Content-Length".into(),
            ))
        })
    }

    /// A manifest by tag or digest, for a client that accepts `accept` (every manifest type
    /// when `None`), at most `max` bytes. Not verified here: see `manifests`.
    pub async fn manifest(
        &self,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
        max: u64,
    ) -> Result<UpstreamManifest, Error> {
        let path = format!("/v2/{name}/manifests/{reference}");
        let resp = self
            .ask(Method::GET, &path, name, &accept_headers(accept))
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.refusal(resp, Asked::Manifest).await);
        }
        let headers = resp.headers();
        if content_length(headers).is_some_and(|len| len > max) {
            return Err(self.error(UpstreamError::TooLarge(max)));
        }
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let digest = content_digest(headers);
        let bytes = read_body(resp.into_body(), max, self.read_timeout)
            .await
            .map_err(|e| self.error(e))?;
        Ok(UpstreamManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// The digest a tag points to now, by a `HEAD` (which Docker Hub does not count as a
    /// pull); `None` when the upstream does not say.
    pub async fn manifest_digest(
        &self,
        name: &Name,
        tag: &Tag,
        accept: Option<&str>,
    ) -> Result<Option<Digest>, Error> {
        let path = format!("/v2/{name}/manifests/{tag}");
        let resp = self
            .ask(Method::HEAD, &path, name, &accept_headers(accept))
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.refusal(resp, Asked::Manifest).await);
        }
        Ok(content_digest(resp.headers()))
    }

    /// Every tag of `name` (pages followed, at most `MAX_TAG_PAGES`), sorted, without the
    /// ones that are not valid tags. `max` bounds each page's body.
    pub async fn tags(&self, name: &Name, max: u64) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let first = format!("/v2/{name}/tags/list");
        let mut tags = Vec::new();
        let mut path = first.clone();
        for _ in 0..MAX_TAG_PAGES {
            let resp = self
                .ask(Method::GET, &path, name, &HeaderMap::new())
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(self.refusal(resp, Asked::Repository).await);
            }
            let next = resp
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let body = read_body(resp.into_body(), max, self.read_timeout)
                .await
                .map_err(|e| self.error(e))?;
            let page: Page = serde_json::from_slice(&body)
                .map_err(|e| self.error(UpstreamError::Protocol(format!("tag list: {e}"))))?;
            tags.extend(
                page.tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| Tag::parse(t).is_ok()),
            );
            match next {
                // Only a path on the same registry: never a link to elsewhere.
                Some(n) if n.split('?').next() == Some(first.as_str()) => path = n,
                _ => break,
            }
        }
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// The referrers index of `digest` (filtered by `artifact_type`), checked to be JSON, and
    /// its media type.
    pub async fn referrers(
        &self,
        name: &Name,
        digest: &Digest,
        artifact_type: Option<&str>,
        max: u64,
    ) -> Result<(Bytes, HeaderValue), Error> {
        let mut path = format!("/v2/{name}/referrers/{digest}");
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.extend(url::form_urlencoded::byte_serialize(t.as_bytes()));
        }
        let resp = self
            .ask(Method::GET, &path, name, &HeaderMap::new())
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.refusal(resp, Asked::Manifest).await);
        }
        let ct =
            resp.headers()
                .get(header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static(
                    "application/vnd.oci.image.index.v1+json",
                ));
        let body = read_body(resp.into_body(), max, self.read_timeout)
            .await
            .map_err(|e| self.error(e))?;
        serde_json::from_slice::<serde_json::Value>(&body)
            .map_err(|e| self.error(UpstreamError::Protocol(format!("referrers: {e}"))))?;
        Ok((body, ct))
    }

    /// Sends a request, with this upstream's name on a failure.
    async fn ask(
        &self,
        method: Method,
        path: &str,
        name: &Name,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, Error> {
        self.send(method, path, name, headers)
            .await
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: UpstreamError) -> Error {
        Error::upstream(&self.name, e)
    }

    /// The one place that turns an upstream's answer that is not a success into our error.
    ///
    /// - 401/403 (after authenticating), 429 and 5xx are the upstream's trouble: an
    ///   [`UpstreamError::Status`] (served stale where we can), with the upstream's message.
    /// - Any other answer (404, 400, ...) is a refusal of what the client asked: the
    ///   upstream's own status, code and message reach the client unchanged, e.g. `OCI index
    ///   found, but accept header does not support OCI indexes`, not a generic text.
    async fn refusal(&self, resp: Response<Incoming>, asked: Asked) -> Error {
        let status = resp.status();
        let retry_after = resp.headers().get(header::RETRY_AFTER).cloned();
        // The first error of the spec's envelope, if the body is one (a HEAD has no body).
        let said = read_body(resp.into_body(), MAX_ERROR_BODY, self.read_timeout)
            .await
            .ok()
            .and_then(|body| first_error(&body));
        let trouble = matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS
        ) || status.is_server_error()
            || status.is_informational()
            || status.is_success()
            || status.is_redirection();
        if trouble {
            return self.error(UpstreamError::Status {
                status,
                retry_after,
                said: said.map(|e| e.message).filter(|m| !m.is_empty()),
            });
        }
        let (code, message) = match asked {
            Asked::Blob => (ErrorCode::BlobUnknown, "blob unknown to the upstream"),
            Asked::Manifest => (
                ErrorCode::ManifestUnknown,
                "manifest unknown to the upstream",
            ),
            Asked::Repository => (ErrorCode::NameUnknown, "repository unknown to the upstream"),
        };
        let said = said.unwrap_or_default();
        Error::Rejected(Arc::new(Rejection {
            upstream: self.name.clone(),
            status,
            code: Some(said.code)
                .filter(|c| is_error_code(c))
                .unwrap_or_else(|| code.as_str().to_string()),
            message: Some(said.message)
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| message.to_string()),
            detail: said.detail,
        }))
    }
}

/// One error of the spec's envelope `{"errors":[{"code","message","detail"}]}`.
#[derive(Debug, Default, Deserialize)]
struct SaidError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    detail: serde_json::Value,
}

fn first_error(body: &[u8]) -> Option<SaidError> {
    #[derive(Deserialize)]
    struct Envelope {
        errors: Vec<SaidError>,
    }
    let mut e = serde_json::from_slice::<Envelope>(body).ok()?.errors;
    (!e.is_empty()).then(|| e.swap_remove(0))
}

/// A code as the spec writes them (`MANIFEST_UNKNOWN`): short, capitals and underscores.
fn is_error_code(c: &str) -> bool {
    !c.is_empty() && c.len() <= 64 && c.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

fn content_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok())
}

fn accept_headers(accept: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let value = accept
        .filter(|a| !a.trim().is_empty())
        .and_then(|a| HeaderValue::from_str(a).ok())
        .unwrap_or(HeaderValue::from_static(MANIFEST_TYPES));
    h.insert(header::ACCEPT, value);
    h
}

/// The target of a `Link: <...>; rel="next"` header.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next")
            .then(|| target.to_string())
    })
}

/// The upstreams of a configuration, by index, as the router sees them.
pub struct Upstreams(pub Vec<Arc<Upstream>>);

impl crate::route::UpstreamNames for Upstreams {
    fn count(&self) -> usize {
        self.0.len()
    }
    fn answers_to(&self, i: usize, host: &str) -> bool {
        self.0[i].answers_to(host)
    }
    fn is_docker_hub(&self, i: usize) -> bool {
        self.0[i].docker_hub
    }
    fn default_upstream(&self) -> Option<usize> {
        self.0.iter().position(|u| u.default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_answers_to_its_name_and_its_urls_authority() {
        let up = |url: &str| {
            let cfg: crate::config::UpstreamConfig = figment::Figment::from(
                figment::providers::Serialized::defaults(serde_json::json!({
                    "name": "mirror",
                    "url": url,
                })),
            )
            .extract()
            .unwrap();
            Upstream::new(&cfg, Arc::new(Metrics::new())).unwrap()
        };
        let with_port = up("http://127.0.0.1:5000");
        assert!(with_port.answers_to("mirror"));
        assert!(with_port.answers_to("127.0.0.1:5000"));
        for other in [
            "127.0.0.1",
            "127.0.0.1:",
            "127.0.0.1:05000",
            "127.0.0.1:+5000",
            "127.0.0.1:50000",
            "127.0.0.2:5000",
            "mirror:5000",
        ] {
            assert!(!with_port.answers_to(other), "{other}");
        }
        let without = up("https://registry.example");
        assert!(without.answers_to("registry.example"));
        assert!(!without.answers_to("registry.example:443"));
        assert!(!without.answers_to("registry"));
    }

    #[test]
    fn link_headers() {
        assert_eq!(
            next_link("</v2/a/tags/list?n=2&last=b>; rel=\"next\"").as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link("</x>; rel=\"prev\""), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn error_envelopes() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"OCI index found, but accept header does not support OCI indexes","detail":{"Tag":"1"}},{"code":"X","message":"y"}]}"#;
        let e = first_error(body).unwrap();
        assert_eq!(e.code, "MANIFEST_UNKNOWN");
        assert!(e.message.starts_with("OCI index found"));
        assert_eq!(e.detail["Tag"], "1");
        assert!(first_error(b"<html>").is_none());
        assert!(first_error(br#"{"errors":[]}"#).is_none());
        assert!(is_error_code("TOOMANYREQUESTS"));
        assert!(!is_error_code("a<script>"));
        assert!(!is_error_code(""));
    }
}
