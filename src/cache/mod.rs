//! The blob cache: the content-addressed store on disk (`store`), the LRU index over it
//! (`index`), and the fills that bring misses in from upstreams (`fill`).

pub mod admin;
mod disk;
pub mod fill;
pub mod index;
pub mod shared;
pub mod store;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;

use crate::config::{CacheConfig, DEFAULT_MAX_FILLS};
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reference::Digest;
use fill::Fill;
pub use fill::{Fetched, Origin, Progress, Reader, Source};
use index::Index;
use shared::{Claim, Shared};
use store::Store;

pub struct Cache {
    pub store: Arc<Store>,
    pub index: Index,
    /// The tier shared with other replicas (`[cache.s3]`), behind the local one.
    pub shared: Option<Arc<Shared>>,
    /// Fills under way, by digest. A std mutex: it is held for a map operation and the
    /// creation of a temp file, never across an await.
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    metrics: Arc<Metrics>,
    stall_timeout: Duration,
    fill_deadline: Duration,
    /// Turns to run a fill (`cache.max_fills`). tokio's semaphore is fair: fills waiting
    /// for a turn get it in the order they asked.
    turns: tokio::sync::Semaphore,
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
    /// Opens the store, removes temp files left by a crash, and rebuilds the index from the
    /// disk in recency order (evicting what no longer fits `max_size`).
    pub fn open(cfg: &CacheConfig, metrics: Arc<Metrics>) -> io::Result<Arc<Cache>> {
        let shared = match &cfg.s3 {
            Some(s3) => Some(Shared::open(s3, shared::LEASE_TTL, metrics.clone())?),
            None => None,
        };
        let limits = FillLimits {
            stall_timeout: cfg.stall_timeout.0,
            fill_deadline: cfg.fill_deadline.0,
            max_fills: cfg.max_fills,
        };
        Self::open_with(&cfg.dir, cfg.max_size.0, limits, metrics, shared)
    }

    /// `open` from parts, with the default `max_fills`.
    pub fn open_at(
        dir: &Path,
        max_size: u64,
        stall_timeout: Duration,
        fill_deadline: Duration,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> io::Result<Arc<Cache>> {
        let limits = FillLimits {
            stall_timeout,
            fill_deadline,
            max_fills: DEFAULT_MAX_FILLS,
        };
        Self::open_with(dir, max_size, limits, metrics, shared)
    }

    /// `open` from parts.
    pub fn open_with(
        dir: &Path,
        max_size: u64,
        limits: FillLimits,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> io::Result<Arc<Cache>> {
        let FillLimits {
            stall_timeout,
            fill_deadline,
            max_fills,
        } = limits;
        let store = Arc::new(Store::open(dir)?);
        let index = Index::new(max_size, store.clone(), metrics.clone());
        for entry in store.scan()? {
            index.insert(entry.digest, entry.size);
        }
        Ok(Arc::new(Cache {
            store,
            index,
            shared,
            fills: Mutex::new(HashMap::new()),
            metrics,
            stall_timeout,
            fill_deadline,
            turns: tokio::sync::Semaphore::new(max_fills),
        }))
    }

    /// A committed blob, with recency refreshed, or `None`.
    pub async fn open_cached(&self, digest: &Digest) -> Result<Option<Source>, Error> {
        let store = self.store.clone();
        let d = digest.clone();
        let found = tokio::task::spawn_blocking(move || {
            let Some((file, size)) = store.open_blob(&d)? else {
                return Ok::<_, io::Error>(None);
            };
            store::touch(&file);
            Ok(Some(Source::committed(file, size, store.media_type(&d))))
        })
        .await
        .map_err(io::Error::other)??;
        if found.is_some() {
            if !self.index.contains(digest) {
                // Written by another path (a manifest) or found late: index it now.
                let size = self
                    .store
                    .blob_path(digest)
                    .metadata()
                    .map(|m| m.len())
                    .unwrap_or(0);
                self.index.insert(digest.clone(), size);
            } else {
                self.index.touch(digest);
            }
        }
        Ok(found)
    }

    /// Serves `digest` from the cache or from a fill: the one under way, or a new one fed by
    /// the shared tier when it has the blob, else by `fetch` (which is only awaited when a
    /// new fill needs the upstream).
    pub async fn open_or_fill<F>(
        self: &Arc<Self>,
        digest: &Digest,
        upstream: &str,
        fetch: F,
    ) -> Result<Source, Error>
    where
        F: Future<Output = Result<hyper::Response<Incoming>, Error>> + Send + 'static,
    {
        let source = || {
            self.clone()
                .source(digest.clone(), upstream.to_string(), fetch)
        };
        self.open_or_start(digest, source).await
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
        if let Some(src) = self.open_cached(digest).await? {
            self.metrics.hit("blob");
            if let Some(shared) = &self.shared {
                shared.touch(digest);
            }
            return Ok(src);
        }
        let fill = {
            let mut fills = self.fills.lock().unwrap();
            match fills.get(digest) {
                Some(fill) => Some(fill.clone()),
                // A fill may have committed since we looked: check under the lock.
                None if self.store.blob_path(digest).exists() => None,
                None => {
                    let fill = self.start_fill(digest.clone(), source())?;
                    fills.insert(digest.clone(), fill.clone());
                    Some(fill)
                }
            }
        };
        let Some(fill) = fill else {
            return match self.open_cached(digest).await? {
                Some(src) => Ok(src),
                None => Err(io::Error::other("blob vanished while opening it").into()),
            };
        };
        self.metrics.miss("blob");
        Ok(Source::filling(&fill))
    }

    /// Where a new fill of `digest` reads from: the shared tier if it has the blob; else the
    /// upstream, by this replica if it wins the blob's lease (or the store cannot arbitrate),
    /// or the shared tier again once the replica that won it has uploaded it.
    async fn source<F>(
        self: Arc<Self>,
        digest: Digest,
        upstream: String,
        fetch: F,
    ) -> Result<Fetched, Error>
    where
        F: Future<Output = Result<hyper::Response<Incoming>, Error>> + Send + 'static,
    {
        let from_shared = |(size, body)| Fetched {
            size: Some(size),
            body,
            origin: Origin::Shared,
            source: "shared store".into(),
        };
        let mut lease = None;
        if let Some(shared) = &self.shared {
            if let Some(found) = shared.get_blob(&digest).await {
                return Ok(from_shared(found));
            }
            match shared.claim(&digest).await {
                Claim::Mine(l) => lease = Some(l),
                Claim::Theirs => {
                    if shared.wait_for(&digest).await {
                        if let Some(found) = shared.get_blob(&digest).await {
                            return Ok(from_shared(found));
                        }
                    }
                }
                Claim::None => {}
            }
        }
        match fetch
            .await
            .and_then(|resp| Fetched::from_upstream(&upstream, resp))
        {
            Ok(mut fetched) => {
                fetched.origin = Origin::Upstream { lease };
                Ok(fetched)
            }
            Err(e) => {
                if let (Some(shared), Some(lease)) = (&self.shared, lease) {
                    shared.release(lease).await;
                }
                Err(e)
            }
        }
    }

    /// The size of `digest` if it is cached or its fill knows it, without starting anything.
    pub async fn peek_size(&self, digest: &Digest) -> Result<Option<(u64, Option<String>)>, Error> {
        if let Some(mut src) = self.open_cached(digest).await? {
            let size = src.size().await?;
            return Ok(Some((size, src.media_type.clone())));
        }
        let fill = self.fills.lock().unwrap().get(digest).cloned();
        Ok(match fill.map(|f| f.progress()) {
            Some(Progress::Streaming { size: Some(s), .. }) | Some(Progress::Done { size: s }) => {
                Some((s, None))
            }
            _ => match &self.shared {
                Some(shared) => shared.head_blob(digest).await.map(|s| (s, None)),
                None => None,
            },
        })
    }

    /// Fills under way (for shutdown and tests).
    pub fn fills_in_flight(&self) -> usize {
        self.fills.lock().unwrap().len()
    }

    /// At shutdown: waits up to `deadline` for the fills under way (so the cache keeps what
    /// was being pulled), then deletes the temp files of those still running.
    pub async fn drain_fills(&self, deadline: Duration) {
        let start = tokio::time::Instant::now();
        while self.fills_in_flight() > 0 && start.elapsed() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.fills_in_flight();
        if left > 0 {
            tracing::warn!(fills = left, "abandoning unfinished fills at shutdown");
        }
        if let Err(e) = self.store.clear_tmp() {
            tracing::warn!(error = %e, "could not clear the temp folder");
        }
    }

    /// Stores a verified manifest by digest (small: written whole), here and in the shared
    /// tier.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: bytes::Bytes,
        media_type: &str,
    ) -> Result<(), Error> {
        let store = self.store.clone();
        let d = digest.clone();
        let mt = media_type.to_string();
        let len = bytes.len() as u64;
        let local = bytes.clone();
        tokio::task::spawn_blocking(move || store.put_manifest(&d, &local, &mt))
            .await
            .map_err(io::Error::other)??;
        self.index.insert(digest.clone(), len);
        if let Some(shared) = self.shared.clone() {
            let (d, mt) = (digest.clone(), media_type.to_string());
            tokio::spawn(async move { shared.put_manifest(&d, bytes, &mt).await });
        }
        Ok(())
    }

    /// Reads a cached manifest whole: its bytes and media type.
    pub async fn read_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<(bytes::Bytes, String)>, Error> {
        let store = self.store.clone();
        let d = digest.clone();
        let found = tokio::task::spawn_blocking(move || {
            let Some(mt) = store.media_type(&d) else {
                return Ok::<_, io::Error>(None);
            };
            match std::fs::read(store.blob_path(&d)) {
                Ok(bytes) => Ok(Some((bytes::Bytes::from(bytes), mt))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(io::Error::other)??;
        if found.is_some() {
            self.index.touch(digest);
        }
        Ok(found)
    }
}
