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

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::cache::bucket::Claim;
use crate::cache::Cache;
use crate::clock;
use crate::error::{Error, ErrorCode, UpstreamError};
use crate::metrics::Metrics;
use crate::reference::{Digest, DigestHasher, Name, Reference, Tag};
use crate::upstream::{read_body, Upstream, MANIFEST_TYPES};

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

/// A manifest as answered, and whether it is a stale answer given because the upstream
/// failed.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub value: T,
    pub stale: bool,
    /// How it was answered: `hit`, `revalidated` (a HEAD confirmed it), `miss`, `stale`.
    pub outcome: &'static str,
}

impl<T> Answer<T> {
    fn hit(value: T) -> Self {
        Answer {
            value,
            stale: false,
            outcome: "hit",
        }
    }
    fn miss(value: T) -> Self {
        Answer {
            value,
            stale: false,
            outcome: "miss",
        }
    }
    fn stale(value: T) -> Self {
        Answer {
            value,
            stale: true,
            outcome: "stale",
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

/// Runs one future per key at a time; callers with the same key share its result.
pub struct Coalesce<K, V> {
    flights: Mutex<HashMap<K, Arc<OnceCell<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Coalesce<K, V> {
    fn default() -> Self {
        Coalesce {
            flights: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Coalesce<K, V> {
    /// If the caller that runs `f` goes away, a waiting caller takes over.
    pub async fn run<F, Fut>(&self, key: K, f: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = self
            .flights
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let value = cell.get_or_init(f).await.clone();
        let mut flights = self.flights.lock().unwrap();
        if flights.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            flights.remove(&key);
        }
        value
    }
}

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
    referrers_last: moka::sync::Cache<String, Arc<(Bytes, HeaderValue)>>,
}

/// How long a referrers answer is served without asking again.
const REFERRERS_TTL: Duration = Duration::from_secs(60);
/// How long a replica waits for another replica's fetch of the same manifest.
const SHARED_WAIT: Duration = Duration::from_secs(15);
/// Bound on tag list pages followed upstream.
const MAX_TAG_PAGES: usize = 100;

impl Manifests {
    pub fn new(
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        offline: bool,
        max_size: u64,
    ) -> Manifests {
        Manifests {
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

    /// A cached manifest by digest, verified, or `None`.
    pub async fn cached(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, Error> {
        if let Some(m) = self.hot.get(digest) {
            return Ok(Some(m));
        }
        let Some((bytes, media_type)) = self.cache.read_manifest(digest).await? else {
            return self.shared_manifest(digest).await;
        };
        if &hash_as(digest, &bytes) != digest {
            tracing::error!(%digest, "cached manifest does not match its digest: removed");
            self.cache.store.remove(digest);
            self.cache.index.forget(digest);
            return Ok(None);
        }
        Ok(Some(self.remember(digest, media_type, bytes)))
    }

    /// A verified manifest, kept in the hot set.
    fn remember(&self, digest: &Digest, media_type: String, bytes: Bytes) -> Arc<Manifest> {
        let m = Arc::new(Manifest::new(digest.clone(), media_type, bytes));
        self.hot.insert(digest.clone(), m.clone());
        m
    }

    /// A manifest from the shared tier, verified, then kept locally too.
    async fn shared_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>, Error> {
        let Some(shared) = &self.cache.shared else {
            return Ok(None);
        };
        let Some((bytes, media_type)) = shared.get_manifest(digest, self.max_size).await else {
            return Ok(None);
        };
        if &hash_as(digest, &bytes) != digest {
            shared.discard(digest).await;
            return Ok(None);
        }
        let media_type = media_type
            .filter(|m| !m.is_empty() && m != "application/octet-stream")
            .or_else(|| media_type_in(&bytes))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into());
        let store = self.cache.store.clone();
        let (d, b, mt) = (digest.clone(), bytes.clone(), media_type.clone());
        tokio::task::spawn_blocking(move || store.put_manifest(&d, &b, &mt))
            .await
            .map_err(std::io::Error::other)??;
        self.cache.index.insert(digest.clone(), bytes.len() as u64);
        Ok(Some(self.remember(digest, media_type, bytes)))
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
            let age = clock::age(r.confirmed);
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
        let shared = self.cache.shared.as_ref()?;
        let bytes = shared.get_tag(&self.tag_hex(key)).await?;
        let record: TagRecord = serde_json::from_slice(&bytes).ok()?;
        let age = clock::age(record.confirmed);
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
                let resp = up
                    .send(
                        Method::HEAD,
                        &manifest_path(name, &reference),
                        name,
                        &accept_headers(accept),
                    )
                    .await
                    .map_err(|e| Error::upstream(&up.name, e))?;
                match resp.status() {
                    StatusCode::OK => {
                        let moved_to = resp
                            .headers()
                            .get("docker-content-digest")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| Digest::parse(v).ok());
                        if moved_to.as_ref() == Some(&record.digest) {
                            self.record_tag(&key, cached).await;
                            return Ok((cached.clone(), "revalidated"));
                        }
                        if let Some(d) = moved_to {
                            if let Some(m) = self.cached(&d).await? {
                                if accepts(accept, &m.media_type) {
                                    self.record_tag(&key, &m).await;
                                    return Ok((m, "revalidated"));
                                }
                            }
                        }
                    }
                    StatusCode::NOT_FOUND => return Err(manifest_unknown()),
                    status => return Err(status_error(&up.name, status, resp.headers())),
                }
            }
            let m = self.fetch(up, name, &reference, accept).await?;
            self.record_tag(&key, &m).await;
            Ok((m, "miss"))
        }
        .await;
        match result {
            Ok((value, outcome)) => Ok(Answer {
                value,
                stale: false,
                outcome,
            }),
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

    /// With a shared tier, one replica at a time GETs a given manifest from the upstream
    /// (under the same kind of lease as blobs); the others wait for it to appear in the
    /// shared tier and take it from there, or fetch it themselves after `SHARED_WAIT`.
    async fn fetch(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        let Some(shared) = self.cache.shared.clone() else {
            return self.fetch_upstream(up, name, reference, accept).await;
        };
        let lease_key =
            Digest::sha256_of(format!("manifest\0{}\0{name}\0{reference}", up.name).as_bytes());
        match shared.claim(&lease_key).await {
            Claim::Mine(lease) => {
                let fetched = self.fetch_upstream(up, name, reference, accept).await;
                if let (Ok(m), Reference::Tag(tag)) = (&fetched, reference) {
                    // Publish the tag before releasing, so that the waiters find it.
                    let key = (up.name.clone(), name.clone(), tag.clone());
                    self.record_tag(&key, m).await;
                }
                shared.release(lease).await;
                fetched
            }
            Claim::Theirs => {
                let start = clock::Instant::now();
                let mut released_polls = 0;
                while start.elapsed() < SHARED_WAIT {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let found = match reference {
                        Reference::Digest(d) => self.shared_manifest(d).await.ok().flatten(),
                        Reference::Tag(tag) => {
                            let key = (up.name.clone(), name.clone(), tag.clone());
                            self.shared_tag(&key, accept, up.tag_ttl).await
                        }
                    };
                    if let Some(m) = found.filter(|m| accepts(accept, &m.media_type)) {
                        return Ok(m);
                    }
                    // Released without a result we can use: give the last writes a moment.
                    if !shared.lease_held(&lease_key).await {
                        released_polls += 1;
                        if released_polls > 3 {
                            break;
                        }
                    }
                }
                self.fetch_upstream(up, name, reference, accept).await
            }
            Claim::None => self.fetch_upstream(up, name, reference, accept).await,
        }
    }

    /// GETs a manifest from the upstream, verifies it, stores it by digest.
    async fn fetch_upstream(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        reference: &Reference,
        accept: Option<&str>,
    ) -> Result<Arc<Manifest>, Error> {
        let resp = up
            .send(
                Method::GET,
                &manifest_path(name, reference),
                name,
                &accept_headers(accept),
            )
            .await
            .map_err(|e| Error::upstream(&up.name, e))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(manifest_unknown()),
            status => return Err(status_error(&up.name, status, resp.headers())),
        }
        let headers = resp.headers().clone();
        if let Some(len) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > self.max_size {
                return Err(Error::upstream(
                    &up.name,
                    UpstreamError::TooLarge(self.max_size),
                ));
            }
        }
        let bytes = read_body(resp.into_body(), self.max_size, up.read_timeout)
            .await
            .map_err(|e| Error::upstream(&up.name, e))?;
        let claimed = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let digest = match (reference, &claimed) {
            (Reference::Digest(d), _) => d.clone(),
            (Reference::Tag(_), Some(c)) => c.clone(),
            (Reference::Tag(_), None) => Digest::sha256_of(&bytes),
        };
        let actual = hash_as(&digest, &bytes);
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
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
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
        let path = self.tag_path(key);
        let bytes = tokio::fs::read(&path).await.ok()?;
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
            confirmed: clock::now(),
        };
        self.tags.insert(key.clone(), Arc::new(record.clone()));
        self.persist_tag(key, &record, true).await;
    }

    /// Writes a tag record to disk and, if `share`, to the shared tier.
    async fn persist_tag(&self, key: &TagKey, record: &TagRecord, share: bool) {
        let bytes = serde_json::to_vec(record).expect("a record serializes");
        if let (true, Some(shared)) = (share, self.cache.shared.clone()) {
            let (hex, bytes) = (self.tag_hex(key), bytes.clone());
            tokio::spawn(async move { shared.put_tag(&hex, bytes).await });
        }
        let path = self.tag_path(key);
        let store = self.cache.store.clone();
        let written = tokio::task::spawn_blocking(move || store.write_atomic(&path, &bytes)).await;
        if !matches!(written, Ok(Ok(()))) {
            tracing::warn!(tag = %key.2, "could not persist a tag record");
        }
    }

    /// The name of a tag's record: a hash of the key, so no request text is in a path.
    fn tag_hex(&self, key: &TagKey) -> String {
        Digest::sha256_of(format!("tag\0{}\0{}\0{}", key.0, key.1, key.2).as_bytes())
            .hex()
            .to_string()
    }

    /// `tags/<2 hex>/<hex>.json`.
    fn tag_path(&self, key: &TagKey) -> std::path::PathBuf {
        let hex = self.tag_hex(key);
        self.cache
            .store
            .root()
            .join("tags")
            .join(&hex[..2])
            .join(format!("{hex}.json"))
    }

    fn list_path(&self, up: &str, name: &Name) -> std::path::PathBuf {
        let h = Digest::sha256_of(format!("list\0{up}\0{name}").as_bytes());
        let hex = h.hex();
        self.cache
            .store
            .root()
            .join("tags")
            .join(&hex[..2])
            .join(format!("{hex}.list.json"))
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
            let bytes = tokio::fs::read(self.list_path(&up.name, name)).await.ok()?;
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
                match self.fetch_tag_list(up, name).await {
                    Ok(list) => {
                        let list = Arc::new(list);
                        self.tag_lists.insert(key.clone(), list.clone());
                        let path = self.list_path(&up.name, name);
                        let store = self.cache.store.clone();
                        let bytes = serde_json::to_vec(&*list).expect("a list serializes");
                        let _ = tokio::task::spawn_blocking(move || store.write_atomic(&path, &bytes)).await;
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

    async fn fetch_tag_list(&self, up: &Arc<Upstream>, name: &Name) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let mut tags = Vec::new();
        let mut path = format!("/v2/{name}/tags/list");
        for _ in 0..MAX_TAG_PAGES {
            let resp = up
                .send(Method::GET, &path, name, &HeaderMap::new())
                .await
                .map_err(|e| Error::upstream(&up.name, e))?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => {
                    return Err(Error::client(
                        ErrorCode::NameUnknown,
                        "repository unknown to the upstream",
                    ))
                }
                status => return Err(status_error(&up.name, status, resp.headers())),
            }
            let next = resp
                .headers()
                .get(header::LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let body = read_body(resp.into_body(), self.max_size, up.read_timeout)
                .await
                .map_err(|e| Error::upstream(&up.name, e))?;
            let page: Page = serde_json::from_slice(&body).map_err(|e| {
                Error::upstream(&up.name, UpstreamError::Protocol(format!("tag list: {e}")))
            })?;
            tags.extend(
                page.tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| Tag::parse(t).is_ok()),
            );
            match next {
                // Only a path on the same registry: never a link to elsewhere.
                Some(n)
                    if n.split('?').next() == Some(format!("/v2/{name}/tags/list").as_str()) =>
                {
                    path = n
                }
                _ => break,
            }
        }
        tags.sort();
        tags.dedup();
        Ok(tags)
    }

    /// Referrers of `digest`, passed through, cached briefly, stale on error.
    pub async fn referrers(
        &self,
        up: &Arc<Upstream>,
        name: &Name,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Answer<Arc<(Bytes, HeaderValue)>>, Error> {
        let mut path = format!("/v2/{name}/referrers/{digest}");
        if let Some(t) = artifact_type {
            path.push_str("?artifactType=");
            path.extend(url::form_urlencoded::byte_serialize(t.as_bytes()));
        }
        let key = format!("{}\0{path}", up.name);
        // Briefly: a minute at most, and never longer than the upstream's tag TTL.
        let fresh_for = REFERRERS_TTL.min(up.tag_ttl);
        if let Some((hit, _)) = self
            .referrers_fresh
            .get(&key)
            .filter(|(_, at)| at.elapsed() < fresh_for)
        {
            return Ok(Answer::hit(hit));
        }
        if self.offline {
            return match self.referrers_last.get(&key) {
                Some(v) => Ok(Answer::hit(v)),
                None => Err(unknown_offline()),
            };
        }
        let fetched = async {
            let resp = up
                .send(Method::GET, &path, name, &HeaderMap::new())
                .await
                .map_err(|e| Error::upstream(&up.name, e))?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Err(manifest_unknown()),
                status => return Err(status_error(&up.name, status, resp.headers())),
            }
            let ct = resp.headers().get(header::CONTENT_TYPE).cloned().unwrap_or(
                HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
            );
            let body = read_body(resp.into_body(), self.max_size, up.read_timeout)
                .await
                .map_err(|e| Error::upstream(&up.name, e))?;
            serde_json::from_slice::<serde_json::Value>(&body).map_err(|e| {
                Error::upstream(&up.name, UpstreamError::Protocol(format!("referrers: {e}")))
            })?;
            Ok(Arc::new((body, ct)))
        }
        .await;
        match fetched {
            Ok(v) => {
                self.referrers_fresh
                    .insert(key.clone(), (v.clone(), clock::Instant::now()));
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

fn manifest_path(name: &Name, reference: &Reference) -> String {
    format!("/v2/{name}/manifests/{reference}")
}

fn accept_headers(accept: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let value = accept
        .filter(|a| !a.trim().is_empty())
        .and_then(|a| HeaderValue::from_str(a).ok())
        .unwrap_or(HeaderValue::from_static(MANIFEST_TYPES));
    h.insert(header::ACCEPT, value);
    h
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

fn hash_as(digest: &Digest, bytes: &[u8]) -> Digest {
    let mut h = DigestHasher::new(digest.algorithm());
    h.update(bytes);
    h.finalize()
}

/// The `mediaType` field of a manifest, for upstreams that send no `Content-Type`.
fn media_type_in(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<M>(bytes).ok()?.media_type
}

/// The target of a `Link: <...>; rel="next"` header.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"" || p.trim() == "rel=next")
            .then(|| target.to_string())
    })
}

fn manifest_unknown() -> Error {
    Error::client(
        ErrorCode::ManifestUnknown,
        "manifest unknown to the upstream",
    )
}

fn unknown_offline() -> Error {
    Error::client(
        ErrorCode::ManifestUnknown,
        "not cached, and this mirror is offline",
    )
}

fn status_error(upstream: &str, status: StatusCode, headers: &HeaderMap) -> Error {
    Error::upstream(
        upstream,
        UpstreamError::Status {
            status,
            retry_after: headers.get(header::RETRY_AFTER).cloned(),
        },
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

    #[test]
    fn link_headers() {
        assert_eq!(
            next_link("</v2/a/tags/list?n=2&last=b>; rel=\"next\"").as_deref(),
            Some("/v2/a/tags/list?n=2&last=b")
        );
        assert_eq!(next_link("</x>; rel=\"prev\""), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[tokio::test]
    async fn coalesce_runs_once_for_concurrent_callers() {
        let c: Arc<Coalesce<u8, u32>> = Arc::new(Coalesce::default());
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, runs) = (c.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                c.run(1, || async {
                    runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    7
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 7);
        }
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
