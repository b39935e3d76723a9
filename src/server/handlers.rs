//! Request handlers: route, validate, answer from the cache or through it; the answer goes
//! out with its log line, written when its body ends (see `body::Logged`).

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::{self, Body};
use super::State;
use crate::cache::{Found, Outcome};
use crate::clock::Instant;
use crate::error::{Error, ErrorCode, Result};
use crate::range::{self, Multipart, RangeError};
use crate::reference::{Digest, Reference};
use crate::route::{self, Endpoint, Target};
use crate::upstream::Upstream;

/// Header names set on every answer, made once: `insert` with a `&str` parses and checks
/// the name on each call, a measurable share of a cached manifest's answer.
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");
const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");

/// Answers one request; `peer` is the client's address, formatted once per connection for
/// the log lines.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: Arc<str>,
) -> Response<body::Logged> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path();
    let endpoint = route::parse_path(path);
    // From here the request is logged even if the client leaves before it is answered.
    let mut pending = body::Pending::new(peer, method.clone(), path.to_string(), started);
    let route_label = match &endpoint {
        Ok(Endpoint::Base) => "base",
        Ok(Endpoint::Manifest { .. }) => "manifest",
        Ok(Endpoint::Blob { .. }) => "blob",
        Ok(Endpoint::Tags { .. }) => "tags",
        Ok(Endpoint::Referrers { .. }) => "referrers",
        Ok(Endpoint::Upload) => "upload",
        Ok(Endpoint::Metrics) => "metrics",
        Ok(Endpoint::Healthz) => "healthz",
        Ok(Endpoint::Readyz) => "readyz",
        Err(_) => "unknown",
    };
    let needs_auth = match &endpoint {
        Ok(Endpoint::Healthz | Endpoint::Readyz) => false,
        Ok(Endpoint::Metrics) => state.auth.as_ref().is_some_and(|a| a.protect_metrics),
        _ => state.auth.is_some(),
    };
    let denied = match (&state.auth, needs_auth) {
        (Some(auth), true) => !auth.check(req.headers()).await,
        _ => false,
    };
    let mut error = None;
    let mut resp = match endpoint {
        _ if denied => super::auth::challenge(),
        // `dispatch` notes the routed upstream as soon as it knows it, so that the line names
        // it on the error path too.
        Ok(e) => match dispatch(&state, &req, e, pending.routed()).await {
            Ok(resp) => resp,
            Err(e) => {
                // Every answer of an upstream is an error that names it (a 404 included);
                // the others (a bad name, offline) asked none.
                if e.upstream_name().is_none() {
                    *pending.routed() = None;
                }
                let resp = e.clone().into_response();
                error = Some(e);
                resp
            }
        },
        Err(e) if method != Method::GET && method != Method::HEAD => {
            let _ = e;
            unsupported()
        }
        Err(e) => {
            let resp = e.clone().into_response();
            error = Some(e);
            resp
        }
    };
    resp.headers_mut()
        .insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    let status = resp.status();
    if let Some(e) = error
        .as_ref()
        .filter(|_| status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
    {
        // Kept for the status page; only errors pay for the text.
        let what = format!("{} {}", method, req.uri().path());
        state.status.error(&what, e);
    }
    state.metrics.request(&crate::metrics::RequestLabels {
        route: route_label,
        method: match method {
            Method::GET => "GET",
            Method::HEAD => "HEAD",
            _ => "other",
        },
        status: status.as_u16(),
    });
    let outcome = resp.extensions_mut().remove::<Outcome>();
    state.metrics.request_took(
        &crate::metrics::RouteOutcomeLabels {
            route: route_label,
            outcome: match outcome {
                Some(o) => o.as_str(),
                None if status.is_client_error() || status.is_server_error() => "error",
                None => "none",
            },
        },
        started.elapsed().as_secs_f64(),
    );
    if let Some(o) = outcome {
        resp.headers_mut()
            .insert(X_CACHE, HeaderValue::from_static(o.x_cache()));
    }
    let expected = if method == Method::HEAD {
        Some(0)
    } else {
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    let line = pending.answered(status, expected, outcome, error);
    resp.map(|b| body::Logged::new(b, line))
}

fn unsupported() -> Response<Body> {
    let mut resp =
        Error::client(ErrorCode::Unsupported, "this mirror is read-only").into_response();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    resp
}

/// Answers `endpoint`; sets `routed` to the upstream the request is routed to once it is
/// known.
async fn dispatch(
    state: &Arc<State>,
    req: &Request<Incoming>,
    endpoint: Endpoint<'_>,
    routed: &mut Option<Arc<Upstream>>,
) -> Result<Response<Body>> {
    let method = req.method();
    if method != Method::GET && method != Method::HEAD {
        return Ok(unsupported());
    }
    let query = req.uri().query();
    let ns = route::query_param(query, "ns");
    let mut target = |name: &str| {
        let t = route::resolve(&state.upstreams, ns.as_deref(), name)?;
        *routed = Some(state.upstreams.0[t.upstream].clone());
        Ok::<_, Error>(t)
    };
    let mut resp = match endpoint {
        Endpoint::Base => json(StatusCode::OK, Bytes::from_static(b"{}")),
        Endpoint::Healthz => text(StatusCode::OK, "ok\n"),
        Endpoint::Readyz => readyz(state).await,
        Endpoint::Metrics => metrics(state),
        Endpoint::Upload => return Ok(unsupported()),
        Endpoint::Manifest { name, reference } => {
            let target = target(name)?;
            let reference = route::reference(reference)?;
            manifest(state, req, &target, &reference).await?
        }
        Endpoint::Blob { name, digest } => {
            let target = target(name)?;
            let digest = route::digest(digest)?;
            blob(state, req, &target, &digest).await?
        }
        Endpoint::Tags { name } => {
            let t = target(name)?;
            tags(state, query, name, &t, ns.as_deref()).await?
        }
        Endpoint::Referrers { name, digest } => {
            let t = target(name)?;
            let digest = route::digest(digest)?;
            let up = &state.upstreams.0[t.upstream];
            let artifact_type = route::query_param(query, "artifactType");
            let ans = state
                .manifests
                .referrers(up, &t.name, &digest, artifact_type.as_deref())
                .await?;
            let (bytes, ct) = &*ans.value;
            let mut resp = Response::new(body::full(bytes.clone()));
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, ct.clone());
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            if artifact_type.is_some() {
                h.insert(
                    "oci-filters-applied",
                    HeaderValue::from_static("artifactType"),
                );
            }
            if ans.outcome.is_stale() {
                h.insert(header::WARNING, stale_warning());
            }
            resp.extensions_mut().insert(ans.outcome);
            with_target(&mut resp, &t);
            resp
        }
    };
    if method == Method::HEAD {
        // Keep every header (Content-Length included) and send no body.
        *resp.body_mut() = body::empty();
    }
    Ok(resp)
}

fn with_target(resp: &mut Response<Body>, target: &Target) {
    if let Some(ns) = &target.namespace {
        if let Ok(v) = HeaderValue::from_str(ns) {
            resp.headers_mut().insert(OCI_NAMESPACE, v);
        }
    }
}

fn stale_warning() -> HeaderValue {
    HeaderValue::from_static("110 - \"Response is Stale\"")
}

fn json(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let len = bytes.len();
    let mut resp = Response::new(body::full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(s));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

async fn readyz(state: &State) -> Response<Body> {
    if !state.cache.writable().await {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "cache folder not writable\n",
        );
    }
    // Blobs are served while the index is rebuilt, but the bound does not hold yet: a
    // load balancer may prefer a replica that is done.
    if let Some(scanned) = state.cache.scan_under_way() {
        let mut resp = Response::new(body::full(format!(
            "index scan under way: {scanned} blobs scanned\n"
        )));
        *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return resp;
    }
    // Still ready (it serves), but the bound no longer holds: say why.
    let (pinned, over) = state.cache.index.pinned_usage();
    if over {
        return Response::new(body::full(format!(
            "ready; pinned images alone ({pinned} bytes) exceed cache.max_size ({} bytes): \
             only unpinned blobs are evicted\n",
            state.cache.index.max_size()
        )));
    }
    text(StatusCode::OK, "ready\n")
}

fn metrics(state: &State) -> Response<Body> {
    let (bytes, entries) = state.cache.usage();
    state.metrics.cache_bytes.set(bytes as i64);
    state.metrics.cache_entries.set(entries as i64);
    let mut resp = Response::new(body::full(state.metrics.encode()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

/// The client's `Accept` headers as one list; borrowed when there is one header (the usual
/// case: nothing is allocated).
fn accept_list(headers: &HeaderMap) -> Option<std::borrow::Cow<'_, str>> {
    let mut parts = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let first = parts.next()?;
    match parts.next() {
        None => Some(std::borrow::Cow::Borrowed(first)),
        Some(second) => {
            let mut all = format!("{first}, {second}");
            for p in parts {
                all.push_str(", ");
                all.push_str(p);
            }
            Some(std::borrow::Cow::Owned(all))
        }
    }
}

async fn manifest(
    state: &State,
    req: &Request<Incoming>,
    target: &Target,
    reference: &Reference,
) -> Result<Response<Body>> {
    let up = &state.upstreams.0[target.upstream];
    let accept = accept_list(req.headers());
    let ans = state
        .manifests
        .get(up, &target.name, reference, accept.as_deref())
        .await?;
    if let Reference::Tag(tag) = reference {
        state
            .status
            .pulled(&up.name, target.name.as_str(), tag.as_str());
    }
    let m = &ans.value;
    m.note_pulled();
    let mut resp = Response::new(body::full(m.bytes.clone()));
    // The headers were built with the manifest: one copy of the map, nothing parsed.
    *resp.headers_mut() = m.headers.clone();
    let h = resp.headers_mut();
    if ans.outcome.is_stale() {
        h.insert(header::WARNING, stale_warning());
    }
    resp.extensions_mut().insert(ans.outcome);
    with_target(&mut resp, target);
    Ok(resp)
}

fn digest_value(d: &Digest) -> HeaderValue {
    HeaderValue::from_str(&d.to_string()).expect("a digest is a header value")
}

fn etag(d: &Digest) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{d}\"")).expect("a digest is a header value")
}

async fn blob(
    state: &State,
    req: &Request<Incoming>,
    target: &Target,
    digest: &Digest,
) -> Result<Response<Body>> {
    let up = &state.upstreams.0[target.upstream];
    let mut resp = if req.method() == Method::HEAD {
        blob_head(state, up, target, digest).await?
    } else {
        blob_get(state, req, up, target, digest).await?
    };
    with_target(&mut resp, target);
    Ok(resp)
}

/// `HEAD` of a blob: from the cache, a fill or the bucket when one knows the size, else asked
/// upstream (without starting a fill: a `HEAD` must not cost a download).
async fn blob_head(
    state: &State,
    up: &Arc<Upstream>,
    target: &Target,
    digest: &Digest,
) -> Result<Response<Body>> {
    let upstream = (!state.config.offline).then_some((up, &target.name));
    let head = state.cache.head(digest, upstream).await?;
    let outcome = if head.from_upstream {
        Outcome::Upstream
    } else {
        Outcome::Hit
    };
    Ok(blob_headers(
        StatusCode::OK,
        head.size,
        digest,
        head.media_type.as_deref(),
        outcome,
    ))
}

fn blob_headers(
    status: StatusCode,
    len: u64,
    digest: &Digest,
    media_type: Option<&str>,
    outcome: Outcome,
) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        media_type
            .and_then(|m| HeaderValue::from_str(m).ok())
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(DOCKER_CONTENT_DIGEST, digest_value(digest));
    h.insert(header::ETAG, etag(digest));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp.extensions_mut().insert(outcome);
    resp
}

async fn blob_get(
    state: &State,
    req: &Request<Incoming>,
    up: &Arc<Upstream>,
    target: &Target,
    digest: &Digest,
) -> Result<Response<Body>> {
    let upstream = (!state.config.offline).then_some((up, &target.name));
    let mut src = match state.cache.blob(digest, upstream).await? {
        Found::Source(src) => src,
        Found::Redirect(url) => {
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
            let location = HeaderValue::from_str(url.as_str())
                .map_err(|e| std::io::Error::other(format!("presigned URL: {e}")))?;
            let h = resp.headers_mut();
            h.insert(header::LOCATION, location);
            h.insert(DOCKER_CONTENT_DIGEST, digest_value(digest));
            resp.extensions_mut().insert(Outcome::Redirect);
            return Ok(resp);
        }
    };
    let size = src.size().await?;
    // After `size`: a fill knows by then whether the bucket or the upstream feeds it.
    let (outcome, source_label) = match (src.is_fill(), src.is_from_tier()) {
        (true, true) if src.is_from_peer() => (Outcome::Peer, "peer"),
        (true, true) => (Outcome::Bucket, "bucket"),
        (true, false) => (Outcome::Fill, "upstream"),
        (false, _) => (Outcome::Hit, "local"),
    };
    let media_type = src.media_type.clone();
    let served = state
        .metrics
        .bytes_served
        .get_or_create(&crate::metrics::SourceLabels {
            source: source_label,
        })
        .clone();
    let status = state.status.clone();
    let count = move |chunk: &std::io::Result<Bytes>| match chunk {
        Ok(c) => {
            served.inc_by(c.len() as u64);
        }
        // The fill feeding it failed (its cause names the upstream, and a mismatch the
        // digest): the client's body is cut; the status page shows why.
        Err(e) => status.error("blob body", e),
    };

    let ranges = match req.headers().get(header::RANGE) {
        None => None,
        Some(v) => match v
            .to_str()
            .map_err(|_| RangeError::Malformed)
            .and_then(range::parse)
        {
            Ok(None) => None,
            Ok(Some(specs)) => match range::resolve(&specs, size) {
                Ok(r) => Some(r),
                Err(e) => return Ok(range_error(e, size)),
            },
            Err(e) => return Ok(range_error(e, size)),
        },
    };
    let mut resp = match ranges.as_deref() {
        None => {
            let mut resp =
                blob_headers(StatusCode::OK, size, digest, media_type.as_deref(), outcome);
            *resp.body_mut() = body::stream(src.reader(0, size).into_stream().inspect(count));
            resp
        }
        Some([r]) => {
            let mut resp = blob_headers(
                StatusCode::PARTIAL_CONTENT,
                r.len(),
                digest,
                media_type.as_deref(),
                outcome,
            );
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&r.content_range(size)).expect("ascii"),
            );
            *resp.body_mut() =
                body::stream(src.reader(r.start, r.end + 1).into_stream().inspect(count));
            resp
        }
        Some(many) => {
            let ct = media_type.as_deref().unwrap_or("application/octet-stream");
            let boundary = format!("ocicache-{}", &digest.hex()[..16]);
            let mp = Multipart::new(many, size, ct, boundary);
            let mut resp = blob_headers(
                StatusCode::PARTIAL_CONTENT,
                mp.content_length(),
                digest,
                None,
                outcome,
            );
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(&mp.content_type()).expect("ascii"),
            );
            let src = src.clone();
            let parts = futures_util::stream::iter(mp.parts.clone()).flat_map(move |(head, r)| {
                futures_util::stream::once(async move { Ok(head) })
                    .chain(src.reader(r.start, r.end + 1).into_stream())
            });
            let closing = futures_util::stream::once(async move { Ok(mp.closing) });
            *resp.body_mut() = body::stream(parts.chain(closing).inspect(count));
            resp
        }
    };
    resp.extensions_mut().insert(outcome);
    Ok(resp)
}

/// `416` with `Content-Range: bytes */SIZE`, in the spec's envelope.
fn range_error(e: RangeError, size: u64) -> Response<Body> {
    let mut resp = Error::client(ErrorCode::RangeInvalid, e.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_RANGE,
        HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    resp
}

async fn tags(
    state: &State,
    query: Option<&str>,
    client_name: &str,
    target: &Target,
    ns: Option<&str>,
) -> Result<Response<Body>> {
    let n = match route::query_param(query, "n") {
        None => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            Error::client(ErrorCode::SizeInvalid, format!("n={v:?} is not a number"))
        })?),
    };
    let last = route::query_param(query, "last");
    let up = &state.upstreams.0[target.upstream];
    let ans = state.manifests.tag_list(up, &target.name).await?;
    let all = &ans.value;
    let start = match &last {
        Some(l) => all.partition_point(|t| t.as_str() <= l.as_str()),
        None => 0,
    };
    let rest = &all[start..];
    let page: &[String] = match n {
        Some(n) => &rest[..n.min(rest.len())],
        None => rest,
    };
    let body = serde_json::json!({ "name": target.name.as_str(), "tags": page });
    let mut resp = json(StatusCode::OK, Bytes::from(body.to_string()));
    if let (Some(n), Some(last_tag)) = (n, page.last()) {
        if page.len() < rest.len() {
            let mut link = format!(
                "</v2/{client_name}/tags/list?n={n}&last={}",
                url::form_urlencoded::byte_serialize(last_tag.as_bytes()).collect::<String>()
            );
            if let Some(ns) = ns {
                link.push_str("&ns=");
                link.extend(url::form_urlencoded::byte_serialize(ns.as_bytes()));
            }
            link.push_str(">; rel=\"next\"");
            if let Ok(v) = HeaderValue::from_str(&link) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
    }
    if ans.outcome.is_stale() {
        resp.headers_mut().insert(header::WARNING, stale_warning());
    }
    resp.extensions_mut().insert(ans.outcome);
    with_target(&mut resp, target);
    Ok(resp)
}
