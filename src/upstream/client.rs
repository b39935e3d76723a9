//! The HTTP side of an upstream: one pooled hyper-util client per upstream (rustls, HTTP/1.1
//! and HTTP/2), the `WWW-Authenticate` flow, redirects, timeouts, and the rate-limit headers.
//!
//! Redirects are followed here, a bounded number of times, and the `Authorization` header is
//! sent only to the registry's own origin (scheme, host and port): Docker Hub sends blobs to a
//! CDN with signed URLs that must never see our token or password. A `Location` is used once
//! and never cached.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use url::Url;

use super::{SetupError, Upstream};
use crate::config::UpstreamConfig;
use crate::error::UpstreamError;
use crate::metrics::UpstreamLabels;
use crate::reference::Name;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 5;

impl Upstream {
    /// Sends `method` for `path` (`/v2/<name>/...`, with query) to this upstream, with
    /// authentication for pulling `repo`, following redirects. Returns the final response,
    /// whatever its status.
    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        repo: &Name,
        headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let scope = format!("repository:{}:pull", repo.as_str());
        let mut url = self
            .base
            .join(path)
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let mut authorization = self.auth.cached(&scope).await;
        let mut authenticated = false;
        let mut redirects = 0;
        loop {
            let same_origin = url.origin() == self.base.origin();
            let auth = authorization.as_ref().filter(|_| same_origin);
            let resp = self.request(method.clone(), &url, headers, auth).await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && same_origin && !authenticated {
                let challenge = resp.headers().get(header::WWW_AUTHENTICATE).cloned();
                if let Some(value) = self.auth.authenticate(challenge.as_ref(), &scope).await? {
                    authorization = Some(value);
                    authenticated = true;
                    continue;
                }
                return Ok(resp);
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                redirects += 1;
                if redirects > MAX_REDIRECTS {
                    return Err(UpstreamError::Redirects);
                }
                let location = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| UpstreamError::Protocol("redirect without Location".into()))?;
                let next = url
                    .join(location)
                    .map_err(|e| UpstreamError::Protocol(format!("bad Location: {e}")))?;
                if next.scheme() != "http" && next.scheme() != "https" {
                    return Err(UpstreamError::Protocol("redirect to a non-HTTP URL".into()));
                }
                url = next;
                continue;
            }
            return Ok(resp);
        }
    }

    async fn request(
        &self,
        method: Method,
        url: &Url,
        headers: &HeaderMap,
        authorization: Option<&HeaderValue>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut req = Request::builder()
            .method(method)
            .uri(url.as_str())
            .body(Empty::new())
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let h = req.headers_mut();
        for (k, v) in headers {
            h.append(k, v.clone());
        }
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("ocicache/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(a) = authorization {
            h.insert(header::AUTHORIZATION, a.clone());
        }
        let result = send_with_timeout(&self.client, req, self.read_timeout).await;
        match &result {
            Ok(resp) => {
                self.metrics
                    .upstream_request(&self.name, resp.status().as_str());
                self.health.answered(resp.status());
                self.note_rate_limit(resp.headers());
                if resp.status() == StatusCode::TOO_MANY_REQUESTS {
                    self.rate.throttled(resp.headers());
                }
            }
            Err(e @ UpstreamError::Timeout) => {
                self.metrics.upstream_request(&self.name, "timeout");
                self.health.failed(true, e);
            }
            Err(e) => {
                self.metrics.upstream_request(&self.name, "error");
                self.health.failed(false, e);
            }
        }
        result
    }

    /// Logs and exports `ratelimit-limit` / `ratelimit-remaining` (`100;w=21600`).
    fn note_rate_limit(&self, headers: &HeaderMap) {
        let read = |name: &str| {
            headers
                .get(name)?
                .to_str()
                .ok()?
                .split(';')
                .next()?
                .trim()
                .parse::<i64>()
                .ok()
        };
        let labels = UpstreamLabels {
            upstream: self.name.clone(),
        };
        if let Some(limit) = read("ratelimit-limit") {
            self.metrics
                .ratelimit_limit
                .get_or_create(&labels)
                .set(limit);
        }
        if let Some(remaining) = read("ratelimit-remaining") {
            self.metrics
                .ratelimit_remaining
                .get_or_create(&labels)
                .set(remaining);
            self.rate.remaining.store(remaining, Ordering::Relaxed);
            self.rate.readings.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(upstream = %self.name, remaining, "upstream rate limit");
        }
        self.health
            .rate_limit(read("ratelimit-remaining"), read("ratelimit-limit"));
    }
}

/// An upstream's rate-limit signals, as its answers arrive (read by [`Upstream::rate_signals`]).
#[derive(Debug)]
pub(super) struct RateNotes {
    /// The last `ratelimit-remaining`; `i64::MIN` before the first.
    remaining: AtomicI64,
    readings: AtomicU64,
    throttled: AtomicU64,
    /// The last 429's `Retry-After` in seconds; `u64::MAX` when it sent none.
    retry_after: AtomicU64,
}

impl Default for RateNotes {
    fn default() -> Self {
        RateNotes {
            remaining: AtomicI64::new(i64::MIN),
            readings: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            retry_after: AtomicU64::new(u64::MAX),
        }
    }
}

impl RateNotes {
    pub(super) fn signals(&self) -> super::RateSignals {
        let remaining = self.remaining.load(Ordering::Relaxed);
        super::RateSignals {
            remaining: (remaining != i64::MIN).then_some(remaining),
            readings: self.readings.load(Ordering::Relaxed),
            throttled: self.throttled.load(Ordering::Relaxed),
            retry_after: match self.retry_after.load(Ordering::Relaxed) {
                u64::MAX => None,
                s => Some(Duration::from_secs(s)),
            },
        }
    }

    /// A 429, with its `Retry-After` when given in seconds (the HTTP-date form is rare from
    /// registries and left out: the back-off's own doubling covers it).
    fn throttled(&self, headers: &HeaderMap) {
        let secs = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(u64::MAX, |s| s.min(u64::MAX - 1));
        self.retry_after.store(secs, Ordering::Relaxed);
        self.throttled.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends `req`, waiting at most `timeout` for the response headers.
pub(crate) async fn send_with_timeout(
    client: &HttpClient,
    req: Request<Empty<Bytes>>,
    timeout: Duration,
) -> Result<Response<Incoming>, UpstreamError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(UpstreamError::Timeout),
        Ok(Err(e)) => Err(UpstreamError::Connect(error_chain(&e))),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// An error with its causes (hyper's top-level text alone says little); the peers' client
/// uses it too.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Reads a whole body of at most `limit` bytes, each chunk within `timeout`.
pub async fn read_body(
    mut body: Incoming,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, UpstreamError> {
    let mut buf = bytes::BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => return Err(UpstreamError::Stalled(timeout)),
            Ok(None) => return Ok(buf.freeze()),
            Ok(Some(Err(e))) => return Err(UpstreamError::Length(error_chain(&e))),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            if buf.len() as u64 + data.len() as u64 > limit {
                return Err(UpstreamError::TooLarge(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
}

pub(super) fn http_client(cfg: &UpstreamConfig) -> Result<HttpClient, SetupError> {
    let io = |e: std::io::Error| SetupError::Io(cfg.name.clone(), e);
    let tls_error = |e: rustls::Error| SetupError::Tls(cfg.name.clone(), e);
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.ca_file {
        let pem = std::fs::read(ca).map_err(|e| {
            io(std::io::Error::new(
                e.kind(),
                format!("ca_file {}: {e}", ca.display()),
            ))
        })?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(cert.map_err(io)?).map_err(tls_error)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_error)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.connect_timeout.0));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https))
}
