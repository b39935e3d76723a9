//! Peers: replicas on one bucket stream a cold blob from the replica responsible for it,
//! at the pace of that replica's fill, instead of waiting for it to land in the bucket.
//!
//! - **Membership**: each replica writes a heartbeat in the bucket every `HEARTBEAT`,
//!   naming its peer endpoint's URL (`bucket::members`), and lists the others'; a heartbeat
//!   older than `GONE_AFTER` is a replica gone.
//! - **Ownership**: every key (a blob's digest, a manifest's or a tag's key) has one owner
//!   among the live members, by rendezvous hashing: each member's weight for a key is a hash
//!   of the two, the heaviest owns it. Every replica computes the same owner from the same
//!   membership with no call, no lease and no wait; a member that joins or leaves moves only
//!   the keys it wins or held.
//! - **Fetching**: the owner of a blob fills it from the bucket or the upstream; another
//!   replica's fill reads it from the owner's peer endpoint (`client`), signed with the
//!   shared secret (`sign`), and verifies the digest again like any fill. A peer that cannot
//!   be reached, stalls or cuts the stream is suspected for `SUSPECT_FOR`: ownership skips
//!   it, so the next request goes to the bucket, another replica, or the upstream.
//!
//! The endpoint itself (the listener, what it serves) is `server::peers`.

pub mod client;
pub mod sign;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{BoxStream, Stream};
use futures_util::StreamExt;
use sha2::Digest as _;

use super::bucket::Bucket;
use super::fill::{Fetched, Origin};
use crate::clock::Instant;
use crate::config::PeersConfig;
use crate::metrics::Metrics;
use crate::reference::{Digest, Name};
pub use client::PeerError;
use client::{Answer, PeerClient};

/// How often a replica writes its heartbeat and reads the others'.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A heartbeat older than this is a replica gone (a few missed beats, so that a slow store
/// call does not drop a live replica).
pub const GONE_AFTER: Duration = Duration::from_secs(8);
/// How long a peer that failed a request is left out of ownership.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);

/// Who is responsible for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This replica.
    Me,
    /// The replica whose peer endpoint is at this URL.
    Peer(String),
    /// No membership known yet (the bucket never answered): decide as without peers.
    Unknown,
}

/// The owner of `key` among `members` by rendezvous hashing: the member with the highest
/// hash of (member, key). Public so that tests and tools compute what replicas compute.
pub fn owner_of<'a>(members: &'a [String], key: &[u8]) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| {
            let mut h = sha2::Sha256::new();
            h.update(m.as_bytes());
            h.update([0]);
            h.update(key);
            let out = h.finalize();
            (
                u64::from_be_bytes(out[..8].try_into().expect("8 bytes")),
                m.as_str(),
            )
        })
        .map(String::as_str)
}

tokio::task_local! {
    /// Set while a request of a peer is answered: what it resolves is not asked of a peer.
    static ASKED_BY_PEER: ();
}

/// Runs `f` as the answer to a peer's request (see [`asked_by_peer`]).
pub async fn as_asked_by_peer<F: std::future::Future>(f: F) -> F::Output {
    ASKED_BY_PEER.scope((), f).await
}

/// Is the current task answering a peer's request?
pub fn asked_by_peer() -> bool {
    ASKED_BY_PEER.try_with(|_| ()).is_ok()
}

/// The key a blob or manifest digest is owned by.
pub fn digest_key(d: &Digest) -> Vec<u8> {
    d.to_string().into_bytes()
}

pub struct Peers {
    /// This replica's advertised URL, without a trailing `/`: its name among the members.
    me: String,
    /// The configured listener of the peer endpoint.
    pub listen: SocketAddr,
    bucket: Arc<Bucket>,
    /// The live members (this replica included once it has beaten), sorted; `None` until
    /// the bucket first answered.
    members: RwLock<Option<Arc<Vec<String>>>>,
    /// Peers that failed lately, until when they are skipped.
    suspects: Mutex<HashMap<String, Instant>>,
    client: PeerClient,
    pub key: sign::Key,
    /// `ocicache_peers_members`: the live members as last listed.
    members_gauge: prometheus_client::metrics::gauge::Gauge,
}

impl std::fmt::Debug for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peers").field("me", &self.me).finish()
    }
}

impl Peers {
    /// The peers of `[cache.s3.peers]` on `bucket`; `answer_timeout` bounds the wait for a
    /// peer's answer (the fill's stall timeout: the owner's fill may be connecting).
    pub fn new(
        cfg: &PeersConfig,
        bucket: Arc<Bucket>,
        answer_timeout: Duration,
        metrics: &Metrics,
    ) -> io::Result<Arc<Peers>> {
        let key = sign::Key::new(cfg.secret()?);
        Ok(Arc::new(Peers {
            me: cfg.advertise.trim_end_matches('/').to_string(),
            listen: cfg.listen,
            bucket,
            members: RwLock::new(None),
            suspects: Mutex::new(HashMap::new()),
            client: PeerClient::new(key.clone(), answer_timeout)?,
            key,
            members_gauge: metrics.peers_members.clone(),
        }))
    }

    /// This replica's advertised URL.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The live members as last listed (this replica included), sorted.
    pub fn members(&self) -> Vec<String> {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members.as_deref().cloned().unwrap_or_default()
    }

    /// One heartbeat: writes ours, lists everyone's.
    pub async fn beat(&self) {
        self.bucket.beat(&self.me).await;
        if let Some(mut listed) = self.bucket.members(GONE_AFTER).await {
            // Our own write may not show in a listing yet: we are a member all the same.
            if !listed.contains(&self.me) {
                listed.push(self.me.clone());
                listed.sort();
            }
            let changed = self.members() != listed;
            if changed {
                tracing::info!(members = ?listed, "peer membership");
            }
            self.members_gauge.set(listed.len() as i64);
            *self.members.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(listed));
        }
    }

    /// Beats every `HEARTBEAT` until the returned task is aborted.
    pub fn start(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                self.beat().await;
            }
        })
    }

    /// Removes our heartbeat (at shutdown).
    pub async fn leave(&self) {
        self.bucket.leave(&self.me).await;
    }

    /// Who is responsible for `key`: rendezvous over the live members, less the suspects.
    pub fn owner(&self, key: &[u8]) -> Owner {
        let members = {
            let m = self.members.read().unwrap_or_else(|e| e.into_inner());
            match &*m {
                Some(m) => m.clone(),
                None => return Owner::Unknown,
            }
        };
        let now = Instant::now();
        let candidates: Vec<String> = {
            let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
            suspects.retain(|_, until| *until > now);
            members
                .iter()
                .filter(|m| !suspects.contains_key(*m))
                .cloned()
                .collect()
        };
        match owner_of(&candidates, key) {
            Some(m) if m == self.me => Owner::Me,
            Some(m) => Owner::Peer(m.to_string()),
            None => Owner::Me,
        }
    }

    /// `peer` failed a request: leave it out of ownership for a while.
    pub fn suspect(&self, peer: &str) {
        if peer == self.me {
            return;
        }
        tracing::warn!(%peer, for_ = ?SUSPECT_FOR, "peer failed: asking the others meanwhile");
        let mut suspects = self.suspects.lock().unwrap_or_else(|e| e.into_inner());
        suspects.insert(peer.to_string(), Instant::now() + SUSPECT_FOR);
    }

    /// The blob `digest` from the peer `peer`, which fetches it (from the bucket or the
    /// upstream `upstream`, as `name`) if it has no fill of it yet. Its body suspects the
    /// peer if it fails or is dropped before its end (a stall).
    pub async fn blob(
        self: &Arc<Self>,
        peer: &str,
        digest: &Digest,
        upstream: &str,
        name: &Name,
    ) -> Result<(Option<u64>, BoxStream<'static, io::Result<Bytes>>), PeerError> {
        let query = fetch_query(upstream, name);
        let path = format!("/peer/v1/blobs/{digest}?{query}");
        let Answer { size, body, .. } = self.client.get(peer, &path, None).await?;
        let watched = Watched {
            body,
            peer: peer.to_string(),
            peers: self.clone(),
            ended: false,
        };
        Ok((size, watched.boxed()))
    }

    /// A manifest (`reference`: a digest or a tag) of `name` from the peer `peer`, which
    /// resolves it as it would for a client: its bytes, `Content-Type` and
    /// `Docker-Content-Digest` (unverified: the caller checks them).
    pub async fn manifest(
        &self,
        peer: &str,
        upstream: &str,
        name: &Name,
        reference: &str,
        accept: Option<&str>,
        max: u64,
    ) -> Result<(Bytes, Option<String>, Option<String>), PeerError> {
        let query = fetch_query(upstream, name);
        let path = format!("/peer/v1/manifests/{reference}?{query}");
        let (headers, bytes) = match self.client.get_small(peer, &path, accept, max).await {
            Ok(got) => got,
            Err(e) => {
                if e.is_peer_fault() {
                    self.suspect(peer);
                }
                return Err(e);
            }
        };
        let text = |h: &str| {
            headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        Ok((bytes, text("content-type"), text("docker-content-digest")))
    }
}

/// The query that tells a peer what to fetch, should it have nothing yet.
fn fetch_query(upstream: &str, name: &Name) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("upstream", upstream)
        .append_pair("name", name.as_str())
        .finish()
}

/// A fill's body from the replica responsible for `digest`, when that is another replica
/// and it answers; `None`: this replica fetches it (it is the owner, no membership is known,
/// the fill was asked for by a peer (`ask` is `None`), or the owner failed: it is then
/// suspected, so that the next request asks another).
pub async fn fill_source(
    peers: &Arc<Peers>,
    digest: &Digest,
    ask: Option<&(String, Name)>,
) -> Option<Fetched> {
    let (upstream, name) = ask?;
    let Owner::Peer(peer) = peers.owner(&digest_key(digest)) else {
        return None;
    };
    match peers.blob(&peer, digest, upstream, name).await {
        Ok((size, body)) => Some(Fetched {
            size,
            body,
            origin: Origin::Peer,
            source: format!("peer {peer}"),
        }),
        Err(e) => {
            if e.is_peer_fault() {
                peers.suspect(&peer);
            }
            tracing::warn!(%digest, error = %e, "the replica responsible for a blob failed: fetching it here");
            None
        }
    }
}

/// A peer's body that suspects the peer when it fails or is dropped unfinished.
struct Watched {
    body: BoxStream<'static, io::Result<Bytes>>,
    peer: String,
    peers: Arc<Peers>,
    ended: bool,
}

impl Stream for Watched {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.body.poll_next_unpin(cx);
        if let Poll::Ready(None) = next {
            self.ended = true;
        }
        next
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if !self.ended {
            self.peers.suspect(&self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::bucket::testing::{tier, TestStore};
    use crate::cache::bucket::LEASE_TTL;
    use crate::config::Secret;

    fn peers_on(store: &Arc<TestStore>, url: &str) -> Arc<Peers> {
        let cfg = PeersConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: format!("{url}/"),
            secret: Some(Secret("0123456789abcdef".into())),
            secret_file: None,
        };
        Peers::new(
            &cfg,
            tier(store, LEASE_TTL, 1 << 30),
            Duration::from_secs(5),
            &Metrics::new(),
        )
        .unwrap()
    }

    /// What the peer endpoint reads a fill with: every byte as soon as it is written (the
    /// asking replica verifies them itself), yet the stream still ends with the fill's
    /// verdict. A client's reader of the same fill waits for the verdict for its last byte.
    #[tokio::test]
    async fn a_verifying_reader_gets_every_byte_and_still_the_verdict() {
        use futures_util::StreamExt;
        // Chunks of 64 KiB: each one's write tells the readers (see `fill::NOTIFY_BYTES`).
        const LEN: usize = 4 << 16;
        let dir = tempfile::tempdir().unwrap();
        let cache = crate::cache::Cache::for_test(dir.path(), None);
        let data = vec![7u8; LEN];
        // A body whose end waits for `end`: every byte is written, no verdict yet.
        let (end, ended) = tokio::sync::oneshot::channel::<()>();
        let chunks: Vec<io::Result<Bytes>> = data
            .chunks(64 << 10)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let tail = futures_util::stream::once(async move {
            let _ = ended.await;
        })
        .filter_map(|_| async { None });
        let body = futures_util::stream::iter(chunks).chain(tail).boxed();
        let fetched = Fetched {
            size: Some(LEN as u64),
            body,
            origin: Origin::Upstream { lease: None },
            source: "test".into(),
        };
        let wrong = Digest::sha256_of(b"another blob");
        let fill = cache.spawn_fill(wrong, async move { Ok(fetched) });
        let all_written = async {
            while !matches!(fill.progress(), crate::cache::Progress::Streaming { written, .. } if written == LEN as u64)
            {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all_written)
            .await
            .expect("every byte written");
        let reader = |verifier: bool| {
            let r = crate::cache::Source::filling(&fill).reader(0, LEN as u64);
            let r = if verifier { r.for_verifier() } else { r };
            r.into_stream()
        };
        let (mut verifying, mut client) = (reader(true), reader(false));
        let mut got = (0, 0);
        while got.0 < LEN {
            got.0 += verifying.next().await.unwrap().unwrap().len();
        }
        while got.1 < LEN - 1 {
            got.1 += client.next().await.unwrap().unwrap().len();
        }
        assert_eq!(
            got,
            (LEN, LEN - 1),
            "all bytes before the verdict, or all but one"
        );
        end.send(()).unwrap();
        assert!(
            verifying.next().await.unwrap().is_err(),
            "the verdict still ends it"
        );
        assert!(client.next().await.unwrap().is_err());
    }

    /// Ownership follows the membership in the bucket: unknown before the first listing, a
    /// replica that stops beating leaves after `GONE_AFTER`, a suspect is skipped for
    /// `SUSPECT_FOR` only; every replica computes the same owner. `ocicache_peers_members`
    /// counts the members listed (a suspect still is one).
    #[tokio::test(start_paused = true)]
    async fn ownership_follows_heartbeats_and_suspicions() {
        let store = TestStore::new();
        let (a, b) = (
            peers_on(&store, "http://a:1"),
            peers_on(&store, "http://b:1"),
        );
        let key = (0u32..)
            .map(|i| i.to_be_bytes().to_vec())
            .find(|k| {
                owner_of(&["http://a:1".into(), "http://b:1".into()], k) == Some("http://b:1")
            })
            .unwrap();
        assert_eq!(a.owner(&key), Owner::Unknown, "before any listing");
        assert_eq!(a.members_gauge.get(), 0);
        a.beat().await;
        assert_eq!(a.owner(&key), Owner::Me, "alone");
        assert_eq!(a.members_gauge.get(), 1);
        b.beat().await;
        a.beat().await;
        assert_eq!(a.members(), ["http://a:1", "http://b:1"]);
        assert_eq!(a.owner(&key), Owner::Peer("http://b:1".into()));
        assert_eq!(b.owner(&key), Owner::Me, "the same owner, seen from b");

        assert_eq!(a.members_gauge.get(), 2);
        a.suspect("http://b:1");
        assert_eq!(a.owner(&key), Owner::Me, "a suspect is skipped");
        tokio::time::advance(SUSPECT_FOR).await;
        assert_eq!(
            a.owner(&key),
            Owner::Peer("http://b:1".into()),
            "then asked again"
        );

        // b beats once more, then stops: gone once its heartbeat is older than GONE_AFTER.
        b.beat().await;
        tokio::time::advance(GONE_AFTER - HEARTBEAT).await;
        a.beat().await;
        assert_eq!(a.owner(&key), Owner::Peer("http://b:1".into()));
        tokio::time::advance(HEARTBEAT * 2).await;
        a.beat().await;
        assert_eq!(a.members(), ["http://a:1"]);
        assert_eq!(a.owner(&key), Owner::Me);
        assert_eq!(a.members_gauge.get(), 1, "b gone");
    }

    #[test]
    fn rendezvous_spreads_keys_and_moves_only_those_of_a_member_gone() {
        let three: Vec<String> = ["http://a:1", "http://b:1", "http://c:1"]
            .map(String::from)
            .to_vec();
        let two: Vec<String> = three[..2].to_vec();
        let mut counts = HashMap::new();
        let mut moved = 0;
        for i in 0..3000u32 {
            let key = i.to_be_bytes();
            let before = owner_of(&three, &key).unwrap();
            *counts.entry(before).or_insert(0) += 1;
            let after = owner_of(&two, &key).unwrap();
            if before != "http://c:1" {
                assert_eq!(before, after, "a key of a live member stays with it");
            } else {
                moved += 1;
            }
        }
        for (m, n) in &counts {
            assert!((800..1200).contains(n), "{m} owns {n} of 3000");
        }
        assert_eq!(moved, counts["http://c:1"]);
        // The order the members are listed in does not matter.
        let reversed: Vec<String> = three.iter().rev().cloned().collect();
        assert_eq!(owner_of(&three, b"k"), owner_of(&reversed, b"k"));
        assert_eq!(owner_of(&[], b"k"), None);
    }
}
