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
//!
//! Everything is stored and read through the cache (`Cache::manifest`, records, leases): this
//! module never sees a path, a file or the bucket. `digest` has manifests by digest and the
//! upstream fetch, `tags` the tag records and revalidation, `lists` tag lists, `referrers`
//! the referrers API, `image` an image reference resolved into all its digests (pins,
//! syncs), `listing` what is cached (the admin API).

mod digest;
mod image;
mod listing;
mod lists;
mod referrers;
mod tags;

pub use image::Walked;
pub use listing::CachedTag;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::cache::records::media_type_in;
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
    /// When a client last pulled it, in seconds since the epoch (0: not since it was
    /// loaded). In memory only, for the admin API: a hit costs one relaxed store, no write.
    pub last_pulled: Arc<std::sync::atomic::AtomicU64>,
}

impl Manifest {
    pub fn new(digest: Digest, media_type: String, bytes: Bytes) -> Manifest {
        // Room for the four below and the ones every answer adds (API version, X-Cache,
        // OCI-Namespace, Warning): with room for four, each answer's copy rebuilt its index
        // to take the API version. (The copy of the entries still grows once: a cloned Vec
        // keeps only its length.)
        let mut headers = HeaderMap::with_capacity(8);
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
            last_pulled: Arc::default(),
        }
    }

    /// Notes that a client pulled it now.
    pub fn note_pulled(&self) {
        let now = clock::since_epoch().as_secs();
        // Written once a second at most: a store on every pull moved the cache line between
        // the cores serving the same manifest, request after request.
        if self.last_pulled.load(std::sync::atomic::Ordering::Relaxed) != now {
            self.last_pulled
                .store(now, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// When a client last pulled it since it was loaded into memory.
    pub fn last_pulled(&self) -> Option<SystemTime> {
        match self.last_pulled.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            s => Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
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

/// A [`TagKey`] made of borrowed parts, to look a tag's record up without copying them: the
/// lookup of every tag's answer made three strings for it.
#[derive(Clone, Copy)]
struct TagKeyRef<'a> {
    upstream: &'a str,
    name: &'a Name,
    tag: &'a Tag,
}

impl<'a> TagKeyRef<'a> {
    fn new(upstream: &'a str, name: &'a Name, tag: &'a Tag) -> Self {
        TagKeyRef {
            upstream,
            name,
            tag,
        }
    }

    fn to_owned(self) -> TagKey {
        (
            self.upstream.to_owned(),
            self.name.clone(),
            self.tag.clone(),
        )
    }
}

/// The hash of the [`TagKey`] with the same parts (a tuple hashes its fields in order), as
/// the maps keyed by `TagKey` require of a key they are asked with.
impl std::hash::Hash for TagKeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.upstream.hash(state);
        self.name.hash(state);
        self.tag.hash(state);
    }
}

impl moka::Equivalent<TagKey> for TagKeyRef<'_> {
    fn equivalent(&self, key: &TagKey) -> bool {
        (self.upstream, self.name, self.tag) == (key.0.as_str(), &key.1, &key.2)
    }
}
/// The hasher of the maps every cached manifest answer looks in: seeded per process, and
/// several times cheaper than the standard SipHash on keys of 70 bytes and more (a digest,
/// a tag's three names): callgrind counted 2,100 instructions of SipHash per answer.
type Hasher = foldhash::fast::RandomState;
type TagFlights = Coalesce<(TagKey, String), Result<Answer<Arc<Manifest>>, Error>>;
type ListFlights = Coalesce<(String, Name), Result<Answer<Arc<Vec<String>>>, Error>>;

pub struct Manifests {
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    offline: bool,
    max_size: u64,
    /// Verified manifests by digest, in memory, bounded by bytes: the hot path of a mirror.
    hot: moka::sync::Cache<Digest, Arc<Manifest>, Hasher>,
    /// Tag records loaded from disk or written since.
    tags: moka::sync::Cache<TagKey, Arc<TagRecord>, Hasher>,
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
                .build_with_hasher(Hasher::default()),
            tags: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .build_with_hasher(Hasher::default()),
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
}

/// Does an `Accept` list admit `media_type`? No list, or a wildcard, admits everything.
///
/// One pass over the list, cutting at `,` and `;` with a plain loop over the bytes: with
/// `str::split` (a char searcher per list and per item) this cost a cached manifest's answer
/// about 630 instructions on a one-type `Accept`.
pub fn accepts(accept: Option<&str>, media_type: &str) -> bool {
    let Some(mut rest) = accept.filter(|a| !a.trim().is_empty()) else {
        return true;
    };
    // Items are `type *(";" param)`, separated by `,`.
    loop {
        let (t, mut sep, after) = cut(rest);
        rest = after;
        let t = t.trim();
        let wanted = t == media_type
            || t == "*/*"
            || t.eq_ignore_ascii_case(media_type)
            || t == "application/*";
        let mut refused = false;
        while sep == Some(b';') {
            let (param, s, after) = cut(rest);
            (sep, rest) = (s, after);
            // `q=0` means "not acceptable" (RFC 9110 §12.4.2); read only for a type that matches.
            refused = refused
                || wanted
                    && param
                        .trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q == 0.0);
        }
        if wanted && !refused {
            return true;
        }
        if sep.is_none() {
            return false;
        }
    }
}

/// `s` cut at its first `,` or `;`: what is before it, which it was (`None`: neither is
/// in `s`), and what is after it.
fn cut(s: &str) -> (&str, Option<u8>, &str) {
    match s.bytes().position(|b| b == b',' || b == b';') {
        Some(i) => (&s[..i], Some(s.as_bytes()[i]), &s[i + 1..]),
        None => (s, None, ""),
    }
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

    /// A pull is noted to the second: the first one, and the next one in a later second.
    #[tokio::test(start_paused = true)]
    async fn pulls_are_noted_to_the_second() {
        let m = Manifest::new(
            Digest::sha256_of(b"{}"),
            "x".into(),
            Bytes::from_static(b"{}"),
        );
        assert_eq!(m.last_pulled(), None);
        m.note_pulled();
        let first = m.last_pulled().expect("noted");
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(first), clock::since_epoch().as_secs());
        tokio::time::advance(Duration::from_secs(3)).await;
        m.note_pulled();
        assert_eq!(secs(m.last_pulled().unwrap()), secs(first) + 3);
    }

    /// A tag's key borrowed hashes as the owned key, equals it and nothing else, and finds
    /// what the owned key put in the tag map.
    #[test]
    fn borrowed_tag_keys_find_what_owned_ones_put() {
        use std::hash::BuildHasher;
        let hasher = Hasher::default();
        let tags: moka::sync::Cache<TagKey, u32, Hasher> =
            moka::sync::Cache::builder().build_with_hasher(Hasher::default());
        let parts = [
            ("docker.io", "library/a", "1"),
            ("docker.io", "library/a", "2"),
            ("docker.io", "library/a1", "x"),
            ("ghcr.io", "library/a", "1"),
            ("docker.i", "olibrary/a", "1"),
        ];
        let keys: Vec<(String, Name, Tag)> = parts
            .iter()
            .map(|(u, n, t)| {
                (
                    u.to_string(),
                    Name::parse(n).unwrap(),
                    Tag::parse(t).unwrap(),
                )
            })
            .collect();
        for (i, key) in keys.iter().enumerate() {
            tags.insert(key.clone(), i as u32);
        }
        for (i, key) in keys.iter().enumerate() {
            let borrowed = TagKeyRef::new(&key.0, &key.1, &key.2);
            assert_eq!(hasher.hash_one(borrowed), hasher.hash_one(key));
            assert_eq!(tags.get(&borrowed), Some(i as u32));
            assert_eq!(borrowed.to_owned(), *key);
            for (j, other) in keys.iter().enumerate() {
                assert_eq!(moka::Equivalent::equivalent(&borrowed, other), i == j);
            }
        }
    }

    /// Lists of types, parameters, spaces and `q` values: the answer is the one of the
    /// parser as it was (`str::split`, every item's `q` read).
    #[test]
    fn accept_lists_answer_as_before() {
        fn model(accept: Option<&str>, media_type: &str) -> bool {
            let Some(accept) = accept.filter(|a| !a.trim().is_empty()) else {
                return true;
            };
            accept.split(',').any(|item| {
                let mut parts = item.split(';');
                let t = parts.next().unwrap_or("").trim();
                let refused = parts.any(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q == 0.0)
                });
                !refused
                    && (t == "*/*" || t.eq_ignore_ascii_case(media_type) || t == "application/*")
            })
        }
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let items = [
            oci,
            "APPLICATION/vnd.oci.image.manifest.v1+JSON",
            "application/vnd.docker.distribution.manifest.v2+json",
            "*/*",
            "application/*",
            "",
            " ",
        ];
        let params = [
            "",
            ";q=0",
            "; q=0.0",
            ";q=0.5",
            ";q=x",
            ";charset=utf-8;q=0",
            " ;q=1",
        ];
        let mut lists = vec![None];
        for a in items {
            for pa in params {
                for b in items {
                    for pb in ["", ";q=0", ";q=0;q=1"] {
                        lists.push(Some(format!("{a}{pa}, {b}{pb}")));
                        lists.push(Some(format!("{a}{pa},{b}{pb},")));
                        lists.push(Some(format!("{b}{pb};, {a}{pa}")));
                        lists.push(Some(format!("{a}{pa}")));
                    }
                }
            }
        }
        for list in &lists {
            for media_type in [oci, "application/vnd.oci.image.index.v1+json"] {
                assert_eq!(
                    accepts(list.as_deref(), media_type),
                    model(list.as_deref(), media_type),
                    "{list:?} {media_type}"
                );
            }
        }
    }

    /// An image manifest with no layers, as the upstreams and peers below serve it.
    const TINY_MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

    /// A registry of one manifest, answering every manifest request with it (HEAD without
    /// the body), counting GETs: just enough upstream for the manifests service.
    async fn one_manifest_upstream(
        body: &'static [u8],
    ) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gets = Arc::new(AtomicUsize::new(0));
        let counted = gets.clone();
        let digest = Digest::sha256_of(body).to_string();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let (digest, counted) = (digest.clone(), counted.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let get = buf.starts_with(b"GET ");
                            buf.drain(..end + 4);
                            if get {
                                counted.fetch_add(1, Ordering::SeqCst);
                            }
                            let head = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\n\
                                 docker-content-digest: {digest}\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            );
                            let _ = sock.write_all(head.as_bytes()).await;
                            if get {
                                let _ = sock.write_all(body).await;
                            }
                        }
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), gets)
    }

    /// Regression (issue 13): a tag fetched under the bucket's lease wrote its record twice
    /// (two disk writes and two PUTs), once before releasing the lease and once after.
    #[tokio::test]
    async fn a_tag_fetched_under_a_lease_is_recorded_once() {
        use crate::cache::bucket::testing::{tier, TestStore};
        use crate::cache::bucket::LEASE_TTL;
        let store = TestStore::new();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let cache = Cache::for_test(dir.path(), Some(tier(&store, LEASE_TTL, 1 << 30)));
        let body = TINY_MANIFEST;
        let (url, gets) = one_manifest_upstream(body).await;
        let config = crate::config::UpstreamConfig::new("docker.io", &url, true);
        let up = Arc::new(Upstream::new(&config, metrics.clone()).unwrap());
        let manifests = Manifests::new(cache, metrics, false, 1 << 20, Arc::default());
        let name = Name::parse("library/x").unwrap();
        let tag = Reference::parse("1").unwrap();
        let answer = manifests.get(&up, &name, &tag, None).await.unwrap();
        assert_eq!(answer.value.digest, Digest::sha256_of(body));
        assert_eq!(gets.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The bucket's copy is written in the background: wait for it. Every task spawned
        // with it runs in the same turns of this single-threaded runtime.
        let start = clock::Instant::now();
        while store.writes_under("mirror/tags/") == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no tag record written"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(store.writes_under("mirror/tags/"), 1, "one tag record PUT");
    }

    /// With peers, a manifest the replica responsible for it resolved is kept on this
    /// replica's disk only: that replica put the manifest and the tag's record in the
    /// bucket as it resolved them, and every asking replica used to PUT both again.
    #[tokio::test]
    async fn a_manifest_resolved_by_a_peer_is_not_put_in_the_bucket_again() {
        use crate::cache::bucket::testing::{tier, TestStore};
        use crate::cache::bucket::LEASE_TTL;
        use std::sync::atomic::Ordering::SeqCst;
        let store = TestStore::new();
        let body = TINY_MANIFEST;
        // The other replica's peer endpoint, and the upstream: both answer with the manifest.
        let (other_url, other_gets) = one_manifest_upstream(body).await;
        let (upstream_url, upstream_gets) = one_manifest_upstream(body).await;
        let replica = |advertise: &str| {
            let cfg = crate::config::PeersConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                advertise: format!("{advertise}/"),
                secret: Some(crate::config::Secret("0123456789abcdef".into())),
                secret_file: None,
            };
            let bucket = tier(&store, LEASE_TTL, 1 << 30);
            crate::cache::peers::Peers::new(&cfg, bucket, Duration::from_secs(5), &Metrics::new())
                .unwrap()
        };
        let (me, other) = (replica("http://127.0.0.1:9"), replica(&other_url));
        other.beat().await;
        me.beat().await;
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let cache = Cache::for_test(dir.path(), Some(tier(&store, LEASE_TTL, 1 << 30)));
        cache.set_peers(me);
        let config = crate::config::UpstreamConfig::new("docker.io", &upstream_url, true);
        let up = Arc::new(Upstream::new(&config, metrics.clone()).unwrap());
        let manifests = Manifests::new(cache.clone(), metrics, false, 1 << 20, Arc::default());
        let name = Name::parse("library/x").unwrap();
        // A tag the other replica is responsible for.
        let tag = (0..100)
            .map(|i| Reference::parse(&format!("t{i}")).unwrap())
            .find(|t| {
                cache
                    .responsible_peer(&digest::fetch_key(&up, &name, t))
                    .is_some()
            })
            .expect("one of 100 tags is the other replica's");

        let written = store.writes_under("mirror/");
        let answer = manifests.get(&up, &name, &tag, None).await.unwrap();
        assert_eq!(answer.value.digest, Digest::sha256_of(body));
        assert_eq!(
            (other_gets.load(SeqCst), upstream_gets.load(SeqCst)),
            (1, 0)
        );
        // The bucket's copies would be written in the background: let those tasks run.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            store.writes_under("mirror/") - written,
            0,
            "nothing PUT by the asking replica"
        );
        // Kept here all the same: the next request is answered from this replica's disk.
        let again = manifests.get(&up, &name, &tag, None).await.unwrap();
        assert_eq!(again.value.digest, answer.value.digest);
        assert_eq!(other_gets.load(SeqCst), 1, "not asked again");
        assert!(cache.store.media_type(&answer.value.digest).is_some());
    }

    /// A manifest by digest that a flight fetched and kept while this request was still
    /// looking in the bucket (a round trip) is taken from the hot set, not fetched again:
    /// three replicas syncing together asked the upstream twice for it in about 1 run in 2.
    #[tokio::test]
    async fn a_flight_ended_while_looking_in_the_bucket_is_not_fetched_again() {
        use crate::cache::bucket::testing::{tier, TestStore};
        use crate::cache::bucket::LEASE_TTL;
        use std::sync::atomic::Ordering::SeqCst;
        let store = TestStore::new();
        let body = TINY_MANIFEST;
        let (url, gets) = one_manifest_upstream(body).await;
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let cache = Cache::for_test(dir.path(), Some(tier(&store, LEASE_TTL, 1 << 30)));
        let config = crate::config::UpstreamConfig::new("docker.io", &url, true);
        let up = Arc::new(Upstream::new(&config, metrics.clone()).unwrap());
        let manifests = Arc::new(Manifests::new(
            cache,
            metrics,
            false,
            1 << 20,
            Arc::default(),
        ));
        let (name, d) = (Name::parse("library/x").unwrap(), Digest::sha256_of(body));

        store.hang(true);
        let asking = tokio::spawn({
            let (manifests, up, name, d) = (manifests.clone(), up.clone(), name.clone(), d.clone());
            async move {
                let reference = Reference::Digest(d);
                manifests
                    .get(&up, &name, &reference, None)
                    .await
                    .map(|a| a.value)
            }
        });
        // The request is in the bucket's lookup when another flight keeps the manifest.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert!(!asking.is_finished());
        let oci = "application/vnd.oci.image.manifest.v1+json";
        manifests.remember(&d, oci.into(), Bytes::from_static(body));
        store.hang(false);
        let m = asking.await.unwrap().unwrap();
        assert_eq!(m.digest, d);
        assert_eq!(gets.load(SeqCst), 0, "not fetched again");
    }
}
