//! The admin API's endpoints: each takes the parsed request and answers JSON, or an error
//! that `mod.rs` writes in the OCI envelope.

use std::sync::Arc;
use std::time::SystemTime;

use http::{Response, StatusCode};
use serde::Serialize;

use super::{json, Admin};
use crate::cache::inventory::FillStatus;
use crate::cache::pins::{Pin, PinKey, PinnedImage};
use crate::error::{Error, ErrorCode};
use crate::reference::{Name, Reference};
use crate::route;
use crate::server::body::Body;
use crate::upstream::Upstream;

/// `GET /api/v1/cache`.
#[derive(Debug, Serialize)]
pub struct CacheReport {
    /// Bytes in the local tier's index.
    pub size: u64,
    /// `cache.max_size`.
    pub max_size: u64,
    /// Blobs (and manifests) in the index.
    pub blobs: u64,
    /// Bytes of pinned blobs (counted in `size`), and whether they alone exceed the bound.
    pub pinned_bytes: u64,
    pub pins_over_bound: bool,
    /// Whether the index's rebuild at start is done (until then `size` may be short).
    pub index_scan_done: bool,
    pub fills: Vec<FillStatus>,
    /// Requests answered from the cache and from elsewhere since start (blobs, manifests,
    /// tags), and hits / (hits + misses), `null` before any.
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: Option<f64>,
    /// Body bytes sent to clients since start, by source: `cache`, `upstream`, `bucket`.
    pub served_bytes: std::collections::BTreeMap<&'static str, u64>,
    /// When this report was made.
    #[serde(with = "crate::cache::inventory::rfc3339")]
    pub at: SystemTime,
}

pub async fn cache(admin: &Arc<Admin>) -> Result<Response<Body>, Error> {
    let cache = &admin.state.cache;
    let metrics = &admin.state.metrics;
    let (size, blobs) = cache.usage();
    let (pinned_bytes, pins_over_bound) = cache.index.pinned_usage();
    let (hits, misses) = metrics.hits_and_misses();
    let report = CacheReport {
        size,
        max_size: cache.index.max_size(),
        blobs,
        pinned_bytes,
        pins_over_bound,
        index_scan_done: cache.index.scan_done(),
        fills: cache.fills_status(),
        hits,
        misses,
        hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        served_bytes: metrics.served_bytes_by_source().into_iter().collect(),
        at: crate::clock::now(),
    };
    Ok(json(StatusCode::OK, &report))
}

/// An image named by an admin path, `<upstream>/<name>/<tag or digest>`: validated like
/// the public API (the upstream must be configured; Docker Hub's one-component names get
/// `library/`).
pub struct ImagePath {
    pub upstream: Arc<Upstream>,
    pub name: Name,
    pub reference: Reference,
}

impl ImagePath {
    pub fn parse(admin: &Admin, segments: &[&str]) -> Result<ImagePath, Error> {
        let [upstream, name @ .., reference] = segments else {
            return Err(Error::client(
                ErrorCode::NameInvalid,
                "expected <upstream>/<name>/<tag or digest>",
            ));
        };
        if name.is_empty() {
            return Err(Error::client(
                ErrorCode::NameInvalid,
                "expected <upstream>/<name>/<tag or digest>",
            ));
        }
        let upstreams = &admin.state.upstreams;
        let target = route::resolve(upstreams, Some(upstream), &name.join("/"))?;
        Ok(ImagePath {
            upstream: upstreams.0[target.upstream].clone(),
            name: target.name,
            reference: route::reference(reference)?,
        })
    }

    pub fn pin_key(&self) -> PinKey {
        PinKey {
            upstream: self.upstream.name.clone(),
            name: self.name.clone(),
            reference: self.reference.clone(),
        }
    }
}

/// `GET /api/v1/pins`.
pub fn pins(admin: &Arc<Admin>) -> Result<Response<Body>, Error> {
    Ok(json(StatusCode::OK, &admin.state.cache.pins()))
}

/// `PUT /api/v1/pins/<upstream>/<name>/<tag or digest>`: resolves the image (asking the
/// upstream if the cache cannot answer) and pins every digest of it. Its blobs are fetched
/// by pulls (or a prefetch) and kept from then on.
pub async fn pin(admin: &Arc<Admin>, segments: &[&str]) -> Result<Response<Body>, Error> {
    let image = ImagePath::parse(admin, segments)?;
    let state = &admin.state;
    let (digests, _) = state
        .manifests
        .resolve_image(&image.upstream, &image.name, &image.reference)
        .await?;
    let pin = Pin {
        key: image.pin_key(),
        image: PinnedImage {
            manifests: digests.manifests,
            blobs: digests.blobs,
            pinned_at: crate::clock::now(),
        },
    };
    state.cache.pin(pin.key.clone(), pin.image.clone())?;
    tracing::info!(upstream = %pin.key.upstream, name = %pin.key.name, reference = %pin.key.reference, "pinned");
    Ok(json(StatusCode::OK, &pin))
}

/// `DELETE /api/v1/pins/<upstream>/<name>/<tag or digest>`.
pub fn unpin(admin: &Arc<Admin>, segments: &[&str]) -> Result<Response<Body>, Error> {
    let key = ImagePath::parse(admin, segments)?.pin_key();
    if !admin.state.cache.unpin(&key)? {
        return Err(Error::client(ErrorCode::ManifestUnknown, "not pinned"));
    }
    tracing::info!(upstream = %key.upstream, name = %key.name, reference = %key.reference, "unpinned");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "unpinned": key }),
    ))
}
