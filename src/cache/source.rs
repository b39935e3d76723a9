//! What a fill's readers see, and how every blob is read: a [`Source`] is a committed file
//! or the growing file of a fill; a [`Reader`] reads a range of it at its own pace, waiting
//! on the fill's [`Progress`] when it has caught up, and never hands out the last byte of its
//! range before the whole blob is verified. A reader that keeps up takes the fill's last
//! chunks from memory ([`Recent`], within one budget for all fills); one further behind, and
//! every committed blob, is read from the file in windows of a memory map, which a plain
//! connection sends with `sendfile` ([`window`]).

pub mod window;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use crate::error::Error;

/// Largest chunk a reader reads from the file into memory at once.
const READ_CHUNK: usize = 256 << 10;
/// Largest window of the file a reader maps at once. A plain connection sends it with
/// `sendfile` without touching its pages, so its size costs no memory there, and each
/// window costs an `mmap`, a `munmap` and a turn through hyper: 2 MiB windows took a fifth
/// less CPU per GB than 256 KiB ones serving a 64 MiB blob to 100 and 500 clients. A reader
/// that reads the map (TLS, a peer's stream) has at most this much of it mapped.
const MAP_WINDOW: usize = 2 << 20;
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

/// Locks `m` even if a thread panicked while holding it: the data guarded here (a fill's
/// recent chunks, its disk state, the map of fills) is checked, not trusted, by its users,
/// and a fill's guard must clean up after a panic (a second panic would abort the process).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The most recent chunks of a fill, as the network delivered them (the same `Bytes` the
/// file was written from). A reader that has caught up with the writer takes its next
/// chunk from here: no read from the file, no copy, no blocking thread. A reader further
/// behind than `RECENT_BYTES`, or whose chunk was not kept (the budget of all fills was
/// spent), reads the file.
pub(super) struct Recent {
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
    pub(super) fn push(&mut self, at: u64, chunk: Bytes) {
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

/// What feeds a fill, as its readers see it.
pub(super) const FED_BY_UPSTREAM: u8 = 0;
pub(super) const FED_BY_TIER: u8 = 1;
pub(super) const FED_BY_PEER: u8 = 2;

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
    /// A fill's feed: `FED_BY_UPSTREAM`, `FED_BY_TIER` (the bucket) or `FED_BY_PEER`.
    from_tier: Option<Arc<AtomicU8>>,
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

    /// The growing file of a fill, as its readers see it (see `Fill::source`).
    pub(super) fn of_fill(
        file: Arc<File>,
        progress: watch::Receiver<Progress>,
        recent: Arc<Mutex<Recent>>,
        from_tier: Arc<AtomicU8>,
    ) -> Source {
        Source {
            file,
            progress: Some(progress),
            recent: Some(recent),
            size: None,
            media_type: None,
            from_tier: Some(from_tier),
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
            .is_some_and(|f| f.load(Ordering::Acquire) != FED_BY_UPSTREAM)
    }

    /// Is this a fill fed by another replica's peer endpoint? Known once
    /// [`Source::size`] has answered.
    pub fn is_from_peer(&self) -> bool {
        self.from_tier
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Acquire) == FED_BY_PEER)
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
            hold_last: 1,
        }
    }

    /// Waits until the blob is whole and verified (at once for a committed file), telling
    /// `written` the bytes on disk as they grow; the blob's size, or the failed fill's
    /// error. For callers that fill the cache without reading the bytes (`warm`).
    pub async fn verified(&mut self, mut written: impl FnMut(u64)) -> Result<u64, Error> {
        let Some(rx) = self.progress.as_mut() else {
            let size = self.size.expect("a committed file knows its size");
            written(size);
            return Ok(size);
        };
        loop {
            match &*rx.borrow_and_update() {
                Progress::Done { size } => {
                    written(*size);
                    return Ok(*size);
                }
                Progress::Failed(e) => return Err(e.clone()),
                Progress::Streaming { written: w, .. } => written(*w),
                Progress::Connecting => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::from(io::Error::other("fill ended without a result")));
            }
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
    /// 1: the last byte waits for the verdict; 0 for a reader that verifies the bytes
    /// itself (see `for_verifier`).
    hold_last: u64,
}

impl Reader {
    /// For a reader that verifies every byte itself against the digest (another replica's
    /// fill): the last byte is not held back for this fill's verdict (its fsync), only the
    /// end of the stream is.
    pub fn for_verifier(mut self) -> Reader {
        self.hold_last = 0;
        self
    }

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
                    Progress::Streaming { written, .. } => written.min(self.end - self.hold_last),
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
        let left = limit - self.pos;
        debug_assert!(left > 0);
        // Below `available`, every byte is on disk: a mapped window is safe (see
        // `window::map`). A committed range is mapped to its end (`into_stream` reads a short
        // one at once); a fill's reader only a few bytes behind the writer reads them, as
        // does any reader whose window could not be mapped.
        let mapped = if left >= MAP_MIN as u64 || self.progress.is_none() {
            let len = left.min(MAP_WINDOW as u64) as usize;
            window::map(&self.file, self.pos, len).ok()
        } else {
            None
        };
        let read = match mapped {
            Some(chunk) => Ok(chunk),
            None => {
                let len = left.min(READ_CHUNK as u64) as usize;
                read_at(self.file.clone(), self.pos, len).await
            }
        };
        match read {
            Ok(chunk) => {
                self.pos += chunk.len() as u64;
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

    /// The reader as a stream of chunks: mapped windows (see [`window`]), or, for a short
    /// committed range, the range read at once.
    pub fn into_stream(self) -> futures_util::stream::BoxStream<'static, io::Result<Bytes>> {
        use futures_util::StreamExt;
        if self.progress.is_none() && self.end - self.pos < MAP_MIN as u64 {
            if self.end <= self.pos {
                return futures_util::stream::empty().boxed();
            }
            let len = (self.end - self.pos) as usize;
            return futures_util::stream::once(read_at(self.file, self.pos, len)).boxed();
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

    /// A fill's growing file, its readers reading from the file (no recent chunks kept):
    /// each gets what is written but the last byte of its range, which waits for the
    /// verdict; a fill that ends short fails its readers.
    #[tokio::test]
    async fn a_fill_growing_under_readers_holds_each_range_s_last_byte() {
        use futures_util::FutureExt;
        let data: Vec<u8> = (0..700_001u32).map(|i| (i % 241) as u8).collect();
        let n = data.len() as u64;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data[..100_000]).unwrap();
        let (tx, rx) = watch::channel(Progress::Streaming {
            size: Some(n),
            written: 100_000,
        });
        let nothing_kept: &'static Budget = Box::leak(Box::new(Budget {
            used: AtomicUsize::new(0),
            cap: 0,
        }));
        let src = Source::of_fill(
            Arc::new(f.try_clone().unwrap()),
            rx,
            Arc::new(Mutex::new(Recent::within(nothing_kept))),
            Arc::new(std::sync::atomic::AtomicU8::new(FED_BY_UPSTREAM)),
        );
        // Takes `n` bytes from `r`, then checks that it waits (for the fill, not a read).
        async fn take(r: &mut Reader, n: usize) -> Vec<u8> {
            let mut got = Vec::new();
            while got.len() < n {
                got.extend_from_slice(&r.next_chunk().await.unwrap().unwrap());
            }
            assert!(r.next_chunk().now_or_never().is_none(), "it waits");
            got
        }
        let mut whole = src.reader(0, n);
        let mut inside = src.reader(10, 5_000);
        assert!(take(&mut whole, 100_000).await == data[..100_000]);
        assert!(
            take(&mut inside, 4_989).await == data[10..4_999],
            "written, but its last byte"
        );
        f.write_all(&data[100_000..]).unwrap();
        tx.send_replace(Progress::Streaming {
            size: Some(n),
            written: n,
        });
        let rest = take(&mut whole, data.len() - 100_001).await;
        assert!(
            rest == data[100_000..n as usize - 1],
            "all but the last byte"
        );
        tx.send_replace(Progress::Done { size: n });
        let last = whole.next_chunk().await.unwrap().unwrap();
        assert_eq!(&last[..], &data[n as usize - 1..]);
        assert!(whole.next_chunk().await.is_none(), "then the end");
        let last = inside.next_chunk().await.unwrap().unwrap();
        assert_eq!(&last[..], &data[4_999..5_000]);
        assert!(inside.next_chunk().await.is_none());
        // A verdict shorter than a reader's range: an error, never a clean end.
        let mut beyond = src.reader(0, n + 1);
        let err = beyond.next_chunk().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            beyond.next_chunk().await.is_none(),
            "nothing after the error"
        );
    }

    /// A committed blob evicted (unlinked, its name taken by other bytes) while a response
    /// reads it: the response keeps reading the bytes it started with.
    #[tokio::test]
    async fn an_evicted_blob_is_read_to_its_end() {
        use futures_util::StreamExt;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 239) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        let src = Source::committed(File::open(&path).unwrap(), data.len() as u64, None);
        let mut stream = src.reader(1, data.len() as u64).into_stream();
        let mut got = stream.next().await.unwrap().unwrap().to_vec();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, vec![0u8; data.len()]).unwrap();
        while let Some(chunk) = stream.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert!(got == data[1..], "the bytes differ");
        let empty: Vec<Bytes> = src.reader(5, 5).into_stream().try_collect().await.unwrap();
        assert!(empty.is_empty());
    }
}
