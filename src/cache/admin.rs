//! Offline maintenance of a cache folder, for `ocicache cache stats|verify|gc`.
//!
//! Each command holds the folder's lock for its run (see [`super::store`]): while a server
//! holds the folder, a command fails with [`Error::Held`] before touching anything, since a
//! second opener must not race the server's fills, and the server's index would not know of
//! what gc or verify removed. While a command runs, a server does not start on the folder.
//!
//! A folder may hold millions of blobs: stats keeps nothing per blob, verify hashes them as
//! it walks, and gc finds its cutoff time with a bounded histogram of modification times and
//! deletes in a second walk (a few MiB whatever the count), never a record per blob.

use std::io::{self, Read};
use std::path::Path;
use std::time::SystemTime;

use super::store::{Blob, Held, OpenError, Store};
use crate::reference::{Algorithm, Digest, DigestHasher};

/// Why a maintenance command did not complete.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process (a server, or another command) holds the folder: nothing was done.
    #[error(transparent)]
    Held(Held),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Error {
        match e {
            OpenError::Held(h) => Error::Held(h),
            OpenError::Io(e) => Error::Io(e),
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub bytes: u64,
    pub entries: u64,
    pub oldest: Option<SystemTime>,
    pub newest: Option<SystemTime>,
}

pub fn stats(dir: &Path) -> Result<Stats, Error> {
    let store = Store::open_for_maintenance(dir, "cache stats")?;
    Ok(count(&store)?)
}

/// Counts and sums the blobs in one walk, keeping nothing per blob.
fn count(store: &Store) -> io::Result<Stats> {
    let mut s = Stats::default();
    store.walk(|blob| {
        s.bytes += blob.size;
        s.entries += 1;
        s.oldest = Some(s.oldest.map_or(blob.modified, |t| t.min(blob.modified)));
        s.newest = Some(s.newest.map_or(blob.modified, |t| t.max(blob.modified)));
        Ok(())
    })?;
    Ok(s)
}

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    /// Blobs whose content did not match their name, removed.
    pub removed: Vec<String>,
}

/// Rehashes every blob; removes those that do not match their digest.
pub fn verify(dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<VerifyReport, Error> {
    let store = Store::open_for_maintenance(dir, "cache verify")?;
    // A first walk for the total the progress shows: cheap beside reading every byte.
    let total = count(&store)?.entries;
    let mut report = VerifyReport::default();
    let mut buf = vec![0u8; 1 << 20];
    store.walk(|blob| {
        let Some(digest) = blob.digest() else {
            return Ok(());
        };
        let Some((bytes, matches)) = rehash(&store, &digest, &mut buf)? else {
            return Ok(());
        };
        report.bytes += bytes;
        if !matches {
            store.remove(&digest);
            report.removed.push(digest.to_string());
        }
        report.checked += 1;
        progress(report.checked, total.max(report.checked));
        Ok(())
    })?;
    Ok(report)
}

/// Hashes committed blob `digest` with `buf`: its bytes and whether they match, `None` if
/// it is gone (evicted or removed meanwhile).
pub(crate) fn rehash(
    store: &Store,
    digest: &Digest,
    buf: &mut [u8],
) -> io::Result<Option<(u64, bool)>> {
    let mut hasher = DigestHasher::new(digest.algorithm());
    let mut file = match std::fs::File::open(store.blob_path(digest)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = 0;
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(Some((bytes, hasher.finalize() == *digest)))
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: u64,
    pub freed: u64,
    pub remaining: u64,
}

/// The most buckets gc's histogram of modification times holds (16 bytes each in a B-tree):
/// past it, neighbours merge and each bucket spans twice the time.
const BUCKETS: usize = 4096;

/// The most blobs of the cutoff bucket gc orders in memory in one round (64 bytes each).
const CUTOFF_BLOBS: usize = 65_536;

/// Bytes per bucket of modification time, in buckets of `2^shift` nanoseconds: a bounded
/// summary of the folder's recency order, coarser as the folder's times spread.
#[derive(Debug)]
struct Histogram {
    max: usize,
    shift: u32,
    buckets: std::collections::BTreeMap<u64, u64>,
}

impl Histogram {
    fn new(max: usize) -> Histogram {
        Histogram {
            max: max.max(2),
            shift: 0,
            buckets: Default::default(),
        }
    }

    fn add(&mut self, ns: u64, size: u64) {
        *self.buckets.entry(ns >> self.shift).or_default() += size;
        while self.buckets.len() > self.max {
            // Ends before the shift reaches 64: at 63 there are at most 2 keys.
            self.shift += 1;
            let old = std::mem::take(&mut self.buckets);
            for (k, bytes) in old {
                *self.buckets.entry(k >> 1).or_default() += bytes;
            }
        }
    }

    /// The oldest bucket by whose end `need` bytes are reached: its span `[from, to)` in
    /// nanoseconds and the bytes of the buckets before it (less than `need`).
    fn cutoff(&self, need: u64) -> (u64, u64, u64) {
        let mut before = 0u64;
        for (&k, &bytes) in &self.buckets {
            if before.saturating_add(bytes) >= need {
                let from = k << self.shift;
                let to = u64::try_from((u128::from(k) + 1) << self.shift).unwrap_or(u64::MAX);
                return (from, to, before);
            }
            before += bytes;
        }
        (u64::MAX, u64::MAX, before)
    }
}

/// Nanoseconds since the epoch (0 before it): what the histogram and the ordering compare.
fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A blob of the cutoff bucket: what gc keeps to delete it in recency order.
struct Candidate {
    modified: u64,
    size: u64,
    digest: RawDigest,
}

// Ordered by time alone, for the heap that keeps the oldest of the cutoff bucket.
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.modified == other.modified
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.modified.cmp(&other.modified)
    }
}

/// A digest as bytes: 32 inline for sha256 (nearly every blob), sha512's 64 boxed so that
/// they do not double every record.
enum RawDigest {
    Sha256([u8; 32]),
    Sha512(Box<[u8; 64]>),
}

impl RawDigest {
    fn of(blob: &Blob<'_>) -> Option<RawDigest> {
        match blob.algorithm {
            Algorithm::Sha256 => {
                let mut b = [0u8; 32];
                hex::decode_to_slice(blob.hex, &mut b).ok()?;
                Some(RawDigest::Sha256(b))
            }
            Algorithm::Sha512 => {
                let mut b = Box::new([0u8; 64]);
                hex::decode_to_slice(blob.hex, &mut b[..]).ok()?;
                Some(RawDigest::Sha512(b))
            }
        }
    }

    fn digest(&self) -> Option<Digest> {
        let text = match self {
            RawDigest::Sha256(b) => format!("sha256:{}", hex::encode(b)),
            RawDigest::Sha512(b) => format!("sha512:{}", hex::encode(&b[..])),
        };
        Digest::parse(&text).ok()
    }
}

/// Deletes the least recently used blobs until the cache holds at most `max_bytes`.
///
/// In bounded memory, whatever the number of blobs: a first walk sums the folder and builds
/// a histogram of modification times ([`BUCKETS`] buckets); if the folder is over its bound,
/// the histogram gives the bucket where the oldest blobs reach the bytes to free, and a
/// second walk deletes every blob older than that bucket and keeps the oldest
/// [`CUTOFF_BLOBS`] of the bucket itself, which are then deleted oldest first while bytes
/// remain to free. Only when the cutoff bucket holds more than that (many blobs within a few
/// nanoseconds of each other) and more of them must go does another round of two walks
/// follow. So a folder within its bound costs one walk, one over it two.
pub fn gc(dir: &Path, max_bytes: u64) -> Result<GcReport, Error> {
    gc_bounded(dir, max_bytes, BUCKETS, CUTOFF_BLOBS)
}

/// [`gc`] with its bounds as arguments, so that tests reach every branch with few blobs.
fn gc_bounded(
    dir: &Path,
    max_bytes: u64,
    buckets: usize,
    cutoff_blobs: usize,
) -> Result<GcReport, Error> {
    let store = Store::open_for_maintenance(dir, "cache gc")?;
    let mut report = GcReport::default();
    let mut last_total = u64::MAX;
    loop {
        let mut total: u64 = 0;
        let mut histogram = Histogram::new(buckets);
        store.walk(|blob| {
            total += blob.size;
            histogram.add(nanos(blob.modified), blob.size);
            Ok(())
        })?;
        report.remaining = total;
        // The second test ends the rounds if the last one shrank nothing (files that cannot
        // be unlinked), where another would find the same blobs again.
        if total <= max_bytes || total >= last_total {
            return Ok(report);
        }
        last_total = total;
        let need = total - max_bytes;
        let (from, to, _) = histogram.cutoff(need);
        drop(histogram);

        let mut freed = 0u64;
        let mut oldest = std::collections::BinaryHeap::<Candidate>::new();
        store.walk(|blob| {
            let modified = nanos(blob.modified);
            if modified >= to {
                return Ok(());
            }
            let Some(digest) = RawDigest::of(&blob) else {
                return Ok(());
            };
            let c = Candidate {
                modified,
                size: blob.size,
                digest,
            };
            if modified < from {
                freed += remove(&store, &c, &mut report);
            } else if oldest.len() < cutoff_blobs {
                oldest.push(c);
            } else if oldest
                .peek()
                .is_some_and(|newest| modified < newest.modified)
            {
                oldest.pop();
                oldest.push(c);
            }
            Ok(())
        })?;
        let full = oldest.len() == cutoff_blobs;
        for c in oldest.into_sorted_vec() {
            if freed >= need {
                break;
            }
            freed += remove(&store, &c, &mut report);
        }
        report.remaining = total.saturating_sub(freed);
        if freed >= need || !full {
            return Ok(report);
        }
    }
}

/// Deletes one blob for gc, counting it; returns its size.
fn remove(store: &Store, c: &Candidate, report: &mut GcReport) -> u64 {
    let Some(d) = c.digest.digest() else {
        return 0;
    };
    store.remove(&d);
    report.removed += 1;
    report.freed += c.size;
    c.size
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Digest;
    use std::io::Write;

    fn put(store: &Store, data: &[u8]) -> Digest {
        store.put_for_test(data)
    }

    fn set_age(store: &Store, d: &Digest, secs_ago: u64) {
        let f = std::fs::File::options()
            .write(true)
            .open(store.blob_path(d))
            .unwrap();
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(secs_ago))
            .unwrap();
    }

    #[test]
    fn verify_removes_corrupt_blobs_and_gc_removes_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c, b_path, a_path, c_path);
        {
            let store = Store::open(dir.path()).unwrap();
            a = put(&store, &[1u8; 1000]);
            b = put(&store, &[2u8; 1000]);
            c = put(&store, &[3u8; 1000]);
            set_age(&store, &a, 300);
            set_age(&store, &b, 200);
            set_age(&store, &c, 100);
            (a_path, b_path, c_path) = (
                store.blob_path(&a),
                store.blob_path(&b),
                store.blob_path(&c),
            );
        } // the server's store is gone: the folder is free
        let s = stats(dir.path()).unwrap();
        assert_eq!((s.entries, s.bytes), (3, 3000));
        assert!(s.oldest < s.newest);

        // Corrupt b on disk.
        std::fs::write(&b_path, [9u8; 1000]).unwrap();
        let r = verify(dir.path(), |_, _| {}).unwrap();
        assert_eq!(r.checked, 3);
        assert_eq!(r.removed, vec![b.to_string()]);
        assert!(!b_path.exists());

        let r = gc(dir.path(), 1000).unwrap();
        assert_eq!((r.removed, r.freed, r.remaining), (1, 1000, 1000));
        assert!(!a_path.exists(), "the oldest goes first");
        assert!(c_path.exists());
        let _ = c;
    }

    #[test]
    fn every_command_is_refused_while_a_server_holds_the_folder_and_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let server = Store::open(dir.path()).unwrap();
        let kept = put(&server, &[1u8; 1000]);
        let (mut fill, fill_path) = server.temp().unwrap();
        fill.write_all(b"a fill under way").unwrap();

        let held = |e: Error| match e {
            Error::Held(h) => h,
            Error::Io(e) => panic!("not refused: {e}"),
        };
        let h = held(stats(dir.path()).unwrap_err());
        assert_eq!(h.pid, Some(std::process::id()));
        assert!(h.by_server(), "{h}");
        assert!(
            h.to_string().contains(&dir.path().display().to_string()),
            "{h}"
        );
        held(verify(dir.path(), |_, _| panic!("no progress")).unwrap_err());
        held(gc(dir.path(), 0).unwrap_err());
        assert!(fill_path.exists(), "the fill's temp file is untouched");
        assert!(server.blob_path(&kept).exists(), "gc removed nothing");

        // A second server is refused the same way, as an io::Error carrying the holder.
        let e = Store::open(dir.path())
            .err()
            .expect("a second server is refused");
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(e.to_string().contains("running ocicache server"), "{e}");
        assert!(fill_path.exists());

        drop(server);
        assert_eq!(stats(dir.path()).unwrap().entries, 1);
    }

    #[test]
    fn a_command_holds_the_folder_against_a_server_and_a_stale_lock_file_blocks_nobody() {
        let dir = tempfile::tempdir().unwrap();
        // What a killed holder leaves: its lock file, whose flock died with it.
        std::fs::write(dir.path().join(super::super::store::LOCK_FILE), "1 serve\n").unwrap();
        let admin = Store::open_for_maintenance(dir.path(), "cache verify").unwrap();
        let e = Store::open(dir.path())
            .err()
            .expect("no server under a command");
        assert!(e.to_string().contains("`ocicache cache verify`"), "{e}");
        match gc(dir.path(), 0).unwrap_err() {
            Error::Held(h) => assert!(!h.by_server(), "{h}"),
            Error::Io(e) => panic!("{e}"),
        }
        drop(admin);
        Store::open(dir.path()).expect("free again");
    }

    #[test]
    fn gc_keeps_a_small_record_per_blob() {
        assert!(std::mem::size_of::<Candidate>() <= 64);
    }

    #[test]
    fn the_histogram_stays_bounded_and_finds_the_bucket_that_reaches_the_bytes_to_free() {
        let mut h = Histogram::new(BUCKETS);
        // A million blobs of 10 bytes, one every millisecond: far more times than buckets.
        for i in 0..1_000_000u64 {
            h.add(1_700_000_000_000_000_000 + i * 1_000_000, 10);
        }
        assert!(h.buckets.len() <= BUCKETS);
        assert_eq!(h.buckets.values().sum::<u64>(), 10_000_000);
        // Freeing the oldest 40 %: the cutoff bucket holds blob 400,000's time.
        let (from, to, before) = h.cutoff(4_000_000);
        let t = 1_700_000_000_000_000_000 + 399_999 * 1_000_000;
        assert!(from <= t && t < to, "{from} {t} {to}");
        assert!(before < 4_000_000);
        let in_bucket = (to - from).div_ceil(1_000_000) * 10;
        assert!(before + in_bucket >= 4_000_000);
        // Nothing to reach: past every bucket.
        assert_eq!(h.cutoff(u64::MAX).0, u64::MAX);
    }

    /// Puts `n` blobs of 100 bytes, blob `i` modified `base + i * step_ns`, oldest first.
    fn put_aged(store: &Store, n: u32, step_ns: u64) -> Vec<Digest> {
        let base = SystemTime::now() - std::time::Duration::from_secs(3600);
        (0..n)
            .map(|i| {
                let mut data = [0u8; 100];
                data[..4].copy_from_slice(&i.to_le_bytes());
                let d = put(store, &data);
                let f = std::fs::File::options()
                    .write(true)
                    .open(store.blob_path(&d))
                    .unwrap();
                f.set_modified(base + std::time::Duration::from_nanos(u64::from(i) * step_ns))
                    .unwrap();
                d
            })
            .collect()
    }

    #[test]
    fn gc_in_bounded_memory_removes_exactly_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        // 500 blobs a millisecond apart, 8 buckets: each bucket spans about 60 blobs, more
        // than the 16 gc orders in memory, so it takes several rounds.
        let blobs = put_aged(&Store::open(dir.path()).unwrap(), 500, 1_000_000);
        let keep = 123;
        let r = gc_bounded(dir.path(), 100 * keep + 50, 8, 16).unwrap();
        assert_eq!((r.removed, r.freed), (500 - keep, 100 * (500 - keep)));
        assert_eq!(r.remaining, 100 * keep);
        let store = Store::open(dir.path()).unwrap();
        let (gone, kept) = blobs.split_at((500 - keep) as usize);
        assert!(gone.iter().all(|d| !store.blob_path(d).exists()));
        assert!(kept.iter().all(|d| store.blob_path(d).exists()));
        drop(store);

        // Within its bound: nothing goes.
        let r = gc_bounded(dir.path(), 100 * keep, 8, 16).unwrap();
        assert_eq!((r.removed, r.remaining), (0, 100 * keep));
        // With the real bounds: one more blob over, the oldest goes.
        let r = gc(dir.path(), 100 * (keep - 1)).unwrap();
        assert_eq!((r.removed, r.remaining), (1, 100 * (keep - 1)));
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.blob_path(&kept[0]).exists());
        assert!(store.blob_path(&kept[1]).exists());
    }

    #[test]
    fn gc_ends_when_many_blobs_share_one_time() {
        let dir = tempfile::tempdir().unwrap();
        // 100 blobs with the same time: one bucket that no histogram can split.
        put_aged(&Store::open(dir.path()).unwrap(), 100, 0);
        let r = gc_bounded(dir.path(), 100 * 30, 8, 16).unwrap();
        assert_eq!((r.removed, r.remaining), (70, 100 * 30));
        assert_eq!(stats(dir.path()).unwrap().entries, 30);
    }
}
