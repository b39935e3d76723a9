//! The client side of the peer endpoint: signed GETs to another replica, bounded by one
//! connect timeout (an advertised address nobody answers at costs that, then the caller
//! goes on without it) and by a wait for the answer's headers.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::sign::Key;
use crate::upstream::error_chain;

/// How long a connection to a peer may take: a replica that is gone (its pod IP answers
/// nothing) costs this once, then it is suspected and skipped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Why a peer gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0}: {1}")]
    Unreachable(String, String),
    #[error("peer {0}: no answer within {1:?}")]
    Timeout(String, Duration),
    #[error("peer {0}: status {1}")]
    Status(String, StatusCode),
}

impl PeerError {
    /// The peer is at fault (unreachable, slow, failing), not the request: a 4xx (the
    /// upstream does not have it, or the peer refused our signature) is not.
    pub fn is_peer_fault(&self) -> bool {
        !matches!(self, PeerError::Status(_, s) if s.is_client_error())
    }
}

/// An answer of a peer: its headers and its body as chunks.
pub struct Answer {
    pub size: Option<u64>,
    pub headers: http::HeaderMap,
    pub body: BoxStream<'static, io::Result<Bytes>>,
}

pub struct PeerClient {
    http: HttpClient,
    key: Key,
    /// Bound of the wait for an answer's headers (the peer's own fill may be connecting).
    answer_timeout: Duration,
}

impl PeerClient {
    pub fn new(key: Key, answer_timeout: Duration) -> io::Result<PeerClient> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(PeerClient {
            http: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(https),
            key,
            answer_timeout,
        })
    }

    /// A signed GET of `path_and_query` from the peer at `base`; a 200 only.
    pub async fn get(
        &self,
        base: &str,
        path_and_query: &str,
        accept: Option<&str>,
    ) -> Result<Answer, PeerError> {
        let unreachable = |e: String| PeerError::Unreachable(base.to_string(), e);
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path_and_query}", base.trim_end_matches('/')));
        for (name, value) in self.key.sign("GET", path_and_query) {
            req = req.header(name, value);
        }
        if let Some(a) = accept {
            req = req.header(header::ACCEPT, a);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = match tokio::time::timeout(self.answer_timeout, self.http.request(req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(unreachable(error_chain(&e))),
            Err(_) => return Err(PeerError::Timeout(base.to_string(), self.answer_timeout)),
        };
        if resp.status() != StatusCode::OK {
            return Err(PeerError::Status(base.to_string(), resp.status()));
        }
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyStream::new(body)
            .try_filter_map(|frame| async move { Ok(frame.into_data().ok()) })
            .map_err(io::Error::other)
            .boxed();
        Ok(Answer {
            size,
            headers: parts.headers,
            body,
        })
    }

    /// A whole small answer (a manifest), at most `max` bytes.
    pub async fn get_small(
        &self,
        base: &str,
        path_and_query: &str,
        accept: Option<&str>,
        max: u64,
    ) -> Result<(http::HeaderMap, Bytes), PeerError> {
        let answer = self.get(base, path_and_query, accept).await?;
        let limited = http_body_util::Limited::new(
            http_body_util::StreamBody::new(answer.body.map_ok(hyper::body::Frame::data)),
            max as usize,
        );
        match tokio::time::timeout(self.answer_timeout, limited.collect()).await {
            Ok(Ok(c)) => Ok((answer.headers, c.to_bytes())),
            Ok(Err(e)) => Err(PeerError::Unreachable(base.to_string(), e.to_string())),
            Err(_) => Err(PeerError::Timeout(base.to_string(), self.answer_timeout)),
        }
    }
}
