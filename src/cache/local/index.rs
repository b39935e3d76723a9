//! The LRU index over every blob on disk, weighed by size and bounded by `cache.max_size`.
//!
//! moka's default admission policy is TinyLFU, which would refuse a fresh blob in favour of
//! old popular ones: a mirror must keep what was just pulled, so the policy is plain LRU.
//! Eviction deletes the file; a reader that has it open keeps reading (unlink semantics).

use std::sync::Arc;

use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

use super::store::Store;
use crate::metrics::Metrics;
use crate::reference::Digest;

/// moka weighs entries with a `u32`: sizes are counted in KiB (rounded up) so a blob of up
/// to 4 TiB fits.
const UNIT: u64 = 1024;

fn units(bytes: u64) -> u32 {
    bytes.div_ceil(UNIT).clamp(1, u32::MAX as u64) as u32
}

pub struct Index {
    entries: moka::sync::Cache<Digest, u64>,
}

impl Index {
    pub fn new(max_size: u64, store: Arc<Store>, metrics: Arc<Metrics>) -> Index {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_size / UNIT)
            .weigher(|_: &Digest, size: &u64| units(*size))
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(move |digest: Arc<Digest>, _size, cause| {
                if cause == RemovalCause::Size {
                    tracing::debug!(%digest, "evicted");
                    metrics.evictions.inc();
                    store.remove(&digest);
                }
            })
            .build();
        Index { entries }
    }

    /// Records a blob (newly committed or found at start) as the most recently used, and
    /// evicts what no longer fits.
    pub fn insert(&self, digest: Digest, size: u64) {
        self.entries.insert(digest, size);
        self.entries.run_pending_tasks();
    }

    /// Refreshes recency on a hit.
    pub fn touch(&self, digest: &Digest) {
        let _ = self.entries.get(digest);
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.entries.contains_key(digest)
    }

    /// Forgets a blob without deleting its file (the caller has).
    pub fn forget(&self, digest: &Digest) {
        self.entries.invalidate(digest);
    }

    /// Bytes and entries indexed.
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        let bytes = self.entries.iter().map(|(_, s)| s).sum();
        (bytes, self.entries.entry_count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn evicts_the_least_recently_used_beyond_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let index = Index::new(1 << 20, store.clone(), Arc::new(Metrics::new()));
        let put = |n: u8| {
            let data = vec![n; 400 << 10];
            let d = Digest::sha256_of(&data);
            let (mut f, tmp) = store.temp().unwrap();
            f.write_all(&data).unwrap();
            store.commit(&f, &tmp, &d).unwrap();
            index.insert(d.clone(), data.len() as u64);
            d
        };
        let a = put(1);
        let b = put(2);
        index.touch(&a);
        let c = put(3);
        assert!(
            !store.blob_path(&b).exists(),
            "b was the least recently used"
        );
        assert!(store.blob_path(&a).exists() && store.blob_path(&c).exists());
        assert!(!index.contains(&b));
    }
}
