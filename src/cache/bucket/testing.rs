//! Test support for the bucket's unit tests: tiers on one in-memory store.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::ObjectStore;

use super::Bucket;
use crate::metrics::Metrics;

pub fn tier(store: &Arc<InMemory>, lease_ttl: Duration, max_size: u64) -> Arc<Bucket> {
    Arc::new(Bucket::new(
        store.clone(),
        "mirror/",
        Duration::from_secs(5),
        Duration::from_secs(5),
        lease_ttl,
        max_size,
        Arc::new(Metrics::new()),
    ))
}

pub async fn keys(store: &InMemory, prefix: &str) -> Vec<String> {
    let prefix = Path::from(prefix);
    let mut keys: Vec<String> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}
