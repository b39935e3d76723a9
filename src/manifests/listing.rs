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
