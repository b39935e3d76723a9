//! Manifests by digest: immutable once verified, read from any tier of the cache, fetched
//! from the upstream once across concurrent clients (and, with a bucket, across replicas).

use super::*;

impl Manifests {
    /// A cached manifest by digest (from any tier), verified, or `None`.
    pub async fn cached(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, Error> {
        if let Some(m) = self.hot.get(digest) {
            return Ok(Some(m));
        }
        Ok(self
            .cache
            .manifest(digest, self.max_size)
            .await?
            .map(|(bytes, media_type)| self.remember(digest, media_type, bytes)))
    }

    /// A verified manifest, kept in the hot set.
    pub(super) fn remember(
        &self,
        digest: &Digest,
        media_type: String,
        bytes: Bytes,
    ) -> Arc<Manifest> {
        let m = Arc::new(Manifest::new(digest.clone(), media_type, bytes));
        self.hot.insert(digest.clone(), m.clone());
        m
    }

    pub(super) async fn by_digest(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        digest: &Digest,
        accept: Option<&str>,
    ) -> Result<Answer<Arc<Manifest>>, Error> {
        if let Some(m) = self.cached(digest).await? {
            self.metrics.hit("manifest");
            return Ok(Answer::hit(m));
        }
        if self.offline {
            return Err(unknown_offline());
        }
        self.metrics.miss("manifest");
        self.digest_flights
            .run(digest.clone(), || async {
                // A flight that ended while we looked (the bucket's answer takes a round
                // trip) left its manifest in the hot set: one look there saves a second GET.
                if let Some(m) = self.hot.get(digest) {
                    return Ok(m);
                }
                let m = self
                    .fetch(up, name, &Reference::Digest(digest.clone()), accept)
                    .await?;
                Ok(m)
            })
            .await
            .map(Answer::miss)
    }

    /// Fetches a manifest (a tag's is recorded). With a shared tier, one replica at a time
    /// GETs a given manifest from the upstream (`Cache::once_across_replicas`); the others
    /// take it from the shared tier when it lands there.
    pub(super) async fn fetch(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        if let Some(m) = self.resolved_by_peer(up, name, reference, accept).await {
            return Ok(m);
        }
        let key = fetch_key(up, name, reference);
        // What another replica's fetch leaves in the shared tier: the manifest by digest, or
        // the tag's record (adopted with that replica's confirmation time).
        let landed = || async {
            let found = match reference {
                Reference::Digest(d) => self.cached(d).await.ok().flatten(),
                Reference::Tag(tag) => {
                    let key = (up.name.clone(), name.clone(), tag.clone());
                    self.shared_tag(&key, accept, up.tag_ttl).await
                }
            };
            found.filter(|m| accepts(accept, &m.media_type))
        };
        self.cache
            .once_across_replicas(&key, landed, || {
                self.fetch_and_record(up, name, reference, accept)
            })
            .await
    }

    /// Fetches a manifest from the upstream; when asked by tag, records the tag (once: on
    /// disk and in the bucket).
    pub(super) async fn fetch_and_record(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        let m = self.fetch_upstream(up, name, reference, accept).await?;
        self.record_if_tag(up, name, reference, &m, true).await;
        Ok(m)
    }

    /// When `reference` is a tag: records that it points to `m` (on disk and, when `share`,
    /// in the bucket).
    async fn record_if_tag(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        m: &Arc<Manifest>,
        share: bool,
    ) {
        if let Reference::Tag(tag) = reference {
            let key = (up.name.clone(), name.clone(), tag.clone());
            self.record_tag(&key, m, share).await;
        }
    }

    /// With peers: `reference` as the replica responsible for it resolved it (so that one
    /// replica asks the upstream for all), verified and kept here, a tag recorded; `None`
    /// when this replica is responsible, or that replica failed (this one fetches then).
    /// Kept and recorded on this replica's disk only: the responsible replica put both in
    /// the bucket as it resolved them.
    pub(super) async fn resolved_by_peer(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Option<Arc<Manifest>> {
        let (peers, peer) = self
            .cache
            .responsible_peer(&fetch_key(up, name, reference))?;
        let text = reference.to_string();
        let asked = peers.manifest(&peer, &up.name, name, &text, accept, self.max_size);
        let (bytes, media_type, claimed) = match asked.await {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(%name, %reference, error = %e, "the replica responsible for a manifest failed: fetching it here");
                return None;
            }
        };
        let got = UpstreamManifest {
            bytes,
            media_type,
            digest: claimed.and_then(|d| Digest::parse(&d).ok()),
        };
        let m = self
            .keep_verified(up, name, reference, got, false)
            .await
            .ok()?;
        if !accepts(accept, &m.media_type) {
            return None;
        }
        self.record_if_tag(up, name, reference, &m, false).await;
        Some(m)
    }

    /// GETs a manifest from the upstream, verifies it, stores it by digest.
    pub(super) async fn fetch_upstream(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        let got = up.manifest(name, reference, accept, self.max_size).await?;
        self.keep_verified(up, name, reference, got, true).await
    }

    /// Verifies a manifest fetched for `reference` (from the upstream or a peer) against
    /// the digest asked for or claimed, and stores it by digest (in the bucket too when
    /// `share`).
    async fn keep_verified(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        got: UpstreamManifest,
        share: bool,
    ) -> Result<Arc<Manifest>, Error> {
        let UpstreamManifest {
            bytes,
            media_type,
            digest: claimed,
        } = got;
        let digest = match (reference, &claimed) {
            (Reference::Digest(d), _) => d.clone(),
            (Reference::Tag(_), Some(c)) => c.clone(),
            (Reference::Tag(_), None) => Digest::sha256_of(&bytes),
        };
        let actual = digest.of_same_kind(&bytes);
        if actual != digest
            || claimed
                .as_ref()
                .is_some_and(|c| c.algorithm() == actual.algorithm() && c != &actual)
        {
            tracing::warn!(upstream = %up.name, %name, %reference, expected = %digest, %actual, "manifest does not match its digest: not cached");
            return Err(Error::upstream(
                &up.name,
                UpstreamError::DigestMismatch(digest.to_string()),
            ));
        }
        let media_type = media_type
            .or_else(|| media_type_in(&bytes))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
        self.cache
            .put_manifest(&digest, bytes.clone(), &media_type, share)
            .await?;
        Ok(self.remember(&digest, media_type, bytes))
    }
}

/// The key of a manifest's fetch across replicas: whose lease, or which replica's.
pub(super) fn fetch_key(up: &Upstream, name: &Name, reference: &Reference) -> Digest {
    Digest::sha256_of(format!("manifest\0{}\0{name}\0{reference}", up.name).as_bytes())
}
