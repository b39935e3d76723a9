//! What is in the cache, for the admin API and the status page: the fills under way, the
//! manifests kept, the tag records; and the removals an operator asks for, done through the
//! cache (its index, its tiers) so that they are safe beside the server's own work.

use std::time::SystemTime;

use serde::Serialize;

use super::{Cache, Progress};
use crate::reference::Digest;

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
