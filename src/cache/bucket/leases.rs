//! Leases: which replica fetches a blob (or a manifest) that is in nobody's cache, and how
//! the others wait for it. The `Lease` guard keeps a held lease alive until it is released.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use super::{Bucket, Fault, NO, YES};
use crate::clock::{self, Instant};
use crate::reference::Digest;

/// How often a replica waiting on another's lease looks for the blob.
const POLL: Duration = Duration::from_millis(200);
/// How long a contender for a lease waits for the others' entries before it lists them
/// (stores without conditional writes).
const SETTLE: Duration = Duration::from_millis(300);
/// A lease not refreshed for this long is dead (its holder crashed or hangs): waiters stop
/// waiting and contenders ignore it. Holders refresh theirs every quarter of it.
pub const LEASE_TTL: Duration = Duration::from_secs(60);

/// Who fetches a blob that is in nobody's cache.
pub enum Claim {
    /// This replica holds the lease: it fetches and uploads, then releases.
    Mine(Lease),
    /// Another replica holds a live lease.
    Theirs,
    /// The store cannot arbitrate (no conditional writes, or down): fetch without a lease.
    None,
}

/// A held lease on a blob's fill, refreshed in the background until it is released.
pub struct Lease {
    path: Path,
    heartbeat: Option<tokio::task::AbortHandle>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

#[derive(Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    /// Seconds since the epoch after which the lease may be taken over.
    expires: u64,
}

impl Bucket {
    /// Whether the store honours `If-None-Match: *`: two creates of one probe object.
    async fn conditional_writes(&self) -> bool {
        match self.conditional.load(Ordering::Relaxed) {
            YES => return true,
            NO => return false,
            _ => {}
        }
        let probe = Path::from(format!("{}leases/probe-{}", self.prefix, self.owner));
        let create = || {
            self.store.put_opts(
                &probe,
                PutPayload::from_static(b"probe"),
                PutOptions::from(PutMode::Create),
            )
        };
        let first = self.call("probe", create()).await;
        let verdict = match first {
            Ok(_) => match self.call("probe", create()).await {
                Err(Fault::Exists) => Some(true),
                Ok(_) | Err(Fault::Unsupported) => Some(false),
                Err(_) => None,
            },
            Err(Fault::Unsupported) => Some(false),
            Err(_) => None,
        };
        let _ = self.call("probe", self.store.delete(&probe)).await;
        match verdict {
            Some(v) => {
                self.conditional
                    .store(if v { YES } else { NO }, Ordering::Relaxed);
                if v {
                    tracing::info!("shared store honours conditional writes: blob leases on");
                } else {
                    tracing::warn!("shared store ignores conditional writes: no blob leases, replicas may fetch a blob more than once");
                }
                v
            }
            None => false,
        }
    }

    /// The folder of `d`'s leases: `leases/<alg>/<hex>/`.
    fn lease_dir(&self, d: &Digest) -> Path {
        self.path("leases", d)
    }

    /// Tries to become the replica that fetches `d`. With conditional writes, the lease is
    /// `leases/<alg>/<hex>/lease`, created only if absent. Without, each contender writes
    /// `leases/<alg>/<hex>/<owner>`, waits `SETTLE`, lists the folder, and the oldest live
    /// entry (by the store's Last-Modified, then name) wins; the others withdraw theirs. A
    /// contender that writes after a winner listed sees the winner's older entry and loses,
    /// so two winners need a PUT slower than the wait (`SETTLE`, or three times this
    /// replica's own PUT when the store is slow): best effort, and the worst case is one more
    /// upstream fetch, never a wrong byte.
    pub async fn claim(&self, d: &Digest) -> Claim {
        if self.conditional_writes().await {
            self.claim_conditional(d).await
        } else {
            self.claim_by_listing(d).await
        }
    }

    fn lease_body(&self) -> PutPayload {
        lease_body(&self.owner, self.lease_ttl)
    }

    async fn claim_conditional(&self, d: &Digest) -> Claim {
        let path = self.lease_dir(d).child("lease");
        for _ in 0..2 {
            let put = self
                .store
                .put_opts(&path, self.lease_body(), PutMode::Create.into());
            match self.call("lease", put).await {
                Ok(_) => {
                    self.count("lease", "mine");
                    return Claim::Mine(self.hold(path));
                }
                Err(Fault::Exists) => {}
                Err(_) => return Claim::None,
            }
            // Someone holds it: theirs, unless it has expired (its holder died).
            let held = match self.call("lease", self.store.get(&path)).await {
                Ok(got) => match self.call("lease", got.bytes()).await {
                    Ok(b) => serde_json::from_slice::<LeaseBody>(&b).ok(),
                    Err(_) => return Claim::None,
                },
                Err(Fault::Absent) => continue, // released meanwhile: try again
                Err(_) => return Claim::None,
            };
            let now = clock::since_epoch().as_secs();
            if held.is_some_and(|l| l.expires > now) {
                self.count("lease", "theirs");
                return Claim::Theirs;
            }
            tracing::info!(%d, "taking over an expired lease");
            let _ = self.call("lease", self.store.delete(&path)).await;
        }
        Claim::None
    }

    async fn claim_by_listing(&self, d: &Digest) -> Claim {
        let dir = self.lease_dir(d);
        let mine = dir.child(self.owner.as_str());
        let put = Instant::now();
        if self
            .call("lease", self.store.put(&mine, self.lease_body()))
            .await
            .is_err()
        {
            return Claim::None;
        }
        // A contender's PUT slower than the wait could go unseen: when the store is slow
        // (ours took long), wait longer.
        tokio::time::sleep(SETTLE.max(put.elapsed() * 3)).await;
        let Ok(mut entries) = self.live_leases(&dir).await else {
            self.withdraw(&mine).await;
            return Claim::None;
        };
        entries.sort_by(|a, b| (a.last_modified, &a.location).cmp(&(b.last_modified, &b.location)));
        match entries.first() {
            Some(first) if first.location != mine => {
                self.withdraw(&mine).await;
                self.count("lease", "theirs");
                Claim::Theirs
            }
            _ => {
                self.count("lease", "mine");
                Claim::Mine(self.hold(mine))
            }
        }
    }

    /// The leases in `dir` younger than the lease lifetime.
    async fn live_leases(&self, dir: &Path) -> Result<Vec<object_store::ObjectMeta>, Fault> {
        let all = self
            .call("lease", self.store.list(Some(dir)).try_collect::<Vec<_>>())
            .await?;
        let oldest = chrono::DateTime::<chrono::Utc>::from(clock::now())
            - chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::MAX);
        Ok(all
            .into_iter()
            .filter(|m| m.last_modified > oldest)
            .collect())
    }

    /// Does some replica hold a live lease on `d`? (`false` when the store fails.)
    pub async fn lease_held(&self, d: &Digest) -> bool {
        self.live_leases(&self.lease_dir(d))
            .await
            .is_ok_and(|l| !l.is_empty())
    }

    /// Waits for another replica's fill of `d` to land in the bucket: `true` once it is
    /// there, `false` when its lease went away without it or `lease_wait` passed.
    pub async fn wait_for(&self, d: &Digest) -> bool {
        let blob = self.path("blobs", d);
        let dir = self.lease_dir(d);
        let start = Instant::now();
        while start.elapsed() < self.lease_wait {
            tokio::time::sleep(POLL).await;
            match self.call("wait", self.store.head(&blob)).await {
                Ok(_) => {
                    self.count("wait", "landed");
                    return true;
                }
                Err(Fault::Absent) => {}
                Err(_) => return false,
            }
            if let Ok(true) = self.live_leases(&dir).await.map(|l| l.is_empty()) {
                // Released: look once more (it may have landed just before), else give up.
                let landed = self.call("wait", self.store.head(&blob)).await.is_ok();
                self.count("wait", if landed { "landed" } else { "abandoned" });
                return landed;
            }
        }
        self.count("wait", "timeout");
        tracing::warn!(%d, wait = ?self.lease_wait, "another replica's fill did not land in time: fetching it here");
        false
    }

    /// Keeps the lease at `path` alive (rewritten every quarter of its lifetime) until it is
    /// released or dropped.
    fn hold(&self, path: Path) -> Lease {
        let (store, p, ttl) = (self.store.clone(), path.clone(), self.lease_ttl);
        let owner = self.owner.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep((ttl / 4).max(Duration::from_millis(100))).await;
                let _ = tokio::time::timeout(ttl / 4, store.put(&p, lease_body(&owner, ttl))).await;
            }
        });
        Lease {
            path,
            heartbeat: Some(task.abort_handle()),
        }
    }

    async fn withdraw(&self, path: &Path) {
        let _ = self.call("lease", self.store.delete(path)).await;
    }

    pub async fn release(&self, mut lease: Lease) {
        if let Some(h) = lease.heartbeat.take() {
            h.abort();
        }
        self.withdraw(&lease.path).await;
    }
}
/// A lease's content: who holds it, and until when unless refreshed.
fn lease_body(owner: &str, ttl: Duration) -> PutPayload {
    let body = LeaseBody {
        owner: owner.to_string(),
        expires: (clock::since_epoch() + ttl).as_secs(),
    };
    PutPayload::from(serde_json::to_vec(&body).expect("a lease serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bucket::testing::{keys, tier};
    use bytes::Bytes;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    #[tokio::test]
    async fn one_replica_wins_a_lease_until_it_releases_it() {
        let store = Arc::new(InMemory::new());
        let (a, b) = (
            tier(&store, Duration::from_secs(60), 1 << 30),
            tier(&store, Duration::from_secs(60), 1 << 30),
        );
        let d = Digest::sha256_of(b"layer");
        let Claim::Mine(lease) = a.claim(&d).await else {
            panic!("the first claim wins")
        };
        assert!(matches!(b.claim(&d).await, Claim::Theirs));
        assert!(
            matches!(a.claim(&d).await, Claim::Theirs),
            "even for its holder"
        );
        a.release(lease).await;
        assert!(matches!(b.claim(&d).await, Claim::Mine(_)));
        // The probe object is gone; the lease is under the prefix.
        assert_eq!(
            keys(&store, "mirror/leases").await,
            vec![format!("mirror/leases/sha256/{}/lease", d.hex())]
        );
    }

    #[tokio::test]
    async fn without_conditional_writes_the_oldest_entry_wins() {
        let store = Arc::new(InMemory::new());
        let replicas: Vec<_> = (0..3)
            .map(|_| {
                let t = tier(&store, Duration::from_secs(60), 1 << 30);
                t.conditional.store(NO, Ordering::Relaxed);
                t
            })
            .collect();
        let d = Digest::sha256_of(b"layer");
        let claims = futures_util::future::join_all(replicas.iter().map(|r| r.claim(&d))).await;
        let winners = claims
            .iter()
            .filter(|c| matches!(c, Claim::Mine(_)))
            .count();
        assert_eq!(winners, 1, "one winner among simultaneous contenders");
        assert_eq!(
            keys(&store, "mirror/leases").await.len(),
            1,
            "losers withdrew"
        );
        // A late contender loses to the live lease, and wins once it is released.
        let w = claims
            .iter()
            .position(|c| matches!(c, Claim::Mine(_)))
            .unwrap();
        let late = &replicas[(w + 1) % 3];
        assert!(matches!(late.claim(&d).await, Claim::Theirs));
        for c in claims {
            if let Claim::Mine(l) = c {
                replicas[w].release(l).await;
            }
        }
        assert!(keys(&store, "mirror/leases").await.is_empty());
        assert!(matches!(replicas[1].claim(&d).await, Claim::Mine(_)));
    }

    #[tokio::test]
    async fn a_held_lease_is_refreshed_and_a_dead_holders_lapses() {
        for conditional in [YES, NO] {
            let store = Arc::new(InMemory::new());
            let ttl = Duration::from_secs(2);
            let (a, b) = (tier(&store, ttl, 1 << 30), tier(&store, ttl, 1 << 30));
            for t in [&a, &b] {
                t.conditional.store(conditional, Ordering::Relaxed);
            }
            let d = Digest::sha256_of(b"layer");
            let Claim::Mine(lease) = a.claim(&d).await else {
                panic!("first claim")
            };
            tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
            assert!(
                matches!(b.claim(&d).await, Claim::Theirs),
                "refreshed by its holder (mode {conditional})"
            );
            // The holder dies: its heartbeat stops, the lease lapses.
            drop(lease);
            tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
            assert!(
                matches!(b.claim(&d).await, Claim::Mine(_)),
                "taken over (mode {conditional})"
            );
        }
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over() {
        let store = Arc::new(InMemory::new());
        let d = Digest::sha256_of(b"layer");
        let dead = tier(&store, Duration::ZERO, 1 << 30);
        assert!(matches!(dead.claim(&d).await, Claim::Mine(_)));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let live = tier(&store, Duration::from_secs(60), 1 << 30);
        assert!(matches!(live.claim(&d).await, Claim::Mine(_)));
    }

    #[tokio::test]
    async fn a_waiter_sees_the_blob_land_or_the_lease_go() {
        let store = Arc::new(InMemory::new());
        let (a, b) = (
            tier(&store, Duration::from_secs(60), 1 << 30),
            tier(&store, Duration::from_secs(60), 1 << 30),
        );
        let d = Digest::sha256_of(b"layer");
        let Claim::Mine(lease) = a.claim(&d).await else {
            panic!()
        };
        let waiting = tokio::spawn({
            let (b, d) = (b.clone(), d.clone());
            async move { b.wait_for(&d).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.put_manifest(&d, Bytes::from_static(b"layer"), "x/y")
            .await;
        assert!(waiting.await.unwrap(), "the blob landed");
        let (size, _) = b.get_blob(&d).await.unwrap();
        assert_eq!(size, 5);

        let e = Digest::sha256_of(b"other");
        let Claim::Mine(lease2) = a.claim(&e).await else {
            panic!()
        };
        let waiting = tokio::spawn({
            let (b, e) = (b.clone(), e.clone());
            async move { b.wait_for(&e).await }
        });
        a.release(lease2).await;
        assert!(!waiting.await.unwrap(), "released without the blob");
        a.release(lease).await;
    }
}
