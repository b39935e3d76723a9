//! Warming the cache from inside the server: an image's manifests and blobs fetched into the
//! cache through the same paths a client's pull takes, without a client. Used by scheduled
//! syncs (`sync`) and the admin API's prefetch jobs.
//!
//! A tag (or digest) is resolved by the manifests service, so `tag_ttl`, the shared tier,
//! stale-if-error and the coalescing of concurrent resolutions apply exactly as for a pull.
//! An index is walked to the manifests of the platforms asked for. Each blob is opened or
//! filled by the cache like a blob GET's (`Cache::open_or_fill`: the local tier, else a fill
//! fed by the shared tier or the upstream), and waited for until it is verified and
//! committed; nothing reads its bytes. Progress goes to an optional watch channel; the result
//! is the image's manifests and blobs: the set a pin keeps.
//!
//! The walk from the reference to the blobs is the manifests service's
//! (`Manifests::walk_image`), the same one a pin resolves with; `ocicache prefetch` does the
//! same over HTTP from outside (`prefetch`).

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::watch;

use crate::cache::Outcome;
use crate::error::{Error, ErrorCode};
use crate::prefetch::ImageRef;
use crate::reference::{Digest, Name};
use crate::server::State;
use crate::upstream::Upstream;

/// Where a warm-up is, for whoever watches it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    /// Manifests resolved so far (the index and the platforms' manifests).
    pub manifests: u64,
    /// Blobs known once every manifest is read (0 until then), and those verified in the
    /// cache so far.
    pub blobs_total: u64,
    pub blobs_done: u64,
    /// Their bytes, as the manifests announce them, and those on disk so far.
    pub bytes_total: u64,
    pub bytes_done: u64,
}

/// A warmed image.
#[derive(Debug, Clone, Serialize)]
pub struct Warmed {
    /// The upstream it came from and its name there.
    pub upstream: String,
    pub name: Name,
    /// What the reference resolved to: the top manifest (an index or an image manifest).
    pub digest: Digest,
    /// Every manifest kept: the top one first, then the platforms' ones. With `blobs`, what
    /// a pin of this image keeps.
    pub manifests: Vec<Digest>,
    /// The configs and layers of the manifests kept, each once.
    pub blobs: Vec<Digest>,
    /// Blob bytes that came in now (from the upstream or the shared tier).
    pub fetched_bytes: u64,
    /// Blob bytes the local cache already had.
    pub cached_bytes: u64,
    /// The tag was answered stale (the upstream failed): this is the cached digest, not one
    /// the upstream confirmed now.
    pub stale: bool,
}

/// Blobs of one image filled at once: enough to overlap the upstream's latency, few enough
/// to leave the fills' turns (`cache.max_fills`) to clients.
const PARALLEL_BLOBS: usize = 4;

/// Fetches `image` (a tag or a digest) into the cache of `state`: the manifests of the
/// `platforms` asked for (`os/arch[/variant]`; empty: every platform of an index) and their
/// blobs, each verified. `progress`, when given, is updated as it goes.
pub async fn warm(
    state: &State,
    image: &ImageRef,
    platforms: &[String],
    progress: Option<&watch::Sender<Progress>>,
) -> Result<Warmed, Error> {
    if state.config.offline {
        return Err(Error::client(
            ErrorCode::Unavailable,
            "this mirror is offline: nothing can be fetched",
        ));
    }
    let target =
        crate::route::resolve(&state.upstreams, Some(&image.registry), image.name.as_str())?;
    let up = state.upstreams.0[target.upstream].clone();
    let name = target.name;
    let report = |f: &dyn Fn(&mut Progress)| {
        if let Some(p) = progress {
            p.send_modify(|p| f(p));
        }
    };

    // No `Accept`: every media type, as for a client that sends none (the upstream is asked
    // with the full list), and the same walk as the admin API's pins.
    let walked = state
        .manifests
        .walk_image(&up, &name, &image.reference, platforms, || {
            report(&|p| p.manifests += 1)
        })
        .await?;
    if walked.index && walked.manifests.len() == 1 {
        return Err(Error::client(
            ErrorCode::ManifestUnknown,
            format!(
                "{}: no manifest for the platforms {platforms:?}",
                image.reference
            ),
        ));
    }
    let blobs = walked.blobs;
    report(&|p| {
        p.blobs_total = blobs.len() as u64;
        p.bytes_total = blobs.iter().map(|(_, s)| s).sum();
    });

    // Owned digests: a stream of borrowed ones makes a future that is not `Send` for every
    // lifetime, which a spawned caller (the sync's task) needs.
    let (up_ref, name_ref) = (&up, &name);
    let digests: Vec<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let filled: Vec<(u64, bool)> = futures_util::stream::iter(digests)
        .map(|digest| async move { fill(state, up_ref, name_ref, &digest, progress).await })
        .buffer_unordered(PARALLEL_BLOBS)
        .try_collect()
        .await?;
    let size_of = |fetched: bool| -> u64 {
        filled
            .iter()
            .filter(|(_, f)| *f == fetched)
            .map(|(s, _)| s)
            .sum()
    };
    Ok(Warmed {
        upstream: up.name.clone(),
        name,
        digest: walked.top.value.digest.clone(),
        manifests: walked.manifests,
        blobs: blobs.into_iter().map(|(d, _)| d).collect(),
        fetched_bytes: size_of(true),
        cached_bytes: size_of(false),
        stale: walked.top.outcome == Outcome::Stale,
    })
}

/// One blob into the cache, verified: its size, and whether it came in now (a fill).
async fn fill(
    state: &State,
    up: &Arc<Upstream>,
    name: &Name,
    digest: &Digest,
    progress: Option<&watch::Sender<Progress>>,
) -> Result<(u64, bool), Error> {
    let mut source = state.cache.open_or_fill(digest, up, name).await?;
    let fetched = source.is_fill();
    let mut reported = 0u64;
    let size = source
        .verified(|written| {
            if let Some(p) = progress {
                let delta = written.saturating_sub(reported);
                p.send_modify(|p| p.bytes_done += delta);
            }
            reported = reported.max(written);
        })
        .await?;
    if let Some(p) = progress {
        p.send_modify(|p| p.blobs_done += 1);
    }
    Ok((size, fetched))
}
