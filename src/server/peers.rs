//! The peer endpoint (`[cache.s3.peers] listen`): what other replicas stream fills and
//! manifests from. On a listener of its own, never the public one, and only for requests
//! signed with the replicas' shared secret (`cache::peers::sign`); anything else is a 401
//! with no bytes. It serves only:
//!
//! - `GET /peer/v1/blobs/<digest>?upstream=&name=`: a blob committed here, or the fill under
//!   way (from byte 0, at its pace; the connection is cut if it fails, like a client's), or
//!   a fill started for the asking replica from the bucket or the upstream `upstream` as
//!   `name` (this replica is responsible for it);
//! - `GET /peer/v1/manifests/<reference>?upstream=&name=`: a manifest, verified, resolved
//!   as for a client of this replica (its tag TTLs and revalidation: one replica for all).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use super::body::{self, Body};
use super::State;
use crate::cache::peers::sign::{SIGNATURE_HEADER, TIME_HEADER};
use crate::error::{Error, ErrorCode};
use crate::reference::{Digest, Name, Reference};
use crate::route;
use crate::upstream::Upstream;

/// Binds the peer endpoint of `state`, if it has one, and serves it (with the heartbeat
/// that makes it known) until the returned task is aborted. A listener that cannot be bound
/// stops the start, as the public and admin listeners do: a replica that silently did
/// without its peers would fetch every blob the others are responsible for on its own.
pub async fn start(state: &Arc<State>) -> std::io::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(peers) = state.cache.peers() else {
        return Ok(None);
    };
    let listener = TcpListener::bind(peers.listen).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cache.s3.peers.listen {}: {e}", peers.listen),
        )
    })?;
    tracing::info!(
        addr = %listener.local_addr()?,
        advertise = peers.me(),
        "serving peers: the replica responsible for a blob, manifest or tag (by hashing over \
         the live replicas) fetches it and the others stream it from there; leases only until \
         the membership is first listed"
    );
    // Known to the others only once it answers.
    let heartbeat = peers.clone().start();
    let state = state.clone();
    Ok(Some(tokio::spawn(async move {
        let _beating = AbortOnDrop(heartbeat);
        serve(listener, state).await
    })))
}

/// Aborts a task when dropped (the heartbeat ends with the endpoint).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "peer endpoint: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "peer connection ended with an error");
            }
        });
    }
}

/// Answers one peer request: the signature first, then the route.
pub async fn handle(state: &State, req: Request<Incoming>) -> Response<Body> {
    let peers = state.cache.peers().expect("the endpoint runs with peers");
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Err(refused) = peers.key.verify(
        req.method().as_str(),
        path_and_query,
        header(TIME_HEADER),
        header(SIGNATURE_HEADER),
    ) {
        tracing::warn!(path = req.uri().path(), why = %refused, "peer request refused");
        let mut resp = Response::new(body::empty());
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    }
    if req.method() != Method::GET {
        return error(Error::client(ErrorCode::Unsupported, "peers only GET"));
    }
    match answer(state, &req).await {
        Ok(resp) => resp,
        Err(e) => error(e),
    }
}

fn error(e: Error) -> Response<Body> {
    e.into_response()
}

async fn answer(state: &State, req: &Request<Incoming>) -> Result<Response<Body>, Error> {
    let path = req.uri().path();
    let query = req.uri().query();
    let upstream = route::query_param(query, "upstream");
    let name = route::query_param(query, "name")
        .map(|n| n.parse::<Name>())
        .transpose()?;
    let up = match &upstream {
        Some(u) => Some(
            state
                .upstreams
                .0
                .iter()
                .find(|x| &x.name == u)
                .ok_or_else(|| Error::client(ErrorCode::NameUnknown, "no such upstream"))?,
        ),
        None => None,
    };
    if let Some(digest) = path.strip_prefix("/peer/v1/blobs/") {
        let digest = route::digest(digest)?;
        let fetch = match (up, &name) {
            (Some(up), Some(name)) if !state.config.offline => Some((up, name)),
            _ => None,
        };
        return blob(state, &digest, fetch).await;
    }
    if let Some(reference) = path.strip_prefix("/peer/v1/manifests/") {
        let reference = route::reference(reference)?;
        let (Some(up), Some(name)) = (up, &name) else {
            return Err(Error::client(
                ErrorCode::NameInvalid,
                "upstream and name are needed",
            ));
        };
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        return manifest(state, up, name, &reference, accept).await;
    }
    Err(Error::client(ErrorCode::Unsupported, "no such peer route"))
}

async fn blob(
    state: &State,
    digest: &Digest,
    fetch: Option<(&Arc<Upstream>, &Name)>,
) -> Result<Response<Body>, Error> {
    let Some(mut src) = state.cache.for_peer(digest, fetch).await? else {
        return Err(Error::client(ErrorCode::BlobUnknown, "blob not here"));
    };
    let size = src.size().await?;
    // The asking replica verifies the digest again: it gets the last byte without waiting
    // for this fill's commit (its fsync), which then runs beside its own.
    let reader = src.reader(0, size).for_verifier();
    let mut resp = Response::new(body::stream(reader.into_stream()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(resp)
}

async fn manifest(
    state: &State,
    up: &Arc<Upstream>,
    name: &Name,
    reference: &Reference,
    accept: Option<&str>,
) -> Result<Response<Body>, Error> {
    let ans =
        crate::cache::peers::as_asked_by_peer(state.manifests.get(up, name, reference, accept))
            .await?;
    let m = &ans.value;
    let mut resp = Response::new(body::full(Bytes::clone(&m.bytes)));
    *resp.headers_mut() = m.headers.clone();
    Ok(resp)
}
