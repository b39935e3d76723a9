#![allow(dead_code)]
//! A fake upstream registry for the integration tests: what a real registry won't do on
//! demand. Corrupt or cut bodies, stalls, slow streams, 401/429/5xx answers, token-service
//! faults, redirects to other origins, and a log of every request.
//!
//! It serves HTTP/1.1 by hand over tokio `TcpStream`s, so a fault can break the stream at
//! any byte after the headers have gone out. It runs on its own thread with its own runtime,
//! listens on 127.0.0.1:0, and stops on drop: the listener closes, then every connection
//! (a hung or stalled one too) is closed.
//!
//! Things to know when writing tests:
//! - Every request is recorded (`requests`, `count`) first, before auth and faults, and
//!   before any byte of its answer: once a client has its answer, the count includes it.
//!   Refused and hung requests are recorded too (the fake reads a request before faulting).
//! - Auth comes before faults: a request answered 401 for a missing/bad token or
//!   credentials (at `/token` too) neither uses up nor sees a fault. So
//!   `fault("/blobs/", .., Some(1))` hits the first *authorized* blob request.
//! - Body faults (CorruptBody, ShortBody, LongBody, TrailingGarbage, NoContentLength,
//!   StallAfter, ResetAfter, Slow) skip HEAD requests: a HEAD neither uses them up nor sees
//!   them. The other faults apply to HEAD as well.
//! - Only one fault applies per request: the most recently added one that matches
//!   (its path contains `path_contains`; the query is not looked at) and has uses left.
//! - Keep-alive works; a response whose fault breaks the stream closes the connection.
//! - The fake does not look at `Accept`: a manifest is served with the media type it was
//!   stored with.
//! - Timing: Hang and StallAfter last until the fake drops (a client needs a timeout);
//!   ResetAfter waits 100 ms before the reset; Slow pauses `delay` between pieces; Delay
//!   holds the headers. Dropping the fake takes a few milliseconds and closes everything.
//! - The fake never closes an idle keep-alive connection itself.

//!
//! The parts: `http` reads requests and writes answers by hand; `routing` is the normal
//! answer of each endpoint; `faults` decides what a request gets (its record, auth, the
//! fault that applies); `auth` is the 401s and the token service; `counters` is what tests
//! count.

mod auth;
mod counters;
mod faults;
mod http;
mod routing;

pub use auth::Auth;
pub use counters::Recorded;
pub use faults::Fault;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use auth::Token;
use faults::FaultRule;
use http::serve_connection;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

struct Store {
    blobs: HashMap<String, Bytes>,
    /// digest -> (media type, bytes)
    manifests: HashMap<String, (String, Bytes)>,
    /// repo -> tag -> digest
    tags: HashMap<String, BTreeMap<String, String>>,
    /// Tag lists set with `set_tags`, as given.
    tag_lists: HashMap<String, Vec<String>>,
    paginate: bool,
    referrers: HashMap<(String, String), Bytes>,
    faults: Vec<FaultRule>,
    auth: Auth,
    tokens: HashMap<String, Token>,
    issued: u64,
    requests: Vec<Recorded>,
    /// Sent as `ratelimit-remaining` on every registry answer, when set.
    ratelimit_remaining: Option<String>,
    /// The page size of tag lists asked without `n`, when paginating (Docker Hub pages by
    /// default; the CNCF registry does not).
    default_page: Option<usize>,
}

struct Shared {
    store: Mutex<Store>,
    connections: AtomicUsize,
    url: String,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not make every later call panic too.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Fake {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fake {
    pub fn start() -> Fake {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("fake: bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("fake: nonblocking");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                blobs: HashMap::new(),
                manifests: HashMap::new(),
                tags: HashMap::new(),
                tag_lists: HashMap::new(),
                paginate: false,
                referrers: HashMap::new(),
                faults: Vec::new(),
                auth: Auth::None,
                tokens: HashMap::new(),
                issued: 0,
                requests: Vec::new(),
                ratelimit_remaining: None,
                default_page: None,
            }),
            connections: AtomicUsize::new(0),
            url: format!("http://{addr}"),
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-upstream".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("fake-upstream-rt")
                    .enable_all()
                    .build()
                    .expect("fake: runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("fake: listener");
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            accepted = listener.accept() => {
                                let Ok((sock, _)) = accepted else { continue };
                                thread_shared.connections.fetch_add(1, Ordering::SeqCst);
                                let _ = sock.set_nodelay(true);
                                tokio::spawn(serve_connection(thread_shared.clone(), sock));
                            }
                        }
                    }
                    // The listener drops here: new connections are refused from now on.
                });
                // Dropping the runtime drops every connection task, and so closes its socket.
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("fake: thread");
        Fake {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// Store a blob; returns "sha256:<hex>". Served at GET/HEAD /v2/<any repo>/blobs/<digest>
    /// with Content-Type application/octet-stream, Docker-Content-Digest, Content-Length and
    /// Accept-Ranges: bytes. A single `Range: bytes=a-b` / `a-` / `-n` gets a 206 (416 when
    /// it starts past the end); other Range headers are ignored (the whole blob).
    pub fn add_blob(&self, data: &[u8]) -> String {
        let digest = sha256(data);
        self.shared
            .lock()
            .blobs
            .insert(digest.clone(), Bytes::copy_from_slice(data));
        digest
    }

    /// Store a manifest by digest (and under `tag` in `repo` when given); returns its digest.
    /// By digest it is served under any repository; by tag only under `repo`.
    /// Served at /v2/<repo>/manifests/<tag|digest> with Content-Type = media_type,
    /// Docker-Content-Digest, Content-Length; HEAD the same without body.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = sha256(bytes);
        let mut st = self.shared.lock();
        st.manifests.insert(
            digest.clone(),
            (media_type.to_string(), Bytes::copy_from_slice(bytes)),
        );
        if let Some(tag) = tag {
            st.tags
                .entry(repo.to_string())
                .or_default()
                .insert(tag.to_string(), digest.clone());
        }
        digest
    }

    /// Point `tag` in `repo` at `digest` (which should have been added with `add_manifest`).
    pub fn set_tag(&self, repo: &str, tag: &str, digest: &str) {
        self.shared
            .lock()
            .tags
            .entry(repo.to_string())
            .or_default()
            .insert(tag.to_string(), digest.to_string());
    }

    /// The tag list of `repo`, returned by GET /v2/<repo>/tags/list in this order as
    /// `{"name":repo,"tags":[..]}`. Without it the list is the repo's tags (from `add_manifest`
    /// and `set_tag`) in lexical order; a repo with neither is 404 NAME_UNKNOWN. Like the
    /// CNCF registry 2.8 the fake ignores `n` and `last` unless `paginate_tags(true)`.
    pub fn set_tags(&self, repo: &str, tags: &[&str]) {
        self.shared.lock().tag_lists.insert(
            repo.to_string(),
            tags.iter().map(|t| t.to_string()).collect(),
        );
    }

    /// On: tags/list sorts the tags lexically, starts after `last`, returns at most `n`
    /// (`n` absent: all the rest; not a number: 400 PAGINATION_NUMBER_INVALID), and when more
    /// remain sends `Link: </v2/<repo>/tags/list?n=<n>&last=<last returned>>; rel="next"`.
    pub fn paginate_tags(&self, on: bool) {
        self.shared.lock().paginate = on;
    }

    /// Referrers: GET/HEAD /v2/<repo>/referrers/<digest> returns this body as
    /// application/vnd.oci.image.index.v1+json, whatever the query (no OCI-Filters-Applied).
    /// Without it, 404 MANIFEST_UNKNOWN (like a registry without the referrers API).
    pub fn set_referrers(&self, repo: &str, digest: &str, index_json: &[u8]) {
        self.shared.lock().referrers.insert(
            (repo.to_string(), digest.to_string()),
            Bytes::copy_from_slice(index_json),
        );
    }

    /// Faults, applied to requests whose path contains `path_contains` ("" = all), for the next
    /// `times` matching requests (None = until cleared). Later faults are checked first.
    pub fn fault(&self, path_contains: &str, fault: Fault, times: Option<usize>) {
        if times == Some(0) {
            return;
        }
        self.shared.lock().faults.push(FaultRule {
            path_contains: path_contains.to_string(),
            fault,
            remaining: times,
        });
    }

    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Auth mode for the registry endpoints (everything under /v2/; /token is the token
    /// service, served in Bearer mode only, 404 otherwise). Forgets every token issued so far,
    /// so calling it again with the same mode revokes them all.
    pub fn set_auth(&self, auth: Auth) {
        let mut st = self.shared.lock();
        st.auth = auth;
        st.tokens.clear();
    }

    /// Send `ratelimit-remaining: <value>` (e.g. `"3;w=21600"`) on every registry answer
    /// from now on; `None` stops it.
    pub fn set_ratelimit_remaining(&self, value: Option<&str>) {
        self.shared.lock().ratelimit_remaining = value.map(String::from);
    }

    /// With `paginate_tags(true)`: a tag list asked without `n` gets pages of this size
    /// (`None`: the whole rest, the default).
    pub fn set_default_tag_page(&self, n: Option<usize>) {
        self.shared.lock().default_page = n;
    }

    /// Adds an image under `repo:tag`: for each platform (`os/arch[/variant]`) a config and
    /// one layer of `layer_size` bytes (contents from `seed`) and an OCI image manifest,
    /// then an OCI index of them, tagged. The digests, to assert on.
    pub fn add_image(
        &self,
        repo: &str,
        tag: &str,
        platforms: &[&str],
        layer_size: usize,
        seed: u64,
    ) -> FakeImage {
        let mut image = FakeImage::default();
        let mut entries = Vec::new();
        for (i, platform) in platforms.iter().enumerate() {
            let mut parts = platform.split('/');
            let (os, arch) = (parts.next().unwrap(), parts.next().unwrap());
            let variant = parts.next();
            let config = format!("{{\"architecture\":\"{arch}\",\"os\":\"{os}\",\"seed\":{seed}}}");
            let layer = super::registry::random_bytes(layer_size, seed * 1000 + i as u64);
            let (config_digest, layer_digest) =
                (self.add_blob(config.as_bytes()), self.add_blob(&layer));
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer.len()}],
            });
            let bytes = serde_json::to_vec(&manifest).unwrap();
            let digest = self.add_manifest(repo, None, OCI_MANIFEST, &bytes);
            let mut p = serde_json::json!({"os": os, "architecture": arch});
            if let Some(v) = variant {
                p["variant"] = v.into();
            }
            entries.push(serde_json::json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": bytes.len(), "platform": p}));
            image.manifests.push(digest);
            image.blobs.extend([config_digest, layer_digest]);
        }
        let index =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries});
        image.index = self.add_manifest(
            repo,
            Some(tag),
            OCI_INDEX,
            &serde_json::to_vec(&index).unwrap(),
        );
        image
    }
}

/// An image added by [`Fake::add_image`]: its index, its platforms' manifests (in the order
/// given) and their blobs (config, layer, per platform).
#[derive(Clone, Debug, Default)]
pub struct FakeImage {
    pub index: String,
    pub manifests: Vec<String>,
    pub blobs: Vec<String>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}
