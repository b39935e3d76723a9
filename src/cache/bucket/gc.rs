//! The bucket's GC: a pass deletes the least recently used blobs beyond the bound, the
//! markers of blobs that are gone and dead leases; `spawn_gc` runs one on a schedule.

use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path;

use super::{Bucket, Fault};
use crate::clock;
use crate::reference::{Algorithm, Digest};

/// What a GC pass did.
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub blobs: u64,
    pub bytes: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
}
impl Bucket {
    /// One GC pass: deletes the least recently used blobs beyond `max_size`, the `recent/`
    /// markers of blobs that are gone, and leases past their expiry.
    pub async fn gc(&self) -> Result<GcReport, Fault> {
        let list = |kind: &str| {
            let prefix = Path::from(format!("{}{kind}", self.prefix));
            self.call("gc", self.store.list(Some(&prefix)).try_collect::<Vec<_>>())
        };
        let blobs = list("blobs").await?;
        let recent = list("recent").await?;
        let leases = list("leases").await?;
        let key = |p: &Path| -> Option<Digest> {
            let mut parts: Vec<_> = p.parts().collect();
            let hex = parts.pop()?;
            let alg = parts.pop()?;
            let alg = Algorithm::parse(alg.as_ref())?;
            Digest::parse(&format!("{}:{}", alg.as_str(), hex.as_ref())).ok()
        };
        let used: std::collections::HashMap<Digest, chrono::DateTime<chrono::Utc>> = recent
            .iter()
            .filter_map(|m| Some((key(&m.location)?, m.last_modified)))
            .collect();
        let mut entries: Vec<_> = blobs
            .iter()
            .map(|m| {
                let last = key(&m.location)
                    .and_then(|d| used.get(&d).copied())
                    .map_or(m.last_modified, |t| t.max(m.last_modified));
                (last, m)
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.location.cmp(&b.1.location)));
        let mut report = GcReport {
            blobs: entries.len() as u64,
            bytes: entries.iter().map(|(_, m)| m.size).sum(),
            ..Default::default()
        };
        let mut total = report.bytes;
        let mut deleted = std::collections::HashSet::new();
        for (_, m) in &entries {
            if total <= self.max_size {
                break;
            }
            self.call("gc", self.store.delete(&m.location))
                .await
                .or_else(|f| if f == Fault::Absent { Ok(()) } else { Err(f) })?;
            total -= m.size;
            report.deleted += 1;
            report.deleted_bytes += m.size;
            if let Some(d) = key(&m.location) {
                // Not to be redirected to any more.
                self.present.invalidate(&d);
                deleted.insert(d);
            }
        }
        let present: std::collections::HashSet<Digest> =
            blobs.iter().filter_map(|m| key(&m.location)).collect();
        for m in &recent {
            if key(&m.location).map_or(true, |d| deleted.contains(&d) || !present.contains(&d)) {
                let _ = self.call("gc", self.store.delete(&m.location)).await;
            }
        }
        let stale = chrono::DateTime::<chrono::Utc>::from(clock::now())
            - chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::MAX);
        for m in &leases {
            if m.last_modified < stale {
                let _ = self.call("gc", self.store.delete(&m.location)).await;
            }
        }
        if report.deleted > 0 {
            tracing::info!(
                deleted = report.deleted,
                freed = report.deleted_bytes,
                kept = total,
                bound = self.max_size,
                "shared store GC"
            );
        }
        self.count("gc", "ok");
        Ok(report)
    }

    /// Runs `gc` every `interval` (with jitter, so replicas spread their passes).
    pub fn spawn_gc(self: &Arc<Self>, interval: Duration) {
        let shared = self.clone();
        tokio::spawn(async move {
            loop {
                let jitter = Duration::from_millis(
                    clock::since_epoch().subsec_nanos() as u64
                        % (interval.as_millis() as u64 / 10 + 1),
                );
                tokio::time::sleep(interval + jitter).await;
                if let Err(f) = shared.gc().await {
                    tracing::debug!(fault = ?f, "shared store GC skipped");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bucket::testing::{keys, tier, TestStore};
    use bytes::Bytes;
    use object_store::{ObjectStore, PutPayload};

    #[tokio::test(start_paused = true)]
    async fn gc_deletes_the_least_recently_used_beyond_the_bound() {
        let store = TestStore::new();
        // Room for three blobs of 1 MiB.
        let shared = tier(&store, Duration::from_secs(60), 3 << 20);
        let mut ds = Vec::new();
        for n in 0..5u8 {
            let data = Bytes::from(vec![n; 1 << 20]);
            let d = Digest::sha256_of(&data);
            shared
                .put_manifest(&d, data, "application/octet-stream")
                .await;
            ds.push(d);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The oldest is used again (as `touch` records it).
        store
            .put(&shared.path("recent", &ds[0]), PutPayload::default())
            .await
            .unwrap();
        let report = shared.gc().await.unwrap();
        assert_eq!((report.blobs, report.deleted), (5, 2));
        let left = keys(&store, "mirror/blobs").await;
        let expect: Vec<String> = [&ds[0], &ds[3], &ds[4]]
            .iter()
            .map(|d| format!("mirror/blobs/sha256/{}", d.hex()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(left, expect);
        // A second pass (another replica) finds nothing to do.
        assert_eq!(shared.gc().await.unwrap().deleted, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blob_the_gc_deleted_is_no_longer_taken_to_be_there() {
        let store = TestStore::new();
        // Room for one blob of 1 MiB.
        let shared = tier(&store, Duration::from_secs(60), 1 << 20);
        let mut ds = Vec::new();
        for n in 0..2u8 {
            let data = Bytes::from(vec![n; 1 << 20]);
            let d = Digest::sha256_of(&data);
            shared
                .put_manifest(&d, data, "application/octet-stream")
                .await;
            // Seen there (as a HEAD or a read marks it): a local hit would be redirected.
            assert!(shared.head_blob(&d).await.is_some());
            ds.push(d);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(shared.gc().await.unwrap().deleted, 1);
        assert!(
            !shared.present.contains_key(&ds[0]),
            "a redirect to what this replica's GC deleted would be a 404"
        );
        assert!(shared.present.contains_key(&ds[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn gc_runs_on_its_schedule_and_deletes_dead_leases() {
        let store = TestStore::new();
        // Room for one blob of 1 MiB.
        let shared = tier(&store, Duration::from_secs(60), 1 << 20);
        for n in 0..2u8 {
            let data = Bytes::from(vec![n; 1 << 20]);
            let d = Digest::sha256_of(&data);
            shared
                .put_manifest(&d, data, "application/octet-stream")
                .await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let dead = Path::from("mirror/leases/sha256/00/someone");
        store.put(&dead, PutPayload::default()).await.unwrap();
        let interval = Duration::from_secs(3600);
        shared.spawn_gc(interval);
        // Nothing before the interval...
        tokio::time::sleep(interval - Duration::from_secs(1)).await;
        assert_eq!(keys(&store, "mirror/blobs").await.len(), 2);
        assert_eq!(keys(&store, "mirror/leases").await.len(), 1);
        // ...one pass within it and its jitter (a tenth): the oldest blob, and the lease
        // that has been dead for an hour.
        tokio::time::sleep(interval / 10 + Duration::from_secs(2)).await;
        assert_eq!(keys(&store, "mirror/blobs").await.len(), 1);
        assert!(keys(&store, "mirror/leases").await.is_empty());
    }
}
