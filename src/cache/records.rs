//! Manifests by digest and small records (tag records, tag lists), through the tiers: the
//! manifests service stores and reads them here and never sees a path, a file or the bucket.
//!
//! A manifest read from any tier is verified against its digest before it is returned (a
//! manifest is a few KiB: hashing it is cheap next to serving a wrong one); one that does not
//! match is removed from the tier that held it.

use std::io;

use bytes::Bytes;

use super::bucket::Claim;
use super::Cache;
use crate::error::Error;
use crate::reference::{Digest, Name, Tag};

/// A record kept beside the blobs, named by a hash of its key, so that no request text is
/// ever part of a path or an object name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A tag's record: the digest it points to and when the upstream confirmed it. Kept
    /// locally and in the bucket.
    Tag(String),
    /// The last good tag list of a repository. Kept locally.
    TagList(String),
}

impl Record {
    pub fn tag(upstream: &str, name: &Name, tag: &Tag) -> Record {
        Record::Tag(key_hex(&format!("tag\0{upstream}\0{name}\0{tag}")))
    }

    pub fn tag_list(upstream: &str, name: &Name) -> Record {
        Record::TagList(key_hex(&format!("list\0{upstream}\0{name}")))
    }

    /// Under the local tier's root: `tags/<2 hex>/<hex>.json` or `<hex>.list.json`.
    fn local_path(&self) -> std::path::PathBuf {
        let (hex, suffix) = match self {
            Record::Tag(hex) => (hex, "json"),
            Record::TagList(hex) => (hex, "list.json"),
        };
        std::path::Path::new("tags")
            .join(&hex[..2])
            .join(format!("{hex}.{suffix}"))
    }
}

fn key_hex(key: &str) -> String {
    Digest::sha256_of(key.as_bytes()).hex().to_string()
}

/// Records are small: a larger one is not ours.
const MAX_RECORD: u64 = 64 << 10;

impl Cache {
    /// A manifest by digest, verified: from the local tier, else from the bucket (then kept
    /// locally too). Its media type: as stored, else its `mediaType` field.
    pub async fn manifest(
        &self,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, Error> {
        if let Some((bytes, media_type)) = self.read_manifest(digest).await? {
            if digest.matches(&bytes) {
                return Ok(Some((bytes, media_type)));
            }
            tracing::error!(%digest, "cached manifest does not match its digest: removed");
            self.store.remove(digest);
            self.index.forget(digest);
        }
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let Some((bytes, media_type)) = shared.get_manifest(digest, max).await else {
            return Ok(None);
        };
        if !digest.matches(&bytes) {
            tracing::error!(%digest, "manifest in the bucket does not match its digest: removed");
            shared.discard(digest).await;
            return Ok(None);
        }
        let media_type = media_type
            .filter(|m| !m.is_empty() && m != "application/octet-stream")
            .or_else(|| media_type_in(&bytes))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
        self.put_local_manifest(digest, bytes.clone(), &media_type)
            .await?;
        Ok(Some((bytes, media_type)))
    }

    /// A record from the local tier.
    pub async fn record(&self, record: &Record) -> Option<Bytes> {
        let path = self.store.root().join(record.local_path());
        let bytes = tokio::fs::read(path).await.ok()?;
        (bytes.len() as u64 <= MAX_RECORD).then(|| Bytes::from(bytes))
    }

    /// A record from the bucket, if there is one (tag records only).
    pub async fn shared_record(&self, record: &Record) -> Option<Bytes> {
        match (record, &self.shared) {
            (Record::Tag(hex), Some(shared)) => shared.get_tag(hex).await,
            _ => None,
        }
    }

    /// Keeps a record locally and, when `share` (tag records), in the bucket.
    pub async fn put_record(&self, record: &Record, bytes: Vec<u8>, share: bool) {
        if let (true, Record::Tag(hex), Some(shared)) = (share, record, self.shared.clone()) {
            let (hex, bytes) = (hex.clone(), bytes.clone());
            tokio::spawn(async move { shared.put_tag(&hex, bytes).await });
        }
        let path = self.store.root().join(record.local_path());
        let store = self.store.clone();
        let written = tokio::task::spawn_blocking(move || store.write_atomic(&path, &bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(?record, "could not keep a record on disk");
        }
    }

    /// Who fetches the object named by `key` from the upstream, when replicas share a
    /// bucket: this replica (it holds the lease until released or dropped), another, or
    /// anyone (no bucket, or it cannot arbitrate).
    pub async fn claim(&self, key: &Digest) -> Claim {
        match &self.shared {
            Some(shared) => shared.claim(key).await,
            None => Claim::None,
        }
    }

    /// Does a replica hold a live lease on `key`?
    pub async fn lease_held(&self, key: &Digest) -> bool {
        match &self.shared {
            Some(shared) => shared.lease_held(key).await,
            None => false,
        }
    }

    /// Gives a lease back at once.
    pub async fn release(&self, lease: super::bucket::Lease) {
        if let Some(shared) = &self.shared {
            shared.release(lease).await;
        }
    }

    /// Whether there is a bucket to share with (and wait for).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Stores a verified manifest in the local tier only.
    async fn put_local_manifest(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<(), Error> {
        let store = self.store.clone();
        let (d, mt, len) = (digest.clone(), media_type.to_string(), bytes.len() as u64);
        tokio::task::spawn_blocking(move || store.put_manifest(&d, &bytes, &mt))
            .await
            .map_err(io::Error::other)??;
        self.index.insert(digest.clone(), len);
        Ok(())
    }

    /// Stores a verified manifest by digest (small: written whole), here and in the bucket.
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
    ) -> Result<(), Error> {
        self.put_local_manifest(digest, bytes.clone(), media_type)
            .await?;
        if let Some(shared) = self.shared.clone() {
            let (d, mt) = (digest.clone(), media_type.to_string());
            tokio::spawn(async move { shared.put_manifest(&d, bytes, &mt).await });
        }
        Ok(())
    }
}

/// The `mediaType` field of a manifest, for sources that send no usable `Content-Type`.
pub fn media_type_in(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(bytes).ok()?.media_type
}
