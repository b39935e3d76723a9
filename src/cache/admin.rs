//! Offline maintenance of a cache folder, for `ocicache cache stats|verify|gc`. Safe to run
//! beside a live `serve`: removing a blob only makes the next request a miss.

use std::io::{self, Read};
use std::path::Path;
use std::time::SystemTime;

use super::store::Store;
use crate::reference::DigestHasher;

#[derive(Debug, Default)]
pub struct Stats {
    pub bytes: u64,
    pub entries: u64,
    pub oldest: Option<SystemTime>,
    pub newest: Option<SystemTime>,
}

pub fn stats(dir: &Path) -> io::Result<Stats> {
    let entries = Store::open(dir)?.scan()?;
    Ok(Stats {
        bytes: entries.iter().map(|e| e.size).sum(),
        entries: entries.len() as u64,
        oldest: entries.first().map(|e| e.modified),
        newest: entries.last().map(|e| e.modified),
    })
}

#[derive(Debug, Default)]
pub struct VerifyReport {
    pub checked: u64,
    pub bytes: u64,
    /// Blobs whose content did not match their name, removed.
    pub removed: Vec<String>,
}

/// Rehashes every blob; removes those that do not match their digest.
pub fn verify(dir: &Path, mut progress: impl FnMut(u64, u64)) -> io::Result<VerifyReport> {
    let store = Store::open(dir)?;
    let entries = store.scan()?;
    let total = entries.len() as u64;
    let mut report = VerifyReport::default();
    let mut buf = vec![0u8; 1 << 20];
    for entry in entries {
        let mut hasher = DigestHasher::new(entry.digest.algorithm());
        let mut file = match std::fs::File::open(store.blob_path(&entry.digest)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
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
        if hasher.finalize() != entry.digest {
            store.remove(&entry.digest);
            report.removed.push(entry.digest.to_string());
        }
        report.checked += 1;
        progress(report.checked, total);
    }
    Ok(report)
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: u64,
    pub freed: u64,
    pub remaining: u64,
}

/// Deletes the least recently used blobs until the cache holds at most `max_bytes`.
pub fn gc(dir: &Path, max_bytes: u64) -> io::Result<GcReport> {
    let store = Store::open(dir)?;
    let entries = store.scan()?;
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut report = GcReport::default();
    for entry in entries {
        if total <= max_bytes {
            break;
        }
        store.remove(&entry.digest);
        total -= entry.size;
        report.removed += 1;
        report.freed += entry.size;
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

    #[test]
    fn verify_removes_corrupt_blobs_and_gc_removes_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = put(&store, &[1u8; 1000]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = put(&store, &[2u8; 1000]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let c = put(&store, &[3u8; 1000]);
        let s = stats(dir.path()).unwrap();
        assert_eq!((s.entries, s.bytes), (3, 3000));

        // Corrupt b on disk.
        std::fs::write(store.blob_path(&b), [9u8; 1000]).unwrap();
        let r = verify(dir.path(), |_, _| {}).unwrap();
        assert_eq!(r.checked, 3);
        assert_eq!(r.removed, vec![b.to_string()]);
        assert!(!store.blob_path(&b).exists());

        let r = gc(dir.path(), 1000).unwrap();
        assert_eq!((r.removed, r.freed, r.remaining), (1, 1000, 1000));
        assert!(!store.blob_path(&a).exists(), "the oldest goes first");
        assert!(store.blob_path(&c).exists());
    }
}
