//! The blob cache: the content-addressed store on disk (`store`), the LRU index over it
//! (`index`), and the fills that bring misses in from upstreams (`fill`).

pub mod admin;
pub mod fill;
pub mod local;
pub mod outcome;
pub mod records;
pub mod shared;

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::CacheConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::reference::{Digest, Name};
use crate::upstream::Upstream;
use fill::Fill;
pub use fill::{Fetched, Origin, Progress, Reader, Source};
use index::Index;
pub use local::{index, store};
pub use outcome::Outcome;
pub use records::Record;
use shared::{Claim, Shared};
use store::Store;

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
}

impl Cache {
    /// Opens the store and removes temp files left by a crash, then returns at once: the
    /// index is rebuilt from the disk in recency order on a thread of its own (see
    /// [`index::Scan`]; `index.scan_done()` tells when), evicting what does not fit
    /// `max_size` once it ends. Meanwhile a blob on disk is served and indexed when asked.
    pub fn open(cfg: &CacheConfig, metrics: Arc<Metrics>) -> io::Result<Arc<Cache>> {
        let shared = match &cfg.s3 {
            Some(s3) => Some(Shared::open(s3, shared::LEASE_TTL, metrics.clone())?),
            None => None,
        };
        Self::open_at(
            &cfg.dir,
            cfg.max_size.0,
            cfg.stall_timeout.0,
            cfg.fill_deadline.0,
            metrics,
            shared,
        )
    }

    /// [`Cache::open`] with its parts given; the scan starts on its thread.
    pub fn open_at(
        dir: &Path,
        max_size: u64,
        stall_timeout: Duration,
        fill_deadline: Duration,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> io::Result<Arc<Cache>> {
        let (cache, scan) =
            Self::open_unindexed(dir, max_size, stall_timeout, fill_deadline, metrics, shared)?;
        scan.spawn();
        Ok(cache)
    }

    /// The cache with an empty index, and the scan that rebuilds it, not started: the
    /// caller runs it (a test steps it through [`index::Scan::gate`]).
    pub fn open_unindexed(
        dir: &Path,
        max_size: u64,
        stall_timeout: Duration,
        fill_deadline: Duration,
        metrics: Arc<Metrics>,
        shared: Option<Arc<Shared>>,
    ) -> io::Result<(Arc<Cache>, index::Scan)> {
        let store = Arc::new(Store::open(dir)?);
        let index = Index::new(max_size, store.clone(), metrics.clone());
        let scan = index::Scan::new(index.clone(), store.clone());
        let cache = Arc::new(Cache {
            store,
            index,
            shared,
            fills: Mutex::new(HashMap::new()),
            metrics,
            stall_timeout,
            fill_deadline,
        });
        Ok((cache, scan))
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
            let media_type = store.media_type(&d);
            Ok(Some((Source::committed(file, size, media_type), size)))
        })
        .await
        .map_err(io::Error::other)??;
        let Some((source, size)) = found else {
            return Ok(None);
        };
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

    /// Where a blob GET is answered from, decided here once: a redirect to the bucket when
    /// `redirect = true` and it holds the blob; else the local tier; else (offline: nowhere)
    /// a fill, fed by the bucket or the upstream `upstream`. `upstream` is `None` offline.
    pub async fn blob(
        self: &Arc<Self>,
        digest: &Digest,
        upstream: Option<(&Arc<Upstream>, &Name)>,
    ) -> Result<Found, Error> {
        let Some((up, name)) = upstream else {
            return match self.local_hit(digest).await? {
                Some(src) => Ok(Found::Source(src)),
                None => Err(Error::client(
                    crate::error::ErrorCode::BlobUnknown,
                    "blob not cached (offline)",
                )),
            };
        };
        if let Some(shared) = self.shared.as_ref().filter(|s| s.redirects()) {
            if let Some(url) = shared.presigned(digest).await {
                return Ok(Found::Redirect(url));
            }
        }
        self.open_or_fill(digest, up, name).await.map(Found::Source)
    }

    /// A blob served from the local tier: counted, and its use marked in the bucket.
    async fn local_hit(&self, digest: &Digest) -> Result<Option<Source>, Error> {
        let found = self.open_cached(digest).await?;
        if found.is_some() {
            self.metrics.hit("blob");
            if let Some(shared) = &self.shared {
                shared.touch(digest);
            }
        }
        Ok(found)
    }

    /// Serves `digest` of `name` from the cache or from a fill: the one under way, or a new
    /// one fed by the shared tier when it has the blob, else by the upstream `up`.
    pub async fn open_or_fill(
        self: &Arc<Self>,
        digest: &Digest,
        up: &Arc<Upstream>,
        name: &Name,
    ) -> Result<Source, Error> {
        if let Some(src) = self.local_hit(digest).await? {
            return Ok(src);
        }
        let fill = {
            let mut fills = self.fills.lock().unwrap();
            match fills.get(digest) {
                Some(fill) => Some(fill.clone()),
                // A fill may have committed since we looked: check under the lock.
                None if self.store.blob_path(digest).exists() => None,
                None => {
                    let fetch = {
                        let (up, name, digest) = (up.clone(), name.clone(), digest.clone());
                        async move {
                            let body = up.blob(&name, &digest, None).await?;
                            Ok(Fetched::from_upstream(&up.name, body))
                        }
                    };
                    let source = self.clone().source(digest.clone(), fetch);
                    let fill = self.start_fill(digest.clone(), source)?;
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
    async fn source<F>(self: Arc<Self>, digest: Digest, fetch: F) -> Result<Fetched, Error>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
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
        match fetch.await {
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

    /// Reads a cached manifest whole: its bytes and media type.
    async fn read_manifest(
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
