//! Leases: which replica fetches a blob (or a manifest) that is in nobody's cache, and how
//! the others wait for it. The `Lease` guard keeps a held lease alive until it is released.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

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
    /// The store cannot arbitrate (it is down or failing): fetch without a lease.
    None,
}

/// A held lease on a blob's fill, refreshed in the background until it is released.
///
/// A guard: dropped without [`Bucket::release`] (the fetch failed, was cancelled, or
/// panicked), it still deletes its lease, so that other replicas need not wait for it to
/// expire. The heartbeat task does that: dropping the guard drops `stop`, which ends it.
pub struct Lease {
    /// Closed (sent or dropped) to make the heartbeat delete the lease and end.
    stop: Option<oneshot::Sender<()>>,
    /// The heartbeat, awaited by `release` so that the lease is gone when it returns.
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

/// A lease this replica wrote, as its heartbeat keeps it.
struct Held {
    store: Arc<dyn ObjectStore>,
    path: Path,
    owner: String,
    ttl: Duration,
    /// Bounds the deletion at the end.
    timeout: Duration,
    /// With conditional writes, the version of our last write of the lease: a refresh is a
    /// conditional update against it, so that it can never overwrite another replica's
    /// lease. `None` in the listing mode, where the entry's name is ours alone.
    version: Option<UpdateVersion>,
    /// When our last successful write was sent (its Last-Modified is no earlier), by which
    /// the holder knows when the others start to take its entry as dead.
    written: Instant,
}

#[derive(Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    /// Seconds since the epoch after which the lease may be taken over.
    expires: u64,
}

impl Bucket {
    /// Whether the store honours conditional writes, both `If-None-Match: *` (two creates of
    /// one probe object: the second must fail) and `If-Match` (an update against a version
    /// that is not the object's must fail): leases are created with the first and refreshed
    /// with the second. Probed once.
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
        let update = || {
            let other = UpdateVersion {
                e_tag: Some("\"ocicache-probe-not-a-version\"".into()),
                version: None,
            };
            self.store.put_opts(
                &probe,
                PutPayload::from_static(b"probe"),
                PutOptions::from(PutMode::Update(other)),
            )
        };
        let first = self.call("probe", create()).await;
        let verdict = match first {
            // Without an ETag, there is no version to refresh against.
            Ok(done) if done.e_tag.is_none() => Some(false),
            Ok(_) => match self.call("probe", create()).await {
                Err(Fault::Exists) => match self.call("probe", update()).await {
                    Err(Fault::Exists) => Some(true),
                    Ok(_) | Err(Fault::Unsupported | Fault::Absent) => Some(false),
                    Err(_) => None,
                },
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
                    tracing::info!("shared store honours conditional writes: leases are created only if absent");
                } else {
                    tracing::info!("shared store ignores conditional writes: leases are taken by listing (each contender writes its own entry, the oldest live one wins)");
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
            let written = Instant::now();
            let put = self
                .store
                .put_opts(&path, self.lease_body(), PutMode::Create.into());
            match self.call("lease", put).await {
                Ok(done) => {
                    self.count("lease", "mine");
                    return Claim::Mine(self.hold(path, Some(done.into()), written));
                }
                Err(Fault::Exists) => {}
                Err(_) => return Claim::None,
            }
            // Someone holds it: theirs, unless it has expired (its holder died).
            let (held, version) = match self.call("lease", self.store.get(&path)).await {
                Ok(got) => {
                    let version = UpdateVersion {
                        e_tag: got.meta.e_tag.clone(),
                        version: got.meta.version.clone(),
                    };
                    match self.call("lease", got.bytes()).await {
                        Ok(b) => (serde_json::from_slice::<LeaseBody>(&b).ok(), version),
                        Err(_) => return Claim::None,
                    }
                }
                Err(Fault::Absent) => continue, // released meanwhile: try again
                Err(_) => return Claim::None,
            };
            let now = clock::since_epoch().as_secs();
            if held.is_some_and(|l| l.expires > now) {
                self.count("lease", "theirs");
                return Claim::Theirs;
            }
            // Taken over by a conditional update of the expired version we read: if its
            // holder refreshed it meanwhile, or another replica took it over first, this
            // fails and the next round finds their live lease.
            if version.e_tag.is_none() {
                return Claim::None; // no version to update against (the probe saw one)
            }
            tracing::info!(%d, "taking over an expired lease");
            let written = Instant::now();
            let put =
                self.store
                    .put_opts(&path, self.lease_body(), PutMode::Update(version).into());
            match self.call("lease", put).await {
                Ok(done) => {
                    self.count("lease", "mine");
                    return Claim::Mine(self.hold(path, Some(done.into()), written));
                }
                Err(Fault::Exists | Fault::Absent) => {}
                Err(_) => return Claim::None,
            }
        }
        Claim::None
    }

    async fn claim_by_listing(&self, d: &Digest) -> Claim {
        let dir = self.lease_dir(d);
        let mine = dir.child(self.owner.as_str());
        let written = Instant::now();
        if self
            .call("lease", self.store.put(&mine, self.lease_body()))
            .await
            .is_err()
        {
            return Claim::None;
        }
        // A contender's PUT slower than the wait could go unseen: when the store is slow
        // (ours took long), wait longer.
        tokio::time::sleep(SETTLE.max(written.elapsed() * 3)).await;
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
                Claim::Mine(self.hold(mine, None, written))
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

    /// Keeps the lease at `path` (written at `written`, as version `version` with conditional
    /// writes) alive, refreshed every quarter of its lifetime, until it is released or
    /// dropped, or found to be another replica's now.
    fn hold(&self, path: Path, version: Option<UpdateVersion>, written: Instant) -> Lease {
        let held = Held {
            store: self.store.clone(),
            path,
            owner: self.owner.clone(),
            ttl: self.lease_ttl,
            timeout: self.timeout,
            version,
            written,
        };
        let (stop, stopped) = oneshot::channel();
        Lease {
            stop: Some(stop),
            heartbeat: Some(tokio::spawn(held.keep(stopped))),
        }
    }

    async fn withdraw(&self, path: &Path) {
        let _ = self.call("lease", self.store.delete(path)).await;
    }

    /// Deletes the lease (unless it is no longer ours) and stops refreshing it.
    pub async fn release(&self, mut lease: Lease) {
        drop(lease.stop.take());
        if let Some(heartbeat) = lease.heartbeat.take() {
            let _ = heartbeat.await;
        }
    }
}

impl Held {
    /// The heartbeat: refreshes the lease until `stop` closes, then deletes it; or gives it
    /// up when it is no longer ours. Never writes a lease that is not its own any more.
    async fn keep(mut self, mut stop: oneshot::Receiver<()>) {
        let every = (self.ttl / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(every) => {}
            }
            if !self.refresh().await {
                tracing::warn!(lease = %self.path, "lost a lease: another replica may fetch the same blob");
                return;
            }
        }
        self.delete().await;
    }

    /// Rewrites the lease with a new expiry; `false` once it is not ours any more.
    async fn refresh(&mut self) -> bool {
        let started = Instant::now();
        let put = match &self.version {
            // Only if it is still the version we wrote: another replica that took it over
            // (it expired while we hung) has changed it.
            Some(v) => {
                let mode = PutMode::Update(v.clone());
                let body = lease_body(&self.owner, self.ttl);
                let put = self.store.put_opts(&self.path, body, mode.into());
                match tokio::time::timeout(self.ttl / 4, put).await {
                    Ok(Err(
                        object_store::Error::Precondition { .. }
                        | object_store::Error::NotFound { .. },
                    )) => return self.still_ours().await,
                    other => other,
                }
            }
            None => {
                // Our entry is ours alone, but once it is older than the lifetime the others
                // take it as dead and may have elected another holder: rewriting it would
                // revive it beside theirs. Give it up (and delete it, as it is dead).
                let age = started.saturating_duration_since(self.written);
                if age >= self.ttl {
                    self.delete().await;
                    return false;
                }
                // Nor may a late PUT land after it died.
                let put = self
                    .store
                    .put(&self.path, lease_body(&self.owner, self.ttl));
                tokio::time::timeout((self.ttl / 4).min(self.ttl - age), put).await
            }
        };
        if let Ok(Ok(done)) = put {
            if self.version.is_some() {
                self.version = Some(done.into());
            }
            self.written = started;
        }
        // A failed or slow refresh is tried again next time; the lease lives until then.
        true
    }

    /// After a conditional refresh failed: is the lease still ours? It is when it holds our
    /// name: a refresh of ours that timed out may have landed all the same, and changed the
    /// version. Then its version is ours again.
    async fn still_ours(&mut self) -> bool {
        let read = async {
            let got = self.store.get(&self.path).await?;
            let meta = got.meta.clone();
            Ok::<_, object_store::Error>((meta, got.bytes().await?))
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok((meta, body))) => {
                let body = serde_json::from_slice::<LeaseBody>(&body).ok();
                if !body.is_some_and(|b| b.owner == self.owner) {
                    return false;
                }
                self.version = Some(UpdateVersion {
                    e_tag: meta.e_tag,
                    version: meta.version,
                });
                true
            }
            Ok(Err(object_store::Error::NotFound { .. })) => false,
            // Cannot tell: the next refresh will.
            _ => true,
        }
    }

    /// Deletes the lease, if it is still ours.
    async fn delete(&self) {
        let delete = async {
            if self.version.is_some() {
                // No conditional delete in object_store: check that it holds our name first.
                // (A takeover between the two is possible only once the lease expired.)
                let got = self.store.get(&self.path).await?;
                let body = serde_json::from_slice::<LeaseBody>(&got.bytes().await?).ok();
                if !body.is_some_and(|b| b.owner == self.owner) {
                    return Ok(());
                }
            }
            self.store.delete(&self.path).await
        };
        let _ = tokio::time::timeout(self.timeout, delete).await;
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
    use crate::cache::bucket::testing::{keys, tier, TestStore};
    use crate::cache::bucket::Bucket;
    use bytes::Bytes;
    use object_store::ObjectStore;

    #[tokio::test(start_paused = true)]
    async fn one_replica_wins_a_lease_until_it_releases_it() {
        let store = TestStore::new();
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
        let Claim::Mine(_held) = b.claim(&d).await else {
            panic!("released: the next claim wins")
        };
        // The probe object is gone; the lease is under the prefix.
        assert_eq!(
            keys(&store, "mirror/leases").await,
            vec![format!("mirror/leases/sha256/{}/lease", d.hex())]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_conditional_writes_the_oldest_entry_wins() {
        let store = TestStore::new();
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

    #[tokio::test(start_paused = true)]
    async fn a_held_lease_is_refreshed_and_a_dead_holders_lapses() {
        for conditional in [YES, NO] {
            let store = TestStore::new();
            let a_store = store.view();
            let ttl = Duration::from_secs(2);
            let (a, b) = (tier(&a_store, ttl, 1 << 30), tier(&store, ttl, 1 << 30));
            for t in [&a, &b] {
                t.conditional.store(conditional, Ordering::Relaxed);
            }
            let d = Digest::sha256_of(b"layer");
            let Claim::Mine(_lease) = a.claim(&d).await else {
                panic!("first claim")
            };
            tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
            assert!(
                matches!(b.claim(&d).await, Claim::Theirs),
                "refreshed by its holder (mode {conditional})"
            );
            // The holder dies (its calls hang: no refresh, no delete), the lease lapses.
            a_store.hang(true);
            tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
            assert!(
                matches!(b.claim(&d).await, Claim::Mine(_)),
                "taken over (mode {conditional})"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_taken_over() {
        let store = TestStore::new();
        let d = Digest::sha256_of(b"layer");
        let dead_store = store.view();
        let dead = tier(&dead_store, Duration::ZERO, 1 << 30);
        let Claim::Mine(_dead) = dead.claim(&d).await else {
            panic!("first claim")
        };
        dead_store.hang(true);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let live = tier(&store, Duration::from_secs(60), 1 << 30);
        assert!(matches!(live.claim(&d).await, Claim::Mine(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_sees_the_blob_land_or_the_lease_go() {
        let store = TestStore::new();
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

    /// The live leases of `d`, as `by` sees them: (key, owner).
    async fn live_owners(by: &Bucket, store: &TestStore, d: &Digest) -> Vec<(String, String)> {
        let mut owners = Vec::new();
        for m in by.live_leases(&by.lease_dir(d)).await.unwrap() {
            let got = store.get(&m.location).await.unwrap();
            let body: LeaseBody = serde_json::from_slice(&got.bytes().await.unwrap()).unwrap();
            owners.push((m.location.to_string(), body.owner));
        }
        owners
    }

    /// Regression: a refresh was an unconditional PUT, so a holder that hung past the
    /// lease's lifetime, while another replica took the lease over, overwrote (or revived)
    /// it when it woke up: two replicas fetching, and waiters misled.
    #[tokio::test(start_paused = true)]
    async fn a_holder_that_hung_never_overwrites_the_lease_taken_over() {
        for conditional in [YES, NO] {
            let store = TestStore::new();
            let a_store = store.view();
            let (a, b, c) = (
                tier(&a_store, LEASE_TTL, 1 << 30),
                tier(&store, LEASE_TTL, 1 << 30),
                tier(&store, LEASE_TTL, 1 << 30),
            );
            for t in [&a, &b, &c] {
                t.conditional.store(conditional, Ordering::Relaxed);
            }
            let d = Digest::sha256_of(b"layer");
            let Claim::Mine(a_lease) = a.claim(&d).await else {
                panic!("A claims first")
            };
            // A hangs past the lease's lifetime: its heartbeat's calls stall.
            a_store.hang(true);
            tokio::time::advance(LEASE_TTL + Duration::from_secs(1)).await;
            let Claim::Mine(_b_lease) = b.claim(&d).await else {
                panic!("B takes the expired lease over (mode {conditional})")
            };
            let before = live_owners(&b, &store, &d).await;
            assert_eq!(before.len(), 1, "{before:?}");
            assert_eq!(before[0].1, b.owner, "B's lease (mode {conditional})");
            // A wakes up: its stalled refresh and the next ones run.
            a_store.hang(false);
            tokio::time::sleep(LEASE_TTL / 2).await;
            let after = live_owners(&b, &store, &d).await;
            assert_eq!(after, before, "B's lease is intact (mode {conditional})");
            assert!(b.lease_held(&d).await);
            assert!(
                matches!(c.claim(&d).await, Claim::Theirs),
                "B still holds it (mode {conditional})"
            );
            // A's end (its upload done) does not delete B's lease either.
            a.release(a_lease).await;
            assert_eq!(
                live_owners(&b, &store, &d).await,
                before,
                "mode {conditional}"
            );
            assert!(matches!(c.claim(&d).await, Claim::Theirs));
        }
    }

    /// A refresh of ours that timed out but landed changed the lease's version: the next
    /// refresh's precondition fails, and the holder must not take that for a takeover.
    #[tokio::test(start_paused = true)]
    async fn a_refresh_that_landed_late_keeps_the_lease() {
        let store = TestStore::new();
        let a_store = store.view();
        let (a, b) = (
            tier(&a_store, LEASE_TTL, 1 << 30),
            tier(&store, LEASE_TTL, 1 << 30),
        );
        let d = Digest::sha256_of(b"layer");
        let Claim::Mine(lease) = a.claim(&d).await else {
            panic!("A claims first")
        };
        assert_eq!(a.conditional.load(Ordering::Relaxed), YES);
        // The first refresh (at a quarter of the lifetime) lands, but its answer comes after
        // its timeout (another quarter).
        a_store.hang_answers(true);
        tokio::time::sleep(LEASE_TTL / 2 + Duration::from_secs(1)).await;
        a_store.hang_answers(false);
        // Long after: A kept refreshing it, and releases it.
        tokio::time::sleep(LEASE_TTL * 2).await;
        assert!(matches!(b.claim(&d).await, Claim::Theirs), "still A's");
        a.release(lease).await;
        assert!(!b.lease_held(&d).await, "deleted by its holder");
        assert!(matches!(b.claim(&d).await, Claim::Mine(_)));
    }

    /// Regression: a lease dropped without `release` (a manifest fetch cancelled mid-way)
    /// stayed until it expired, and the other replicas waited for it.
    #[tokio::test(start_paused = true)]
    async fn a_lease_dropped_without_release_is_deleted_at_once() {
        for conditional in [YES, NO] {
            for panics in [false, true] {
                let store = TestStore::new();
                let (a, b) = (
                    tier(&store, LEASE_TTL, 1 << 30),
                    tier(&store, LEASE_TTL, 1 << 30),
                );
                for t in [&a, &b] {
                    t.conditional.store(conditional, Ordering::Relaxed);
                }
                let d = Digest::sha256_of(b"manifest");
                let (claimed, is_claimed) = oneshot::channel();
                let fetch = tokio::spawn({
                    let (a, d) = (a.clone(), d.clone());
                    async move {
                        let Claim::Mine(_lease) = a.claim(&d).await else {
                            panic!("A claims first")
                        };
                        claimed.send(()).unwrap();
                        if panics {
                            panic!("the fetch panics while it holds the lease");
                        }
                        std::future::pending::<()>().await;
                    }
                });
                is_claimed.await.unwrap();
                if !panics {
                    fetch.abort(); // the client went away
                }
                assert!(fetch.await.is_err());
                let gone = tokio::time::timeout(Duration::from_secs(1), async {
                    while b.lease_held(&d).await {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await;
                assert!(
                    gone.is_ok(),
                    "deleted at once, not left to expire (mode {conditional}, panics {panics})"
                );
                let started = Instant::now();
                assert!(matches!(b.claim(&d).await, Claim::Mine(_)));
                assert!(started.elapsed() < Duration::from_secs(1));
            }
        }
    }

    /// Regression: every start logged "no blob leases, replicas may fetch a blob more than
    /// once" for a store that ignores conditional writes, although the listing lease works.
    #[tokio::test(start_paused = true)]
    async fn the_probe_finds_the_lease_mode_and_logs_what_is_true() {
        for (if_none_match, if_match, mode) in [
            (true, true, YES),
            (false, false, NO),
            // A lease could be created, but not refreshed safely.
            (true, false, NO),
        ] {
            let (logs, _guard) = crate::test_logs::Logs::capture();
            let store = TestStore::with_conditions(if_none_match, if_match);
            let t: Arc<Bucket> = tier(&store, LEASE_TTL, 1 << 30);
            let d = Digest::sha256_of(b"layer");
            let Claim::Mine(lease) = t.claim(&d).await else {
                panic!("the only claim wins")
            };
            assert_eq!(t.conditional.load(Ordering::Relaxed), mode);
            let entry = if mode == YES {
                "lease"
            } else {
                t.owner.as_str()
            };
            assert_eq!(
                keys(&store, "mirror/leases").await,
                vec![format!("mirror/leases/sha256/{}/{entry}", d.hex())]
            );
            t.release(lease).await;
            let text = logs.text();
            assert!(!text.contains("no blob leases"), "{text}");
            if mode == YES {
                assert!(text.contains("honours conditional writes"), "{text}");
            } else {
                assert!(
                    text.contains("ignores conditional writes: leases are taken by listing"),
                    "{text}"
                );
            }
        }
    }
}
