//! Fills: one verified upstream stream per digest, served to every waiting client from the
//! growing file.
//!
//! A miss starts a fill, a task detached from the client, that streams the body (from an
//! upstream, or from the shared tier) into a temp file while hashing it. The fill publishes
//! its progress on a `watch` channel: how many bytes are on disk, then `Done` or `Failed`.
//! Every client of that digest (the one that caused the miss and all that join while it
//! runs) gets a [`Reader`] over the same file, at its own offset, up to the bytes written so
//! far; it waits on the channel when it has caught up. A reader that keeps up takes the
//! fill's last chunks from memory (`Recent`); one further behind reads the file through
//! mapped windows (`map_window`). So a joining client gets its first byte as soon as there
//! is one on disk, a slow client slows nobody, and memory is a window per reader.
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
//! and `pwrite`) runs on the fixed pool of `disk`; and the chunks they keep in memory for
//! their readers share one budget.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::disk::Lane;
use super::Cache;
use crate::clock::Instant;
use crate::error::{Error, UpstreamError};
use crate::reference::{Algorithm, Digest, DigestHasher};

/// Largest chunk a reader takes from the file at once.
const READ_CHUNK: usize = 256 << 10;
/// Chunks of one fill queued for its disk thread and not yet written. A chunk is a network
/// frame (up to a few hundred KiB on a fast link), so this bounds a fill's memory to a few
/// MiB when the disk or the hash falls behind.
const WRITE_QUEUE: usize = 16;

/// Where a fill is, as every reader sees it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for its turn (`cache.max_fills`), then for the upstream's response headers.
    Connecting,
    /// `written` bytes are on disk; `size` is the upstream's `Content-Length`, if it sent one.
    Streaming { size: Option<u64>, written: u64 },
    /// Verified and committed: the file holds exactly `size` bytes.
    Done { size: u64 },
    /// The fill failed; the temp file is gone.
    Failed(Error),
}

/// A fill under way, shared by the task that runs it and its readers.
pub struct Fill {
    /// The temp file, opened once; readers `pread` it, so they share no offset.
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    /// The last chunks written, for readers that keep up with the writer.
    recent: Arc<Mutex<Recent>>,
    /// Set before the first byte when a tier behind the local one (the bucket) feeds the
    /// fill rather than the upstream: the answer is then labelled `bucket`, not `fill`.
    from_tier: Arc<AtomicBool>,
}

/// Locks `m` even if a thread panicked while holding it: the data guarded here (a fill's
/// recent chunks, its disk state, the map of fills) is checked, not trusted, by its users,
/// and a fill's guard must clean up after a panic (a second panic would abort the process).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The most recent chunks of a fill, as the network delivered them (the same `Bytes` the
/// file was written from). A reader that has caught up with the writer takes its next
/// chunk from here: no read from the file, no copy, no blocking thread. A reader further
/// behind than `RECENT_BYTES`, or whose chunk was not kept (the budget of all fills was
/// spent), reads the file.
struct Recent {
    /// `(offset in the blob, chunk)`, in order; not contiguous when a chunk was not kept.
    chunks: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// What all fills together may keep.
    budget: &'static Budget,
}

/// The most a fill keeps for its readers.
const RECENT_BYTES: usize = 4 << 20;
/// The most all fills together keep for their readers. Past it, a fill keeps fewer chunks
/// and its readers read the file (from the page cache: it was just written).
const RECENT_BUDGET: usize = 64 << 20;

/// Bytes shared by all fills' `Recent`, taken and given back atomically.
struct Budget {
    used: AtomicUsize,
    cap: usize,
}

static BUDGET: Budget = Budget {
    used: AtomicUsize::new(0),
    cap: RECENT_BUDGET,
};

impl Budget {
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.cap).then_some(used + n)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

impl Default for Recent {
    fn default() -> Self {
        Recent::within(&BUDGET)
    }
}

impl Drop for Recent {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

impl Recent {
    fn within(budget: &'static Budget) -> Recent {
        Recent {
            chunks: Default::default(),
            bytes: 0,
            budget,
        }
    }

    /// Keeps `chunk`, written at `at`, making room with this fill's oldest chunks when it is
    /// over its own bound or the budget is spent; if there is still no room, the chunk is not
    /// kept.
    fn push(&mut self, at: u64, chunk: Bytes) {
        let len = chunk.len();
        loop {
            if self.bytes + len <= RECENT_BYTES && self.budget.take(len) {
                self.bytes += len;
                self.chunks.push_back((at, chunk));
                return;
            }
            let Some((_, old)) = self.chunks.pop_front() else {
                return;
            };
            self.bytes -= old.len();
            self.budget.give(old.len());
        }
    }

    /// The bytes from `pos` (up to `limit`, exclusive) if they are still here: the rest of
    /// the chunk that holds `pos`.
    fn slice(&self, pos: u64, limit: u64) -> Option<Bytes> {
        let i = self
            .chunks
            .partition_point(|(at, _)| *at <= pos)
            .checked_sub(1)?;
        let (at, chunk) = &self.chunks[i];
        let off = (pos - at) as usize;
        if off >= chunk.len() || pos >= limit {
            return None;
        }
        let len = (chunk.len() - off).min((limit - pos) as usize);
        Some(chunk.slice(off..off + len))
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
    /// Starts a fill of `digest` from the body `fetch` yields. Called with the fills lock
    /// held, after a miss on disk; the caller records the returned fill. The fill waits for
    /// its turn (`max_fills`) before `fetch` is awaited; the deadline counts the wait.
    pub(super) fn start_fill<F>(self: &Arc<Self>, digest: Digest, fetch: F) -> io::Result<Arc<Fill>>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let (file, temp) = self.store.temp()?;
        let (tx, rx) = watch::channel(Progress::Connecting);
        let fill = Arc::new(Fill {
            file: Arc::new(file),
            progress: rx,
            recent: Arc::new(Mutex::new(Recent::default())),
            from_tier: Arc::new(AtomicBool::new(false)),
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
        };
        tokio::spawn(guard.run(fetch));
        Ok(fill)
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
    async fn run<F>(self, fetch: F)
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

    async fn work<F>(&self, fetch: F) -> Result<u64, Error>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let (cache, digest) = (&self.cache, &self.digest);
        let _turn = {
            let _queued = Raised::new(&cache.metrics.fills_queued);
            cache.turns.acquire().await.map_err(io::Error::other)?
        };
        let _running = Raised::new(&cache.metrics.fills_in_flight);
        let mut fetched = fetch.await?;
        let origin = std::mem::replace(&mut fetched.origin, Origin::Shared);
        let from_shared = matches!(origin, Origin::Shared);
        // Before any progress is published: a reader that knows the size knows this too.
        self.fill.from_tier.store(from_shared, Ordering::Release);
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
        let last = match (self.committed, self.error.take()) {
            (Some(size), _) => {
                cache.metrics.fills_completed.inc();
                tracing::info!(%digest, size, "fill committed");
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
                        tracing::debug!(%digest, error = %e, "fill failed")
                    }
                    _ => tracing::warn!(%digest, error = %e, "fill failed"),
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

    let sink = Sink::with_recent(file, digest.algorithm(), progress.clone(), Some(recent));
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

/// The disk half of a fill: each chunk is written (`pwrite`), offered to the readers, then
/// hashed, all on the fill's `Lane` of the disk pool, in order. One thread per fill doing
/// both costs no more CPU than two threads (the work is the same), and the thread count no
/// longer follows the number of fills (see `disk`). The network side queues chunks through
/// `push` without blocking the runtime, at most `WRITE_QUEUE` ahead of the disk.
pub struct Sink {
    lane: Lane,
    state: Arc<SinkState>,
    /// One permit per chunk queued and not yet written; the job gives it back.
    credit: Arc<Semaphore>,
}

/// What a fill's disk jobs share. Only the lane's thread locks `disk`: the lock is never
/// contended, it only makes the state shareable with the jobs.
struct SinkState {
    file: Arc<File>,
    progress: Arc<watch::Sender<Progress>>,
    recent: Option<Arc<Mutex<Recent>>>,
    /// A write failed (or a job panicked): `push` refuses more chunks.
    failed: AtomicBool,
    disk: Mutex<Disk>,
}

struct Disk {
    hasher: Option<DigestHasher>,
    /// Bytes written.
    offset: u64,
    /// When the readers were last told, and of how much.
    notified: (u64, Instant),
    /// Where writeback was last started.
    flushing: u64,
    error: Option<io::Error>,
}

/// The writer asks the kernel to start writing back every this many bytes it has written,
/// so the `fsync` of the commit (which the clients' last byte waits for) finds most of the
/// file on disk already instead of flushing all of it then.
const WRITEBACK_AHEAD: u64 = 8 << 20;

/// Starts writeback of `len` bytes of `file` from `offset`, without waiting for it. Only an
/// early start: the commit's `fsync` is what makes the file durable and reports errors.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor that `file` keeps open; no memory is
    // passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Readers are woken when this much has been written since they last were (or at once when
/// the last wake is older than `NOTIFY_AFTER`): waking every reader for every small network
/// frame would make them chase the writer in tiny reads.
const NOTIFY_BYTES: u64 = 64 << 10;
const NOTIFY_AFTER: Duration = Duration::from_millis(2);

impl SinkState {
    fn publish(&self, offset: u64) {
        self.progress.send_modify(|p| {
            if let Progress::Streaming { written, .. } = p {
                *written = offset;
            }
        })
    }

    /// Writes, offers and hashes one chunk (a job on the lane). After a failure, chunks are
    /// dropped: `finish` reports the error.
    fn write(&self, chunk: Bytes) {
        let mut disk = match self.disk.lock() {
            Ok(d) => d,
            Err(_) => return, // a job panicked: `finish` reports it
        };
        if disk.error.is_some() {
            return;
        }
        let offset = disk.offset;
        if let Err(e) = self.file.write_all_at(&chunk, offset) {
            disk.error = Some(e);
            self.failed.store(true, Ordering::Release);
            return;
        }
        let end = offset + chunk.len() as u64;
        disk.offset = end;
        // The readers first, the hash after: they need not wait for it.
        if let Some(recent) = &self.recent {
            lock(recent).push(offset, chunk.clone());
        }
        if end - disk.notified.0 >= NOTIFY_BYTES || disk.notified.1.elapsed() >= NOTIFY_AFTER {
            self.publish(end);
            disk.notified = (end, Instant::now());
        }
        if let Some(hasher) = &mut disk.hasher {
            hasher.update(&chunk);
        }
        if end - disk.flushing >= WRITEBACK_AHEAD {
            start_writeback(&self.file, disk.flushing, end - disk.flushing);
            disk.flushing = end;
        }
    }

    /// After the last chunk (a job on the lane): the bytes written and their digest.
    fn finish(&self) -> io::Result<(u64, Digest)> {
        let mut disk = self
            .disk
            .lock()
            .map_err(|_| io::Error::other("a disk job of this fill panicked"))?;
        if let Some(e) = disk.error.take() {
            return Err(e);
        }
        let offset = disk.offset;
        self.publish(offset);
        let hasher = disk.hasher.take().expect("finished once");
        Ok((offset, hasher.finalize()))
    }
}

impl Sink {
    /// A sink for `file` on a lane of the disk pool, publishing `written` on `progress`.
    pub fn start(
        file: Arc<File>,
        algorithm: Algorithm,
        progress: Arc<watch::Sender<Progress>>,
    ) -> Sink {
        Self::with_recent(file, algorithm, progress, None)
    }

    /// `start`, also keeping the chunks written last in `recent` for the readers.
    fn with_recent(
        file: Arc<File>,
        algorithm: Algorithm,
        progress: Arc<watch::Sender<Progress>>,
        recent: Option<Arc<Mutex<Recent>>>,
    ) -> Sink {
        Sink {
            lane: Lane::new(),
            state: Arc::new(SinkState {
                file,
                progress,
                recent,
                failed: AtomicBool::new(false),
                disk: Mutex::new(Disk {
                    hasher: Some(DigestHasher::new(algorithm)),
                    offset: 0,
                    notified: (0, Instant::now()),
                    flushing: 0,
                    error: None,
                }),
            }),
            credit: Arc::new(Semaphore::new(WRITE_QUEUE)),
        }
    }

    /// Queues a chunk; `false` when the sink has failed (its error comes from `finish`).
    pub async fn push(&self, chunk: Bytes) -> bool {
        if self.state.failed.load(Ordering::Acquire) {
            return false;
        }
        let Ok(permit) = self.credit.clone().acquire_owned().await else {
            return false;
        };
        let state = self.state.clone();
        self.lane.run(move || {
            let _permit: OwnedSemaphorePermit = permit;
            state.write(chunk);
        });
        true
    }

    /// Waits for the chunks queued: the bytes written and their digest.
    pub async fn finish(self) -> io::Result<(u64, Digest)> {
        let (tx, rx) = oneshot::channel();
        let state = self.state.clone();
        self.lane.run(move || {
            let _ = tx.send(state.finish());
        });
        rx.await
            .map_err(|_| io::Error::other("a disk job of this fill panicked"))?
    }
}

/// A blob to serve: a committed file, or the growing file of a fill.
#[derive(Clone)]
pub struct Source {
    file: Arc<File>,
    /// `None` for a committed file: every byte is there.
    progress: Option<watch::Receiver<Progress>>,
    /// A fill's last chunks.
    recent: Option<Arc<Mutex<Recent>>>,
    /// Known size of a committed file.
    size: Option<u64>,
    /// The media type, when the blob is a manifest.
    pub media_type: Option<String>,
    /// A fill's flag: fed by a tier behind the local one.
    from_tier: Option<Arc<AtomicBool>>,
}

impl Source {
    pub fn committed(file: File, size: u64, media_type: Option<String>) -> Source {
        Source {
            file: Arc::new(file),
            progress: None,
            recent: None,
            size: Some(size),
            media_type,
            from_tier: None,
        }
    }

    pub fn filling(fill: &Fill) -> Source {
        Source {
            file: fill.file.clone(),
            progress: Some(fill.progress.clone()),
            recent: Some(fill.recent.clone()),
            size: None,
            media_type: None,
            from_tier: Some(fill.from_tier.clone()),
        }
    }

    /// Is this served from a fill (bytes coming from the upstream or the bucket right now)?
    pub fn is_fill(&self) -> bool {
        self.progress.is_some()
    }

    /// Is this a fill fed by a tier behind the local one (the bucket), not the upstream?
    /// Known once [`Source::size`] has answered.
    pub fn is_from_tier(&self) -> bool {
        self.from_tier
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// The blob's size: at once for a committed file; for a fill, once the upstream has
    /// announced it (or, without a `Content-Length`, once the fill is done). A fill that
    /// fails first gives its error.
    pub async fn size(&mut self) -> Result<u64, Error> {
        if let Some(s) = self.size {
            return Ok(s);
        }
        let rx = self
            .progress
            .as_mut()
            .expect("a source without size is a fill");
        loop {
            match &*rx.borrow_and_update() {
                Progress::Streaming { size: Some(s), .. } | Progress::Done { size: s } => {
                    self.size = Some(*s);
                    return Ok(*s);
                }
                Progress::Failed(e) => return Err(e.clone()),
                Progress::Connecting | Progress::Streaming { size: None, .. } => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::from(io::Error::other("fill ended without a result")));
            }
        }
    }

    /// A reader of bytes `start..end` (exclusive).
    pub fn reader(&self, start: u64, end: u64) -> Reader {
        Reader {
            file: self.file.clone(),
            progress: self.progress.clone(),
            recent: self.recent.clone(),
            pos: start,
            end,
        }
    }
}

/// Reads a range of a blob at its own pace, waiting for a fill to write the bytes.
pub struct Reader {
    file: Arc<File>,
    progress: Option<watch::Receiver<Progress>>,
    recent: Option<Arc<Mutex<Recent>>>,
    pos: u64,
    end: u64,
}

impl Reader {
    /// The next chunk, `None` at the end, or an error if the fill failed.
    pub async fn next_chunk(&mut self) -> Option<io::Result<Bytes>> {
        if self.pos >= self.end {
            return self.finish().await;
        }
        let available = match &mut self.progress {
            None => self.end,
            Some(rx) => loop {
                let state = rx.borrow_and_update().clone();
                let available = match state {
                    Progress::Connecting => 0,
                    // The last byte of the range waits for the verdict: a client must never
                    // hold a complete body that later proves wrong (it could not tell).
                    Progress::Streaming { written, .. } => written.min(self.end - 1),
                    Progress::Done { size } if size < self.end => {
                        return self.fail(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob is shorter than announced",
                        ));
                    }
                    Progress::Done { size } => size,
                    Progress::Failed(e) => return self.fail(io::Error::other(e.to_string())),
                };
                if available > self.pos {
                    break available;
                }
                if rx.changed().await.is_err() {
                    return self.fail(io::Error::other("fill ended without a result"));
                }
            },
        };
        let limit = available.min(self.end);
        if let Some(recent) = &self.recent {
            let hit = lock(recent).slice(self.pos, limit);
            if let Some(chunk) = hit {
                self.pos += chunk.len() as u64;
                return Some(Ok(chunk));
            }
        }
        let len = (limit - self.pos).min(READ_CHUNK as u64) as usize;
        debug_assert!(len > 0);
        // Below `available`, every byte is on disk: a mapped window is safe (see map_window).
        let read = if len >= MAP_MIN {
            map_window(&self.file, self.pos, len)
        } else {
            read_at(self.file.clone(), self.pos, len).await
        };
        match read {
            Ok(chunk) => {
                self.pos += len as u64;
                Some(Ok(chunk))
            }
            Err(e) => self.fail(e),
        }
    }

    /// Ends the reader with `e`: no chunk comes after an error.
    fn fail(&mut self, e: io::Error) -> Option<io::Result<Bytes>> {
        self.pos = self.end;
        self.progress = None;
        Some(Err(e))
    }

    /// The end of the range: for a fill, only once the whole blob is verified (the last byte
    /// was held back until then, see above).
    async fn finish(&mut self) -> Option<io::Result<Bytes>> {
        let rx = self.progress.as_mut()?;
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                Progress::Done { .. } => {
                    self.progress = None;
                    return None;
                }
                Progress::Failed(e) => return self.fail(io::Error::other(e.to_string())),
                Progress::Connecting | Progress::Streaming { .. } => {}
            }
            if rx.changed().await.is_err() {
                return self.fail(io::Error::other("fill ended without a result"));
            }
        }
    }

    /// The reader as a stream of chunks. A committed range is served in mapped windows
    /// (see `map_window`), or read at once when it is short.
    pub fn into_stream(self) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
        use futures_util::StreamExt;
        if self.progress.is_none() {
            let Reader { file, pos, end, .. } = self;
            if end - pos >= MAP_MIN as u64 {
                if let Some(stream) = mapped_stream(&file, pos, end) {
                    return stream;
                }
                return futures_util::stream::iter((pos..end).step_by(READ_CHUNK))
                    .then(move |at| {
                        read_at(file.clone(), at, (end - at).min(READ_CHUNK as u64) as usize)
                    })
                    .boxed();
            }
            if end == pos {
                return futures_util::stream::empty().boxed();
            }
            return futures_util::stream::once(read_at(file, pos, (end - pos) as usize)).boxed();
        }
        futures_util::stream::unfold(self, |mut r| async move {
            let chunk = r.next_chunk().await?;
            Some((chunk, r))
        })
        .boxed()
    }
}

/// Reads at least this long are served from a memory map of the file.
const MAP_MIN: usize = 64 << 10;
/// A committed blob is sent in slices of this size from its map, each next one read ahead.
const MAP_CHUNK: usize = 2 << 20;

/// `len` bytes at `at` of `file`, as `Bytes` over a memory map of just that window: hyper
/// writes the page cache to the socket, one copy fewer than `pread` into a buffer, and no
/// blocking thread is needed when the pages are in memory (they are for a fill: just
/// written). The map is dropped (unmapped) once hyper has written the chunk, so memory
/// stays a window per response in flight.
///
/// Safe because the window is inside what is on disk and stays there: a fill's temp file
/// only grows (readers map below the bytes written), and a committed blob's file is never
/// written or truncated again (replaced by a rename, evicted by an unlink, which leaves
/// mapped pages valid).
fn map_window(file: &File, at: u64, len: usize) -> io::Result<Bytes> {
    // SAFETY: see above: the mapped range is never truncated or modified.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(at)
            .len(len)
            .populate()
            .map(file)
    }?;
    Ok(Bytes::from_owner(map))
}

/// A slice of a memory-mapped blob, handed to hyper as `Bytes` without a copy.
struct MapSlice {
    map: Arc<memmap2::Mmap>,
    at: usize,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        &self.map[self.at..self.at + self.len]
    }
}

/// Serves `pos..end` of a committed blob from one map of the file, in `MAP_CHUNK` slices.
/// The kernel is asked to read the next slice ahead (`WILLNEED`), and the pages of slices
/// sent long ago are unmapped from this process (`DONTNEED`: they stay in the page cache),
/// so the process's resident memory stays a few slices per response, not the whole blob.
/// `None` (the caller reads with `pread`) if the file cannot be mapped.
fn mapped_stream(
    file: &File,
    pos: u64,
    end: u64,
) -> Option<futures_util::stream::BoxStream<'static, io::Result<Bytes>>> {
    use futures_util::StreamExt;
    // SAFETY: a committed blob's file is never written or truncated (see `map_window`).
    let map = unsafe { memmap2::Mmap::map(file) }.ok()?;
    if (map.len() as u64) < end {
        return None;
    }
    let _ = map.advise(memmap2::Advice::Sequential);
    let map = Arc::new(map);
    let (pos, end) = (pos as usize, end as usize);
    let chunks = (pos..end)
        .step_by(MAP_CHUNK)
        .map(move |at| (at, (end - at).min(MAP_CHUNK)));
    Some(
        futures_util::stream::iter(chunks)
            .map(move |(at, len)| {
                let next = at + len;
                if next < end {
                    let ahead = (end - next).min(MAP_CHUNK);
                    let _ = map.advise_range(memmap2::Advice::WillNeed, next, ahead);
                }
                let behind = 4 * MAP_CHUNK;
                if at >= pos + behind {
                    // SAFETY: DONTNEED on a read-only shared file map only drops this
                    // process's page table entries; a later access reads the page cache
                    // again, so slices hyper still holds stay valid.
                    let _ = unsafe {
                        map.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            at - behind,
                            MAP_CHUNK,
                        )
                    };
                }
                Ok(Bytes::from_owner(MapSlice {
                    map: map.clone(),
                    at,
                    len,
                }))
            })
            .boxed(),
    )
}

/// Reads `len` bytes at `at` on a blocking thread.
async fn read_at(file: Arc<File>, at: u64, len: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        file.read_exact_at(&mut buf, at)?;
        Ok(buf.freeze())
    })
    .await
    .map_err(io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;
    use std::io::Write;

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

        let body = futures_util::stream::iter(chunks(&data)).boxed();
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

    /// A fill waiting for its turn is bounded by the fill deadline, like a running one.
    #[tokio::test(start_paused = true)]
    async fn a_queued_fill_fails_at_the_fill_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, metrics) = cache(dir.path(), 1);
        let never = || std::future::pending::<Result<Fetched, Error>>();
        let start = Instant::now();
        let running = cache.start_fill(blob(10).1, never()).unwrap();
        let queued = cache.start_fill(blob(11).1, never()).unwrap();
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

    #[test]
    fn recent_chunks_share_one_budget() {
        let budget: &'static Budget = Box::leak(Box::new(Budget {
            used: AtomicUsize::new(0),
            cap: 3 << 20,
        }));
        let mb = |n: u8| Bytes::from(vec![n; 1 << 20]);
        let mut a = Recent::within(budget);
        let mut b = Recent::within(budget);
        a.push(0, mb(1));
        a.push(1 << 20, mb(2));
        b.push(0, mb(3));
        assert_eq!(budget.used.load(Ordering::SeqCst), 3 << 20);
        // Spent: b makes room with its own oldest chunk.
        b.push(1 << 20, mb(4));
        assert!(b.slice(0, 10).is_none());
        assert_eq!(b.slice(1 << 20, 2 << 20).unwrap(), mb(4));
        // A fill with nothing to give back keeps nothing: its readers read the file.
        let mut c = Recent::within(budget);
        c.push(0, mb(5));
        assert!(c.slice(0, 10).is_none());
        drop(a);
        assert_eq!(
            budget.used.load(Ordering::SeqCst),
            1 << 20,
            "given back on drop"
        );
        c.push(1 << 20, mb(6));
        assert_eq!(c.slice(1 << 20, 2 << 20).unwrap(), mb(6));
        drop((b, c));
        assert_eq!(budget.used.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn recent_chunks_are_sliced_and_bounded() {
        let mut r = Recent::default();
        let chunk = |n: u8, len: usize| Bytes::from(vec![n; len]);
        r.push(0, chunk(1, 1000));
        r.push(1000, chunk(2, 500));
        assert_eq!(r.slice(0, 2000).unwrap(), chunk(1, 1000));
        assert_eq!(r.slice(900, 2000).unwrap(), chunk(1, 100));
        assert_eq!(
            r.slice(1200, 1300).unwrap(),
            chunk(2, 100),
            "up to the limit"
        );
        assert!(r.slice(1500, 2000).is_none(), "not written yet");
        assert!(r.slice(1200, 1200).is_none());
        // Beyond the bound, the oldest go.
        let mut at = 1500;
        for _ in 0..5 {
            r.push(at, chunk(3, 1 << 20));
            at += 1 << 20;
        }
        assert!(r.bytes <= RECENT_BYTES);
        assert!(
            r.slice(0, 10).is_none(),
            "dropped: the reader reads the file"
        );
        assert_eq!(r.slice(at - 10, at).unwrap().len(), 10);
    }

    /// Committed ranges, mapped (long) or read (short), at unaligned offsets.
    #[tokio::test]
    async fn committed_ranges_come_out_exact() {
        let data: Vec<u8> = (0..5_000_003u32).map(|i| (i % 253) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let src = Source::committed(f, data.len() as u64, None);
        for (start, end) in [
            (0, data.len()),
            (1_234_567, 4_900_001),
            (4_999_000, data.len()),
            (17, 1_048_593),
            (3, 9),
        ] {
            let got: Vec<Bytes> = src
                .reader(start as u64, end as u64)
                .into_stream()
                .try_collect()
                .await
                .unwrap();
            assert_eq!(got.concat(), &data[start..end], "{start}..{end}");
        }
    }
}
