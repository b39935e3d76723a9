//! The cache: where a blob or a manifest comes from, decided here once. [`Cache::blob`] and
//! [`Cache::head`] answer a blob from the local tier, a redirect to a tier behind it, or a
//! fill fed by that tier or, failing it, by the upstream; [`Cache::manifest`] (in `records`)
//! answers a manifest from the first tier that has it.
//!
//! The tiers, as one list (`tier`, the trait): the local disk with its LRU index (`local`,
//! always first), then the S3-compatible bucket shared by replicas (`bucket`, optional).
//! Fills (`fill`) run on the fixed disk pool of `disk`; `records` keeps manifests and small
//! records through the tiers; `outcome` says how a request was answered; `admin` is the
//! offline maintenance of a cache folder; `pins` the images the bound never evicts;
//! `inventory` what is cached and its removal, for the admin API.

pub mod admin;
pub mod bucket;
mod disk;
pub mod fill;
pub mod inventory;
pub mod local;
pub mod outcome;
pub mod peers;
pub mod pins;
pub mod records;
pub mod source;
pub mod tier;

use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::coalesce::Flights;
use crate::config::{CacheConfig, DEFAULT_MAX_FILLS};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reference::{Digest, Name};
use crate::upstream::Upstream;
use bucket::Bucket;
use fill::Fill;
pub use fill::{Fetched, Origin};
use index::Index;
pub use local::{index, store};
pub use outcome::Outcome;
pub use records::Record;
pub use source::{Progress, Reader, Source};
use store::Store;
use tier::{Claim, Lease, Tier};

/// Where a blob GET is answered from.
pub enum Found {
    /// The local tier, or a fill under way.
    Source(Source),
    /// A presigned URL of the bucket's copy.
    Redirect(url::Url),
}

/// What a `HEAD` of a blob needs.
pub struct Head {
    pub size: u64,
    /// The media type, when the blob is a cached manifest.
    pub media_type: Option<String>,
    /// Whether the upstream was asked.
    pub from_upstream: bool,
}

pub struct Cache {
    /// The local tier's store and index, which fills write into and hits are served from.
    pub store: Arc<Store>,
    pub index: Index,
    /// Every tier, in order: the local one first, then those behind it (the bucket shared
    /// with other replicas, `[cache.s3]`). The one list of tiers: nothing outside the cache
    /// holds or checks one.
    tiers: Vec<Arc<dyn Tier>>,
    /// Fills under way, by digest: the same coalescing as manifests' resolutions (a fill's
    /// guard ends its entry).
    fills: Flights<Digest, Fill>,
    metrics: Arc<Metrics>,
    stall_timeout: Duration,
    fill_deadline: Duration,
    /// Turns to run a fill (`cache.max_fills`). tokio's semaphore is fair: fills waiting
    /// for a turn get it in the order they asked.
    turns: tokio::sync::Semaphore,
    /// Images whose blobs the index never evicts, kept in `pins.json` (see `pins`).
    pins: pins::Pins,
    /// The other replicas on the bucket, when they stream fills from each other
    /// (`[cache.s3.peers]`); set once at open.
    peers: std::sync::OnceLock<Arc<peers::Peers>>,
}

/// The bounds of fills, from `[cache]`.
#[derive(Debug, Clone, Copy)]
pub struct FillLimits {
    /// A fill that receives no byte for this long fails.
    pub stall_timeout: Duration,
    /// A fill not done this long after it started (its wait for a turn included) fails.
    pub fill_deadline: Duration,
    /// Fills running at once; the others wait their turn.
    pub max_fills: usize,
}

impl Cache {
    /// Opens the store and removes temp files left by a crash, then returns at once: the
    /// index is rebuilt from the disk in recency order on a thread of its own (see
    /// [`index::Scan`]; `index.scan_done()` tells when), evicting what does not fit
    /// `max_size` once it ends. Meanwhile a blob on disk is served and indexed when asked.
    pub fn open(cfg: &CacheConfig, metrics: Arc<Metrics>) -> io::Result<Arc<Cache>> {
        let shared = match &cfg.s3 {
            Some(s3) => Some(Bucket::open(s3, bucket::LEASE_TTL, metrics.clone())?),
            None => None,
        };
        let limits = FillLimits {
            stall_timeout: cfg.stall_timeout.0,
            fill_deadline: cfg.fill_deadline.0,
            max_fills: cfg.max_fills,
        };
        let peers = match (&cfg.s3, &shared) {
            (Some(s3), Some(bucket)) => match &s3.peers {
                Some(p) => Some(peers::Peers::new(
                    p,
                    bucket.clone(),
                    cfg.stall_timeout.0,
                    &metrics,
                )?),
                None => None,
            },
            _ => None,
        };
        let cache = Self::open_with(&cfg.dir, cfg.max_size.0, limits, metrics, shared)?;
        if let Some(p) = peers {
            cache.set_peers(p);
        }
        Ok(cache)
    }

    /// Streams fills from the other replicas of `peers` (once, at open).
    pub fn set_peers(&self, peers: Arc<peers::Peers>) {
        let _ = self.peers.set(peers);
    }

    /// The other replicas, when fills stream between them.
    pub fn peers(&self) -> Option<&Arc<peers::Peers>> {
        self.peers.get()
    }

    /// `open` from parts, with the default `max_fills`; the scan starts on its thread.
    pub fn open_at(
        dir: &Path,
        max_size: u64,
        stall_timeout: Duration,
        fill_deadline: Duration,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Bucket>>,
    ) -> io::Result<Arc<Cache>> {
        let limits = FillLimits {
            stall_timeout,
            fill_deadline,
            max_fills: DEFAULT_MAX_FILLS,
        };
        Self::open_with(dir, max_size, limits, metrics, shared)
    }

    /// A cache in `dir` (1 GiB bound, 5 s stall timeout, 60 s fill deadline) in front of
    /// `bucket`: for tests of the tiers together.
    #[cfg(test)]
    pub(crate) fn for_test(dir: &Path, bucket: Option<Arc<Bucket>>) -> Arc<Cache> {
        let metrics = Arc::new(Metrics::new());
        let (five, sixty) = (Duration::from_secs(5), Duration::from_secs(60));
        Self::open_at(dir, 1 << 30, five, sixty, metrics, bucket).unwrap()
    }

    /// `open` from parts; the scan starts on its thread.
    pub fn open_with(
        dir: &Path,
        max_size: u64,
        limits: FillLimits,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Bucket>>,
    ) -> io::Result<Arc<Cache>> {
        let (cache, scan) = Self::open_unindexed(dir, max_size, limits, metrics, shared)?;
        scan.spawn();
        Ok(cache)
    }

    /// The cache with an empty index, and the scan that rebuilds it, not started: the
    /// caller runs it (a test steps it through [`index::Scan::gate`]).
    pub fn open_unindexed(
        dir: &Path,
        max_size: u64,
        limits: FillLimits,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Bucket>>,
    ) -> io::Result<(Arc<Cache>, index::Scan)> {
        let FillLimits {
            stall_timeout,
            fill_deadline,
            max_fills,
        } = limits;
        let store = Arc::new(Store::open(dir)?);
        let index = Index::new(max_size, store.clone(), metrics.clone());
        let pins = pins::Pins::load(dir)?;
        index.set_pinned(pins.digests());
        let scan = index::Scan::new(index.clone(), store.clone());
        let local = Arc::new(local::Local {
            store: store.clone(),
            index: index.clone(),
        });
        let mut tiers: Vec<Arc<dyn Tier>> = vec![local];
        if let Some(bucket) = shared {
            tiers.push(bucket);
        }
        let cache = Arc::new(Cache {
            store,
            index,
            tiers,
            fills: Flights::default(),
            metrics,
            stall_timeout,
            fill_deadline,
            turns: tokio::sync::Semaphore::new(max_fills),
            pins,
            peers: std::sync::OnceLock::new(),
        });
        Ok((cache, scan))
    }

    /// A committed blob, with recency refreshed, or `None`.
    pub async fn open_cached(&self, digest: &Digest) -> Result<Option<Source>, Error> {
        // On this thread, as nginx opens a file it serves: a few metadata calls on a folder
        // whose entries are in memory take microseconds, where a hop to the blocking pool
        // and back cost two thread wake-ups per hit (1 MiB blobs to one client: a third
        // less CPU per GB without it). A disk that must read a directory block stalls this
        // worker for that read, not the others.
        let Some((file, size)) = self.store.open_blob(digest)? else {
            return Ok(None);
        };
        store::touch(&file);
        let source = Source::committed(file, size, self.store.media_type(digest));
        if !self.index.contains(digest) {
            // Written by another path (a manifest), or on disk but not yet reached by the
            // scan at start: index it now, as the most recently used (the scan will leave it
            // there).
            self.index.insert(digest.clone(), size);
        } else {
            self.index.touch(digest);
        }
        Ok(Some(source))
    }

    /// Where a blob GET is answered from, decided here once: the local tier (or, when a
    /// tier behind it redirects and is known to hold the blob, a redirect to it, which costs
    /// no call); else (offline: nowhere) a redirect to a tier behind that holds it; else a
    /// fill, fed by a tier behind or the upstream `upstream`. `upstream` is `None` offline.
    pub async fn blob(
        self: &Arc<Self>,
        digest: &Digest,
        upstream: Option<(&Arc<Upstream>, &Name)>,
    ) -> Result<Found, Error> {
        if let Some(src) = self.open_cached(digest).await? {
            if upstream.is_some() {
                if let Some(url) = self.redirect(digest, true).await {
                    // Not a hit: the bytes come from the bucket (which the redirect touched).
                    return Ok(Found::Redirect(url));
                }
            }
            self.count_hit(digest);
            return Ok(Found::Source(src));
        }
        let Some((up, name)) = upstream else {
            return self.offline_fill(digest).await.map(Found::Source);
        };
        if let Some(url) = self.redirect(digest, false).await {
            return Ok(Found::Redirect(url));
        }
        self.open_or_fill(digest, up, name).await.map(Found::Source)
    }

    /// Offline, a blob not on local disk: a fill fed by a tier behind (the bucket) if it
    /// has it, else `BLOB_UNKNOWN`. Never the upstream.
    async fn offline_fill(self: &Arc<Self>, digest: &Digest) -> Result<Source, Error> {
        let unknown = || {
            Error::client(
                crate::error::ErrorCode::BlobUnknown,
                "blob not cached (offline)",
            )
        };
        if self.behind().is_empty() {
            return Err(unknown());
        }
        let source = || {
            let (this, d) = (self.clone(), digest.clone());
            async move { this.fill_from_behind(&d).await.ok_or_else(unknown) }
        };
        self.open_or_start(digest, source).await
    }

    /// A fill's body from the first tier behind that has `digest`.
    async fn fill_from_behind(&self, digest: &Digest) -> Option<Fetched> {
        for tier in self.behind() {
            if let Some((size, body)) = tier.get_blob(digest).await {
                return Some(Fetched {
                    size: Some(size),
                    body,
                    origin: Origin::Shared,
                    source: format!("{} tier", tier.name()),
                });
            }
        }
        None
    }

    /// For a peer's request: `digest` committed here, or the fill under way, or (given the
    /// upstream and name to fetch it from) a new fill fed by the bucket or the upstream,
    /// never by another peer (two replicas that disagree on the owner cannot loop).
    /// `None`: not here, and nothing to fetch it from.
    pub async fn for_peer(
        self: &Arc<Self>,
        digest: &Digest,
        upstream: Option<(&Arc<Upstream>, &Name)>,
    ) -> Result<Option<Source>, Error> {
        if let Some(src) = self.open_cached(digest).await? {
            return Ok(Some(src));
        }
        if let Some(fill) = self.fills.get(digest) {
            return Ok(Some(Source::filling(&fill)));
        }
        let Some((up, name)) = upstream else {
            return Ok(None);
        };
        let source = || {
            let (up, name, d) = (up.clone(), name.clone(), digest.clone());
            let fetch = async move {
                let body = up.blob(&name, &d, None).await?;
                Ok(Fetched::from_upstream(&up.name, body))
            };
            self.clone().source(digest.clone(), fetch, None)
        };
        self.open_or_start(digest, source).await.map(Some)
    }

    /// The tiers behind the local one.
    fn behind(&self) -> &[Arc<dyn Tier>] {
        &self.tiers[1..]
    }

    /// A redirect to a tier behind that holds `digest` (see [`Tier::redirect`]).
    async fn redirect(&self, digest: &Digest, known_only: bool) -> Option<url::Url> {
        for tier in self.behind() {
            if let Some(url) = tier.redirect(digest, known_only).await {
                return Some(url);
            }
        }
        None
    }

    /// Starts the background work of the tiers (the bucket's GC).
    pub fn start(&self) {
        for tier in self.behind() {
            tier.clone().start();
        }
    }

    /// A blob served from the local tier: counted, and its use marked in the bucket.
    async fn local_hit(&self, digest: &Digest) -> Result<Option<Source>, Error> {
        let found = self.open_cached(digest).await?;
        if found.is_some() {
            self.count_hit(digest);
        }
        Ok(found)
    }

    /// Counts a hit of the local tier and marks the use in the tiers behind.
    fn count_hit(&self, digest: &Digest) {
        self.metrics.hit("blob");
        for tier in self.behind() {
            tier.touch(digest);
        }
    }

    /// Serves `digest` of `name` from the cache or from a fill: the one under way, or a new
    /// one fed by the bucket when it has the blob, else by the replica responsible for it,
    /// else by the upstream `up`.
    pub async fn open_or_fill(
        self: &Arc<Self>,
        digest: &Digest,
        up: &Arc<Upstream>,
        name: &Name,
    ) -> Result<Source, Error> {
        let source = || {
            let (up, name, d) = (up.clone(), name.clone(), digest.clone());
            let ask = Some((up.name.clone(), name.clone()));
            let fetch = async move {
                let body = up.blob(&name, &d, None).await?;
                Ok(Fetched::from_upstream(&up.name, body))
            };
            self.clone().source(digest.clone(), fetch, ask)
        };
        let found = self.open_or_start(digest, source).await;
        if let Some(fill) = self.fills.get(digest) {
            // For the admin API's list of fills: the first repository to ask names it.
            fill.repository
                .get_or_init(|| format!("{}/{name}", up.name));
        }
        found
    }

    /// `open_or_fill` with the source of a new fill made by `source` (called only when a new
    /// fill starts).
    async fn open_or_start<S>(
        self: &Arc<Self>,
        digest: &Digest,
        source: impl FnOnce() -> S,
    ) -> Result<Source, Error>
    where
        S: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        if let Some(src) = self.local_hit(digest).await? {
            return Ok(src);
        }
        let mut task = None;
        let fill = self.fills.join_or_start(digest, || {
            // A fill may have committed since we looked: check under the lock.
            if self.store.blob_path(digest).exists() {
                return Ok::<_, io::Error>(None);
            }
            let (fill, unspawned) = self.start_fill(digest.clone(), source())?;
            task = Some(unspawned);
            Ok(Some(fill))
        })?;
        // Outside the lock (see `Unspawned`).
        if let Some(task) = task {
            task.spawn();
        }
        let Some(fill) = fill else {
            return match self.open_cached(digest).await? {
                Some(src) => Ok(src),
                None => Err(io::Error::other("blob vanished while opening it").into()),
            };
        };
        self.metrics.miss("blob");
        fill.joined
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Source::filling(&fill))
    }

    /// Where a new fill of `digest` reads from: a tier behind the local one if it has the
    /// blob; else, with peers, the replica responsible for it (`ask`: the upstream's and
    /// the repository's names it fetches it as; `None` for a fill a peer asked for, which
    /// never asks a peer), falling back to the upstream; else the upstream, by this replica
    /// if it wins the blob's lease (or nobody arbitrates), or the tier again once the
    /// replica that won it has landed it there.
    async fn source<F>(
        self: Arc<Self>,
        digest: Digest,
        fetch: F,
        ask: Option<(String, Name)>,
    ) -> Result<Fetched, Error>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let from_tier = |tier: &Arc<dyn Tier>, (size, body)| Fetched {
            size: Some(size),
            body,
            origin: Origin::Shared,
            source: format!("{} tier", tier.name()),
        };
        if let Some(peers) = self.peers.get() {
            // The responsible replica looks in the bucket itself: asking it first saves a
            // call; the bucket is asked here only when it fails.
            if let Some(fetched) = peers::fill_source(peers, &digest, ask.as_ref()).await {
                return Ok(fetched);
            }
        }
        if let Some(fetched) = self.fill_from_behind(&digest).await {
            return Ok(fetched);
        }
        if let Some(peers) = self.peers.get() {
            if peers.owner(&peers::digest_key(&digest)) != peers::Owner::Unknown {
                // Ownership decided who fetches: no lease.
                return fetch.await;
            }
        }
        let mut lease = None;
        if let Some(tier) = self.behind().first() {
            match tier.claim(&digest).await {
                Claim::Mine(l) => lease = Some(l),
                Claim::Theirs => {
                    if tier.wait_for(&digest).await {
                        if let Some(found) = tier.get_blob(&digest).await {
                            return Ok(from_tier(tier, found));
                        }
                    }
                }
                Claim::None => {}
            }
        }
        match fetch.await {
            Ok(mut fetched) => {
                fetched.origin = Origin::Upstream { lease };
                Ok(fetched)
            }
            Err(e) => {
                if let (Some(tier), Some(lease)) = (self.behind().first(), lease) {
                    tier.release(lease).await;
                }
                Err(e)
            }
        }
    }

    /// A fill from the upstream is under way: the tiers behind keep it once verified (the
    /// first one under `lease`, which it granted). With peers and no lease, the other
    /// replicas stream it from here, not from the bucket: it is kept once this replica is
    /// idle, so that the upload stays off the way of the pull under way.
    fn keep_behind(self: &Arc<Self>, digest: &Digest, source: &Source, mut lease: Option<Lease>) {
        if lease.is_none() && self.peers().is_some() {
            let cache = Arc::downgrade(self);
            let idle: tier::Idle =
                Arc::new(move || cache.upgrade().map_or(true, |c| c.fills_in_flight() == 0));
            for tier in self.behind() {
                tier.clone()
                    .keep_when_idle(digest.clone(), source.clone(), idle.clone());
            }
            return;
        }
        for tier in self.behind() {
            tier.clone()
                .keep(digest.clone(), source.clone(), lease.take());
        }
    }

    /// What a tier behind fed a fill proved wrong: it is dropped there.
    async fn discard_behind(&self, digest: &Digest) {
        for tier in self.behind() {
            tier.discard(digest).await;
        }
    }

    /// The size of `digest` if it is cached or its fill knows it, without starting anything.
    pub async fn peek_size(&self, digest: &Digest) -> Result<Option<(u64, Option<String>)>, Error> {
        if let Some(mut src) = self.open_cached(digest).await? {
            let size = src.size().await?;
            return Ok(Some((size, src.media_type.clone())));
        }
        let fill = self.fills.get(digest);
        Ok(match fill.map(|f| f.progress()) {
            Some(Progress::Streaming { size: Some(s), .. }) | Some(Progress::Done { size: s }) => {
                Some((s, None))
            }
            _ => {
                for tier in self.behind() {
                    if let Some(size) = tier.head_blob(digest).await {
                        return Ok(Some((size, None)));
                    }
                }
                None
            }
        })
    }

    /// A blob's size and media type without starting a download: from the local tier, a
    /// fill that knows it, the bucket, else (when `upstream` is given, i.e. not offline) the
    /// upstream's answer to a `HEAD`.
    pub async fn head(
        &self,
        digest: &Digest,
        upstream: Option<(&Arc<Upstream>, &Name)>,
    ) -> Result<Head, Error> {
        if let Some((size, media_type)) = self.peek_size(digest).await? {
            return Ok(Head {
                size,
                media_type,
                from_upstream: false,
            });
        }
        let Some((up, name)) = upstream else {
            return Err(Error::client(
                crate::error::ErrorCode::BlobUnknown,
                "blob not cached (offline)",
            ));
        };
        Ok(Head {
            size: up.blob_size(name, digest).await?,
            media_type: None,
            from_upstream: true,
        })
    }

    /// Can the local tier write (a temp file made and removed)? For `/readyz`.
    pub async fn writable(&self) -> bool {
        let store = self.store.clone();
        let made = tokio::task::spawn_blocking(move || {
            let (_, path) = store.temp()?;
            std::fs::remove_file(path)
        })
        .await;
        matches!(made, Ok(Ok(())))
    }

    /// While the index of the local tier is rebuilt at start: the blobs scanned so far.
    pub fn scan_under_way(&self) -> Option<u64> {
        (!self.index.scan_done()).then(|| self.index.scanned())
    }

    /// Bytes and blobs in the local tier, for the metrics.
    pub fn usage(&self) -> (u64, u64) {
        self.index.usage()
    }

    /// Fills under way (for shutdown and tests).
    pub fn fills_in_flight(&self) -> usize {
        self.fills.len()
    }

    /// At shutdown: waits up to `deadline` for the fills under way (so the cache keeps what
    /// was being pulled) and for the uploads deferred until the replica is idle, then
    /// deletes the temp files of the fills still running.
    pub async fn drain_fills(&self, deadline: Duration) {
        let start = tokio::time::Instant::now();
        while self.fills_in_flight() > 0 && start.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.fills_in_flight();
        if left > 0 {
            tracing::warn!(fills = left, "abandoning unfinished fills at shutdown");
        }
        // What the tiers behind keep once the replica is idle (with peers, the uploads): it
        // is, so they run now; the bucket should not miss what only this replica's disk has.
        let pending = || self.behind().iter().map(|t| t.pending()).sum::<usize>();
        while pending() > 0 && start.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if pending() > 0 {
            tracing::warn!(
                uploads = pending(),
                "abandoning deferred uploads at shutdown"
            );
        }
        if let Err(e) = self.store.clear_tmp() {
            tracing::warn!(error = %e, "could not clear the temp folder");
        }
    }
}
