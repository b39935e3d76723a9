//! The shared tier: verified blobs, manifests and tag records in an S3-compatible bucket,
//! which several replicas use as one cache. The local store stays in front of it as a
//! bounded tier: a miss looks on local disk, then in the bucket, then upstream.
//!
//! ```text
//! <prefix>/blobs/<algorithm>/<hex>   verified content; a manifest has its media type as
//!                                    the object's Content-Type
//! <prefix>/tags/<hex>.json           tag records, named by a hash of (upstream, name, tag)
//! <prefix>/leases/<algorithm>/<hex>  "a replica is fetching this blob": created only if
//!                                    absent (`If-None-Match: *`), deleted when done
//! <prefix>/recent/<algorithm>/<hex>  empty; its Last-Modified is the blob's last use
//! ```
//!
//! The store is behind object_store's `ObjectStore` trait: S3 (AWS, MinIO, Garage, Ceph) in
//! production, an in-memory store in unit tests.
//!
//! - **Nothing unverified**: a blob fetched upstream is uploaded by a task that reads the
//!   local fill like any client does, so it gets the last byte only once the digest is
//!   checked; only then is the (multipart) upload completed. A failed fill aborts it.
//! - **Once per blob across replicas**: where the store honours conditional writes (probed
//!   once), the replica that creates a blob's lease fetches it; the others wait (up to
//!   `lease_wait`) for the blob to appear in the bucket and stream it from there. A lease
//!   older than the fill deadline is taken over.
//! - **A store that is down or slow** costs one `timeout` per call; then the tier is skipped
//!   for `BACKOFF`, and the replica serves its local tier and the upstream meanwhile.
//! - **GC**: every replica lists the bucket, orders blobs by last use (the newer of the
//!   blob's and its `recent/` marker's Last-Modified), and deletes the oldest beyond
//!   `max_size`. Two replicas doing it at once compute the same order, and deleting twice is
//!   harmless.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload,
    WriteMultipart,
};
use serde::{Deserialize, Serialize};

use super::fill::Source;
use crate::config::S3Config;
use crate::metrics::Metrics;
use crate::reference::{Algorithm, Digest};

/// After a failed call, the tier is skipped this long.
const BACKOFF: Duration = Duration::from_secs(10);
/// Blobs up to this size are uploaded in one PUT; larger ones in parts of at least this.
const PART: usize = 8 << 20;
/// S3 allows 10,000 parts per upload.
const MAX_PARTS: u64 = 9_000;
/// How often a replica waiting on another's lease looks for the blob.
const POLL: Duration = Duration::from_millis(200);
/// A replica marks a blob as used in the bucket at most this often.
const TOUCH_EVERY: Duration = Duration::from_secs(600);
/// How long a contender for a lease waits for the others' entries before it lists them
/// (stores without conditional writes).
const SETTLE: Duration = Duration::from_millis(300);
/// A lease not refreshed for this long is dead (its holder crashed or hangs): waiters stop
/// waiting and contenders ignore it. Holders refresh theirs every quarter of it.
pub const LEASE_TTL: Duration = Duration::from_secs(60);
/// Lifetime of a presigned URL.
const PRESIGN_FOR: Duration = Duration::from_secs(900);

/// Why an upload stopped.
enum Upload {
    /// The fill failed: nothing to upload.
    Fill(io::Error),
    /// The store failed.
    Store(Fault),
}

/// Tries of an upload when the store fails.
const UPLOAD_ATTEMPTS: u32 = 3;

/// Why a call gave no result.
#[derive(Debug, PartialEq, Eq)]
pub enum Fault {
    /// No such object.
    Absent,
    /// A conditional create found the object there.
    Exists,
    /// The store refused the call kind (e.g. conditional writes).
    Unsupported,
    /// The store failed, timed out, or is being skipped after a failure.
    Unavailable,
}

/// Who fetches a blob that is in nobody's cache.
pub enum Claim {
    /// This replica holds the lease: it fetches and uploads, then releases.
    Mine(Lease),
    /// Another replica holds a live lease.
    Theirs,
    /// The store cannot arbitrate (no conditional writes, or down): fetch without a lease.
    None,
}

/// A held lease on a blob's fill, refreshed in the background until it is released.
pub struct Lease {
    path: Path,
    heartbeat: Option<tokio::task::AbortHandle>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(h) = &self.heartbeat {
            h.abort();
        }
    }
}

#[derive(Serialize, Deserialize)]
struct LeaseBody {
    owner: String,
    /// Seconds since the epoch after which the lease may be taken over.
    expires: u64,
}

/// What a GC pass did.
#[derive(Debug, Default, Clone)]
pub struct GcReport {
    pub blobs: u64,
    pub bytes: u64,
    pub deleted: u64,
    pub deleted_bytes: u64,
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

pub struct Shared {
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
    /// Does the store honour `If-None-Match: *`? Probed on first use.
    conditional: AtomicU8,
    down_until: Mutex<Option<Instant>>,
    /// Blobs marked as used recently by this replica.
    touched: moka::sync::Cache<Digest, ()>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .field("owner", &self.owner)
            .finish()
    }
}

impl Shared {
    /// The tier on the S3 bucket `cfg` names. Nothing is sent until the first use.
    pub fn open(
        cfg: &S3Config,
        lease_ttl: Duration,
        metrics: Arc<Metrics>,
    ) -> io::Result<Arc<Shared>> {
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
        let mut shared = Shared::new(
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
    ) -> Shared {
        let prefix = prefix.trim_matches('/');
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "ocicache".into());
        let nanos = since_epoch().subsec_nanos();
        Shared {
            store,
            signer: None,
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            owner: format!("{host}-{}-{nanos:08x}", std::process::id()),
            timeout,
            lease_wait,
            lease_ttl,
            max_size,
            redirect: false,
            conditional: AtomicU8::new(UNKNOWN),
            down_until: Mutex::new(None),
            touched: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TOUCH_EVERY)
                .build(),
            metrics,
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
    fn tag_path(&self, hex: &str) -> Path {
        Path::from(format!("{}tags/{hex}.json", self.prefix))
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

    /// The blob from the bucket, as a stream, with its size.
    pub async fn get_blob(
        &self,
        d: &Digest,
    ) -> Option<(
        u64,
        futures_util::stream::BoxStream<'static, io::Result<Bytes>>,
    )> {
        let path = self.path("blobs", d);
        match self.call("get_blob", self.store.get(&path)).await {
            Ok(got) => {
                self.count("get_blob", "hit");
                self.touch(d);
                let size = got.meta.size;
                let body = got.into_stream().map_err(io::Error::other).boxed();
                Some((size, body))
            }
            Err(Fault::Absent) => {
                self.count("get_blob", "miss");
                None
            }
            Err(_) => None,
        }
    }

    /// The size of the blob in the bucket, if it is there.
    pub async fn head_blob(&self, d: &Digest) -> Option<u64> {
        let path = self.path("blobs", d);
        self.call("head_blob", self.store.head(&path))
            .await
            .ok()
            .map(|m| m.size)
    }

    /// Deletes a blob that proved wrong (bit rot, or someone wrote it behind our back).
    pub async fn discard(&self, d: &Digest) {
        tracing::error!(%d, "the shared store's copy does not match its digest: deleted");
        let path = self.path("blobs", d);
        let _ = self.call("discard", self.store.delete(&path)).await;
    }

    /// Whether the store honours `If-None-Match: *`: two creates of one probe object.
    async fn conditional_writes(&self) -> bool {
        match self.conditional.load(Ordering::Relaxed) {
            YES => return true,
            NO => return false,
            _ => {}
        }
        let probe = Path::from(format!("{}leases/probe-{}", self.prefix, self.owner));
        let create = || {
            self.store.put_opts(
                &probe,
                PutPayload::from_static(b"probe"),
                PutOptions::from(PutMode::Create),
            )
        };
        let first = self.call("probe", create()).await;
        let verdict = match first {
            Ok(_) => match self.call("probe", create()).await {
                Err(Fault::Exists) => Some(true),
                Ok(_) | Err(Fault::Unsupported) => Some(false),
                Err(_) => None,
            },
            Err(Fault::Unsupported) => Some(false),
            Err(_) => None,
        };
        let _ = self.call("probe", self.store.delete(&probe)).await;
        match verdict {
            Some(v) => {
                self.conditional
                    .store(if v { YES } else { NO }, Ordering::Relaxed);
                if v {
                    tracing::info!("shared store honours conditional writes: blob leases on");
                } else {
                    tracing::warn!("shared store ignores conditional writes: no blob leases, replicas may fetch a blob more than once");
                }
                v
            }
            None => false,
        }
    }

    /// The folder of `d`'s leases: `leases/<alg>/<hex>/`.
    fn lease_dir(&self, d: &Digest) -> Path {
        self.path("leases", d)
    }

    /// Tries to become the replica that fetches `d`. With conditional writes, the lease is
    /// `leases/<alg>/<hex>/lease`, created only if absent. Without, each contender writes
    /// `leases/<alg>/<hex>/<owner>`, waits `SETTLE`, lists the folder, and the oldest live
    /// entry (by the store's Last-Modified, then name) wins; the others withdraw theirs. A
    /// contender that writes after a winner listed sees the winner's older entry and loses,
    /// so two winners need a PUT slower than the wait (`SETTLE`, or three times this
    /// replica's own PUT when the store is slow): best effort, and the worst case is one more
    /// upstream fetch, never a wrong byte.
    pub async fn claim(&self, d: &Digest) -> Claim {
        if self.conditional_writes().await {
            self.claim_conditional(d).await
        } else {
            self.claim_by_listing(d).await
        }
    }

    fn lease_body(&self) -> PutPayload {
        lease_body(&self.owner, self.lease_ttl)
    }

    async fn claim_conditional(&self, d: &Digest) -> Claim {
        let path = self.lease_dir(d).child("lease");
        for _ in 0..2 {
            let put = self
                .store
                .put_opts(&path, self.lease_body(), PutMode::Create.into());
            match self.call("lease", put).await {
                Ok(_) => {
                    self.count("lease", "mine");
                    return Claim::Mine(self.hold(path));
                }
                Err(Fault::Exists) => {}
                Err(_) => return Claim::None,
            }
            // Someone holds it: theirs, unless it has expired (its holder died).
            let held = match self.call("lease", self.store.get(&path)).await {
                Ok(got) => match self.call("lease", got.bytes()).await {
                    Ok(b) => serde_json::from_slice::<LeaseBody>(&b).ok(),
                    Err(_) => return Claim::None,
                },
                Err(Fault::Absent) => continue, // released meanwhile: try again
                Err(_) => return Claim::None,
            };
            let now = since_epoch().as_secs();
            if held.is_some_and(|l| l.expires > now) {
                self.count("lease", "theirs");
                return Claim::Theirs;
            }
            tracing::info!(%d, "taking over an expired lease");
            let _ = self.call("lease", self.store.delete(&path)).await;
        }
        Claim::None
    }

    async fn claim_by_listing(&self, d: &Digest) -> Claim {
        let dir = self.lease_dir(d);
        let mine = dir.child(self.owner.as_str());
        let put = Instant::now();
        if self
            .call("lease", self.store.put(&mine, self.lease_body()))
            .await
            .is_err()
        {
            return Claim::None;
        }
        // A contender's PUT slower than the wait could go unseen: when the store is slow
        // (ours took long), wait longer.
        tokio::time::sleep(SETTLE.max(put.elapsed() * 3)).await;
        let Ok(mut entries) = self.live_leases(&dir).await else {
            self.withdraw(&mine).await;
            return Claim::None;
        };
        entries.sort_by(|a, b| (a.last_modified, &a.location).cmp(&(b.last_modified, &b.location)));
        match entries.first() {
            Some(first) if first.location != mine => {
                self.withdraw(&mine).await;
                self.count("lease", "theirs");
                Claim::Theirs
            }
            _ => {
                self.count("lease", "mine");
                Claim::Mine(self.hold(mine))
            }
        }
    }

    /// The leases in `dir` younger than the lease lifetime.
    async fn live_leases(&self, dir: &Path) -> Result<Vec<object_store::ObjectMeta>, Fault> {
        let all = self
            .call("lease", self.store.list(Some(dir)).try_collect::<Vec<_>>())
            .await?;
        let oldest = chrono::Utc::now()
            - chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::MAX);
        Ok(all
            .into_iter()
            .filter(|m| m.last_modified > oldest)
            .collect())
    }

    /// Does some replica hold a live lease on `d`? (`false` when the store fails.)
    pub async fn lease_held(&self, d: &Digest) -> bool {
        self.live_leases(&self.lease_dir(d))
            .await
            .is_ok_and(|l| !l.is_empty())
    }

    /// Waits for another replica's fill of `d` to land in the bucket: `true` once it is
    /// there, `false` when its lease went away without it or `lease_wait` passed.
    pub async fn wait_for(&self, d: &Digest) -> bool {
        let blob = self.path("blobs", d);
        let dir = self.lease_dir(d);
        let start = Instant::now();
        while start.elapsed() < self.lease_wait {
            tokio::time::sleep(POLL).await;
            match self.call("wait", self.store.head(&blob)).await {
                Ok(_) => {
                    self.count("wait", "landed");
                    return true;
                }
                Err(Fault::Absent) => {}
                Err(_) => return false,
            }
            if let Ok(true) = self.live_leases(&dir).await.map(|l| l.is_empty()) {
                // Released: look once more (it may have landed just before), else give up.
                let landed = self.call("wait", self.store.head(&blob)).await.is_ok();
                self.count("wait", if landed { "landed" } else { "abandoned" });
                return landed;
            }
        }
        self.count("wait", "timeout");
        tracing::warn!(%d, wait = ?self.lease_wait, "another replica's fill did not land in time: fetching it here");
        false
    }

    /// Keeps the lease at `path` alive (rewritten every quarter of its lifetime) until it is
    /// released or dropped.
    fn hold(&self, path: Path) -> Lease {
        let (store, p, ttl) = (self.store.clone(), path.clone(), self.lease_ttl);
        let owner = self.owner.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep((ttl / 4).max(Duration::from_millis(100))).await;
                let _ = tokio::time::timeout(ttl / 4, store.put(&p, lease_body(&owner, ttl))).await;
            }
        });
        Lease {
            path,
            heartbeat: Some(task.abort_handle()),
        }
    }

    async fn withdraw(&self, path: &Path) {
        let _ = self.call("lease", self.store.delete(path)).await;
    }

    pub async fn release(&self, mut lease: Lease) {
        if let Some(h) = lease.heartbeat.take() {
            h.abort();
        }
        self.withdraw(&lease.path).await;
    }

    /// Uploads the blob a local fill is bringing in, in the background: completed only once
    /// the fill has verified it (the reader's last byte waits for that), aborted if the fill
    /// fails. A store that fails meanwhile gets `UPLOAD_ATTEMPTS` tries, `BACKOFF` apart (the
    /// fill's file stays readable through its descriptor). Releases `lease` at the end.
    pub fn upload(self: &Arc<Self>, d: Digest, src: Source, lease: Option<Lease>) {
        let shared = self.clone();
        tokio::spawn(async move {
            let mut attempt = 1;
            let result = loop {
                match shared.upload_now(&d, src.clone()).await {
                    Err(Upload::Store(f)) if attempt < UPLOAD_ATTEMPTS => {
                        tracing::debug!(%d, fault = ?f, attempt, "upload failed: trying again");
                        attempt += 1;
                        tokio::time::sleep(BACKOFF).await;
                    }
                    other => break other,
                }
            };
            match &result {
                Ok(size) => {
                    shared.count("upload", "completed");
                    tracing::info!(%d, size, "uploaded to the shared store");
                }
                Err(Upload::Fill(e)) => {
                    shared.count("upload", "aborted");
                    tracing::debug!(%d, error = %e, "fill failed: upload aborted");
                }
                Err(Upload::Store(f)) => {
                    shared.count("upload", "failed");
                    tracing::warn!(%d, fault = ?f, "could not upload to the shared store");
                }
            }
            if let Some(lease) = lease {
                shared.release(lease).await;
            }
        });
    }

    async fn upload_now(&self, d: &Digest, mut src: Source) -> Result<u64, Upload> {
        let size = src
            .size()
            .await
            .map_err(|e| Upload::Fill(io::Error::other(e)))?;
        let mut reader = src.reader(0, size);
        let path = self.path("blobs", d);
        let opts = attributes(src.media_type.as_deref());
        if size as usize <= PART {
            let mut buf = BytesMut::with_capacity(size as usize);
            while let Some(chunk) = reader.next_chunk().await {
                buf.extend_from_slice(&chunk.map_err(Upload::Fill)?);
            }
            let put = self.store.put_opts(
                &path,
                PutPayload::from(buf.freeze()),
                PutOptions {
                    attributes: opts,
                    ..Default::default()
                },
            );
            self.call("upload", put).await.map_err(Upload::Store)?;
            return Ok(size);
        }
        let part = PART.max(size.div_ceil(MAX_PARTS) as usize);
        let multipart = self.store.put_multipart_opts(
            &path,
            PutMultipartOptions {
                attributes: opts,
                ..Default::default()
            },
        );
        let upload = self
            .call("upload", multipart)
            .await
            .map_err(Upload::Store)?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        let result: Result<(), Upload> = async {
            while let Some(chunk) = reader.next_chunk().await {
                let chunk = chunk.map_err(Upload::Fill)?;
                self.call("upload", w.wait_for_capacity(2))
                    .await
                    .map_err(Upload::Store)?;
                w.put(chunk);
            }
            Ok(())
        }
        .await;
        match result {
            // The reader ended cleanly: the fill is verified and committed.
            Ok(()) => {
                self.call("upload", w.finish())
                    .await
                    .map_err(Upload::Store)?;
                Ok(size)
            }
            Err(e) => {
                let _ = tokio::time::timeout(self.timeout, w.abort()).await;
                Err(e)
            }
        }
    }

    /// Stores a verified manifest (small: one PUT), with its media type.
    pub async fn put_manifest(&self, d: &Digest, bytes: Bytes, media_type: &str) {
        let path = self.path("blobs", d);
        let put = self.store.put_opts(
            &path,
            PutPayload::from(bytes),
            PutOptions {
                attributes: attributes(Some(media_type)),
                ..Default::default()
            },
        );
        let _ = self.call("put_manifest", put).await;
    }

    /// A manifest from the bucket, up to `max` bytes (the caller verifies its digest), and
    /// its media type if the store kept it.
    pub async fn get_manifest(&self, d: &Digest, max: u64) -> Option<(Bytes, Option<String>)> {
        let path = self.path("blobs", d);
        let got = self
            .call("get_manifest", self.store.get(&path))
            .await
            .ok()?;
        if got.meta.size > max {
            return None;
        }
        let media_type = got
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string());
        let bytes = self.call("get_manifest", got.bytes()).await.ok()?;
        self.touch(d);
        Some((bytes, media_type))
    }

    pub async fn put_tag(&self, hex: &str, bytes: Vec<u8>) {
        let path = self.tag_path(hex);
        let put = self.store.put(&path, PutPayload::from(bytes));
        let _ = self.call("put_tag", put).await;
    }

    pub async fn get_tag(&self, hex: &str) -> Option<Bytes> {
        let path = self.tag_path(hex);
        let got = self.call("get_tag", self.store.get(&path)).await.ok()?;
        if got.meta.size > 64 << 10 {
            return None;
        }
        self.call("get_tag", got.bytes()).await.ok()
    }

    /// Marks `d` as used, for the GC's order (at most every `TOUCH_EVERY` per replica).
    pub fn touch(&self, d: &Digest) {
        if self.touched.contains_key(d) || !self.available() {
            return;
        }
        self.touched.insert(d.clone(), ());
        let store = self.store.clone();
        let path = self.path("recent", d);
        let timeout = self.timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, store.put(&path, PutPayload::default())).await;
        });
    }

    /// A presigned GET URL of blob `d`, if the bucket holds it.
    pub async fn presigned(&self, d: &Digest) -> Option<url::Url> {
        let signer = self.signer.as_ref()?;
        self.head_blob(d).await?;
        let path = self.path("blobs", d);
        let url = self
            .call(
                "presign",
                signer.signed_url(http::Method::GET, &path, PRESIGN_FOR),
            )
            .await
            .ok()?;
        self.touch(d);
        Some(url)
    }

    /// One GC pass: deletes the least recently used blobs beyond `max_size`, the `recent/`
    /// markers of blobs that are gone, and leases past their expiry.
    pub async fn gc(&self) -> Result<GcReport, Fault> {
        let list = |kind: &str| {
            let prefix = Path::from(format!("{}{kind}", self.prefix));
            self.call("gc", self.store.list(Some(&prefix)).try_collect::<Vec<_>>())
        };
        let blobs = list("blobs").await?;
        let recent = list("recent").await?;
        let leases = list("leases").await?;
        let key = |p: &Path| -> Option<Digest> {
            let mut parts: Vec<_> = p.parts().collect();
            let hex = parts.pop()?;
            let alg = parts.pop()?;
            let alg = Algorithm::parse(alg.as_ref())?;
            Digest::parse(&format!("{}:{}", alg.as_str(), hex.as_ref())).ok()
        };
        let used: std::collections::HashMap<Digest, chrono::DateTime<chrono::Utc>> = recent
            .iter()
            .filter_map(|m| Some((key(&m.location)?, m.last_modified)))
            .collect();
        let mut entries: Vec<_> = blobs
            .iter()
            .map(|m| {
                let last = key(&m.location)
                    .and_then(|d| used.get(&d).copied())
                    .map_or(m.last_modified, |t| t.max(m.last_modified));
                (last, m)
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.location.cmp(&b.1.location)));
        let mut report = GcReport {
            blobs: entries.len() as u64,
            bytes: entries.iter().map(|(_, m)| m.size).sum(),
            ..Default::default()
        };
        let mut total = report.bytes;
        let mut deleted = std::collections::HashSet::new();
        for (_, m) in &entries {
            if total <= self.max_size {
                break;
            }
            self.call("gc", self.store.delete(&m.location))
                .await
                .or_else(|f| if f == Fault::Absent { Ok(()) } else { Err(f) })?;
            total -= m.size;
            report.deleted += 1;
            report.deleted_bytes += m.size;
            if let Some(d) = key(&m.location) {
                deleted.insert(d);
            }
        }
        let present: std::collections::HashSet<Digest> =
            blobs.iter().filter_map(|m| key(&m.location)).collect();
        for m in &recent {
            if key(&m.location).map_or(true, |d| deleted.contains(&d) || !present.contains(&d)) {
                let _ = self.call("gc", self.store.delete(&m.location)).await;
            }
        }
        let stale = chrono::Utc::now()
            - chrono::Duration::from_std(self.lease_ttl).unwrap_or(chrono::Duration::MAX);
        for m in &leases {
            if m.last_modified < stale {
                let _ = self.call("gc", self.store.delete(&m.location)).await;
            }
        }
        if report.deleted > 0 {
            tracing::info!(
                deleted = report.deleted,
                freed = report.deleted_bytes,
                kept = total,
                bound = self.max_size,
                "shared store GC"
            );
        }
        self.count("gc", "ok");
        Ok(report)
    }

    /// Runs `gc` every `interval` (with jitter, so replicas spread their passes).
    pub fn spawn_gc(self: &Arc<Self>, interval: Duration) {
        let shared = self.clone();
        tokio::spawn(async move {
            loop {
                let jitter = Duration::from_millis(
                    since_epoch().subsec_nanos() as u64 % (interval.as_millis() as u64 / 10 + 1),
                );
                tokio::time::sleep(interval + jitter).await;
                if let Err(f) = shared.gc().await {
                    tracing::debug!(fault = ?f, "shared store GC skipped");
                }
            }
        });
    }
}

/// The wall clock, as leases and their readers on other replicas compare it.
fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// A lease's content: who holds it, and until when unless refreshed.
fn lease_body(owner: &str, ttl: Duration) -> PutPayload {
    let body = LeaseBody {
        owner: owner.to_string(),
        expires: (since_epoch() + ttl).as_secs(),
    };
    PutPayload::from(serde_json::to_vec(&body).expect("a lease serializes"))
}

fn attributes(media_type: Option<&str>) -> Attributes {
    let mut attrs = Attributes::new();
    if let Some(mt) = media_type {
        attrs.insert(Attribute::ContentType, mt.to_string().into());
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{Cache, Fetched, Origin, Progress};
    use object_store::memory::InMemory;

    fn tier(store: &Arc<InMemory>, lease_ttl: Duration, max_size: u64) -> Arc<Shared> {
        Arc::new(Shared::new(
            store.clone(),
            "mirror/",
            Duration::from_secs(5),
            Duration::from_secs(5),
            lease_ttl,
            max_size,
            Arc::new(Metrics::new()),
        ))
    }

    async fn keys(store: &InMemory, prefix: &str) -> Vec<String> {
        let prefix = Path::from(prefix);
        let mut keys: Vec<String> = store
            .list(Some(&prefix))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn one_replica_wins_a_lease_until_it_releases_it() {
        let store = Arc::new(InMemory::new());
        let (a, b) = (
            tier(&store, Duration::from_secs(60), 1 << 30),
            tier(&store, Duration::from_secs(60), 1 << 30),
        );
        let d = Digest::sha256_of(b"layer");
        let Claim::Mine(lease) = a.claim(&d).await else {
            panic!("the first claim wins")
        };
        assert!(matches!(b.claim(&d).await, Claim::Theirs));
        assert!(
            matches!(a.claim(&d).await, Claim::Theirs),
            "even for its holder"
        );
        a.release(lease).await;
        assert!(matches!(b.claim(&d).await, Claim::Mine(_)));
        // The probe object is gone; the lease is under the prefix.
        assert_eq!(
            keys(&store, "mirror/leases").await,
            vec![format!("mirror/leases/sha256/{}/lease", d.hex())]
        );
    }

    #[tokio::test]
    async fn without_conditional_writes_the_oldest_entry_wins() {
        let store = Arc::new(InMemory::new());
        let replicas: Vec<_> = (0..3)
            .map(|_| {
                let t = tier(&store, Duration::from_secs(60), 1 << 30);
                t.conditional.store(NO, Ordering::Relaxed);
                t
            })
            .collect();
        let d = Digest::sha256_of(b"layer");
        let claims = futures_util::future::join_all(replicas.iter().map(|r| r.claim(&d))).await;
        let winners = claims
            .iter()
            .filter(|c| matches!(c, Claim::Mine(_)))
            .count();
        assert_eq!(winners, 1, "one winner among simultaneous contenders");
        assert_eq!(
            keys(&store, "mirror/leases").await.len(),
            1,
            "losers withdrew"
        );
        // A late contender loses to the live lease, and wins once it is released.
        let w = claims
            .iter()
            .position(|c| matches!(c, Claim::Mine(_)))
            .unwrap();
        let late = &replicas[(w + 1) % 3];
        assert!(matches!(late.claim(&d).await, Claim::Theirs));
        for c in claims {
            if let Claim::Mine(l) = c {
                replicas[w].release(l).await;
            }
        }
        assert!(keys(&store, "mirror/leases").await.is_empty());
        assert!(matches!(replicas[1].claim(&d).await, Claim::Mine(_)));
    }

    #[tokio::test]
    async fn a_held_lease_is_refreshed_and_a_dead_holders_lapses() {
        for conditional in [YES, NO] {
            let store = Arc::new(InMemory::new());
            let ttl = Duration::from_secs(2);
            let (a, b) = (tier(&store, ttl, 1 << 30), tier(&store, ttl, 1 << 30));
            for t in [&a, &b] {
                t.conditional.store(conditional, Ordering::Relaxed);
            }
            let d = Digest::sha256_of(b"layer");
            let Claim::Mine(lease) = a.claim(&d).await else {
                panic!("first claim")
            };
            tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
            assert!(
                matches!(b.claim(&d).await, Claim::Theirs),
                "refreshed by its holder (mode {conditional})"
            );
            // The holder dies: its heartbeat stops, the lease lapses.
            drop(lease);
            tokio::time::sleep(ttl + Duration::from_millis(1200)).await;
            assert!(
                matches!(b.claim(&d).await, Claim::Mine(_)),
                "taken over (mode {conditional})"
            );
        }
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over() {
        let store = Arc::new(InMemory::new());
        let d = Digest::sha256_of(b"layer");
        let dead = tier(&store, Duration::ZERO, 1 << 30);
        assert!(matches!(dead.claim(&d).await, Claim::Mine(_)));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let live = tier(&store, Duration::from_secs(60), 1 << 30);
        assert!(matches!(live.claim(&d).await, Claim::Mine(_)));
    }

    #[tokio::test]
    async fn a_waiter_sees_the_blob_land_or_the_lease_go() {
        let store = Arc::new(InMemory::new());
        let (a, b) = (
            tier(&store, Duration::from_secs(60), 1 << 30),
            tier(&store, Duration::from_secs(60), 1 << 30),
        );
        let d = Digest::sha256_of(b"layer");
        let Claim::Mine(lease) = a.claim(&d).await else {
            panic!()
        };
        let waiting = tokio::spawn({
            let (b, d) = (b.clone(), d.clone());
            async move { b.wait_for(&d).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.put_manifest(&d, Bytes::from_static(b"layer"), "x/y")
            .await;
        assert!(waiting.await.unwrap(), "the blob landed");
        let (size, _) = b.get_blob(&d).await.unwrap();
        assert_eq!(size, 5);

        let e = Digest::sha256_of(b"other");
        let Claim::Mine(lease2) = a.claim(&e).await else {
            panic!()
        };
        let waiting = tokio::spawn({
            let (b, e) = (b.clone(), e.clone());
            async move { b.wait_for(&e).await }
        });
        a.release(lease2).await;
        assert!(!waiting.await.unwrap(), "released without the blob");
        a.release(lease).await;
    }

    /// Feeds a fill from a channel the test controls.
    fn fill_from(
        cache: &Arc<Cache>,
        d: &Digest,
        size: u64,
    ) -> (
        tokio::sync::mpsc::Sender<io::Result<Bytes>>,
        Arc<super::super::fill::Fill>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let body =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
            )
            .boxed();
        let fetched = Fetched {
            size: Some(size),
            body,
            origin: Origin::Upstream { lease: None },
            source: "test".into(),
        };
        let fill = cache
            .start_fill(d.clone(), async move { Ok(fetched) })
            .unwrap();
        (tx, fill)
    }

    async fn wait_done(fill: &super::super::fill::Fill) -> bool {
        for _ in 0..200 {
            match fill.progress() {
                Progress::Done { .. } => return true,
                Progress::Failed(_) => return false,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        panic!("the fill did not end")
    }

    #[tokio::test]
    async fn only_verified_fills_reach_the_bucket() {
        let store = Arc::new(InMemory::new());
        let shared = tier(&store, Duration::from_secs(60), 1 << 30);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open_at(
            dir.path(),
            1 << 30,
            Duration::from_secs(5),
            Duration::from_secs(60),
            Arc::new(Metrics::new()),
            Some(shared),
        )
        .unwrap();
        // 20 MiB: a multipart upload of several parts.
        let data: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
        let d = Digest::sha256_of(&data);

        // A corrupt body: the bytes arrive, the digest does not match.
        let (tx, fill) = fill_from(&cache, &d, data.len() as u64);
        let mut bad = data.clone();
        bad[7 << 20] ^= 1;
        for c in bad.chunks(1 << 20) {
            tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
        }
        drop(tx);
        assert!(!wait_done(&fill).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            keys(&store, "mirror/blobs").await.is_empty(),
            "nothing unverified"
        );

        // Cut in the middle: nothing either.
        let (tx, fill) = fill_from(&cache, &d, data.len() as u64);
        tx.send(Ok(Bytes::copy_from_slice(&data[..9 << 20])))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(keys(&store, "mirror/blobs").await.is_empty());
        tx.send(Err(io::Error::other("reset"))).await.unwrap();
        assert!(!wait_done(&fill).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(keys(&store, "mirror/blobs").await.is_empty());

        // The right body: the upload completes after the fill.
        let (tx, fill) = fill_from(&cache, &d, data.len() as u64);
        for c in data.chunks(1 << 20) {
            tx.send(Ok(Bytes::copy_from_slice(c))).await.unwrap();
        }
        drop(tx);
        assert!(wait_done(&fill).await);
        let key = Path::from(format!("mirror/blobs/sha256/{}", d.hex()));
        for _ in 0..100 {
            if store.head(&key).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(Digest::sha256_of(&got), d);
    }

    #[tokio::test]
    async fn gc_deletes_the_least_recently_used_beyond_the_bound() {
        let store = Arc::new(InMemory::new());
        // Room for three blobs of 1 MiB.
        let shared = tier(&store, Duration::from_secs(60), 3 << 20);
        let mut ds = Vec::new();
        for n in 0..5u8 {
            let data = Bytes::from(vec![n; 1 << 20]);
            let d = Digest::sha256_of(&data);
            shared
                .put_manifest(&d, data, "application/octet-stream")
                .await;
            ds.push(d);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The oldest is used again (as `touch` records it).
        store
            .put(&shared.path("recent", &ds[0]), PutPayload::default())
            .await
            .unwrap();
        let report = shared.gc().await.unwrap();
        assert_eq!((report.blobs, report.deleted), (5, 2));
        let left = keys(&store, "mirror/blobs").await;
        let expect: Vec<String> = [&ds[0], &ds[3], &ds[4]]
            .iter()
            .map(|d| format!("mirror/blobs/sha256/{}", d.hex()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(left, expect);
        // A second pass (another replica) finds nothing to do.
        assert_eq!(shared.gc().await.unwrap().deleted, 0);
    }

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
        let shared = Shared::open(&cfg, Duration::from_secs(60), metrics.clone()).unwrap();
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
}
