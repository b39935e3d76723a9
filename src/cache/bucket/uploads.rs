//! Uploading a local fill to the bucket: one PUT for a small blob, a multipart upload for a
//! large one, completed only once the fill has verified the content; retried when the store
//! fails. With peers, started only once the replica is idle (`upload_when_idle`): the other
//! replicas stream the blob from this one meanwhile, and a pull's time does not include the
//! store's work.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use object_store::{PutMultipartOptions, PutOptions, PutPayload, WriteMultipart};

use super::leases::Lease;
use super::objects::attributes;
use super::{Bucket, Fault, BACKOFF};
use crate::cache::source::Source;
use crate::cache::tier::{when_idle, Idle, IDLE_WAIT};
use crate::clock::Instant;
use crate::reference::Digest;

/// Blobs up to this size are uploaded in one PUT; larger ones in parts of at least this.
const PART: usize = 8 << 20;
/// S3 allows 10,000 parts per upload.
const MAX_PARTS: u64 = 9_000;

/// Why an upload stopped.
enum Upload {
    /// The fill failed: nothing to upload.
    Fill(io::Error),
    /// The store failed.
    Store(Fault),
}

/// Tries of an upload when the store fails.
const UPLOAD_ATTEMPTS: u32 = 3;
/// Uploads deferred until the replica is idle that run at once: a pull of many blobs ends
/// with that many uploads waiting, whose buffers (up to `PART` each) and store calls should
/// not all start together, nor hold the store when the next pull begins.
pub(super) const DEFERRED_AT_ONCE: usize = 2;

impl Bucket {
    /// Uploads the blob a local fill is bringing in, in the background: completed only once
    /// the fill has verified it (the reader's last byte waits for that), aborted if the fill
    /// fails. A store that fails meanwhile gets `UPLOAD_ATTEMPTS` tries, `BACKOFF` apart (the
    /// fill's file stays readable through its descriptor). Releases `lease` at the end.
    pub fn upload(self: &Arc<Self>, d: Digest, src: Source, lease: Option<Lease>) {
        let shared = self.clone();
        tokio::spawn(async move { shared.uploading(d, src, lease).await });
    }

    /// `upload`, once the replica is `idle` and a turn of the deferred uploads is free (at
    /// most `IDLE_WAIT` later for both): with peers, the other replicas stream the blob from this
    /// one meanwhile, and the store's work (a copy per node) no longer competes with the
    /// fills of a pull under way. The fill's file stays readable through its descriptor.
    pub fn upload_when_idle(self: &Arc<Self>, d: Digest, src: Source, idle: Idle) {
        let shared = self.clone();
        let pending = Pending::new(&self.deferred_pending);
        tokio::spawn(async move {
            let _pending = pending;
            let since = Instant::now();
            loop {
                when_idle(&idle, since).await;
                // A turn, or none once `IDLE_WAIT` has passed: two long uploads (blobs of
                // GiBs, streamed as their fills go) do not hold back the others for hours.
                let _turn =
                    tokio::time::timeout_at(since + IDLE_WAIT, shared.deferred.acquire()).await;
                // The turn may come after a new pull began: then wait for the next lull.
                if idle() || since.elapsed() >= IDLE_WAIT {
                    shared.uploading(d, src, None).await;
                    return;
                }
            }
        });
    }

    /// An upload with its tries, counted and logged; releases `lease` at the end.
    async fn uploading(&self, d: Digest, src: Source, lease: Option<Lease>) {
        let mut attempt = 1;
        let result = loop {
            match self.upload_now(&d, src.clone()).await {
                Err(Upload::Store(f)) if attempt < UPLOAD_ATTEMPTS => {
                    tracing::debug!(%d, fault = ?f, attempt, "upload failed: trying again");
                    attempt += 1;
                    tokio::time::sleep(BACKOFF).await;
                }
                other => break other,
            }
        };
        match &result {
            Ok(size) => {
                self.present.insert(d.clone(), ());
                self.count("upload", "completed");
                tracing::info!(%d, size, "uploaded to the shared store");
            }
            Err(Upload::Fill(e)) => {
                self.count("upload", "aborted");
                tracing::debug!(%d, error = %e, "fill failed: upload aborted");
            }
            Err(Upload::Store(f)) => {
                self.count("upload", "failed");
                tracing::warn!(%d, fault = ?f, "could not upload to the shared store");
            }
        }
        if let Some(lease) = lease {
            self.release(lease).await;
        }
    }

    async fn upload_now(&self, d: &Digest, mut src: Source) -> Result<u64, Upload> {
        let size = src
            .size()
            .await
            .map_err(|e| Upload::Fill(io::Error::other(e)))?;
        let mut reader = src.reader(0, size);
        let path = self.path("blobs", d);
        let opts = attributes(src.media_type.as_deref());
        if size as usize <= PART {
            let mut buf = BytesMut::with_capacity(size as usize);
            while let Some(chunk) = reader.next_chunk().await {
                buf.extend_from_slice(&chunk.map_err(Upload::Fill)?);
            }
            let put = self.store.put_opts(
                &path,
                PutPayload::from(buf.freeze()),
                PutOptions {
                    attributes: opts,
                    ..Default::default()
                },
            );
            self.call("upload", put).await.map_err(Upload::Store)?;
            return Ok(size);
        }
        let part = PART.max(size.div_ceil(MAX_PARTS) as usize);
        let multipart = self.store.put_multipart_opts(
            &path,
            PutMultipartOptions {
                attributes: opts,
                ..Default::default()
            },
        );
        let upload = self
            .call("upload", multipart)
            .await
            .map_err(Upload::Store)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        let result: Result<(), Upload> = async {
            while let Some(chunk) = reader.next_chunk().await {
                let chunk = chunk.map_err(Upload::Fill)?;
                self.call("upload", w.wait_for_capacity(2))
                    .await
                    .map_err(Upload::Store)?;
                w.put(chunk);
            }
            Ok(())
        }
        .await;
        match result {
            // The reader ended cleanly: the fill is verified and committed.
            Ok(()) => {
                self.call("upload", w.finish())
                    .await
                    .map_err(Upload::Store)?;
                Ok(size)
            }
            Err(e) => {
                let _ = tokio::time::timeout(self.timeout, w.abort()).await;
                Err(e)
            }
        }
    }
}

/// One deferred upload counted in `Bucket::deferred_pending` for as long as its task lives
/// (however it ends).
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn new(count: &Arc<AtomicUsize>) -> Pending {
        count.fetch_add(1, Ordering::Relaxed);
        Pending(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bucket::testing::{keys, tier, TestStore};
    use crate::cache::{Cache, Fetched, Origin, Progress};
    use bytes::Bytes;
    use futures_util::StreamExt;
    use object_store::path::Path;
    use object_store::ObjectStore;
    use std::time::Duration;

    /// Feeds a fill from a channel the test controls.
    fn fill_from(
        cache: &Arc<Cache>,
        d: &Digest,
        size: u64,
    ) -> (
        tokio::sync::mpsc::Sender<io::Result<Bytes>>,
        Arc<crate::cache::fill::Fill>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            )
            .boxed();
        let fetched = Fetched {
            size: Some(size),
            body,
            origin: Origin::Upstream { lease: None },
            source: "test".into(),
        };
        let fill = cache.spawn_fill(d.clone(), async move { Ok(fetched) });
        (tx, fill)
    }

    async fn wait_done(fill: &crate::cache::fill::Fill) -> bool {
        for _ in 0..200 {
            match fill.progress() {
                Progress::Done { .. } => return true,
                Progress::Failed(_) => return false,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        panic!("the fill did not end")
    }

    /// Polls for `done`, for up to 10 s.
    async fn wait_until(mut done: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out")
    }

    #[tokio::test]
    async fn only_verified_fills_reach_the_bucket() {
        let store = TestStore::new();
        let shared = tier(&store, Duration::from_secs(60), 1 << 30);
        // The upload's verdicts, counted: what the test waits for instead of sleeping.
        let aborted = |n: u64| {
            let text = shared.metrics.encode();
            text.contains(&format!(r#"op="upload",result="aborted"}} {n}"#))
        };
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::for_test(dir.path(), Some(shared.clone()));
        // 20 MiB: a multipart upload of several parts.
        let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
        let d = Digest::sha256_of(&data);

        // A corrupt body: the bytes arrive, the digest does not match.
        let (tx, fill) = fill_from(&cache, &d, data.len() as u64);
        let mut bad = data.clone();
        bad[7 << 20] ^= 1;
        for c in bad.chunks(1 << 20) {
            tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
        }
        drop(tx);
        assert!(!wait_done(&fill).await);
        wait_until(|| aborted(1)).await;
        assert!(
            keys(&store, "mirror/blobs").await.is_empty(),
            "nothing unverified"
        );

        // Cut in the middle: nothing either.
        let (tx, fill) = fill_from(&cache, &d, data.len() as u64);
        tx.send(Ok(Bytes::copy_from_slice(&data[..9 << 20])))
            .await
            .unwrap();
        wait_until(
            || matches!(fill.progress(), Progress::Streaming { written, .. } if written >= 9 << 20),
        )
        .await;
        assert!(keys(&store, "mirror/blobs").await.is_empty());
        tx.send(Err(io::Error::other("reset"))).await.unwrap();
        assert!(!wait_done(&fill).await);
        wait_until(|| aborted(2)).await;
        assert!(keys(&store, "mirror/blobs").await.is_empty());

        // The right body: the upload completes after the fill.
        let (tx, fill) = fill_from(&cache, &d, data.len() as u64);
        for c in data.chunks(1 << 20) {
            tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
        }
        drop(tx);
        assert!(wait_done(&fill).await);
        let key = Path::from(format!("mirror/blobs/sha256/{}", d.hex()));
        for _ in 0..100 {
            if store.head(&key).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(Digest::sha256_of(&got), d);
    }

    /// A fill of `n` repeated (1 MiB), committed in `cache`: its digest and its source.
    async fn filled(cache: &Arc<Cache>, n: u8) -> (Digest, Source) {
        let data = vec![n; 1 << 20];
        let d = Digest::sha256_of(&data);
        let (tx, fill) = fill_from(cache, &d, data.len() as u64);
        tx.send(Ok(Bytes::from(data))).await.unwrap();
        drop(tx);
        assert!(wait_done(&fill).await);
        (d, Source::filling(&fill))
    }

    /// With peers, an upload waits until its replica has been idle for `IDLE_QUIET` (the
    /// next blobs of a pull, a peer still pulling, go first), and goes anyway `IDLE_WAIT`
    /// after it was asked for when the replica is never idle.
    #[tokio::test]
    async fn an_upload_deferred_until_idle_waits_for_a_lull_or_the_bound() {
        use crate::cache::tier::IDLE_QUIET;
        use std::sync::atomic::{AtomicBool, Ordering};
        let store = TestStore::new();
        let shared = tier(&store, Duration::from_secs(60), 1 << 30);
        let dir = tempfile::tempdir().unwrap();
        // The fills are made by a cache without the bucket: only the test uploads them.
        let cache = Cache::for_test(dir.path(), None);
        let (lull, never) = (filled(&cache, 1).await, filled(&cache, 2).await);
        tokio::time::pause();
        let start = Instant::now();
        let busy = Arc::new(AtomicBool::new(true));
        let idle: Idle = {
            let busy = busy.clone();
            Arc::new(move || !busy.load(Ordering::SeqCst))
        };
        shared.upload_when_idle(lull.0.clone(), lull.1, idle);
        shared.upload_when_idle(never.0.clone(), never.1, Arc::new(|| false));
        let landed =
            |d: &Digest| store.writes_under(&format!("mirror/blobs/sha256/{}", d.hex())) > 0;

        tokio::time::sleep(IDLE_WAIT / 2).await;
        assert!(!landed(&lull.0) && !landed(&never.0), "nothing while busy");
        busy.store(false, Ordering::SeqCst);
        tokio::time::sleep(IDLE_QUIET / 2).await;
        assert!(!landed(&lull.0), "not before a lull of IDLE_QUIET");
        wait_until(|| landed(&lull.0)).await;
        tokio::time::sleep_until(start + IDLE_WAIT - Duration::from_secs(1)).await;
        assert!(
            !landed(&never.0),
            "a replica never idle: not before IDLE_WAIT"
        );
        wait_until(|| landed(&never.0)).await;
        assert!(start.elapsed() >= IDLE_WAIT);
    }

    /// Deferred uploads take turns (`DEFERRED_AT_ONCE`), but one that gets no turn within
    /// `IDLE_WAIT` (long uploads hold them all) goes without.
    #[tokio::test]
    async fn a_deferred_upload_without_a_turn_goes_at_the_bound() {
        let store = TestStore::new();
        let shared = tier(&store, Duration::from_secs(60), 1 << 30);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::for_test(dir.path(), None);
        let (d, src) = filled(&cache, 3).await;
        tokio::time::pause();
        let start = Instant::now();
        let held = shared
            .deferred
            .acquire_many(DEFERRED_AT_ONCE as u32)
            .await
            .unwrap();
        shared.upload_when_idle(d.clone(), src, Arc::new(|| true));
        let landed = || store.writes_under(&format!("mirror/blobs/sha256/{}", d.hex())) > 0;
        tokio::time::sleep(IDLE_WAIT - Duration::from_secs(1)).await;
        assert!(!landed(), "idle, but every turn taken");
        wait_until(landed).await;
        assert!(start.elapsed() >= IDLE_WAIT);
        drop(held);
    }

    /// At shutdown the cache waits for the uploads deferred until idle (here a replica
    /// never idle: the upload goes at `IDLE_WAIT`), within its deadline.
    #[tokio::test]
    async fn shutdown_waits_for_the_deferred_uploads_within_its_deadline() {
        use crate::cache::tier::Tier;
        let store = TestStore::new();
        let shared = tier(&store, Duration::from_secs(60), 1 << 30);
        let (dir, filler_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let cache = Cache::for_test(dir.path(), Some(shared.clone()));
        let filler = Cache::for_test(filler_dir.path(), None);
        let (d, src) = filled(&filler, 4).await;
        tokio::time::pause();
        let start = Instant::now();
        shared.upload_when_idle(d.clone(), src, Arc::new(|| false));
        let landed = || store.writes_under(&format!("mirror/blobs/sha256/{}", d.hex())) > 0;
        assert_eq!(shared.pending(), 1);
        cache.drain_fills(Duration::from_secs(1)).await;
        assert!(
            !landed() && shared.pending() == 1,
            "given up at the deadline"
        );
        cache.drain_fills(IDLE_WAIT * 2).await;
        assert!(landed(), "waited for");
        assert_eq!(shared.pending(), 0);
        assert!(start.elapsed() >= IDLE_WAIT && start.elapsed() < IDLE_WAIT * 2);
    }
}
