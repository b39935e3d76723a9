//! The admin API: operating the cache while it runs, on a listener of its own (`[admin]
//! listen`, loopback by default, never the public port: the public listener never answers
//! `/api/...`). JSON under `/api/v1/`; errors in the OCI error envelope the public API uses.
//! With `[admin] token` set, every request must carry `Authorization: Bearer <token>`
//! (compared in constant time), else 401 with `WWW-Authenticate: Bearer`.
//!
//! - `mod.rs`: the listener, the token check, the router: a plain `match` on the method and
//!   the path's segments, where an endpoint is one more arm.
//! - `api`: the endpoints (what is cached, pins, purges, jobs).
//! - `page`: the status page at `/`, one HTML page for people.
//! - `jobs`: background jobs (verify, gc, prefetch) and their progress.
//! - `client`: the HTTP client the `ocicache cache ...` commands use with `--server`.
//!
//! Everything goes through the cache and its index (never the folder behind its back), so
//! each operation is safe beside the server's own fills.

pub mod api;
pub mod client;
pub mod jobs;
pub mod page;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Serialize;
use tokio::net::TcpListener;

use http_body_util::BodyExt;

use crate::config::Secret;
use crate::error::{Error, ErrorCode};
use crate::server::body::{self, Body};
use crate::server::{StartError, State};

/// Largest request body accepted (a prefetch's list of images).
const MAX_BODY: usize = 1 << 20;

/// What the admin endpoints share.
pub struct Admin {
    /// The server's state: its cache, manifests service, upstreams and configuration.
    pub state: Arc<State>,
    /// `[admin] token`, read once at start.
    token: Option<Secret>,
    /// Background jobs (verify, gc, prefetch), by id.
    pub jobs: jobs::Jobs,
}

impl Admin {
    /// The admin API over `state`; reads the token (`[admin] token` / `token_file`).
    pub fn new(state: Arc<State>) -> Result<Arc<Admin>, StartError> {
        let token = state.config.admin.token().map_err(|e| StartError::File {
            key: "admin.token_file",
            path: state.config.admin.token_file.clone().unwrap_or_default(),
            problem: e.to_string(),
        })?;
        Ok(Arc::new(Admin {
            state,
            token,
            jobs: jobs::Jobs::default(),
        }))
    }

    /// Does the request carry the token (or is none needed)?
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let value = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        // A browser opening the status page sends the token as a Basic password.
        let given = match value.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(bearer) => bearer.trim().to_string(),
            None => value.and_then(page::basic_password).unwrap_or_default(),
        };
        constant_time_eq(given.as_bytes(), token.0.as_bytes())
    }
}

/// Compares two byte strings in a time that depends on their lengths only, not on where
/// they differ: a remote caller cannot find the token a byte at a time.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Serves the admin API on `listener` until `shutdown` completes, then lets requests in
/// flight finish for up to `limits.shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    admin: Arc<Admin>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let timeout = admin.state.config.limits.header_read_timeout.0;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    tracing::info!(addr = %listener.local_addr()?, "admin API serving");
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let admin = admin.clone();
        let service = service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(handle(admin, req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let watched = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = watched.await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
        });
    }
    drop(listener);
    let deadline = admin.state.config.limits.shutdown_timeout.0;
    let _ = tokio::time::timeout(deadline, graceful.shutdown()).await;
    Ok(())
}

/// Answers one admin request and logs it (never its headers: the token is one).
async fn handle(
    admin: Arc<Admin>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = if admin.authorized(&req) {
        route(&admin, req)
            .await
            .unwrap_or_else(Error::into_response)
    } else if path == "/" {
        page::unauthorized(unauthorized())
    } else {
        unauthorized()
    };
    let status = resp.status().as_u16();
    if method == Method::GET {
        // Reads, a job's polls among them, are many and change nothing.
        tracing::debug!(%peer, %method, path, status, "admin request");
    } else {
        tracing::info!(%peer, %method, path, status, "admin request");
    }
    resp
}

fn unauthorized() -> Response<Body> {
    let mut resp = Error::client(
        ErrorCode::Unauthorized,
        "the admin API needs its token: Authorization: Bearer <token>",
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"ocicache-admin\""),
    );
    resp
}

/// The router: one arm per endpoint, on the method and the path's segments. Names (which
/// hold slashes) are the segments between an upstream and a tag, digest or end.
async fn route(admin: &Arc<Admin>, req: Request<Incoming>) -> Result<Response<Body>, Error> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    if method == Method::GET && segments == [""] {
        return Ok(page::page(admin));
    }
    let Some(["api", "v1", rest @ ..]) = Some(segments.as_slice()) else {
        return Err(not_found());
    };
    match (&method, rest) {
        (&Method::GET, ["cache"]) => api::cache(admin).await,
        (&Method::GET, ["pins"]) => api::pins(admin),
        (&Method::PUT, ["pins", image @ ..]) => api::pin(admin, image).await,
        (&Method::DELETE, ["pins", image @ ..]) => api::unpin(admin, image).await,
        (&Method::GET, ["images"]) => api::images(admin, &query).await,
        (&Method::DELETE, ["tags", image @ ..]) => api::delete_tag(admin, image, &query).await,
        (&Method::DELETE, ["images", image @ ..]) => api::delete_image(admin, image, &query).await,
        (&Method::DELETE, ["blobs", digest]) => api::delete_blob(admin, digest, &query).await,
        (&Method::POST, ["verify"]) => Ok(api::verify(admin)),
        (&Method::POST, ["gc"]) => api::gc(admin, read_json(req).await?),
        (&Method::POST, ["prefetch"]) => api::prefetch(admin, read_json(req).await?),
        (&Method::GET, ["jobs"]) => Ok(json(StatusCode::OK, &admin.jobs.list())),
        (&Method::GET, ["jobs", id]) => api::job(admin, id),
        (&Method::GET, ["sync"]) => Ok(json(StatusCode::OK, &admin.state.sync.status())),
        _ => Err(not_found()),
    }
}

fn not_found() -> Error {
    Error::client(ErrorCode::NameUnknown, "no such admin endpoint")
}

/// A bad request that is not a name, tag or digest (those have their own codes).
pub fn bad_request(message: impl Into<String>) -> Error {
    Error::client(ErrorCode::RequestInvalid, message)
}

/// The request's JSON body (none or empty: `T::default()`).
async fn read_json<T: serde::de::DeserializeOwned + Default>(
    req: Request<Incoming>,
) -> Result<T, Error> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| bad_request(format!("request body: {e}")))?
        .to_bytes();
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&body).map_err(|e| bad_request(format!("request body: {e}")))
}

/// A JSON answer.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let bytes = Bytes::from(serde_json::to_vec(value).expect("serializing to memory"));
    let len = bytes.len();
    let mut resp = Response::new(body::full(bytes));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(constant_time_eq(b"", b""));
    }
}
