//! The admin API's endpoints: each takes the parsed request and answers JSON, or an error
//! that `mod.rs` writes in the OCI envelope.

use std::sync::Arc;
use std::time::SystemTime;

use http::{Response, StatusCode};
use serde::Serialize;

use super::{json, Admin};
use crate::cache::inventory::FillStatus;
use crate::error::Error;
use crate::server::body::Body;

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
