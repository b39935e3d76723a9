//! What the manifests service has cached, for the admin API: the tag records (each names
//! its upstream, repository and tag, so the hashed file names need no index) and when a
//! client last pulled a manifest.

use super::*;

/// A cached tag, as its record says.
#[derive(Debug, Clone)]
pub struct CachedTag {
    pub upstream: String,
    pub name: Name,
    pub tag: Tag,
    pub digest: Digest,
    pub media_type: String,
    /// When the upstream last confirmed the digest for the tag.
    pub confirmed: SystemTime,
}

impl Manifests {
    /// Every tag recorded in the local tier (records that do not parse are skipped).
    pub async fn cached_tags(&self) -> Result<Vec<CachedTag>, Error> {
        let records = self.cache.tag_records().await?;
        Ok(records
            .iter()
            .filter_map(|bytes| serde_json::from_slice::<TagRecord>(bytes).ok())
            .map(|r| CachedTag {
                upstream: r.upstream,
                name: r.name,
                tag: r.tag,
                digest: r.digest,
                media_type: r.media_type,
                confirmed: r.confirmed,
            })
            .collect())
    }

    /// When a client last pulled manifest `digest`, if it is in memory and was pulled since
    /// it was loaded (the time is not kept across restarts or the in-memory set's bound).
    pub fn last_pulled(&self, digest: &Digest) -> Option<SystemTime> {
        self.hot.get(digest)?.last_pulled()
    }

    /// The largest manifest this service accepts (`limits.max_manifest_size`).
    pub fn max_size(&self) -> u64 {
        self.max_size
    }
}

impl Manifests {
    /// Forgets a tag: its record here and, with `shared`, in the tiers behind; the next
    /// pull asks the upstream. Returns the digest it pointed to, `None` if it had no record.
    pub async fn forget_tag(
        &self,
        upstream: &str,
        name: &Name,
        tag: &Tag,
        shared: bool,
    ) -> Option<Digest> {
        let key: TagKey = (upstream.to_string(), name.clone(), tag.clone());
        let record = self.tag_record(TagKeyRef::new(upstream, name, tag)).await;
        // The file first: a request in between reloads it no more.
        self.cache
            .remove_record(&tag_record_name(&key), shared)
            .await;
        self.tags.invalidate(&key);
        record.map(|r| r.digest.clone())
    }

    /// Forgets a manifest kept in memory (its file is removed through the cache).
    pub fn forget_manifest(&self, digest: &Digest) {
        self.hot.invalidate(digest);
    }
}
