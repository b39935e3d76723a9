//! The content-addressed store on the local filesystem.
//!
//! ```text
//! <dir>/blobs/<algorithm>/<2 hex>/<hex>   verified content, named by its digest
//! <dir>/types/<algorithm>/<2 hex>/<hex>   media type of a blob that is a manifest
//! <dir>/tags/<2 hex>/<hex>.json           tag records (see `manifests`)
//! <dir>/tmp/<unique>                      fills under way; removed at start
//! ```
//!
//! Every path is built from a parsed [`Digest`] (whose hex is checked) or from a hash: never
//! from raw request input. Content enters `blobs/` only through [`Store::commit`]: written to
//! `tmp/`, verified by the caller, fsynced, renamed, the folder fsynced.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::reference::{Algorithm, Digest};

pub struct Store {
    root: PathBuf,
    /// Makes temp names unique within this process (the pid covers other processes).
    next_tmp: AtomicU64,
}

/// A blob on disk, as found when the index is rebuilt.
#[derive(Debug, Clone)]
pub struct Entry {
    pub digest: Digest,
    pub size: u64,
    pub modified: SystemTime,
}

impl Store {
    /// Opens (creating) the store at `root` and removes temp files a crash left behind.
    pub fn open(root: &Path) -> io::Result<Store> {
        for sub in ["blobs", "types", "tags", "tmp"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let store = Store {
            root: root.to_path_buf(),
            next_tmp: AtomicU64::new(0),
        };
        store.clear_tmp()?;
        Ok(store)
    }

    /// Removes every temp file: at start (a crash's leftovers) and at shutdown.
    pub fn clear_tmp(&self) -> io::Result<()> {
        for entry in fs::read_dir(self.root.join("tmp"))? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.cas_path("blobs", d)
    }

    fn type_path(&self, d: &Digest) -> PathBuf {
        self.cas_path("types", d)
    }

    fn cas_path(&self, kind: &str, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join(kind)
            .join(d.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Opens a committed blob: the file and its size, or `None` on a miss.
    pub fn open_blob(&self, d: &Digest) -> io::Result<Option<(File, u64)>> {
        match File::open(self.blob_path(d)) {
            Ok(f) => {
                let len = f.metadata()?.len();
                Ok(Some((f, len)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The media type recorded for a blob that is a manifest.
    pub fn media_type(&self, d: &Digest) -> Option<String> {
        fs::read_to_string(self.type_path(d)).ok()
    }

    /// A new temp file under `tmp/`, and its path.
    pub fn temp(&self) -> io::Result<(File, PathBuf)> {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{}-{}", std::process::id(), nanos, n));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Publishes a verified temp file as blob `d`: fsync, rename, fsync the folder.
    pub fn commit(&self, file: &File, temp: &Path, d: &Digest) -> io::Result<()> {
        file.sync_all()?;
        let dest = self.blob_path(d);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir)?;
        fs::rename(temp, &dest)?;
        File::open(dir)?.sync_all()
    }

    /// Writes a whole small blob (a manifest), verified by the caller, with its media type.
    pub fn put_manifest(&self, d: &Digest, bytes: &[u8], media_type: &str) -> io::Result<()> {
        self.write_atomic(&self.type_path(d), media_type.as_bytes())?;
        if self.blob_path(d).exists() {
            return Ok(());
        }
        let (mut file, temp) = self.temp()?;
        let result = file
            .write_all(bytes)
            .and_then(|_| self.commit(&file, &temp, d));
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Writes `bytes` to `path` through a temp file and a rename: readers see the old or the
    /// new content, never a part.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let (mut file, temp) = self.temp()?;
        let result = file
            .write_all(bytes)
            .and_then(|_| file.sync_all())
            .and_then(|_| {
                fs::create_dir_all(path.parent().expect("store paths have a parent"))?;
                fs::rename(&temp, path)
            });
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result
    }

    /// Deletes blob `d` (and its media type). Open readers keep reading.
    pub fn remove(&self, d: &Digest) {
        let _ = fs::remove_file(self.blob_path(d));
        let _ = fs::remove_file(self.type_path(d));
    }

    /// Every committed blob with a valid name, oldest first (by modification time, which a
    /// hit refreshes), so the LRU index is rebuilt in recency order.
    pub fn scan(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.walk(|e| out.push(e));
        out.sort_by_key(|e| e.modified);
        Ok(out)
    }

    /// Calls `found` on every committed blob with a valid name, in the order of the
    /// folders, holding nothing: the index's rebuild keeps a compact form of each.
    pub fn walk(&self, mut found: impl FnMut(Entry)) {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let dir = self.root.join("blobs").join(alg.as_str());
            let Ok(prefixes) = fs::read_dir(&dir) else {
                continue;
            };
            for prefix in prefixes.flatten() {
                let Ok(files) = fs::read_dir(prefix.path()) else {
                    continue;
                };
                for file in files.flatten() {
                    let name = file.file_name();
                    let Some(name) = name.to_str() else { continue };
                    let Ok(digest) = Digest::parse(&format!("{}:{name}", alg.as_str())) else {
                        continue;
                    };
                    let Ok(meta) = file.metadata() else { continue };
                    if !meta.is_file() || prefix.file_name().to_str() != Some(&name[..2]) {
                        continue;
                    }
                    found(Entry {
                        digest,
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    });
                }
            }
        }
    }
}

/// Marks a blob as recently used across restarts (the index order is rebuilt from it).
pub fn touch(file: &File) {
    let _ = file.set_modified(SystemTime::now());
}
