//! The disk half of a fill: its chunks hashed and written in order on the disk pool, and
//! offered to the fill's readers as they are written.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};

use super::super::disk::Lane;
use super::super::source::{lock, Progress, Recent};
use crate::clock::Instant;
use crate::reference::{Algorithm, Digest, DigestHasher};

/// Chunks of one fill queued for its disk thread and not yet written. A chunk is a network
/// frame (up to a few hundred KiB on a fast link), so this bounds a fill's memory to a few
/// MiB when the disk or the hash falls behind.
const WRITE_QUEUE: usize = 16;

/// The disk half of a fill, on two lanes of the disk pool: each chunk is written (`pwrite`)
/// and offered to the readers on one, hashed on the other, each lane in order. The hash
/// (about 0.6 CPU-s a GiB) and the write with its writeback (about 0.4) were one thread's
/// work, which bounded a cold fill at about 900 MB/s with the network task waiting on it
/// most of the time; on two lanes they overlap. The network side queues chunks through
/// `push` without blocking the runtime, at most `WRITE_QUEUE` ahead of the slower lane.
pub struct Sink {
    lane: Lane,
    /// Where the chunks are hashed: another thread of the pool than `lane`'s, when it has
    /// one.
    hash_lane: Lane,
    state: Arc<SinkState>,
    /// One permit per chunk queued and not yet written; the job gives it back.
    credit: Arc<Semaphore>,
}

/// What a fill's disk jobs share. Only the write lane's thread locks `disk`, and only the
/// hash lane's locks `hasher`: the locks are never contended, they only make the state
/// shareable with the jobs (and a job that panics poisons its lock, which `finish` reports).
struct SinkState {
    file: Arc<File>,
    progress: Arc<watch::Sender<Progress>>,
    recent: Option<Arc<Mutex<Recent>>>,
    /// A write failed (or a job panicked): `push` refuses more chunks.
    failed: AtomicBool,
    disk: Mutex<Disk>,
    hasher: Mutex<Option<DigestHasher>>,
}

struct Disk {
    /// Bytes written.
    offset: u64,
    /// When the readers were last told, and of how much.
    notified: (u64, Instant),
    /// Where writeback was last started.
    flushing: u64,
    /// The announced size, if any, and how much of the file's disk space is allocated so
    /// far (see `RESERVE_AHEAD`).
    announced: Option<u64>,
    reserved: u64,
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

/// With a size announced, the writer allocates the file's disk space (`fallocate`) this far
/// ahead of its writes, never past the size. A `pwrite` into space not yet allocated does
/// ext4's delayed-allocation bookkeeping for every page; into space allocated ahead it does
/// not: the disk threads took 0.98 CPU-s per cold GiB against 1.11 (medians of ten pulls
/// each), and 400 KiB `pwrite`s alone 0.24-0.26 s a GiB against 0.33, while the kernel's
/// workers do 0.01-0.04 s more at writeback. Ahead in steps rather than the whole size at
/// once: an announced size that is a lie, or a fill that fails, holds no more than a step
/// of disk.
const RESERVE_AHEAD: u64 = 64 << 20;

/// Allocates `len` bytes of `file`'s disk space from `offset`, keeping its size. Only an
/// early allocation: where it fails (no space, a file system without it), the writes
/// allocate as they go and report the errors.
fn allocate(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain system call on a descriptor that `file` keeps open; no memory is
    // passed.
    unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
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

    /// Writes and offers one chunk (a job on the write lane). After a failure, chunks are
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
        self.reserve(&mut disk, offset + chunk.len() as u64);
        if let Err(e) = self.file.write_all_at(&chunk, offset) {
            disk.error = Some(e);
            self.failed.store(true, Ordering::Release);
            return;
        }
        let end = offset + chunk.len() as u64;
        disk.offset = end;
        if let Some(recent) = &self.recent {
            lock(recent).push(offset, chunk.clone());
        }
        if end - disk.notified.0 >= NOTIFY_BYTES || disk.notified.1.elapsed() >= NOTIFY_AFTER {
            self.publish(end);
            disk.notified = (end, Instant::now());
        }
        if end - disk.flushing >= WRITEBACK_AHEAD {
            start_writeback(&self.file, disk.flushing, end - disk.flushing);
            disk.flushing = end;
        }
    }

    /// Allocates the disk space up to `end` before it is written, and `RESERVE_AHEAD` more
    /// (within the announced size).
    fn reserve(&self, disk: &mut Disk, end: u64) {
        match disk.announced {
            Some(size) if end > disk.reserved && disk.reserved < size => {
                let to = (disk.reserved + RESERVE_AHEAD).max(end).min(size);
                allocate(&self.file, disk.reserved, to - disk.reserved);
                disk.reserved = to;
            }
            _ => {}
        }
    }

    /// Hashes one chunk (a job on the hash lane). A job that panicked poisoned the lock: the
    /// chunks after it are not hashed, and `finish` reports the panic.
    fn hash(&self, chunk: &[u8]) {
        if let Ok(mut hasher) = self.hasher.lock() {
            if let Some(h) = hasher.as_mut() {
                h.update(chunk);
            }
        }
    }

    /// After the last chunk (a job on the write lane, once the hash lane is done too): the
    /// bytes written and their digest.
    fn finish(&self) -> io::Result<(u64, Digest)> {
        fn panicked<T>(_: T) -> io::Error {
            io::Error::other("a disk job of this fill panicked")
        }
        let mut disk = self.disk.lock().map_err(panicked)?;
        if let Some(e) = disk.error.take() {
            return Err(e);
        }
        let offset = disk.offset;
        self.publish(offset);
        let hasher = self.hasher.lock().map_err(panicked)?.take();
        Ok((offset, hasher.expect("finished once").finalize()))
    }
}

impl Sink {
    /// A sink for `file` on a lane of the disk pool, publishing `written` on `progress`.
    pub fn start(
        file: Arc<File>,
        algorithm: Algorithm,
        progress: Arc<watch::Sender<Progress>>,
    ) -> Sink {
        Self::with_recent(file, algorithm, progress, None, None)
    }

    /// `start`, also keeping the chunks written last in `recent` for the readers, and
    /// allocating the disk space of an `announced` size ahead of the writes.
    pub(super) fn with_recent(
        file: Arc<File>,
        algorithm: Algorithm,
        progress: Arc<watch::Sender<Progress>>,
        recent: Option<Arc<Mutex<Recent>>>,
        announced: Option<u64>,
    ) -> Sink {
        let lane = Lane::new();
        Sink {
            hash_lane: Lane::beside(&lane),
            lane,
            state: Arc::new(SinkState {
                file,
                progress,
                recent,
                failed: AtomicBool::new(false),
                hasher: Mutex::new(Some(DigestHasher::new(algorithm))),
                disk: Mutex::new(Disk {
                    offset: 0,
                    notified: (0, Instant::now()),
                    flushing: 0,
                    announced,
                    reserved: 0,
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
        // The chunk's credit comes back when both lanes are done with it.
        let permit: Arc<OwnedSemaphorePermit> = Arc::new(permit);
        let (state, held, bytes) = (self.state.clone(), permit.clone(), chunk.clone());
        self.hash_lane.run(move || {
            let _permit = held;
            state.hash(&bytes);
        });
        let state = self.state.clone();
        self.lane.run(move || {
            let _permit = permit;
            state.write(chunk);
        });
        true
    }

    /// Waits for the chunks queued: the bytes written and their digest.
    pub async fn finish(self) -> io::Result<(u64, Digest)> {
        let (hashed, all_hashed) = oneshot::channel();
        self.hash_lane.run(move || {
            let _ = hashed.send(());
        });
        all_hashed
            .await
            .map_err(|_| io::Error::other("a disk job of this fill panicked"))?;
        let (tx, rx) = oneshot::channel();
        let state = self.state.clone();
        self.lane.run(move || {
            let _ = tx.send(state.finish());
        });
        rx.await
            .map_err(|_| io::Error::other("a disk job of this fill panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a size announced, the file's disk space is allocated ahead of the writes, its
    /// size staying what is written, and one step at a time: a size that is a lie holds no
    /// more than a step of disk. Without one, nothing is allocated ahead.
    #[tokio::test]
    async fn an_announced_size_is_allocated_ahead_one_step_at_a_time() {
        use std::os::unix::fs::MetadataExt;
        let (dir, chunk) = (tempfile::tempdir().unwrap(), 256 << 10);
        for (size, ahead) in [(Some(3 << 20), 3 << 20), (Some(100 << 30), RESERVE_AHEAD)]
            .into_iter()
            .chain([(None, chunk)])
        {
            let file = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
            let progress = Arc::new(watch::channel(Progress::Connecting).0);
            let sink = Sink::with_recent(file.clone(), Algorithm::Sha256, progress, None, size);
            assert!(sink.push(Bytes::from(vec![7u8; chunk as usize])).await);
            assert_eq!(sink.finish().await.unwrap().0, chunk);
            let (len, allocated) = file
                .metadata()
                .map(|m| (m.len(), m.blocks() * 512))
                .unwrap();
            assert_eq!(len, chunk, "{size:?}: the size is what is written");
            let ok = (ahead..ahead + (1 << 20)).contains(&allocated);
            assert!(ok, "{size:?}: {allocated} bytes allocated");
        }
    }
}
