//! Manifests by digest and small records (tag records, tag lists), through the tiers: the
//! manifests service stores and reads them here and never sees a path, a file or the bucket.
//!
//! A manifest read from any tier is verified against its digest before it is returned (a
//! manifest is a few KiB: hashing it is cheap next to serving a wrong one); one that does not
//! match is removed from the tier that held it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use super::tier::Record;
use super::tier::{Claim, Lease};
use super::{peers, Cache};
use crate::clock;
use crate::error::Error;
use crate::reference::Digest;

/// How long a replica waits for another replica's fetch of the same object.
const SHARED_WAIT: Duration = Duration::from_secs(15);
/// How often it looks for it meanwhile.
const SHARED_POLL: Duration = Duration::from_millis(200);

impl Cache {
    /// A manifest by digest, verified: from the first tier that has it (then kept in the
    /// tiers before it too). Its media type: as stored, else its `mediaType` field.
    pub async fn manifest(
        &self,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, Error> {
        for (i, tier) in self.tiers.iter().enumerate() {
            let Some((bytes, media_type)) = tier.get_manifest(digest, max).await else {
                continue;
            };
            if !digest.matches(&bytes) {
                tracing::error!(%digest, tier = tier.name(), "a cached manifest does not match its digest: removed");
                tier.discard(digest).await;
                continue;
            }
            let media_type = media_type
                .filter(|m| !m.is_empty() && m != "application/octet-stream")
                .or_else(|| media_type_in(&bytes))
                .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
            for before in &self.tiers[..i] {
                before
                    .put_manifest(digest, bytes.clone(), &media_type)
                    .await?;
            }
            return Ok(Some((bytes, media_type)));
        }
        Ok(None)
    }

    /// A record from the local tier.
    pub async fn record(&self, record: &Record) -> Option<Bytes> {
        self.tiers[0].get_record(record).await
    }

    /// A record from a tier shared with other replicas, if one has it.
    pub async fn shared_record(&self, record: &Record) -> Option<Bytes> {
        for tier in &self.tiers[1..] {
            if let Some(bytes) = tier.get_record(record).await {
                return Some(bytes);
            }
        }
        None
    }

    /// Keeps a record locally and, when `share`, in the tiers shared with other replicas
    /// (in the background).
    pub async fn put_record(&self, record: &Record, bytes: Vec<u8>, share: bool) {
        if share {
            for tier in &self.tiers[1..] {
                let (tier, record, bytes) = (tier.clone(), record.clone(), bytes.clone());
                tokio::spawn(async move { tier.put_record(&record, bytes).await });
            }
        }
        if let Err(e) = self.tiers[0].put_record(record, bytes).await {
            tracing::warn!(?record, error = %e, "could not keep a record on disk");
        }
    }

    /// Who fetches the object named by `key` from the upstream, when replicas share a
    /// tier: this replica (it holds the lease until released or dropped), another, or
    /// anyone (no shared tier, or it cannot arbitrate).
    async fn claim(&self, key: &Digest) -> Claim {
        match self.tiers.get(1) {
            Some(tier) => tier.claim(key).await,
            None => Claim::None,
        }
    }

    /// Does a replica hold a live lease on `key`?
    async fn lease_held(&self, key: &Digest) -> bool {
        match self.tiers.get(1) {
            Some(tier) => tier.lease_held(key).await,
            None => false,
        }
    }

    /// Gives a lease back at once.
    async fn release(&self, lease: Lease) {
        if let Some(tier) = self.tiers.get(1) {
            tier.release(lease).await;
        }
    }

    /// Runs `fetch` once across the replicas that share a tier, for the object named by
    /// `key`: the replica that wins the lease fetches (and releases it after); the others
    /// poll `landed` (what the fetch leaves in the shared tier) for up to
    /// `SHARED_WAIT`, and fetch themselves if it does not come. The winner's copies in the
    /// bucket are written in the background, so a waiter that sees the lease gone polls a
    /// few more times before it fetches. Without a shared tier, just `fetch`.
    pub async fn once_across_replicas<T, L, LF, F, FF>(
        &self,
        key: &Digest,
        landed: L,
        fetch: F,
    ) -> Result<T, Error>
    where
        L: Fn() -> LF,
        LF: std::future::Future<Output = Option<T>>,
        F: FnOnce() -> FF,
        FF: std::future::Future<Output = Result<T, Error>>,
    {
        if !self.is_shared() {
            return fetch().await;
        }
        if let Some(peers) = self.peers() {
            // Ownership decides who fetches, with no lease and no wait: the callers ask the
            // responsible replica first (`responsible_peer`); what reaches here is fetched.
            if peers.owner(&peers::digest_key(key)) != peers::Owner::Unknown {
                return fetch().await;
            }
        }
        match self.claim(key).await {
            Claim::Mine(lease) => {
                let fetched = fetch().await;
                self.release(lease).await;
                fetched
            }
            Claim::Theirs => {
                let start = clock::Instant::now();
                let mut released_polls = 0;
                while start.elapsed() < SHARED_WAIT {
                    tokio::time::sleep(SHARED_POLL).await;
                    if let Some(found) = landed().await {
                        return Ok(found);
                    }
                    if !self.lease_held(key).await {
                        released_polls += 1;
                        if released_polls > 3 {
                            break;
                        }
                    }
                }
                fetch().await
            }
            Claim::None => fetch().await,
        }
    }

    /// With peers: the replica responsible for the object named by `key`, when it is
    /// another one and this request was not itself asked by a peer (so that two replicas
    /// that disagree on the owner ask each other at most once).
    pub fn responsible_peer(&self, key: &Digest) -> Option<(Arc<peers::Peers>, String)> {
        let peers = self.peers()?;
        if peers::asked_by_peer() {
            return None;
        }
        match peers.owner(&peers::digest_key(key)) {
            peers::Owner::Peer(p) => Some((peers.clone(), p)),
            peers::Owner::Me | peers::Owner::Unknown => None,
        }
    }

    /// Whether a tier is shared with other replicas (and worth waiting for).
    fn is_shared(&self) -> bool {
        self.tiers.len() > 1
    }

    /// Stores a verified manifest by digest (small: written whole): locally, then, when
    /// `share`, in the tiers behind (in the background).
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: Bytes,
        media_type: &str,
        share: bool,
    ) -> Result<(), Error> {
        self.tiers[0]
            .put_manifest(digest, bytes.clone(), media_type)
            .await?;
        let behind = if share { &self.tiers[1..] } else { &[] };
        for tier in behind {
            let tier = tier.clone();
            let (d, b, mt) = (digest.clone(), bytes.clone(), media_type.to_string());
            tokio::spawn(async move {
                if let Err(e) = tier.put_manifest(&d, b, &mt).await {
                    tracing::debug!(%d, error = %e, tier = tier.name(), "manifest not kept");
                }
            });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bucket::testing::{keys, tier, TestStore};
    use std::time::Duration;

    #[tokio::test]
    async fn a_manifest_found_in_the_bucket_is_verified_and_adopted_locally() {
        let dir = tempfile::tempdir().unwrap();
        let store = TestStore::new();
        let bucket = tier(&store, Duration::from_secs(60), 1 << 30);
        let cache = Cache::for_test(dir.path(), Some(bucket.clone()));
        let oci = "application/vnd.oci.image.index.v1+json";
        let bytes = Bytes::from_static(br#"{"schemaVersion":2,"manifests":[]}"#);
        let d = Digest::sha256_of(&bytes);
        bucket.put_manifest(&d, bytes.clone(), oci).await;

        let (got, media_type) = cache.manifest(&d, 1 << 20).await.unwrap().unwrap();
        assert_eq!((got, media_type.as_str()), (bytes.clone(), oci));
        assert_eq!(
            cache.store.media_type(&d).as_deref(),
            Some(oci),
            "kept locally"
        );
        assert!(cache.index.contains(&d), "and indexed");
        assert_eq!(std::fs::read(cache.store.blob_path(&d)).unwrap(), bytes);

        // A copy that does not match its digest is not served, and leaves the bucket.
        let wrong = Digest::sha256_of(b"another");
        bucket.put_manifest(&wrong, bytes.clone(), oci).await;
        assert!(cache.manifest(&wrong, 1 << 20).await.unwrap().is_none());
        assert!(cache.store.media_type(&wrong).is_none());
        let left = keys(&store, "mirror/blobs").await;
        assert_eq!(left, [format!("mirror/blobs/sha256/{}", d.hex())]);
    }
}
