//! The content-addressed store on the local filesystem.
//!
//! ```text
//! <dir>/blobs/<algorithm>/<2 hex>/<hex>   verified content, named by its digest
//! <dir>/types/<algorithm>/<2 hex>/<hex>   media type of a blob that is a manifest
//! <dir>/tags/<2 hex>/<hex>.json           tag records (see `manifests`)
//! <dir>/tmp/<unique>                      fills under way; removed at start
//! <dir>/ocicache.lock                     "<pid> <role>" of the process that holds the folder
//! ```
//!
//! One process at a time works on a folder: it holds an exclusive `flock` on `ocicache.lock`
//! for as long as its [`Store`] lives. The server takes it at start ([`Store::open`]), and only
//! the holder may clear `tmp/`, which is what made it unsafe to open a live server's folder a
//! second time: the second opener deleted the first one's fills under way. The maintenance
//! commands take it too ([`Store::open_for_maintenance`]), so they never run beside a server
//! and a server never starts under them. The kernel drops the lock when the process ends, by
//! exit, crash or kill: a lock file left behind never blocks anyone, so it is never removed
//! (removing it would let two processes lock two different files of the same name).
//!
//! Every path is built from a parsed [`Digest`] (whose hex is checked) or from a hash: never
//! from raw request input. Content enters `blobs/` only through [`Store::commit`]: written to
//! `tmp/`, verified by the caller, fsynced, renamed, the folder fsynced.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use crate::reference::{Algorithm, Digest};

/// The lock file's name in the cache folder.
pub const LOCK_FILE: &str = "ocicache.lock";

/// The role [`Store::open`] writes in the lock file: a server (`serve`, or the loopback
/// server of `prefetch --config`).
pub const SERVER: &str = "serve";

pub struct Store {
    root: PathBuf,
    /// Makes temp names unique within this process (the pid covers other processes).
    next_tmp: AtomicU64,
    /// The open lock file, whose `flock` says this process owns the folder; closing it (when
    /// the store is dropped or the process ends) releases the folder.
    _lock: File,
}

/// The folder is held by another process (or another store of this one): nothing was done.
#[derive(Debug)]
pub struct Held {
    pub dir: PathBuf,
    /// The holder's pid, as its lock file says; `None` when the file is not readable yet
    /// (the holder has the lock but has not written its pid).
    pub pid: Option<u32>,
    /// What the holder is: [`SERVER`], or the maintenance command (`cache gc`, ...).
    pub role: Option<String>,
}

impl Held {
    /// Whether the holder is (or may be, when its lock file does not say) a server.
    pub fn by_server(&self) -> bool {
        matches!(self.role.as_deref(), None | Some(SERVER))
    }

    /// "pid 123", or "pid unknown".
    pub fn pid_text(&self) -> String {
        match self.pid {
            Some(p) => format!("pid {p}"),
            None => "pid unknown".into(),
        }
    }
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = self.dir.display();
        let pid = self.pid_text();
        match self.role.as_deref() {
            Some(SERVER) => write!(
                f,
                "{dir} is held by a running ocicache server ({pid}): one server per cache folder"
            ),
            Some(role) => write!(f, "{dir} is held by `ocicache {role}` ({pid})"),
            None => write!(f, "{dir} is held by another ocicache ({pid})"),
        }
    }
}

impl std::error::Error for Held {}

/// Why a folder could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Held(#[from] Held),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// For [`Store::open`]'s callers, which speak `io::Error`: a held folder is `WouldBlock`
/// carrying the [`Held`] (its message names the folder and the holder's pid).
impl From<OpenError> for io::Error {
    fn from(e: OpenError) -> io::Error {
        match e {
            OpenError::Held(h) => io::Error::new(io::ErrorKind::WouldBlock, h),
            OpenError::Io(e) => e,
        }
    }
}

/// Takes the folder's lock without waiting and writes `role` and our pid into it.
fn lock(root: &Path, role: &str) -> Result<File, OpenError> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(root.join(LOCK_FILE))?;
    let held = loop {
        // SAFETY: flock on a descriptor we own; it touches no memory.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break false;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => break true,
            // A filesystem without locks (some FUSE and network mounts) served before the
            // lock existed: it still does, unguarded, rather than refusing to start.
            Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => {
                tracing::warn!(
                    dir = %root.display(),
                    error = %e,
                    "the cache folder cannot be locked: nothing keeps a second ocicache off it"
                );
                break false;
            }
            _ => return Err(e.into()),
        }
    };
    if held {
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let (pid, role) = match text.trim_end().split_once(' ') {
            Some((pid, role)) => (pid.parse().ok(), Some(role.to_string())),
            None => (None, None),
        };
        return Err(Held {
            dir: root.to_path_buf(),
            pid,
            role: role.filter(|_| pid.is_some()),
        }
        .into());
    }
    file.set_len(0)?;
    file.write_all(format!("{} {role}\n", std::process::id()).as_bytes())?;
    Ok(file)
}

/// A blob on disk, as found when the index is rebuilt.
#[derive(Debug, Clone)]
pub struct Entry {
    pub digest: Digest,
    pub size: u64,
    pub modified: SystemTime,
}

impl Store {
    /// Opens (creating) the store at `root` for a server: takes the folder's lock (a folder
    /// held by another process is an error of kind `WouldBlock` carrying a [`Held`]) and
    /// removes the temp files a crash left behind.
    pub fn open(root: &Path) -> io::Result<Store> {
        fs::create_dir_all(root)?;
        let lock = lock(root, SERVER)?;
        for sub in ["blobs", "types", "tags", "tmp"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let store = Store {
            root: root.to_path_buf(),
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        };
        store.clear_tmp()?;
        Ok(store)
    }

    /// Opens the store at `root` for a maintenance command (`role`, e.g. `cache gc`): takes
    /// the folder's lock or fails with [`OpenError::Held`], and leaves `tmp/` alone.
    pub fn open_for_maintenance(root: &Path, role: &str) -> Result<Store, OpenError> {
        fs::create_dir_all(root)?;
        let lock = lock(root, role)?;
        Ok(Store {
            root: root.to_path_buf(),
            next_tmp: AtomicU64::new(0),
            _lock: lock,
        })
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
        self.walk(|blob| {
            if let Some(digest) = blob.digest() {
                out.push(Entry {
                    digest,
                    size: blob.size,
                    modified: blob.modified,
                });
            }
            Ok(())
        })?;
        out.sort_by_key(|e| e.modified);
        Ok(out)
    }

    /// Calls `f` for every committed blob with a valid name, in directory order, keeping
    /// nothing: what a caller needs to hold of each blob is its own choice. Folders that
    /// cannot be read are skipped; the first error `f` returns stops the walk.
    pub fn walk(&self, mut f: impl FnMut(Blob<'_>) -> io::Result<()>) -> io::Result<()> {
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
                    let Some(hex) = name.to_str() else { continue };
                    let lower_hex = hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                    if hex.len() != alg.hex_len()
                        || !lower_hex
                        || prefix.file_name().to_str() != Some(&hex[..2])
                    {
                        continue;
                    }
                    let Ok(meta) = file.metadata() else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    f(Blob {
                        algorithm: alg,
                        hex,
                        size: meta.len(),
                        modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// A committed blob met by [`Store::walk`], borrowed for the call.
#[derive(Debug, Clone, Copy)]
pub struct Blob<'a> {
    pub algorithm: Algorithm,
    /// The file name: lowercase hex of the algorithm's length (checked).
    pub hex: &'a str,
    pub size: u64,
    pub modified: SystemTime,
}

impl Blob<'_> {
    pub fn digest(&self) -> Option<Digest> {
        Digest::parse(&format!("{}:{}", self.algorithm.as_str(), self.hex)).ok()
    }
}

/// Marks a blob as recently used across restarts (the index order is rebuilt from it).
pub fn touch(file: &File) {
    let _ = file.set_modified(SystemTime::now());
}

#[cfg(test)]
impl Store {
    /// Commits `data` as a blob, as a fill would: for tests that need blobs on disk.
    pub(crate) fn put_for_test(&self, data: &[u8]) -> Digest {
        use std::io::Write;
        let d = Digest::sha256_of(data);
        let (mut f, tmp) = self.temp().unwrap();
        f.write_all(data).unwrap();
        self.commit(&f, &tmp, &d).unwrap();
        d
    }
}
