//! Manifests, tags, tag lists and referrers: fresh when the upstream is up, served when it
//! is not.
//!
//! - A manifest by digest is immutable: verified against its digest, kept like a blob (with
//!   its media type), then served from the cache forever, byte for byte.
//! - A tag maps to a digest with the time it was last confirmed. Within the upstream's
//!   `tag_ttl` it is answered with no upstream contact; after it, it is revalidated with a
//!   `HEAD` (which Docker Hub does not count as a pull) and the body is fetched only when
//!   the digest moved. Concurrent resolutions of one tag make one upstream request.
//! - When the upstream is unreachable, slow, 5xx, 429 or its token service fails, a cached
//!   answer is served stale (and counted); `offline` never asks at all.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::cache::records::media_type_in;
use crate::cache::shared::Claim;
use crate::cache::{Cache, Outcome, Record};
use crate::clock::{self, Clock};
use crate::coalesce::Coalesce;
use crate::error::{Error, ErrorCode, UpstreamError};
use crate::metrics::Metrics;
use crate::reference::{Digest, Name, Reference, Tag};
use crate::upstream::{Upstream, UpstreamManifest};

/// A verified manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
    /// The response headers, made once: a cached manifest is the hottest answer there is.
    pub headers: HeaderMap,
}

impl Manifest {
    pub fn new(digest: Digest, media_type: String, bytes: Bytes) -> Manifest {
        let mut headers = HeaderMap::with_capacity(4);
        let text = |s: &str| HeaderValue::from_str(s).ok();
        headers.insert(
            header::CONTENT_TYPE,
            text(&media_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        if let (Some(d), Some(e)) = (text(&digest.to_string()), text(&format!("\"{digest}\""))) {
            headers.insert("docker-content-digest", d);
            headers.insert(header::ETAG, e);
        }
        Manifest {
            digest,
            media_type,
            bytes,
            headers,
        }
    }
}

/// An answer (a manifest, a tag list, referrers) and how it was obtained: `outcome` says
/// whether it is a hit, a fetch, a revalidated tag or a stale answer given because the upstream
/// failed.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub value: T,
    pub outcome: Outcome,
}

impl<T> Answer<T> {
    fn hit(value: T) -> Self {
        Answer {
            value,
            outcome: Outcome::Hit,
        }
    }
    fn miss(value: T) -> Self {
        Answer {
            value,
            outcome: Outcome::Miss,
        }
    }
    fn stale(value: T) -> Self {
        Answer {
            value,
            outcome: Outcome::Stale,
        }
    }
}

/// A tag's record, also kept on disk so that a restart (or `offline`) still knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TagRecord {
    upstream: String,
    name: Name,
    tag: Tag,
    digest: Digest,
    media_type: String,
    /// When the upstream last confirmed this digest for the tag.
    confirmed: SystemTime,
}

type TagKey = (String, Name, Tag);
type TagFlights = Coalesce<(TagKey, String), Result<Answer<Arc<Manifest>>, Error>>;
type ListFlights = Coalesce<(String, Name), Result<Answer<Arc<Vec<String>>>, Error>>;

pub struct Manifests {
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    offline: bool,
    max_size: u64,
    /// Verified manifests by digest, in memory, bounded by bytes: the hot path of a mirror.
    hot: moka::sync::Cache<Digest, Arc<Manifest>>,
    /// Tag records loaded from disk or written since.
    tags: moka::sync::Cache<TagKey, Arc<TagRecord>>,
    tag_flights: TagFlights,
    digest_flights: Coalesce<Digest, Result<Arc<Manifest>, Error>>,
    /// Last good tag list per (upstream, name), for stale and offline answers.
    tag_lists: moka::sync::Cache<(String, Name), Arc<Vec<String>>>,
    list_flights: ListFlights,
    /// Referrers answers: fresh ones (briefly) and the last good one (for errors).
    referrers_fresh: moka::sync::Cache<String, (Arc<(Bytes, HeaderValue)>, clock::Instant)>,
    /// Tag ages and referrers' freshness are read on it (tests skip it ahead).
    clock: Arc<Clock>,
    referrers_last: moka::sync::Cache<String, Arc<(Bytes, HeaderValue)>>,
}

/// How long a referrers answer is served without asking again.
const REFERRERS_TTL: Duration = Duration::from_secs(60);
/// How long a replica waits for another replica's fetch of the same manifest.
const SHARED_WAIT: Duration = Duration::from_secs(15);

impl Manifests {
    pub fn new(
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        offline: bool,
        max_size: u64,
        clock: Arc<Clock>,
    ) -> Manifests {
        Manifests {
            clock,
            cache,
            metrics,
            offline,
            max_size,
            hot: moka::sync::Cache::builder()
                .max_capacity(64 << 20)
                .weigher(|_, m: &Arc<Manifest>| m.bytes.len().clamp(1, u32::MAX as usize) as u32)
                .build(),
            tags: moka::sync::Cache::new(100_000),
            tag_flights: Coalesce::default(),
            digest_flights: Coalesce::default(),
            tag_lists: moka::sync::Cache::new(10_000),
            list_flights: Coalesce::default(),
            referrers_fresh: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(REFERRERS_TTL)
                .build(),
            referrers_last: moka::sync::Cache::new(10_000),
        }
    }

    /// The manifest `reference` of `name` on `up`, for a client that accepts `accept`.
    pub async fn get(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Answer<Arc<Manifest>>, Error> {
        match reference {
            Reference::Digest(d) => self.by_digest(up, name, d, accept).await,
            Reference::Tag(t) => self.by_tag(up, name, t, accept).await,
        }
    }

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
    fn remember(&self, digest: &Digest, media_type: String, bytes: Bytes) -> Arc<Manifest> {
        let m = Arc::new(Manifest::new(digest.clone(), media_type, bytes));
        self.hot.insert(digest.clone(), m.clone());
        m
    }

    async fn by_digest(
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
                let m = self
                    .fetch(up, name, &Reference::Digest(digest.clone()), accept)
                    .await?;
                Ok(m)
            })
            .await
            .map(Answer::miss)
    }

    async fn by_tag(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        tag: &Tag,
        accept: Option<&str>,
    ) -> Result<Answer<Arc<Manifest>>, Error> {
        let key: TagKey = (up.name.clone(), name.clone(), tag.clone());
        let record = self.tag_record(&key).await;
        let usable = match &record {
            Some(r) if accepts(accept, &r.media_type) => {
                self.cached(&r.digest).await?.map(|m| (r.clone(), m))
            }
            _ => None,
        };
        if self.offline {
            return match usable {
                Some((_, m)) => Ok(Answer::hit(m)),
                None => Err(unknown_offline()),
            };
        }
        if let Some((r, m)) = &usable {
            let age = self.clock.age(r.confirmed);
            if age < up.tag_ttl {
                self.metrics.hit("tag");
                return Ok(Answer::hit(m.clone()));
            }
        }
        self.metrics.miss("tag");
        let flight = (key.clone(), accept.unwrap_or_default().to_string());
        self.tag_flights
            .run(flight, || async {
                // Another replica may have confirmed the tag within its TTL: answer the same.
                if let Some(m) = self.shared_tag(&key, accept, up.tag_ttl).await {
                    return Ok(Answer::hit(m));
                }
                self.revalidate(up, key.clone(), usable, accept).await
            })
            .await
    }

    /// The tag's record in the shared tier, if it was confirmed within `ttl` and its
    /// manifest is there and acceptable; adopted here.
    async fn shared_tag(
        &self,
        key: &TagKey,
        accept: Option<&str>,
        ttl: Duration,
    ) -> Option<Arc<Manifest>> {
        let bytes = self.cache.shared_record(&tag_record_name(key)).await?;
        let record: TagRecord = serde_json::from_slice(&bytes).ok()?;
        let age = self.clock.age(record.confirmed);
        if (&record.upstream, &record.name, &record.tag) != (&key.0, &key.1, &key.2)
            || age >= ttl
            || !accepts(accept, &record.media_type)
        {
            return None;
        }
        let m = self.cached(&record.digest).await.ok()??;
        self.metrics.hit("tag");
        self.tags.insert(key.clone(), Arc::new(record.clone()));
        self.persist_tag(key, &record, false).await;
        Some(m)
    }

    /// Asks the upstream about a tag whose record is missing or old.
    async fn revalidate(
        &self,
        up: &Arc<Upstream>,
        key: TagKey,
        usable: Option<(Arc<TagRecord>, Arc<Manifest>)>,
        accept: Option<&str>,
    ) -> Result<Answer<Arc<Manifest>>, Error> {
        let (_, name, tag) = &key;
        let reference = Reference::Tag(tag.clone());
        let result = async {
            if let Some((record, cached)) = &usable {
                // HEAD first: the body only when the digest moved.
                let moved_to = up.manifest_digest(name, tag, accept).await?;
                if moved_to.as_ref() == Some(&record.digest) {
                    self.record_tag(&key, cached).await;
                    return Ok((cached.clone(), Outcome::Revalidated));
                }
                if let Some(d) = moved_to {
                    if let Some(m) = self.cached(&d).await? {
                        if accepts(accept, &m.media_type) {
                            self.record_tag(&key, &m).await;
                            return Ok((m, Outcome::Revalidated));
                        }
                    }
                }
            }
            // Recorded by `fetch` (or adopted from another replica's record).
            let m = self.fetch(up, name, &reference, accept).await?;
            Ok((m, Outcome::Miss))
        }
        .await;
        match result {
            Ok((value, outcome)) => Ok(Answer { value, outcome }),
            Err(Error::Upstream { upstream, error })
                if error.is_unavailable() && usable.is_some() =>
            {
                tracing::warn!(upstream = %upstream, name = %name, tag = %tag, %error, "upstream failed: serving the cached tag stale");
                self.metrics.stale(&upstream);
                Ok(Answer::stale(usable.expect("checked").1))
            }
            Err(e) => Err(e),
        }
    }

    /// Fetches a manifest (a tag's is recorded). With a shared tier, one replica at a time GETs a given manifest from the upstream
    /// (under the same kind of lease as blobs); the others wait for it to appear in the
    /// shared tier and take it from there, or fetch it themselves after `SHARED_WAIT`.
    async fn fetch(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        if !self.cache.is_shared() {
            return self.fetch_and_record(up, name, reference, accept).await;
        }
        let lease_key =
            Digest::sha256_of(format!("manifest\0{}\0{name}\0{reference}", up.name).as_bytes());
        match self.cache.claim(&lease_key).await {
            Claim::Mine(lease) => {
                // The tag is recorded (and published) before the lease goes, so that the
                // waiters find it.
                let fetched = self.fetch_and_record(up, name, reference, accept).await;
                self.cache.release(lease).await;
                fetched
            }
            Claim::Theirs => {
                let start = clock::Instant::now();
                let mut released_polls = 0;
                while start.elapsed() < SHARED_WAIT {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let found = match reference {
                        Reference::Digest(d) => self.cached(d).await.ok().flatten(),
                        Reference::Tag(tag) => {
                            let key = (up.name.clone(), name.clone(), tag.clone());
                            self.shared_tag(&key, accept, up.tag_ttl).await
                        }
                    };
                    // A tag found there was adopted with the other replica's record.
                    if let Some(m) = found.filter(|m| accepts(accept, &m.media_type)) {
                        return Ok(m);
                    }
                    // Released without a result we can use: give the last writes a moment.
                    if !self.cache.lease_held(&lease_key).await {
                        released_polls += 1;
                        if released_polls > 3 {
                            break;
                        }
                    }
                }
                self.fetch_and_record(up, name, reference, accept).await
            }
            Claim::None => self.fetch_and_record(up, name, reference, accept).await,
        }
    }

    /// Fetches a manifest from the upstream; when asked by tag, records the tag (once: on
    /// disk and in the bucket).
    async fn fetch_and_record(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        let m = self.fetch_upstream(up, name, reference, accept).await?;
        if let Reference::Tag(tag) = reference {
            let key = (up.name.clone(), name.clone(), tag.clone());
            self.record_tag(&key, &m).await;
        }
        Ok(m)
    }

    /// GETs a manifest from the upstream, verifies it, stores it by digest.
    async fn fetch_upstream(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        let UpstreamManifest {
            bytes,
            media_type,
            digest: claimed,
        } = up.manifest(name, reference, accept, self.max_size).await?;
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
            .put_manifest(&digest, bytes.clone(), &media_type)
            .await?;
        Ok(self.remember(&digest, media_type, bytes))
    }

    async fn tag_record(&self, key: &TagKey) -> Option<Arc<TagRecord>> {
        if let Some(r) = self.tags.get(key) {
            return Some(r);
        }
        let bytes = self.cache.record(&tag_record_name(key)).await?;
        let record: Arc<TagRecord> = Arc::new(serde_json::from_slice(&bytes).ok()?);
        if (&record.upstream, &record.name, &record.tag) != (&key.0, &key.1, &key.2) {
            return None;
        }
        self.tags.insert(key.clone(), record.clone());
        Some(record)
    }

    async fn record_tag(&self, key: &TagKey, m: &Manifest) {
        let record = TagRecord {
            upstream: key.0.clone(),
            name: key.1.clone(),
            tag: key.2.clone(),
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            confirmed: self.clock.now(),
        };
        self.tags.insert(key.clone(), Arc::new(record.clone()));
        self.persist_tag(key, &record, true).await;
    }

    /// Keeps a tag record on disk and, if `share`, in the bucket.
    async fn persist_tag(&self, key: &TagKey, record: &TagRecord, share: bool) {
        let bytes = serde_json::to_vec(record).expect("a record serializes");
        self.cache
            .put_record(&tag_record_name(key), bytes, share)
            .await;
    }

    /// The whole tag list of `name`, sorted; the last good one when the upstream fails.
    pub async fn tag_list(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
    ) -> Result<Answer<Arc<Vec<String>>>, Error> {
        let key = (up.name.clone(), name.clone());
        let last_good = || async {
            if let Some(l) = self.tag_lists.get(&key) {
                return Some(l);
            }
            let bytes = self.cache.record(&Record::tag_list(&up.name, name)).await?;
            let list: Vec<String> = serde_json::from_slice(&bytes).ok()?;
            Some(Arc::new(list))
        };
        if self.offline {
            return match last_good().await {
                Some(l) => Ok(Answer::hit(l)),
                None => Err(Error::client(
                    ErrorCode::NameUnknown,
                    "repository not cached (offline)",
                )),
            };
        }
        self.list_flights
            .run(key.clone(), || async {
                match up.tags(name, self.max_size).await {
                    Ok(list) => {
                        let list = Arc::new(list);
                        self.tag_lists.insert(key.clone(), list.clone());
                        let bytes = serde_json::to_vec(&*list).expect("a list serializes");
                        self.cache.put_record(&Record::tag_list(&up.name, name), bytes, false).await;
                        Ok(Answer::miss(list))
                    }
                    Err(Error::Upstream { upstream, error }) if error.is_unavailable() => match last_good().await {
                        Some(l) => {
                            tracing::warn!(%upstream, %name, %error, "upstream failed: serving the last tag list");
                            self.metrics.stale(&upstream);
                            Ok(Answer::stale(l))
                        }
                        None => Err(Error::Upstream { upstream, error }),
                    },
                    Err(e) => Err(e),
                }
            })
            .await
    }

    /// Referrers of `digest`, passed through, cached briefly, stale on error.
    pub async fn referrers(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Answer<Arc<(Bytes, HeaderValue)>>, Error> {
        let key = format!(
            "{}\0{name}\0{digest}\0{}",
            up.name,
            artifact_type.unwrap_or_default()
        );
        // Briefly: a minute at most, and never longer than the upstream's tag TTL.
        let fresh_for = REFERRERS_TTL.min(up.tag_ttl);
        if let Some((hit, _)) = self
            .referrers_fresh
            .get(&key)
            .filter(|(_, at)| self.clock.instant().saturating_duration_since(*at) < fresh_for)
        {
            return Ok(Answer::hit(hit));
        }
        if self.offline {
            return match self.referrers_last.get(&key) {
                Some(v) => Ok(Answer::hit(v)),
                None => Err(unknown_offline()),
            };
        }
        let fetched = up
            .referrers(name, digest, artifact_type, self.max_size)
            .await
            .map(Arc::new);
        match fetched {
            Ok(v) => {
                self.referrers_fresh
                    .insert(key.clone(), (v.clone(), self.clock.instant()));
                self.referrers_last.insert(key, v.clone());
                Ok(Answer::miss(v))
            }
            Err(Error::Upstream { upstream, error }) if error.is_unavailable() => {
                match self.referrers_last.get(&key) {
                    Some(v) => {
                        self.metrics.stale(&upstream);
                        Ok(Answer::stale(v))
                    }
                    None => Err(Error::Upstream { upstream, error }),
                }
            }
            Err(e) => Err(e),
        }
    }
}

/// Does an `Accept` list admit `media_type`? No list, or a wildcard, admits everything.
pub fn accepts(accept: Option<&str>, media_type: &str) -> bool {
    let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
        return true;
    };
    accept.split(',').any(|item| {
        let mut parts = item.split(';');
        let t = parts.next().unwrap_or("").trim();
        // `q=0` means "not acceptable" (RFC 9110 §12.4.2).
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        !refused && (t == "*/*" || t.eq_ignore_ascii_case(media_type) || t == "application/*")
    })
}

/// The name of a tag's record.
fn tag_record_name(key: &TagKey) -> Record {
    Record::tag(&key.0, &key.1, &key.2)
}

fn unknown_offline() -> Error {
    Error::client(
        ErrorCode::ManifestUnknown,
        "not cached, and this mirror is offline",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists() {
        let oci = "application/vnd.oci.image.manifest.v1+json";
        assert!(accepts(None, oci));
        assert!(accepts(Some("*/*"), oci));
        assert!(accepts(Some("application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json;q=0.9"), oci));
        assert!(!accepts(
            Some("application/vnd.docker.distribution.manifest.v2+json"),
            oci
        ));
        assert!(!accepts(Some(&format!("{oci};q=0")), oci), "q=0 refuses");
        assert!(accepts(Some(&format!("{oci};q=0.5")), oci));
    }
}
