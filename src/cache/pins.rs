//! Pins: images the LRU bound never evicts. A pin names an image as an operator does
//! (upstream, repository, tag or digest) and holds what it resolved to: the manifest
//! digest(s) (an index and its children) and the config and layer blobs. Every digest of
//! every pin is in the index's pinned set (`local::index`), which the eviction passes over;
//! a digest pinned before its blob arrives is protected from its arrival on. Pinned bytes
//! still count toward `cache.max_size`; when pins alone exceed it, the index says so.
//!
//! Pins are kept in `<cache dir>/pins.json`, rewritten whole (temp file and rename, through
//! the store) on each change: they survive restarts, and a crash leaves the old or the new
//! file, never a part. A file that cannot be read is an error at start that names it: an
//! empty set in its place would let the bound evict what an operator asked to keep.
//!
//! The API: [`Cache::pin`], [`Cache::unpin`], [`Cache::pins`], [`Cache::is_pinned`].
//! Resolving an image into its digests is the manifests service's job
//! (`Manifests::resolve_image`).
//!
//! A pin records who set it ([`PinOwner`]): an operator (the admin API, `cache pin`) or a
//! scheduled sync. A sync drops the pins it set for tags it no longer syncs
//! ([`Cache::release_sync_pins`]); an operator's pin stays until an operator removes it,
//! even when a sync re-pins its tag at a new digest. Pins of files written before the owner
//! was recorded read as an operator's: nothing is released that sync may not have set.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Cache;
use crate::reference::{Digest, Name, Reference};

/// The pins file's name in the cache folder.
pub const PINS_FILE: &str = "pins.json";

/// What a pin names: an image as an operator writes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PinKey {
    /// The configured upstream's name (`docker.io`).
    pub upstream: String,
    pub name: Name,
    /// The tag or digest pinned.
    pub reference: Reference,
}

/// What a pin keeps: every digest of the image, as resolved when it was pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedImage {
    /// The manifest the reference resolved to, then (for an index) its children.
    pub manifests: Vec<Digest>,
    /// Config and layer blobs of every manifest.
    pub blobs: Vec<Digest>,
    /// When it was pinned.
    #[serde(with = "super::inventory::rfc3339")]
    pub pinned_at: SystemTime,
    /// Who set it: only a sync's own pins are released when it stops syncing their tag.
    #[serde(default)]
    pub set_by: PinOwner,
}

/// Who set a pin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinOwner {
    /// By hand (the admin API, `cache pin`): kept until an operator unpins it. The default,
    /// so that a pin of unknown origin is never released by a sync.
    #[default]
    Operator,
    /// A scheduled sync with `pin = true`, for a tag of its schedule.
    Sync,
}

impl PinnedImage {
    /// Every digest this pin keeps.
    pub fn digests(&self) -> impl Iterator<Item = &Digest> {
        self.manifests.iter().chain(&self.blobs)
    }
}

/// One pin as `pins()` lists it and `pins.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    #[serde(flatten)]
    pub key: PinKey,
    #[serde(flatten)]
    pub image: PinnedImage,
}

/// `pins.json`.
#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    pins: Vec<Pin>,
}

/// The pins of one cache, behind a mutex held for a change and its write (pins change
/// rarely, by an operator or a sync, never on a request's path).
pub(crate) struct Pins {
    path: PathBuf,
    map: Mutex<HashMap<PinKey, PinnedImage>>,
}

impl Pins {
    /// Reads `<dir>/pins.json` (none yet: no pins). A file that cannot be read or parsed is
    /// an error naming it.
    pub(crate) fn load(dir: &Path) -> io::Result<Pins> {
        let path = dir.join(PINS_FILE);
        let map = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: File = serde_json::from_slice(&bytes).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the pins file {} is not valid ({e}); fix it or move it away \
                             (its pins are then lost)",
                            path.display()
                        ),
                    )
                })?;
                file.pins.into_iter().map(|p| (p.key, p.image)).collect()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("the pins file {}: {e}", path.display()),
                ))
            }
        };
        Ok(Pins {
            path,
            map: Mutex::new(map),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PinKey, PinnedImage>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every digest of every pin.
    pub(crate) fn digests(&self) -> HashSet<Digest> {
        digests_of(&self.lock())
    }
}

fn digests_of(map: &HashMap<PinKey, PinnedImage>) -> HashSet<Digest> {
    map.values().flat_map(|i| i.digests().cloned()).collect()
}

impl Cache {
    /// Pins `image` under `key` (replacing what `key` held: a moved tag's old digests are
    /// no longer kept unless another pin holds them), writes `pins.json`, and makes the
    /// index keep its digests. On a write error nothing changes.
    /// A sync re-pinning an operator's pin updates its digests but leaves it the operator's.
    pub fn pin(&self, key: PinKey, mut image: PinnedImage) -> io::Result<()> {
        self.change_pins(|map| {
            if map
                .get(&key)
                .is_some_and(|held| held.set_by == PinOwner::Operator)
            {
                image.set_by = PinOwner::Operator;
            }
            map.insert(key, image);
            true
        })
    }

    /// Removes the pin of `key`; `false` if there was none. Its blobs become evictable
    /// (unless another pin holds them).
    pub fn unpin(&self, key: &PinKey) -> io::Result<bool> {
        let mut found = false;
        self.change_pins(|map| {
            found = map.remove(key).is_some();
            found
        })?;
        Ok(found)
    }

    /// Removes every pin a sync set whose key `scheduled` says no sync keeps any more; the
    /// keys removed, in no order. Operators' pins are never removed. Decided under the pins'
    /// lock, so a pin an operator sets meanwhile is not lost; nothing is written when
    /// nothing goes.
    pub fn release_sync_pins(
        &self,
        scheduled: impl Fn(&PinKey) -> bool,
    ) -> io::Result<Vec<PinKey>> {
        let mut released = Vec::new();
        self.change_pins(|map| {
            map.retain(|key, image| {
                let keep = image.set_by == PinOwner::Operator || scheduled(key);
                if !keep {
                    released.push(key.clone());
                }
                keep
            });
            !released.is_empty()
        })?;
        Ok(released)
    }

    /// Every pin, ordered by upstream, name and reference.
    pub fn pins(&self) -> Vec<Pin> {
        let mut pins: Vec<Pin> = self
            .pins
            .lock()
            .iter()
            .map(|(k, i)| Pin {
                key: k.clone(),
                image: i.clone(),
            })
            .collect();
        pins.sort_by_cached_key(|p| {
            let k = &p.key;
            (k.upstream.clone(), k.name.clone(), k.reference.to_string())
        });
        pins
    }

    /// Whether a pin keeps `digest`.
    pub fn is_pinned(&self, digest: &Digest) -> bool {
        self.index.is_pinned(digest)
    }

    /// Applies `change` to the pins and, when it says it changed them, writes the file, then
    /// hands the index the new set.
    fn change_pins(
        &self,
        change: impl FnOnce(&mut HashMap<PinKey, PinnedImage>) -> bool,
    ) -> io::Result<()> {
        let mut map = self.pins.lock();
        let mut next = map.clone();
        if !change(&mut next) {
            return Ok(());
        }
        let mut pins: Vec<Pin> = next
            .iter()
            .map(|(k, i)| Pin {
                key: k.clone(),
                image: i.clone(),
            })
            .collect();
        // A stable file: the same pins give the same bytes.
        pins.sort_by_cached_key(|p| serde_json::to_string(&p.key).unwrap_or_default());
        let bytes =
            serde_json::to_vec_pretty(&File { version: 1, pins }).map_err(io::Error::other)?;
        self.store.write_atomic(&self.pins.path, &bytes)?;
        let digests = digests_of(&next);
        *map = next;
        drop(map);
        self.index.set_pinned(digests);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::sync::Arc;
    use std::time::Duration;

    fn key(tag: &str) -> PinKey {
        PinKey {
            upstream: "docker.io".into(),
            name: Name::parse("library/app").unwrap(),
            reference: Reference::parse(tag).unwrap(),
        }
    }

    fn open(dir: &Path, max_size: u64) -> (Arc<Cache>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let d = Duration::from_secs(5);
        let (cache, scan) = Cache::open_unindexed(
            dir,
            max_size,
            super::super::FillLimits {
                stall_timeout: d,
                fill_deadline: d,
                max_fills: 4,
            },
            metrics.clone(),
            None,
        )
        .unwrap();
        scan.run();
        (cache, metrics)
    }

    #[test]
    fn pinned_blobs_are_not_evicted_and_pins_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, metrics) = open(dir.path(), 3 << 20);
        let blob = |n: u8| {
            let d = cache.store.put_for_test(&vec![n; 1 << 20]);
            cache.index.insert(d.clone(), 1 << 20);
            d
        };
        let kept = blob(1);
        // Pinned before it arrives: protected once it does.
        let later = Digest::sha256_of(&vec![2u8; 1 << 20]);
        let image = PinnedImage {
            manifests: vec![kept.clone()],
            blobs: vec![later.clone()],
            // Whole seconds: the file keeps times to the second.
            pinned_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            set_by: PinOwner::Operator,
        };
        cache.pin(key("1"), image.clone()).unwrap();
        assert_eq!(blob(2), later);
        // A storm of unpinned blobs: the two pinned ones stay, the oldest unpinned go.
        let storm: Vec<Digest> = (10..20).map(blob).collect();
        assert!(cache.store.blob_path(&kept).exists() && cache.store.blob_path(&later).exists());
        assert!(cache.is_pinned(&kept) && cache.is_pinned(&later));
        assert!(
            !cache.store.blob_path(&storm[0]).exists(),
            "unpinned are evicted"
        );
        assert!(cache.store.blob_path(&storm[9]).exists());
        assert_eq!(
            cache.index.usage().0,
            3 << 20,
            "pinned bytes count toward the bound"
        );
        assert!(metrics.encode().contains("ocicache_pinned_bytes 2097152\n"));

        drop(cache);
        let (cache, _) = open(dir.path(), 3 << 20);
        assert_eq!(
            cache.pins(),
            vec![Pin {
                key: key("1"),
                image
            }]
        );
        assert!(cache.is_pinned(&later));
        assert!(cache.unpin(&key("1")).unwrap());
        assert!(!cache.unpin(&key("1")).unwrap(), "already gone");
        assert!(!cache.is_pinned(&later));
        drop(cache);
        let (cache, _) = open(dir.path(), 3 << 20);
        assert!(cache.pins().is_empty(), "the unpin was kept too");
    }

    #[test]
    fn pins_alone_over_the_bound_evict_only_unpinned_blobs_and_say_so() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, metrics) = open(dir.path(), 2 << 20);
        let put = |n: u8| {
            let d = cache.store.put_for_test(&vec![n; 1 << 20]);
            cache.index.insert(d.clone(), 1 << 20);
            d
        };
        let a = put(1);
        let b = put(2);
        let image = PinnedImage {
            manifests: vec![],
            blobs: vec![a.clone(), b.clone(), Digest::sha256_of(&vec![3u8; 1 << 20])],
            pinned_at: crate::clock::now(),
            set_by: PinOwner::Operator,
        };
        cache.pin(key("big"), image).unwrap();
        let c = put(3);
        let loose = put(4);
        assert!(
            !cache.store.blob_path(&loose).exists(),
            "the unpinned one goes"
        );
        for d in [&a, &b, &c] {
            assert!(cache.store.blob_path(d).exists());
        }
        assert_eq!(cache.index.pinned_usage(), (3 << 20, true));
        let text = metrics.encode();
        assert!(text.contains("ocicache_pins_over_bound 1\n"), "{text}");
        // A gc to nothing leaves the pinned blobs too.
        let (removed, _, left) = cache.gc_to(0);
        assert_eq!((removed, left), (0, 3 << 20));
        for d in [&a, &b, &c] {
            assert!(cache.store.blob_path(d).exists());
        }
        // Unpinned: back under the bound at once.
        cache.unpin(&key("big")).unwrap();
        assert_eq!(cache.index.usage().0, 2 << 20);
        assert_eq!(cache.index.pinned_usage(), (0, false));
        assert!(metrics.encode().contains("ocicache_pins_over_bound 0\n"));
    }

    #[test]
    fn a_corrupt_pins_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(PINS_FILE), b"{not json").unwrap();
        let metrics = Arc::new(Metrics::new());
        let d = Duration::from_secs(5);
        let e = Cache::open_at(dir.path(), 1 << 30, d, d, metrics, None)
            .err()
            .expect("a corrupt pins file refuses the start");
        assert!(e.to_string().contains("pins.json"), "{e}");
    }

    /// A pin of one blob, set by `set_by`.
    fn image(n: u8, set_by: PinOwner) -> PinnedImage {
        PinnedImage {
            manifests: vec![],
            blobs: vec![Digest::sha256_of(&[n])],
            pinned_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            set_by,
        }
    }

    #[test]
    fn a_sync_releases_only_its_own_pins_that_are_no_longer_scheduled() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = open(dir.path(), 1 << 30);
        let file = dir.path().join(PINS_FILE);
        // Nothing to release: nothing is written.
        assert!(cache.release_sync_pins(|_| false).unwrap().is_empty());
        assert!(!file.exists());
        cache.pin(key("kept"), image(1, PinOwner::Sync)).unwrap();
        cache.pin(key("dropped"), image(2, PinOwner::Sync)).unwrap();
        cache
            .pin(key("by-hand"), image(3, PinOwner::Operator))
            .unwrap();
        let released = cache
            .release_sync_pins(|k| k.reference.to_string() == "kept")
            .unwrap();
        assert_eq!(released, vec![key("dropped")]);
        assert!(!cache.is_pinned(&Digest::sha256_of(&[2])));
        assert!(cache.is_pinned(&Digest::sha256_of(&[1])));
        assert!(
            cache.is_pinned(&Digest::sha256_of(&[3])),
            "a hand pin stays"
        );
        drop(cache);
        let (cache, _) = open(dir.path(), 1 << 30);
        let left: Vec<(String, PinOwner)> = cache
            .pins()
            .into_iter()
            .map(|p| (p.key.reference.to_string(), p.image.set_by))
            .collect();
        assert_eq!(
            left,
            [
                ("by-hand".to_string(), PinOwner::Operator),
                ("kept".to_string(), PinOwner::Sync)
            ]
        );
    }

    #[test]
    fn a_hand_pin_stays_the_operators_when_a_sync_re_pins_its_tag() {
        let dir = tempfile::tempdir().unwrap();
        let (cache, _) = open(dir.path(), 1 << 30);
        cache.pin(key("1"), image(1, PinOwner::Operator)).unwrap();
        cache.pin(key("1"), image(2, PinOwner::Sync)).unwrap();
        let pins = cache.pins();
        assert_eq!(pins[0].image.blobs, [Digest::sha256_of(&[2])], "moved");
        assert_eq!(pins[0].image.set_by, PinOwner::Operator);
        assert!(cache.release_sync_pins(|_| false).unwrap().is_empty());
        // An operator pinning a sync's pin makes it theirs.
        cache.pin(key("2"), image(3, PinOwner::Sync)).unwrap();
        cache.pin(key("2"), image(3, PinOwner::Operator)).unwrap();
        assert!(cache.release_sync_pins(|_| false).unwrap().is_empty());
        assert_eq!(cache.pins().len(), 2);
    }

    #[test]
    fn a_pin_without_an_owner_in_the_file_is_an_operators() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(b"x");
        let old = serde_json::json!({"version": 1, "pins": [{
            "upstream": "docker.io", "name": "library/app", "reference": "1",
            "manifests": [], "blobs": [digest.to_string()],
            "pinned_at": "2023-11-14T22:13:20Z",
        }]});
        std::fs::write(dir.path().join(PINS_FILE), old.to_string()).unwrap();
        let (cache, _) = open(dir.path(), 1 << 30);
        assert_eq!(cache.pins()[0].image.set_by, PinOwner::Operator);
        assert!(cache.release_sync_pins(|_| false).unwrap().is_empty());
        assert!(cache.is_pinned(&digest));
    }
}
