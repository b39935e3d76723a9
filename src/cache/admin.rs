//! Offline maintenance of a cache folder, for `ocicache cache stats|verify|gc`.
//!
//! Each command holds the folder's lock for its run (see [`super::store`]): while a server
//! holds the folder, a command fails with [`Error::Held`] before touching anything, since a
//! second opener must not race the server's fills, and the server's index would not know of
//! what gc or verify removed. While a command runs, a server does not start on the folder.
//!
//! A folder may hold millions of blobs: stats keeps nothing per blob, verify hashes them as
//! it walks, and gc keeps what ordering by recency needs (size, time, raw digest: 64 bytes a
//! blob), never paths or strings.

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

#[derive(Debug, Default)]
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
        let mut hasher = DigestHasher::new(digest.algorithm());
        let mut file = match std::fs::File::open(store.blob_path(&digest)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            report.bytes += n as u64;
        }
        if hasher.finalize() != digest {
            store.remove(&digest);
            report.removed.push(digest.to_string());
        }
        report.checked += 1;
        progress(report.checked, total.max(report.checked));
        Ok(())
    })?;
    Ok(report)
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: u64,
    pub freed: u64,
    pub remaining: u64,
}

/// What gc keeps of a blob to order the folder by recency.
struct Candidate {
    modified: SystemTime,
    size: u64,
    digest: RawDigest,
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
pub fn gc(dir: &Path, max_bytes: u64) -> Result<GcReport, Error> {
    let store = Store::open_for_maintenance(dir, "cache gc")?;
    let mut total: u64 = 0;
    let mut blobs = Vec::new();
    store.walk(|blob| {
        total += blob.size;
        if let Some(digest) = RawDigest::of(&blob) {
            blobs.push(Candidate {
                modified: blob.modified,
                size: blob.size,
                digest,
            });
        }
        Ok(())
    })?;
    let mut report = GcReport::default();
    if total > max_bytes {
        blobs.sort_unstable_by_key(|c| c.modified);
        for c in blobs {
            if total <= max_bytes {
                break;
            }
            let Some(digest) = c.digest.digest() else {
                continue;
            };
            store.remove(&digest);
            total -= c.size;
            report.removed += 1;
            report.freed += c.size;
        }
    }
    report.remaining = total;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Digest;
    use std::io::Write;

    fn put(store: &Store, data: &[u8]) -> Digest {
        let d = Digest::sha256_of(data);
        let (mut f, tmp) = store.temp().unwrap();
        f.write_all(data).unwrap();
        store.commit(&f, &tmp, &d).unwrap();
        d
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
}
