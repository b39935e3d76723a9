//! Fills: one verified upstream stream per digest, served to every waiting client from the
//! growing file.
//!
//! A miss starts a fill, a task detached from the client, that streams the body (from an
//! upstream, or from the shared tier) into a temp file while hashing it. The fill publishes
//! its progress on a `watch` channel: how many bytes are on disk, then `Done` or `Failed`.
//! Every client of that digest (the one that caused the miss and all that join while it
//! runs) gets a `Reader` over the same file, at its own offset, up to the bytes written so
//! far; it waits on the channel when it has caught up (the reading side is `source`). So a
//! joining client gets its first byte as soon as there is one on disk, a slow client slows
//! nobody, and memory is a window per reader.
//!
//! The end is all or nothing. When the stream ends, length and digest are checked; only then
//! is the file fsynced and renamed into `blobs/` (the inode is the same, so readers go on
//! reading through their descriptor) and `Done` published. Until `Done`, every reader holds
//! back the last byte of its range: a client can never hold a complete body that is wrong.
//!
//! A fill is a guard (`Guard`), like a cache lock: only its `commit` publishes `Done`.
//! Dropped otherwise, whatever ended the task (a mismatch, a short body, a stall, a disk
//! error, the deadline, a cancel, a panic), it deletes the temp file, forgets the fill (so
//! the next request starts a new one) and publishes `Failed`, which every reader turns into
//! an error chunk (the client's connection is aborted, never cleanly ended).
//!
//! Fills are bounded: at most `cache.max_fills` run at once, the others wait their turn in
//! order (still joinable, their readers waiting for the first byte); their disk work (hash
//! and `pwrite`, in `sink`) runs on the fixed pool of `disk`; and the chunks they keep in memory for
//! their readers share one budget.

mod sink;

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::source::{lock, Progress, Recent, Source, FED_BY_PEER, FED_BY_TIER, FED_BY_UPSTREAM};
use super::Cache;
use crate::error::{Error, UpstreamError};
use crate::reference::Digest;
pub use sink::Sink;

/// A fill under way, shared by the task that runs it and its readers.
pub struct Fill {
    /// The temp file, opened once; readers `pread` it, so they share no offset.
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    /// The last chunks written, for readers that keep up with the writer.
    recent: Arc<Mutex<Recent>>,
    /// Set before the first byte when a tier behind the local one (the bucket) or a peer
    /// feeds the fill rather than the upstream: the answer is then labelled `bucket` or
    /// `peer`, not `fill` (`source::FED_BY_*`).
    from_tier: Arc<AtomicU8>,
    /// When it started, for the admin API's list of fills (display only).
    pub(super) started: std::time::SystemTime,
    /// `upstream/name` of the request that started it, once known (the admin API).
    pub(super) repository: std::sync::OnceLock<String>,
    /// Clients that joined it so far, the first included: the admin API's figure.
    pub(super) joined: std::sync::atomic::AtomicU32,
}

impl Source {
    /// The growing file of `fill`, for one more reader.
    pub fn filling(fill: &Fill) -> Source {
        Source::of_fill(
            fill.file.clone(),
            fill.progress.clone(),
            fill.recent.clone(),
            fill.from_tier.clone(),
        )
    }
}

impl Fill {
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }
}

/// Why a fill failed, as counted in the metrics.
fn reason(e: &Error) -> &'static str {
    match e {
        Error::Upstream { error, .. } => match error {
            UpstreamError::DigestMismatch(_) => "digest_mismatch",
            UpstreamError::Length(_) | UpstreamError::TooLarge(_) => "truncated",
            UpstreamError::Stalled(_) | UpstreamError::Timeout => "stalled",
            UpstreamError::Status { .. } => "upstream_status",
            _ => "upstream",
        },
        Error::Internal(_) => "disk",
        Error::Client { .. } | Error::Rejected(_) => "upstream_status",
    }
}

/// Where a fill's bytes come from.
pub enum Origin {
    /// An upstream registry; with a shared tier, the fill is uploaded to it (under `lease`
    /// when this replica won it).
    Upstream { lease: Option<super::tier::Lease> },
    /// The shared tier (verified again here, like any source).
    Shared,
    /// Another replica's peer endpoint, streaming its fill (verified again here; that
    /// replica keeps it in the shared tier).
    Peer,
}

/// A response body to fill from: its announced size, its chunks, and where it comes from.
pub struct Fetched {
    pub size: Option<u64>,
    pub body: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    pub origin: Origin,
    /// Names the source in errors: the upstream's name, or the tier's (`bucket tier`).
    pub source: String,
}

impl Fetched {
    /// An upstream's blob body.
    pub fn from_upstream(upstream: &str, body: crate::upstream::BlobBody) -> Fetched {
        Fetched {
            size: body.size,
            body: body.chunks,
            origin: Origin::Upstream { lease: None },
            source: upstream.to_string(),
        }
    }
}

impl Cache {
    /// Makes a fill of `digest` from the body `fetch` yields, and its task, which runs it once
    /// spawned. Called with the fills lock held, after a miss on disk; the caller records the
    /// returned fill, and spawns the task after the lock is released. The fill waits for its
    /// turn (`max_fills`) before `fetch` is awaited; the deadline counts the wait.
    pub(super) fn start_fill<F>(
        self: &Arc<Self>,
        digest: Digest,
        fetch: F,
    ) -> io::Result<(Arc<Fill>, Unspawned)>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let (file, temp) = self.store.temp()?;
        let (tx, rx) = watch::channel(Progress::Connecting);
        let fill = Arc::new(Fill {
            file: Arc::new(file),
            progress: rx,
            recent: Arc::new(Mutex::new(Recent::default())),
            from_tier: Arc::new(AtomicU8::new(FED_BY_UPSTREAM)),
            started: crate::clock::now(),
            repository: std::sync::OnceLock::new(),
            joined: std::sync::atomic::AtomicU32::new(0),
        });
        // Made before the task is spawned: if the task never runs (the runtime shuts down),
        // dropping it still cleans up.
        let guard = Guard {
            cache: self.clone(),
            digest,
            fill: fill.clone(),
            progress: Arc::new(tx),
            temp,
            committed: None,
            error: None,
            timeline: Timeline::new(),
        };
        Ok((fill, Unspawned(Box::pin(guard.run(fetch)))))
    }

    /// A fill started and running at once, for tests that do not go through the map of
    /// fills.
    #[cfg(test)]
    pub(super) fn spawn_fill<F>(self: &Arc<Self>, digest: Digest, fetch: F) -> Arc<Fill>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let (fill, task) = self.start_fill(digest, fetch).unwrap();
        task.spawn();
        fill
    }

    async fn commit(
        &self,
        digest: &Digest,
        file: Arc<File>,
        temp: PathBuf,
        size: u64,
    ) -> Result<u64, Error> {
        let store = self.store.clone();
        let d = digest.clone();
        tokio::task::spawn_blocking(move || store.commit(&file, &temp, &d))
            .await
            .map_err(io::Error::other)??;
        self.index.insert(digest.clone(), size);
        Ok(size)
    }
}

/// A fill's task, made under the fills' lock and spawned after it is released: a runtime
/// that is shutting down drops a task as it is spawned, on the spawning thread, and the
/// guard's drop takes that lock to forget the fill (under the lock, that thread would wait
/// for itself). Dropped unspawned, it drops the guard: the fill fails and is forgotten.
#[must_use = "a fill runs only once its task is spawned"]
pub(super) struct Unspawned(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>);

impl Unspawned {
    pub(super) fn spawn(self) {
        tokio::spawn(self.0);
    }
}

/// A fill's end, owned by its task. Only [`Guard::commit`] publishes `Done`. When the guard
/// is dropped otherwise (the task failed, was cancelled, or panicked: tokio drops a task's
/// future when it panics), it deletes the temp file, counts the failure, and publishes
/// `Failed`. Either way it first removes the fill from the map of fills in flight (if the
/// map still holds this very fill), so the next request finds the blob on disk or starts a
/// new fill.
struct Guard {
    cache: Arc<Cache>,
    digest: Digest,
    fill: Arc<Fill>,
    progress: Arc<watch::Sender<Progress>>,
    temp: PathBuf,
    /// Set by `commit`: the verified size, in `blobs/`.
    committed: Option<u64>,
    /// Set by `abort`: why the fill failed (`None` when dropped without either: a panic).
    error: Option<Error>,
    timeline: Timeline,
}

/// When a fill got its turn and when its source answered (with a body or an error), counted
/// from its start: logged with its end, since every client of the fill waits for that answer
/// before its first byte.
struct Timeline {
    start: tokio::time::Instant,
    turn: Option<Duration>,
    answer: Option<Duration>,
}

impl Timeline {
    fn new() -> Timeline {
        Timeline {
            start: tokio::time::Instant::now(),
            turn: None,
            answer: None,
        }
    }

    fn now(&self) -> Option<Duration> {
        Some(self.start.elapsed())
    }
}

/// Milliseconds, for a log line.
fn ms(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

/// A gauge raised for as long as this lives (however the task holding it ends).
struct Raised<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Raised<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Raised(gauge)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Guard {
    /// The fill's task: wait for a turn, fetch, stream, verify, commit, all within the
    /// fill's deadline.
    async fn run<F>(mut self, fetch: F)
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let deadline = self.cache.fill_deadline;
        let outcome = tokio::time::timeout(deadline, self.work(fetch))
            .await
            .unwrap_or_else(|_| Err(Error::upstream("fill", UpstreamError::Stalled(deadline))));
        match outcome {
            Ok(size) => self.commit(size),
            Err(e) => self.abort(e),
        }
    }

    async fn work<F>(&mut self, fetch: F) -> Result<u64, Error>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let cache = self.cache.clone();
        let _turn = {
            let _queued = Raised::new(&cache.metrics.fills_queued);
            cache.turns.acquire().await.map_err(io::Error::other)?
        };
        self.timeline.turn = self.timeline.now();
        let _running = Raised::new(&cache.metrics.fills_in_flight);
        let answer = fetch.await;
        self.timeline.answer = self.timeline.now();
        let mut fetched = answer?;
        let digest = &self.digest;
        let origin = std::mem::replace(&mut fetched.origin, Origin::Shared);
        let from_shared = matches!(origin, Origin::Shared);
        let fed_by = match origin {
            Origin::Upstream { .. } => FED_BY_UPSTREAM,
            Origin::Shared => FED_BY_TIER,
            Origin::Peer => FED_BY_PEER,
        };
        // Before any progress is published: a reader that knows the size knows this too.
        self.fill.from_tier.store(fed_by, Ordering::Release);
        if let Origin::Upstream { lease } = origin {
            // Kept by the tiers behind as it arrives; completed only once verified.
            cache.keep_behind(digest, &Source::filling(&self.fill), lease);
        }
        let streamed = stream_to_file(
            fetched,
            digest,
            self.fill.file.clone(),
            self.progress.clone(),
            self.fill.recent.clone(),
            cache.stall_timeout,
        )
        .await;
        if let (
            true,
            Err(Error::Upstream {
                error: UpstreamError::DigestMismatch(_) | UpstreamError::Length(_),
                ..
            }),
        ) = (from_shared, &streamed)
        {
            cache.discard_behind(digest).await;
        }
        let size = streamed?;
        cache
            .commit(digest, self.fill.file.clone(), self.temp.clone(), size)
            .await
    }

    /// The blob is verified and in `blobs/`: tell the readers.
    fn commit(mut self, size: u64) {
        self.committed = Some(size);
    }

    /// The fill failed with `e`.
    fn abort(mut self, e: Error) {
        self.error = Some(e);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let (cache, digest) = (&self.cache, &self.digest);
        let t = &self.timeline;
        let (ms, turn_ms, answer_ms) = (ms(t.start.elapsed()), t.turn.map(ms), t.answer.map(ms));
        let last = match (self.committed, self.error.take()) {
            (Some(size), _) => {
                cache.metrics.fills_completed.inc();
                tracing::info!(%digest, size, ms, turn_ms, answer_ms, "fill committed");
                Progress::Done { size }
            }
            (None, error) => {
                // A plain unlink: cheap enough for a drop, and it must happen even when no
                // runtime is left to run a task.
                let _ = std::fs::remove_file(&self.temp);
                let (why, e) = match error {
                    Some(e) => (reason(&e), e),
                    None => (
                        "aborted",
                        Error::from(io::Error::other(
                            "the fill ended without a result (its task panicked or was cancelled)",
                        )),
                    ),
                };
                cache.metrics.fill_failed(why);
                match &e {
                    // The upstream does not have it: the client's mistake, not a fault.
                    e if e.is_client_side() => {
                        tracing::debug!(%digest, error = %e, ms, turn_ms, answer_ms, "fill failed")
                    }
                    _ => tracing::warn!(%digest, error = %e, ms, turn_ms, answer_ms, "fill failed"),
                }
                Progress::Failed(e)
            }
        };
        // Forget the fill before telling its readers: from here a new request finds the
        // committed blob on disk, or starts a new fill after a failure.
        cache.fills.end(digest, &self.fill);
        self.progress.send_replace(last);
        // Readers still behind read the file; the chunks are not needed any more.
        *lock(&self.fill.recent) = Recent::default();
    }
}

/// Streams a body into `file`, hashing it, publishing progress; returns the verified length.
async fn stream_to_file(
    fetched: Fetched,
    digest: &Digest,
    file: Arc<File>,
    progress: Arc<watch::Sender<Progress>>,
    recent: Arc<Mutex<Recent>>,
    stall: Duration,
) -> Result<u64, Error> {
    use futures_util::StreamExt;
    let Fetched {
        size,
        mut body,
        source,
        ..
    } = fetched;
    let upstream_err = |e| Error::upstream(&source, e);
    progress.send_replace(Progress::Streaming { size, written: 0 });

    let (algorithm, recent) = (digest.algorithm(), Some(recent));
    let sink = Sink::with_recent(file, algorithm, progress.clone(), recent, size);
    let mut received: u64 = 0;
    let mut failure = None;
    loop {
        let data = match tokio::time::timeout(stall, body.next()).await {
            Err(_) => {
                failure = Some(UpstreamError::Stalled(stall));
                break;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                failure = Some(UpstreamError::Length(format!(
                    "body cut after {received} bytes: {e}"
                )));
                break;
            }
            Ok(Some(Ok(data))) => data,
        };
        received += data.len() as u64;
        if size.is_some_and(|s| received > s) {
            failure = Some(UpstreamError::Length(format!(
                "more than Content-Length {}",
                size.unwrap()
            )));
            break;
        }
        if !sink.push(data).await {
            break; // the writer failed; its error is reported below
        }
    }
    let (written, actual) = sink.finish().await?;
    if let Some(f) = failure {
        return Err(upstream_err(f));
    }
    if let Some(expected) = size {
        if written != expected {
            return Err(upstream_err(UpstreamError::Length(format!(
                "{written} bytes, Content-Length {expected}"
            ))));
        }
    }
    if &actual != digest {
        return Err(upstream_err(UpstreamError::DigestMismatch(
            digest.to_string(),
        )));
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Instant;
    use futures_util::TryStreamExt;
    use std::sync::atomic::AtomicBool;
    use tokio::sync::oneshot;

    /// A cache in `dir` with `max_fills` turns.
    fn cache(
        dir: &std::path::Path,
        max_fills: usize,
    ) -> (Arc<Cache>, Arc<crate::metrics::Metrics>) {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let limits = super::super::FillLimits {
            stall_timeout: Duration::from_secs(5),
            fill_deadline: Duration::from_secs(60),
            max_fills,
        };
        let cache = Cache::open_with(dir, 1 << 30, limits, metrics.clone(), None).unwrap();
        (cache, metrics)
    }

    fn fetched(
        size: usize,
        body: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    ) -> Fetched {
        Fetched {
            size: Some(size as u64),
            body,
            origin: Origin::Upstream { lease: None },
            source: "test".into(),
        }
    }

    fn blob(len: u32) -> (Vec<u8>, Digest) {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let d = Digest::sha256_of(&data);
        (data, d)
    }

    fn chunks(data: &[u8]) -> Vec<io::Result<Bytes>> {
        data.chunks(256 << 10)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    }

    async fn read_all(src: &Source, len: usize) -> io::Result<Vec<u8>> {
        let got: Vec<Bytes> = src
            .reader(0, len as u64)
            .into_stream()
            .try_collect()
            .await?;
        Ok(got.concat())
    }

    fn temp_files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    /// A panic inside a fill's task (here: its body panics when polled after 1 MiB) fails
    /// its readers, forgets the fill and deletes its temp file; the next request starts a new
    /// fill, which succeeds.
    #[tokio::test]
    async fn a_fill_that_panics_fails_its_readers_and_is_forgotten() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let (cache, metrics) = cache(dir.path(), 4);
        let (data, d) = blob(3 << 20);
        let len = data.len();
        let first = chunks(&data[..1 << 20]);
        // The panic waits for the test's word, so that the second request finds the fill.
        let (go, wait) = oneshot::channel::<()>();
        let panicking = futures_util::stream::iter(first)
            .chain(futures_util::stream::once(async move {
                let _ = wait.await;
                panic!("injected: the body panics mid-way")
            }))
            .boxed();
        let src = cache
            .open_or_start(&d, || async move { Ok(fetched(len, panicking)) })
            .await
            .unwrap();
        let joined = cache
            .open_or_start(&d, || async { panic!("a second fill of the same digest") })
            .await
            .unwrap();
        go.send(()).unwrap();
        let (a, b) = tokio::join!(read_all(&src, len), read_all(&joined, len));
        assert!(a.is_err() && b.is_err(), "every reader gets an error");
        assert_eq!(cache.fills_in_flight(), 0, "the fill is forgotten");
        assert_eq!(temp_files(dir.path()), 0, "the temp file is gone");
        assert!(cache.open_cached(&d).await.unwrap().is_none());
        let text = metrics.encode();
        assert!(
            text.contains(r#"ocicache_fills_failed_total{reason="aborted"} 1"#),
            "{text}"
        );
        assert!(text.contains("ocicache_fills_in_flight 0"), "{text}");

        let body = futures_util::StreamExt::boxed(futures_util::stream::iter(chunks(&data)));
        let src = cache
            .open_or_start(&d, || async move { Ok(fetched(len, body)) })
            .await
            .unwrap();
        assert!(src.is_fill(), "a new fill");
        assert_eq!(read_all(&src, len).await.unwrap(), data);
        assert!(cache.open_cached(&d).await.unwrap().is_some(), "committed");
        assert_eq!(cache.fills_in_flight(), 0);
    }

    /// With one turn, a second fill waits (visible in `fills_queued`) without fetching,
    /// and runs once the first is done.
    #[tokio::test]
    async fn fills_beyond_max_fills_wait_their_turn() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let (cache, metrics) = cache(dir.path(), 1);
        let (one, d1) = blob(1 << 20);
        let (two, d2) = blob((1 << 20) + 1);
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(64);
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            )
            .boxed();
        let (l1, l2) = (one.len(), two.len());
        let first = cache
            .open_or_start(&d1, || async move { Ok(fetched(l1, body)) })
            .await
            .unwrap();
        let fetched_second = Arc::new(AtomicBool::new(false));
        let flag = fetched_second.clone();
        let body2 = futures_util::stream::iter(chunks(&two)).boxed();
        let second = cache
            .open_or_start(&d2, || async move {
                flag.store(true, Ordering::SeqCst);
                Ok(fetched(l2, body2))
            })
            .await
            .unwrap();
        for _ in 0..500 {
            if metrics.fills_queued.get() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(metrics.fills_queued.get(), 1);
        assert_eq!(metrics.fills_in_flight.get(), 1);
        assert!(
            !fetched_second.load(Ordering::SeqCst),
            "no fetch before its turn"
        );
        for c in chunks(&one) {
            tx.send(c).await.unwrap();
        }
        drop(tx);
        assert_eq!(read_all(&first, l1).await.unwrap(), one);
        assert_eq!(read_all(&second, l2).await.unwrap(), two);
        assert!(fetched_second.load(Ordering::SeqCst));
        assert_eq!(metrics.fills_queued.get(), 0);
    }

    /// A fill started as the runtime shuts down (a sync or a prefetch asking when SIGTERM
    /// lands): the runtime drops its task as it is spawned, on the spawning thread, and the
    /// guard's clean-up must not wait for the fills' lock that the start holds. It once did,
    /// and the server never exited.
    #[test]
    fn a_fill_started_as_the_runtime_shuts_down_fails_and_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let (cache, _) = rt.block_on(async { cache(&path, 4) });
            let dead = rt.handle().clone();
            rt.shutdown_background();
            let (data, d) = blob(1 << 20);
            let len = data.len();
            let body = futures_util::StreamExt::boxed(futures_util::stream::iter(chunks(&data)));
            let other = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let src = other.block_on(async {
                let _spawns_on_the_dead_runtime = dead.enter();
                cache
                    .open_or_start(&d, || async move { Ok(fetched(len, body)) })
                    .await
                    .unwrap()
            });
            let read = other.block_on(read_all(&src, len));
            let _ = done.send((read.map(|b| b.len()), cache.fills_in_flight()));
        });
        let (read, in_flight) = finished
            .recv_timeout(Duration::from_secs(60))
            .expect("the start returned (no deadlock)");
        assert!(read.is_err(), "its reader gets an error: {read:?}");
        assert_eq!(in_flight, 0, "the fill is forgotten");
        assert_eq!(temp_files(dir.path()), 0, "the temp file is gone");
    }

    /// A fill waiting for its turn is bounded by the fill deadline, like a running one.
    #[tokio::test(start_paused = true)]
    async fn a_queued_fill_fails_at_the_fill_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, metrics) = cache(dir.path(), 1);
        let never = || std::future::pending::<Result<Fetched, Error>>();
        let start = Instant::now();
        let running = cache.spawn_fill(blob(10).1, never());
        let queued = cache.spawn_fill(blob(11).1, never());
        while metrics.fills_queued.get() != 1 {
            tokio::task::yield_now().await;
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(matches!(queued.progress(), Progress::Connecting));
        tokio::time::advance(Duration::from_secs(2)).await;
        for fill in [&running, &queued] {
            let mut rx = fill.progress.clone();
            let failed = rx.wait_for(|p| matches!(p, Progress::Failed(_))).await;
            let Progress::Failed(e) = &*failed.unwrap() else {
                unreachable!()
            };
            assert!(e.to_string().contains("stalled"), "{e}");
        }
        // Not a deadline counted from its turn (that would be at 120 s).
        assert!(
            start.elapsed() < Duration::from_secs(62),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(
            (metrics.fills_queued.get(), metrics.fills_in_flight.get()),
            (0, 0)
        );
        assert_eq!(temp_files(dir.path()), 0);
    }

    /// A fill's end is logged with when it got its turn and when its source answered, from
    /// its start: here the second fill waits 3 s for the first one's turn, and each source
    /// answers (with an error) 3 and 2 s after it was asked.
    #[tokio::test(start_paused = true)]
    async fn a_fill_logs_when_it_got_its_turn_and_its_answer() {
        let (logs, _guard) = crate::test_logs::Logs::capture();
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = cache(dir.path(), 1);
        let answer_after = |secs| async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Err::<Fetched, _>(Error::upstream("test", UpstreamError::Timeout))
        };
        let (first, second) = (blob(10).1, blob(11).1);
        let fills = [
            cache.spawn_fill(first.clone(), answer_after(3)),
            cache.spawn_fill(second.clone(), answer_after(2)),
        ];
        for fill in &fills {
            let mut rx = fill.progress.clone();
            rx.wait_for(|p| matches!(p, Progress::Failed(_)))
                .await
                .unwrap();
        }
        let text = logs.text();
        let line = |d: &Digest| {
            text.lines()
                .find(|l| l.contains("fill failed") && l.contains(&d.to_string()))
                .unwrap_or_else(|| panic!("no line for {d} in {text}"))
                .to_string()
        };
        let (one, two) = (line(&first), line(&second));
        assert!(one.contains("ms=3000 turn_ms=0 answer_ms=3000"), "{one}");
        assert!(two.contains("ms=5000 turn_ms=3000 answer_ms=5000"), "{two}");
    }
}
