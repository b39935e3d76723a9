//! The bucket tier: verified blobs, manifests and tag records in an S3-compatible bucket,
//! which several replicas use as one cache. The local store stays in front of it as a
//! bounded tier: a miss looks on local disk, then in the bucket, then upstream.
//!
//! ```text
//! <prefix>/blobs/<algorithm>/<hex>          verified content; a manifest has its media type
//!                                           as the object's Content-Type
//! <prefix>/tags/<hex>.json                  tag records, named by a hash of (upstream, name,
//!                                           tag)
//! <prefix>/leases/<algorithm>/<hex>/lease   "a replica is fetching this blob": created only
//!                                           if absent (`If-None-Match: *`), refreshed only if
//!                                           unchanged (`If-Match`), deleted when done
//! <prefix>/leases/<algorithm>/<hex>/<owner> the same on a store without conditional writes:
//!                                           one entry per contender, the oldest live wins
//! <prefix>/recent/<algorithm>/<hex>         empty; its Last-Modified is the blob's last use
//! <prefix>/peers/<hex of a URL>              empty; a replica's heartbeat (`[cache.s3.peers]`):
//!                                           the URL of its peer endpoint, alive while fresh
//! ```
//!
//! The store is behind object_store's `ObjectStore` trait: S3 (AWS, MinIO, Garage, Ceph) in
//! production, an in-memory store in unit tests. One job a file: `objects` (blobs, manifests,
//! tag records, markers, presigned URLs), `leases` (who fetches, who waits), `uploads` (a
//! local fill into the bucket), `gc`; here, the tier itself and its back-off.
//!
//! - **Nothing unverified**: a blob fetched upstream is uploaded by a task that reads the
//!   local fill like any client does, so it gets the last byte only once the digest is
//!   checked; only then is the (multipart) upload completed. A failed fill aborts it.
//! - **Once per blob across replicas**: the replica that wins a blob's lease fetches it; the
//!   others wait (up to `lease_wait`) for the blob to appear in the bucket and stream it
//!   from there. A lease its holder stopped refreshing for `LEASE_TTL` is taken over, and a
//!   holder never writes a lease that is no longer its own.
//! - **A store that is down or slow** costs one `timeout` per call; then the tier is skipped
//!   for `BACKOFF`, and the replica serves its local tier and the upstream meanwhile.
//! - **GC**: every replica lists the bucket, orders blobs by last use (the newer of the
//!   blob's and its `recent/` marker's Last-Modified), and deletes the oldest beyond
//!   `max_size`. Two replicas doing it at once compute the same order, and deleting twice is
//!   harmless.
//! - **Time** is read from `crate::clock`, so that the tests pause and advance it.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::ObjectStore;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt};

use super::source::Source;
use super::tier::Record;
use super::tier::{self, Tier, TierBody};
use crate::clock::{self, Instant};
use crate::config::S3Config;
use crate::metrics::Metrics;
use crate::reference::Digest;

mod gc;
mod leases;
mod members;
mod objects;
#[cfg(test)]
pub(crate) mod testing;
mod uploads;

pub use gc::GcReport;
pub use leases::{Claim, Lease, LEASE_TTL};

/// After a failed call, the tier is skipped this long.
const BACKOFF: Duration = Duration::from_secs(10);

/// Why a call gave no result.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    /// No such object.
    Absent,
    /// A conditional create found the object there, or a conditional update found it
    /// changed (or gone).
    Exists,
    /// The store refused the call kind (e.g. conditional writes).
    Unsupported,
    /// The store failed, timed out, or is being skipped after a failure.
    Unavailable,
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    signer: Option<Arc<dyn Signer>>,
    /// `""` or `"some/prefix/"`.
    prefix: String,
    /// This replica, in lease bodies and logs.
    owner: String,
    timeout: Duration,
    lease_wait: Duration,
    lease_ttl: Duration,
    max_size: u64,
    redirect: bool,
    /// Does the store honour conditional writes (`If-None-Match: *` and `If-Match`)?
    /// Probed on first use.
    conditional: AtomicU8,
    down_until: Mutex<Option<Instant>>,
    /// Blobs marked as used by this replica, and when (by `clock`, so that tests can
    /// advance it; moka's own expiry reads another clock).
    touched: moka::sync::Cache<Digest, Instant>,
    /// Blobs this replica saw in the bucket lately (uploaded, read, or found by a HEAD):
    /// a local hit is redirected to one of these without asking the store. Forgotten after
    /// `PRESENT_FOR`, well under the time the bucket's LRU GC takes to reach a blob in use.
    present: moka::sync::Cache<Digest, ()>,
    /// Every how long this replica runs the bucket's GC (`gc_interval`); none: never.
    gc_interval: Option<Duration>,
    metrics: Arc<Metrics>,
    /// Turns of the uploads deferred until the replica is idle (`uploads`).
    deferred: tokio::sync::Semaphore,
    /// Deferred uploads not ended yet.
    deferred_pending: Arc<std::sync::atomic::AtomicUsize>,
}

/// How long a blob seen in the bucket is taken to be there still.
const PRESENT_FOR: Duration = Duration::from_secs(600);

impl fmt::Debug for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bucket")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .field("owner", &self.owner)
            .finish()
    }
}

impl Bucket {
    /// The tier on the S3 bucket `cfg` names. Nothing is sent until the first use.
    pub fn open(
        cfg: &S3Config,
        lease_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> io::Result<Arc<Bucket>> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_retry(object_store::RetryConfig {
                backoff: Default::default(),
                max_retries: 2,
                retry_timeout: cfg.timeout.0,
            })
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_connect_timeout(cfg.timeout.0.min(Duration::from_secs(5)))
                    // A whole GET streams for longer than one call: its reads are bounded by
                    // the fill's stall timeout instead.
                    .with_timeout_disabled()
                    .with_pool_idle_timeout(Duration::from_secs(30)),
            );
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        let (id, secret) = cfg.credentials()?;
        if let Some(id) = id {
            b = b.with_access_key_id(id);
        }
        if let Some(secret) = secret {
            b = b.with_secret_access_key(secret.0);
        }
        let s3: Arc<AmazonS3> = Arc::new(b.build().map_err(io::Error::other)?);
        let mut shared = Bucket::new(
            s3.clone(),
            &cfg.prefix,
            cfg.timeout.0,
            cfg.lease_wait.0,
            lease_ttl,
            cfg.max_size.0,
            metrics,
        );
        shared.signer = Some(s3);
        shared.redirect = cfg.redirect;
        shared.gc_interval = Some(cfg.gc_interval.0);
        Ok(Arc::new(shared))
    }

    /// The tier on any object store (tests use an in-memory one).
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        timeout: Duration,
        lease_wait: Duration,
        lease_ttl: Duration,
        max_size: u64,
        metrics: Arc<Metrics>,
    ) -> Bucket {
        let prefix = prefix.trim_matches('/');
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "ocicache".into());
        let nanos = clock::since_epoch().subsec_nanos();
        // Several tiers in one process (tests) read the same paused clock: a counter keeps
        // their names apart.
        static TIERS: AtomicU32 = AtomicU32::new(0);
        let n = TIERS.fetch_add(1, Ordering::Relaxed);
        Bucket {
            store,
            signer: None,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            owner: format!("{host}-{}-{nanos:08x}-{n}", std::process::id()),
            timeout,
            lease_wait,
            lease_ttl,
            max_size,
            redirect: false,
            conditional: AtomicU8::new(UNKNOWN),
            down_until: Mutex::new(None),
            touched: moka::sync::Cache::new(100_000),
            present: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(PRESENT_FOR)
                .build(),
            gc_interval: None,
            metrics,
            deferred: tokio::sync::Semaphore::new(uploads::DEFERRED_AT_ONCE),
            deferred_pending: Arc::default(),
        }
    }

    /// Answer blob GETs with a redirect to the bucket?
    pub fn redirects(&self) -> bool {
        self.redirect && self.signer.is_some()
    }

    fn path(&self, kind: &str, d: &Digest) -> Path {
        Path::from(format!(
            "{}{kind}/{}/{}",
            self.prefix,
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    /// `tags/<hex>.json`; `hex` is a hash the caller made, never request text.
    /// A record's object: under `tags/`, named as the local tier names its file.
    fn record_path(&self, record: &Record) -> Path {
        let (hex, suffix) = record.hex_and_suffix();
        Path::from(format!("{}tags/{hex}.{suffix}", self.prefix))
    }

    fn count(&self, op: &'static str, result: &'static str) {
        self.metrics.shared(op, result);
    }

    fn available(&self) -> bool {
        let mut down = self.down_until.lock().unwrap();
        match *down {
            Some(t) if Instant::now() < t => false,
            Some(_) => {
                *down = None;
                true
            }
            None => true,
        }
    }

    /// Runs one call to the store, bounded by the timeout; maps and counts its failures.
    async fn call<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, Fault> {
        if !self.available() {
            self.count(op, "skipped");
            return Err(Fault::Unavailable);
        }
        let error = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(object_store::Error::NotFound { .. })) => return Err(Fault::Absent),
            Ok(Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            )) => return Err(Fault::Exists),
            Ok(Err(object_store::Error::NotImplemented)) => return Err(Fault::Unsupported),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.timeout),
        };
        self.count(op, "error");
        tracing::warn!(op, %error, backoff = ?BACKOFF, "shared store failed: using the local tier and upstreams");
        *self.down_until.lock().unwrap() = Some(Instant::now() + BACKOFF);
        Err(Fault::Unavailable)
    }
}

/// The bucket as the cache's second tier.
impl Tier for Bucket {
    fn name(&self) -> &'static str {
        "bucket"
    }

    fn get_blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Option<TierBody>> {
        Bucket::get_blob(self, digest).boxed()
    }

    fn head_blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Option<u64>> {
        Bucket::head_blob(self, digest).boxed()
    }

    fn discard<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()> {
        Bucket::discard(self, digest).boxed()
    }

    fn get_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        max: u64,
    ) -> BoxFuture<'a, Option<(Bytes, Option<String>)>> {
        Bucket::get_manifest(self, digest, max).boxed()
    }

    fn put_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        bytes: Bytes,
        media_type: &'a str,
    ) -> BoxFuture<'a, io::Result<()>> {
        async move {
            Bucket::put_manifest(self, digest, bytes, media_type).await;
            Ok(())
        }
        .boxed()
    }

    fn get_record<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, Option<Bytes>> {
        async move { self.get_record_object(record).await }.boxed()
    }

    fn put_record<'a>(
        &'a self,
        record: &'a Record,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, io::Result<()>> {
        async move {
            self.put_record_object(record, bytes).await;
            Ok(())
        }
        .boxed()
    }

    fn purge<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()> {
        Bucket::purge(self, digest).boxed()
    }

    fn remove_record<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, ()> {
        self.delete_record(record).boxed()
    }

    fn touch(&self, digest: &Digest) {
        Bucket::touch(self, digest)
    }

    fn claim<'a>(&'a self, key: &'a Digest) -> BoxFuture<'a, tier::Claim> {
        async move {
            match Bucket::claim(self, key).await {
                Claim::Mine(lease) => tier::Claim::Mine(tier::Lease(Box::new(lease))),
                Claim::Theirs => tier::Claim::Theirs,
                Claim::None => tier::Claim::None,
            }
        }
        .boxed()
    }

    fn wait_for<'a>(&'a self, key: &'a Digest) -> BoxFuture<'a, bool> {
        Bucket::wait_for(self, key).boxed()
    }

    fn lease_held<'a>(&'a self, key: &'a Digest) -> BoxFuture<'a, bool> {
        Bucket::lease_held(self, key).boxed()
    }

    fn release(&self, lease: tier::Lease) -> BoxFuture<'_, ()> {
        match lease.0.downcast::<Lease>() {
            Ok(lease) => Bucket::release(self, *lease).boxed(),
            Err(_) => futures_util::future::ready(()).boxed(),
        }
    }

    fn keep(self: Arc<Self>, digest: Digest, source: Source, lease: Option<tier::Lease>) {
        let lease = lease.and_then(|l| l.0.downcast::<Lease>().ok().map(|l| *l));
        self.upload(digest, source, lease);
    }

    fn keep_when_idle(self: Arc<Self>, digest: Digest, source: Source, idle: tier::Idle) {
        self.upload_when_idle(digest, source, idle);
    }

    fn pending(&self) -> usize {
        self.deferred_pending.load(Ordering::Relaxed)
    }

    fn redirect<'a>(
        &'a self,
        digest: &'a Digest,
        known_only: bool,
    ) -> BoxFuture<'a, Option<url::Url>> {
        async move {
            if !self.redirects() {
                return None;
            }
            self.presigned(digest, known_only).await
        }
        .boxed()
    }

    fn start(self: Arc<Self>) {
        if let Some(interval) = self.gc_interval {
            self.spawn_gc(interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Digest;

    #[tokio::test]
    async fn a_store_that_is_down_is_skipped_for_a_while() {
        let cfg: S3Config = serde_json::from_value(serde_json::json!({
            "endpoint": "http://127.0.0.1:1",
            "bucket": "b",
            "access_key_id": "k",
            "secret_access_key": "s",
            "timeout": "2s",
        }))
        .unwrap();
        let metrics = Arc::new(Metrics::new());
        let shared = Bucket::open(&cfg, Duration::from_secs(60), metrics.clone()).unwrap();
        let d = Digest::sha256_of(b"x");
        assert!(shared.get_blob(&d).await.is_none());
        assert!(shared.head_blob(&d).await.is_none());
        assert!(matches!(shared.claim(&d).await, Claim::None));
        let text = metrics.encode();
        assert!(text.contains(r#"op="get_blob",result="error""#), "{text}");
        assert!(
            text.contains(r#"op="head_blob",result="skipped""#),
            "{text}"
        );
    }

    /// The back-off runs on the library's clock: a paused test moves it.
    #[tokio::test(start_paused = true)]
    async fn a_store_that_hangs_is_skipped_for_the_backoff_then_tried_again() {
        let store = testing::TestStore::new();
        let mine = store.view();
        let shared = testing::tier(&mine, LEASE_TTL, 1 << 30);
        let d = Digest::sha256_of(b"x");
        store
            .put(
                &shared.path("blobs", &d),
                object_store::PutPayload::from_static(b"x"),
            )
            .await
            .unwrap();
        mine.hang(true);
        let started = Instant::now();
        assert!(shared.head_blob(&d).await.is_none(), "no answer in time");
        assert_eq!(started.elapsed(), shared.timeout);
        mine.hang(false);
        assert!(shared.head_blob(&d).await.is_none(), "skipped");
        tokio::time::advance(BACKOFF - Duration::from_secs(1)).await;
        assert!(shared.head_blob(&d).await.is_none(), "still skipped");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(shared.head_blob(&d).await, Some(1), "tried again");
        let text = shared.metrics.encode();
        assert!(
            text.contains(r#"op="head_blob",result="error"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"op="head_blob",result="skipped"} 2"#),
            "{text}"
        );
    }
}
