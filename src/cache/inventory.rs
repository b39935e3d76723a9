//! What is in the cache, for the admin API and the status page: the fills under way, the
//! manifests kept, the tag records; and the removals an operator asks for, done through the
//! cache (its index, its tiers) so that they are safe beside the server's own work.

use std::io;
use std::path::Path;
use std::time::SystemTime;

use bytes::Bytes;
use serde::Serialize;

use super::{Cache, Progress};
use crate::reference::{Algorithm, Digest};

/// Records are small: a larger file under `tags/` is not ours.
const MAX_RECORD: u64 = 64 << 10;

/// A fill under way, as `Cache::fills_status` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct FillStatus {
    pub digest: Digest,
    /// `upstream/name` of the first request for it, when known (a fill started by the
    /// bucket's own work has none).
    pub repository: Option<String>,
    /// Bytes on disk so far.
    pub received: u64,
    /// The size the source announced, if it did.
    pub expected: Option<u64>,
    /// Clients that joined it so far, the first included.
    pub readers: u32,
    /// When it started (it may have waited for a turn since).
    #[serde(with = "rfc3339")]
    pub started: SystemTime,
    /// `queued` (waiting for a turn or the upstream's answer), `streaming`, `done`
    /// (verified, leaving the list) or `failed`.
    pub state: &'static str,
}

impl Cache {
    /// The fills under way now, oldest first.
    pub fn fills_status(&self) -> Vec<FillStatus> {
        let mut out: Vec<FillStatus> = self
            .fills
            .snapshot()
            .into_iter()
            .map(|(digest, fill)| {
                let (state, received, expected) = match fill.progress() {
                    Progress::Connecting => ("queued", 0, None),
                    Progress::Streaming { size, written } => ("streaming", written, size),
                    Progress::Done { size } => ("done", size, Some(size)),
                    Progress::Failed(_) => ("failed", 0, None),
                };
                FillStatus {
                    digest,
                    repository: fill.repository.get().cloned(),
                    received,
                    expected,
                    readers: fill.joined.load(std::sync::atomic::Ordering::Relaxed),
                    started: fill.started,
                    state,
                }
            })
            .collect();
        out.sort_by_key(|f| f.started);
        out
    }
    /// The bytes of every tag record of the local tier (`tags/<2 hex>/<hex>.json`), for
    /// listing: the manifests service reads them. Tag lists are not included.
    pub async fn tag_records(&self) -> io::Result<Vec<Bytes>> {
        let root = self.store.root().join("tags");
        blocking(move || {
            let mut out = Vec::new();
            for_files(&root, |path, size| {
                let tag_record = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.ends_with(".json")
                        && !n.ends_with(".list.json")
                        && !n.ends_with(".referrers.json")
                });
                if tag_record && size <= MAX_RECORD {
                    if let Ok(bytes) = std::fs::read(path) {
                        out.push(Bytes::from(bytes));
                    }
                }
            });
            Ok(out)
        })
        .await
    }

    /// Every manifest kept in the local tier (those with a media type under `types/`).
    pub async fn cached_manifests(&self) -> io::Result<Vec<Digest>> {
        let root = self.store.root().join("types");
        blocking(move || {
            let mut out = Vec::new();
            for alg in [Algorithm::Sha256, Algorithm::Sha512] {
                for_files(&root.join(alg.as_str()), |path, _| {
                    let hex = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if let Ok(d) = Digest::parse(&format!("{alg}:{hex}")) {
                        out.push(d);
                    }
                });
            }
            Ok(out)
        })
        .await
    }

    /// A manifest of the local tier, verified, without marking a use (listing is not
    /// pulling): `None` if absent, too large or wrong.
    pub async fn local_manifest(&self, digest: &Digest, max: u64) -> Option<Bytes> {
        let store = self.store.clone();
        let d = digest.clone();
        let bytes = blocking(move || {
            let (file, size) = store.open_blob(&d)?.ok_or(io::ErrorKind::NotFound)?;
            if size > max {
                return Err(io::ErrorKind::InvalidData.into());
            }
            let mut bytes = Vec::with_capacity(size as usize);
            io::Read::read_to_end(&mut &file, &mut bytes)?;
            Ok(bytes)
        })
        .await
        .ok()?;
        digest.matches(&bytes).then(|| Bytes::from(bytes))
    }

    /// Removes blob (or manifest) `digest` from the local tier, and with `shared` from the
    /// tiers behind it too; returns whether the local tier had it. A fill of it under way
    /// is left alone: its temp file is its own, its readers keep reading, and once verified
    /// it lands as usual (the blob is back). A committed file being read keeps being read
    /// (unlink semantics).
    pub async fn remove_blob(&self, digest: &Digest, shared: bool) -> bool {
        let store = self.store.clone();
        let d = digest.clone();
        let had = blocking(move || Ok(store.blob_path(&d).exists()))
            .await
            .unwrap_or(false);
        self.tiers[0].purge(digest).await;
        if shared {
            for tier in self.behind() {
                tier.purge(digest).await;
            }
        }
        had
    }

    /// Whether a fill of `digest` is under way.
    pub fn filling(&self, digest: &Digest) -> bool {
        self.fills.get(digest).is_some()
    }

    /// Removes a record from the local tier, and with `shared` from the tiers behind it.
    pub async fn remove_record(&self, record: &super::Record, shared: bool) {
        let tiers = if shared {
            &self.tiers[..]
        } else {
            &self.tiers[..1]
        };
        for tier in tiers {
            tier.remove_record(record).await;
        }
    }

    /// The server's `verify`, beside its own fills: rehashes every committed blob of the
    /// local tier (never a fill's temp file: those are under `tmp/`, and only verified
    /// content is ever committed) and removes through the index those that do not match,
    /// so the next request fetches them again. Blocks for as long as it reads: run it on a
    /// thread of its own. `progress` gets (checked, about how many in all).
    pub fn verify_blobs(
        &self,
        progress: impl FnMut(u64, u64),
    ) -> io::Result<super::admin::VerifyReport> {
        let remove = |digest: &Digest| {
            tracing::error!(%digest, "a cached blob does not match its digest: removed");
            self.index.forget(digest);
            self.store.remove(digest);
        };
        super::admin::verify_walk(&self.store, self.index.usage().1, remove, progress)
    }

    /// The server's `gc`, beside its own fills: evicts least recently used, unpinned blobs
    /// through the index until at most `target` bytes remain (fills under way are not in
    /// the index: untouched). Returns (blobs removed, bytes freed, bytes left).
    pub fn gc_to(&self, target: u64) -> (u64, u64, u64) {
        let (removed, freed) = self.index.shrink_to(target);
        (removed, freed, self.index.usage().0)
    }

    /// The bytes of the digests of `image` that are in the local tier's index.
    pub fn cached_bytes(&self, image: &ImageDigests) -> u64 {
        image.all().filter_map(|d| self.index.size_of(d)).sum()
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io::Error::other)?
}

/// Calls `f` with the path and size of every file in the folders under `root` (one level:
/// `<root>/<2 hex>/<file>`, the layout of `tags/` and `types/<algorithm>/`).
fn for_files(root: &Path, mut f: impl FnMut(&Path, u64)) {
    let Ok(prefixes) = std::fs::read_dir(root) else {
        return;
    };
    for prefix in prefixes.flatten() {
        let Ok(files) = std::fs::read_dir(prefix.path()) else {
            continue;
        };
        for file in files.flatten() {
            if let Ok(meta) = file.metadata() {
                if meta.is_file() {
                    f(&file.path(), meta.len());
                }
            }
        }
    }
}

/// A time in JSON as an RFC 3339 string (UTC, seconds), as operators read it.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_seconds(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom)
    }

    /// The same for an optional time (`null` for none).
    pub mod option {
        use std::time::SystemTime;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| humantime::parse_rfc3339_weak(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// The digests a manifest refers to: child manifests (an index's `manifests`) and blobs
/// (`config`, `layers`, an artifact's `blobs`). A `subject` is another image, not a part.
/// Bytes that are not a manifest refer to nothing.
pub fn references(bytes: &[u8]) -> (Vec<Digest>, Vec<Digest>) {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: Digest,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Manifest {
        manifests: Vec<Descriptor>,
        config: Option<Descriptor>,
        layers: Vec<Descriptor>,
        blobs: Vec<Descriptor>,
    }
    let m: Manifest = serde_json::from_slice(bytes).unwrap_or_default();
    let children = m.manifests.into_iter().map(|d| d.digest).collect();
    let blobs = m
        .config
        .into_iter()
        .chain(m.layers)
        .chain(m.blobs)
        .map(|d| d.digest)
        .collect();
    (children, blobs)
}

/// An image's digests: the manifest, its children (for an index), and every blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageDigests {
    /// The manifest the image resolved to, then its children.
    pub manifests: Vec<Digest>,
    /// Config and layers of every manifest, each once.
    pub blobs: Vec<Digest>,
}

impl ImageDigests {
    /// Walks from the manifest `top` (its `bytes`) down its children, each read with
    /// `child` (`None`: not available, its blobs unknown). Used with the manifests service
    /// (to pin: children fetched) and with the cache alone (to list and purge).
    pub async fn walk<F, Fut, E>(
        top: &Digest,
        bytes: &[u8],
        mut child: F,
    ) -> Result<ImageDigests, E>
    where
        F: FnMut(Digest) -> Fut,
        Fut: std::future::Future<Output = Result<Option<bytes::Bytes>, E>>,
    {
        let mut image = ImageDigests {
            manifests: vec![top.clone()],
            blobs: Vec::new(),
        };
        let (children, blobs) = references(bytes);
        image.add_blobs(blobs);
        for c in children {
            if image.manifests.contains(&c) {
                continue;
            }
            image.manifests.push(c.clone());
            if let Some(bytes) = child(c).await? {
                // An index's children are image manifests: one level.
                image.add_blobs(references(&bytes).1);
            }
        }
        Ok(image)
    }

    fn add_blobs(&mut self, blobs: Vec<Digest>) {
        for b in blobs {
            if !self.blobs.contains(&b) {
                self.blobs.push(b);
            }
        }
    }

    /// Every digest, manifests first.
    pub fn all(&self) -> impl Iterator<Item = &Digest> {
        self.manifests.iter().chain(&self.blobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bucket::testing::{keys, tier, TestStore};
    use crate::cache::Record;
    use crate::reference::{Name, Tag};
    use std::time::Duration;

    #[tokio::test]
    async fn a_purge_with_shared_removes_from_the_bucket_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new();
        let cache = Cache::for_test(
            dir.path(),
            Some(tier(&store, Duration::from_secs(60), 1 << 30)),
        );
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let bytes = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
        let d = Digest::sha256_of(&bytes);
        cache.put_manifest(&d, bytes, oci, true).await.unwrap();
        let record = Record::tag(
            "docker.io",
            &Name::parse("a/b").unwrap(),
            &Tag::parse("1").unwrap(),
        );
        cache.put_record(&record, b"{}".to_vec(), true).await;
        // Both written to the bucket in the background.
        while keys(&store, "mirror/blobs").await.is_empty()
            || keys(&store, "mirror/tags").await.is_empty()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        // Local only: the bucket keeps its copies.
        assert!(cache.remove_blob(&d, false).await);
        cache.remove_record(&record, false).await;
        assert!(!cache.store.blob_path(&d).exists() && !cache.index.contains(&d));
        assert!(cache.record(&record).await.is_none());
        assert_eq!(keys(&store, "mirror/blobs").await.len(), 1);
        assert!(cache.shared_record(&record).await.is_some());

        // Shared: gone from the bucket.
        assert!(!cache.remove_blob(&d, true).await, "no longer local");
        cache.remove_record(&record, true).await;
        assert!(keys(&store, "mirror/blobs").await.is_empty());
        assert!(keys(&store, "mirror/tags").await.is_empty());
    }

    #[test]
    fn references_of_an_index_and_a_manifest() {
        let d = |n: u8| Digest::sha256_of(&[n]);
        let index = format!(
            r#"{{"manifests":[{{"digest":"{}"}},{{"digest":"{}"}}],"subject":{{"digest":"{}"}}}}"#,
            d(1),
            d(2),
            d(9)
        );
        assert_eq!(references(index.as_bytes()), (vec![d(1), d(2)], vec![]));
        let manifest = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d(3),
            d(4)
        );
        assert_eq!(references(manifest.as_bytes()), (vec![], vec![d(3), d(4)]));
        assert_eq!(references(b"not json"), (vec![], vec![]));
    }
}
