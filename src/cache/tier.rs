//! The trait of a storage tier: what the cache asks of the places verified content is kept.
//!
//! The tiers, in order: the local disk with its LRU index (`local`, always present, always
//! first), then the S3-compatible bucket shared by replicas (`bucket`, optional). The cache
//! holds them as one list and is the one place that decides where a blob or manifest comes
//! from: the first tier that has it, else the upstream. What a tier finds is verified again
//! by whoever takes it (a fill hashes every byte; a manifest is hashed before use), so a
//! tier that lies costs a refetch, never a wrong byte.
//!
//! Beside get / head / put / touch, a tier that several replicas share offers what only it
//! can: leases (who fetches a blob from the upstream), keeping a fill once it is verified
//! (the upload), and redirects to its own copy. The defaults are those of a tier that has
//! none of these (the local disk).

use std::any::Any;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, FutureExt};
use futures_util::stream::BoxStream;

use super::source::Source;
use crate::clock::Instant;
use crate::reference::{Digest, Name, Tag};

/// A record kept beside the blobs, named by a hash of its key, so that no request text is
/// ever part of a path or an object name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A tag's record: the digest it points to and when the upstream confirmed it. Kept
    /// locally and in the bucket.
    Tag(String),
    /// The last good tag list of a repository. Kept locally and in the bucket.
    TagList(String),
    /// The last good referrers answer for a digest (and an artifact type filter): its
    /// content type and body. Kept locally and in the bucket.
    Referrers(String),
}

impl Record {
    pub fn tag(upstream: &str, name: &Name, tag: &Tag) -> Record {
        Record::Tag(key_hex(&format!("tag\0{upstream}\0{name}\0{tag}")))
    }

    pub fn tag_list(upstream: &str, name: &Name) -> Record {
        Record::TagList(key_hex(&format!("list\0{upstream}\0{name}")))
    }

    pub fn referrers(upstream: &str, name: &Name, digest: &Digest, artifact_type: &str) -> Record {
        Record::Referrers(key_hex(&format!(
            "referrers\0{upstream}\0{name}\0{digest}\0{artifact_type}"
        )))
    }

    /// Its hash and the end of its file's (or object's) name: `json` (a tag record),
    /// `list.json`, `referrers.json`.
    pub(crate) fn hex_and_suffix(&self) -> (&str, &'static str) {
        match self {
            Record::Tag(hex) => (hex, "json"),
            Record::TagList(hex) => (hex, "list.json"),
            Record::Referrers(hex) => (hex, "referrers.json"),
        }
    }

    /// Under the local tier's root: `tags/<2 hex>/<hex>.<suffix>`.
    pub(crate) fn local_path(&self) -> std::path::PathBuf {
        let (hex, suffix) = self.hex_and_suffix();
        std::path::Path::new("tags")
            .join(&hex[..2])
            .join(format!("{hex}.{suffix}"))
    }
}

fn key_hex(key: &str) -> String {
    Digest::sha256_of(key.as_bytes()).hex().to_string()
}

/// A blob's body as a tier streams it: its size and its chunks.
pub type TierBody = (u64, BoxStream<'static, io::Result<Bytes>>);

/// Who fetches an object that is in no tier.
pub enum Claim {
    /// This replica holds the lease: it fetches (and keeps), then releases.
    Mine(Lease),
    /// Another replica holds a live lease: wait for the object to land.
    Theirs,
    /// Nobody arbitrates (no shared tier, or it is down): fetch.
    None,
}

/// Is the replica idle (no fill under way)? What a tier's deferred work waits for.
pub type Idle = Arc<dyn Fn() -> bool + Send + Sync>;

/// How long deferred work waits for its replica to be idle before it runs anyway: a replica
/// that is never idle still keeps what it fetched, this much later.
pub const IDLE_WAIT: Duration = Duration::from_secs(30);
/// Idle is idle for this long: the gap between two blobs of one pull (a client asks for
/// the next ones when the last ones end), or a replica that streamed a blob to another one
/// which is still pulling the rest of the image, is not.
pub const IDLE_QUIET: Duration = Duration::from_secs(1);
/// How often it looks meanwhile.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// Returns once `idle` has said so for `IDLE_QUIET`, or `IDLE_WAIT` after `since`.
pub async fn when_idle(idle: &Idle, since: Instant) {
    let mut quiet_since = None;
    while since.elapsed() < IDLE_WAIT {
        match (idle(), quiet_since) {
            (false, _) => quiet_since = None,
            (true, None) => quiet_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() >= IDLE_QUIET => return,
            (true, Some(_)) => {}
        }
        tokio::time::sleep(IDLE_POLL).await;
    }
}

/// A held lease, as the tier that granted it made it. A guard: dropped without
/// [`Tier::release`], the tier still gives it back (see `bucket::leases`).
pub struct Lease(pub Box<dyn Any + Send + Sync>);

pub trait Tier: Send + Sync + 'static {
    /// The tier's name in logs and metrics: `local`, `bucket`.
    fn name(&self) -> &'static str;

    /// A blob's body, if this tier has it.
    fn get_blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Option<TierBody>>;

    /// A blob's size, if this tier has it.
    fn head_blob<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, Option<u64>>;

    /// Drops what this tier holds for `digest` (it proved wrong).
    fn discard<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, ()>;

    /// A manifest's bytes (at most `max`) and stored media type, if this tier has it.
    fn get_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        max: u64,
    ) -> BoxFuture<'a, Option<(Bytes, Option<String>)>>;

    /// Keeps a verified manifest.
    fn put_manifest<'a>(
        &'a self,
        digest: &'a Digest,
        bytes: Bytes,
        media_type: &'a str,
    ) -> BoxFuture<'a, io::Result<()>>;

    /// A record, if this tier keeps records of its kind and has it.
    fn get_record<'a>(&'a self, record: &'a Record) -> BoxFuture<'a, Option<Bytes>>;

    /// Keeps a record (a tier that keeps none of its kind ignores it).
    fn put_record<'a>(
        &'a self,
        record: &'a Record,
        bytes: Vec<u8>,
    ) -> BoxFuture<'a, io::Result<()>>;

    /// Marks a use of `digest` (recency for eviction).
    fn touch(&self, digest: &Digest);

    /// Who fetches `key` from the upstream.
    fn claim<'a>(&'a self, _key: &'a Digest) -> BoxFuture<'a, Claim> {
        future::ready(Claim::None).boxed()
    }

    /// Waits (up to the tier's bound) for the holder of `key`'s lease to land it; `true` if
    /// it did.
    fn wait_for<'a>(&'a self, _key: &'a Digest) -> BoxFuture<'a, bool> {
        future::ready(false).boxed()
    }

    /// Does a replica hold a live lease on `key`?
    fn lease_held<'a>(&'a self, _key: &'a Digest) -> BoxFuture<'a, bool> {
        future::ready(false).boxed()
    }

    /// Gives a lease back now (dropping it does too, in the background).
    fn release(&self, lease: Lease) -> BoxFuture<'_, ()> {
        drop(lease);
        future::ready(()).boxed()
    }

    /// Keeps the blob a fill is bringing in, once the fill has verified it (the tier reads
    /// `source` like a client: its last byte waits for the verdict); a failed fill keeps
    /// nothing. Releases `lease` at the end.
    fn keep(self: Arc<Self>, _digest: Digest, _source: Source, _lease: Option<Lease>) {}

    /// Keeps a fill like [`Tier::keep`] (no lease), but once the replica is `idle` (see
    /// [`when_idle`]): for a fill no other replica waits for in this tier (with peers, they
    /// stream it from this replica), so that keeping it stays off the way of the fills and
    /// clients of a pull under way. A tier that keeps nothing ignores it.
    fn keep_when_idle(self: Arc<Self>, _digest: Digest, _source: Source, _idle: Idle) {}

    /// What `keep_when_idle` was given and has not kept (or given up on) yet: at shutdown,
    /// the cache waits for it like for its fills.
    fn pending(&self) -> usize {
        0
    }

    /// A URL a client can fetch the blob from directly, if this tier redirects and has it.
    /// `known_only`: answer only from what the tier knows without asking its store (a local
    /// hit must not cost a call).
    fn redirect<'a>(
        &'a self,
        _digest: &'a Digest,
        _known_only: bool,
    ) -> BoxFuture<'a, Option<url::Url>> {
        future::ready(None).boxed()
    }

    /// Starts the tier's own background work (the bucket's GC).
    fn start(self: Arc<Self>) {}

    /// Removes what this tier holds for `digest` because an operator purged it (the admin
    /// API's `purge_shared`); a tier that cannot, does nothing.
    fn purge<'a>(&'a self, _digest: &'a Digest) -> BoxFuture<'a, ()> {
        future::ready(()).boxed()
    }

    /// Removes a record an operator purged; a tier that keeps none of its kind does nothing.
    fn remove_record<'a>(&'a self, _record: &'a Record) -> BoxFuture<'a, ()> {
        future::ready(()).boxed()
    }
}
