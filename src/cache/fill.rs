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
//! A mismatch, a short body, a stall or a disk error publishes `Failed`, which every reader
//! turns into an error chunk (the client's connection is aborted, never cleanly ended), and
//! deletes the temp file. The fill is then forgotten, so the next request starts a new one.
//!
//! The disk half (`Sink`) is two blocking threads fed the same chunks through bounded
//! channels, one writing and one hashing, so the network read, the write and the hash
//! overlap and none blocks the runtime.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch};

use super::Cache;
use crate::error::{Error, UpstreamError};
use crate::reference::{Algorithm, Digest, DigestHasher};

/// Largest chunk a reader takes from the file at once.
const READ_CHUNK: usize = 256 << 10;
/// Chunks queued between the network and each disk thread of one fill. A chunk is a network
/// frame (up to a few hundred KiB on a fast link), so this bounds a fill's memory to a few
/// MiB when the disk or the hasher falls behind.
const WRITE_QUEUE: usize = 16;

/// Where a fill is, as every reader sees it.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for the upstream's response headers.
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
}

/// The most recent chunks of a fill, as the network delivered them (the same `Bytes` the
/// file was written from). A reader that has caught up with the writer takes its next
/// chunk from here: no read from the file, no copy, no blocking thread. A reader further
/// behind than `RECENT_BYTES` reads the file.
#[derive(Default)]
struct Recent {
    /// `(offset in the blob, chunk)`, in order, contiguous.
    chunks: std::collections::VecDeque<(u64, Bytes)>,
    bytes: usize,
}

const RECENT_BYTES: usize = 4 << 20;

impl Recent {
    fn push(&mut self, at: u64, chunk: Bytes) {
        self.bytes += chunk.len();
        self.chunks.push_back((at, chunk));
        while self.bytes > RECENT_BYTES && self.chunks.len() > 1 {
            let (_, old) = self.chunks.pop_front().expect("not empty");
            self.bytes -= old.len();
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
    Upstream { lease: Option<super::bucket::Lease> },
    /// The shared tier (verified again here, like any source).
    Shared,
}

/// A response body to fill from: its announced size, its chunks, and where it comes from.
pub struct Fetched {
    pub size: Option<u64>,
    pub body: futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    pub origin: Origin,
    /// Names the source in errors: the upstream's name, or `shared store`.
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
    /// held, after a miss on disk; the caller records the returned fill.
    pub(super) fn start_fill<F>(self: &Arc<Self>, digest: Digest, fetch: F) -> io::Result<Arc<Fill>>
    where
        F: Future<Output = Result<Fetched, Error>> + Send + 'static,
    {
        let (file, temp) = self.store.temp()?;
        let file = Arc::new(file);
        let (tx, rx) = watch::channel(Progress::Connecting);
        let recent = Arc::new(Mutex::new(Recent::default()));
        let fill = Arc::new(Fill {
            file: file.clone(),
            progress: rx,
            recent: recent.clone(),
        });
        self.metrics.fills_in_flight.inc();
        let cache = self.clone();
        let handle = fill.clone();
        tokio::spawn(async move {
            let tx = Arc::new(tx);
            let work = async {
                let mut fetched = fetch.await?;
                let origin = std::mem::replace(&mut fetched.origin, Origin::Shared);
                let from_shared = matches!(origin, Origin::Shared);
                if let (Origin::Upstream { lease }, Some(shared)) = (origin, &cache.shared) {
                    // Uploaded as it arrives; completed only once verified (see `shared`).
                    shared.upload(digest.clone(), Source::filling(&handle), lease);
                }
                let streamed = stream_to_file(
                    fetched,
                    &digest,
                    file.clone(),
                    tx.clone(),
                    recent,
                    cache.stall_timeout,
                )
                .await;
                if let (true, Some(shared)) = (from_shared, &cache.shared) {
                    if let Err(Error::Upstream {
                        error: UpstreamError::DigestMismatch(_) | UpstreamError::Length(_),
                        ..
                    }) = &streamed
                    {
                        shared.discard(&digest).await;
                    }
                }
                streamed
            };
            let outcome = tokio::time::timeout(cache.fill_deadline, work)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::upstream(
                        "fill",
                        UpstreamError::Stalled(cache.fill_deadline),
                    ))
                });
            let outcome = match outcome {
                Ok(size) => cache.commit(&digest, file, temp.clone(), size).await,
                Err(e) => Err(e),
            };
            let last = match outcome {
                Ok(size) => {
                    cache.metrics.fills_completed.inc();
                    tracing::info!(%digest, size, "fill committed");
                    Progress::Done { size }
                }
                Err(e) => {
                    let _ = tokio::fs::remove_file(&temp).await;
                    cache.metrics.fill_failed(reason(&e));
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
            cache.metrics.fills_in_flight.dec();
            // Forget the fill before telling its readers: from here a new request finds the
            // committed blob on disk, or starts a new fill after a failure.
            {
                let mut fills = cache.fills.lock().unwrap();
                if fills.get(&digest).is_some_and(|f| Arc::ptr_eq(f, &handle)) {
                    fills.remove(&digest);
                }
            }
            tx.send_replace(last);
            // Readers still behind read the file; the chunks are not needed any more.
            *handle.recent.lock().unwrap() = Recent::default();
        });
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

/// The disk half of a fill: one blocking thread writes the chunks and tells the readers,
/// another hashes the same chunks (`Bytes` are shared, not copied). Running the two side by
/// side makes a fill cost about what hashing alone costs, and readers see bytes as soon as
/// they are written, not after they are hashed.
pub struct Sink {
    writer: (
        mpsc::Sender<Bytes>,
        tokio::task::JoinHandle<io::Result<u64>>,
    ),
    hasher: (mpsc::Sender<Bytes>, tokio::task::JoinHandle<Digest>),
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

impl Sink {
    /// Starts the writer and hasher threads for `file`, publishing `written` on `progress`.
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
        let (wtx, mut wrx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            let mut offset = 0u64;
            let mut notified = (0u64, Instant::now());
            let mut flushing = 0u64;
            let publish = |offset: u64| {
                progress.send_modify(|p| {
                    if let Progress::Streaming { written, .. } = p {
                        *written = offset;
                    }
                })
            };
            while let Some(chunk) = wrx.blocking_recv() {
                file.write_all_at(&chunk, offset)?;
                let len = chunk.len() as u64;
                if let Some(recent) = &recent {
                    recent.lock().unwrap().push(offset, chunk);
                }
                offset += len;
                if offset - notified.0 >= NOTIFY_BYTES || notified.1.elapsed() >= NOTIFY_AFTER {
                    publish(offset);
                    notified = (offset, Instant::now());
                }
                if offset - flushing >= WRITEBACK_AHEAD {
                    start_writeback(&file, flushing, offset - flushing);
                    flushing = offset;
                }
            }
            publish(offset);
            Ok(offset)
        });
        let (htx, mut hrx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = DigestHasher::new(algorithm);
            while let Some(chunk) = hrx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finalize()
        });
        Sink {
            writer: (wtx, writer),
            hasher: (htx, hasher),
        }
    }

    /// Queues a chunk; `false` when the writer has failed (its error comes from `finish`).
    pub async fn push(&self, chunk: Bytes) -> bool {
        self.hasher.0.send(chunk.clone()).await.is_ok() && self.writer.0.send(chunk).await.is_ok()
    }

    /// Waits for both threads: the bytes written and their digest.
    pub async fn finish(self) -> io::Result<(u64, Digest)> {
        let (wtx, writer) = self.writer;
        let (htx, hasher) = self.hasher;
        drop((wtx, htx));
        let written = writer.await.map_err(io::Error::other)??;
        let digest = hasher.await.map_err(io::Error::other)?;
        Ok((written, digest))
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
}

impl Source {
    pub fn committed(file: File, size: u64, media_type: Option<String>) -> Source {
        Source {
            file: Arc::new(file),
            progress: None,
            recent: None,
            size: Some(size),
            media_type,
        }
    }

    pub fn filling(fill: &Fill) -> Source {
        Source {
            file: fill.file.clone(),
            progress: Some(fill.progress.clone()),
            recent: Some(fill.recent.clone()),
            size: None,
            media_type: None,
        }
    }

    /// Is this served from a fill (bytes coming from the upstream right now)?
    pub fn is_fill(&self) -> bool {
        self.progress.is_some()
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
            let hit = recent.lock().unwrap().slice(self.pos, limit);
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
