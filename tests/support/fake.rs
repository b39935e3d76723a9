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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest request head (request line and headers) the fake reads: beyond it, 431.
const MAX_HEAD: usize = 64 << 10;
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The parameter `RedirectLoop` counts its hops in.
const LOOP_PARAM: &str = "fake_loop";
/// How long `ResetAfter` waits between sending its bytes and the reset, so that they reach
/// the client first.
const RESET_PAUSE: Duration = Duration::from_millis(100);
/// How many extra bytes `LongBody` sends after the whole body.
const LONG_EXTRA: usize = 1024;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The path as sent (not percent-decoded), without the query.
    pub path: String,
    pub query: Option<String>,
    /// In order; names lowercase.
    pub headers: Vec<(String, String)>,
}

impl Recorded {
    /// The first header of this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an OCI error body (`{"errors":[{"code":..}]}`: UNAUTHORIZED,
    /// DENIED, BLOB_UNKNOWN/MANIFEST_UNKNOWN/NAME_UNKNOWN, TOOMANYREQUESTS, UNAVAILABLE or
    /// UNKNOWN). A 401 carries the `WWW-Authenticate` challenge of the current auth mode
    /// (none in `Auth::None`; Basic at `/token`).
    Status(u16),
    /// 429 with this `Retry-After` and a TOOMANYREQUESTS error body.
    TooMany { retry_after: String },
    /// Read the request, then close the connection without answering.
    Refuse,
    /// Read the request, never answer; the connection stays open until the fake drops.
    Hang,
    /// Answer normally after this delay (the headers come after the delay).
    Delay(Duration),
    /// Same length and headers (the right digest), one byte changed near the middle of the
    /// body. Text stays valid (a letter or digit is swapped for another), so JSON still parses
    /// and only a digest check finds it. An empty body is left as it is.
    CorruptBody,
    /// Announce the full Content-Length, send only N bytes (at most length - 1, so it is
    /// always short), then close the connection (FIN).
    ShortBody(usize),
    /// Announce a Content-Length of half the body (and `Connection: close`), then send the
    /// whole body and 1 KiB of junk after it, then close. A client that obeys Content-Length
    /// gets the first half only, whose digest is wrong; the rest is junk on the connection.
    LongBody,
    /// Announce the full Content-Length (and `Connection: close`), send the right body, then
    /// these many junk bytes, then close. A client that obeys Content-Length gets the right body. (Not in the brief:
    /// the literal "correct body plus trailing bytes" case.)
    TrailingGarbage(usize),
    /// `Transfer-Encoding: chunked` (64 KiB chunks), no Content-Length, right bytes.
    NoContentLength,
    /// Announce the full Content-Length, send N bytes (at most length - 1), then send
    /// nothing more; the connection stays open until the fake drops.
    StallAfter(usize),
    /// Announce the full Content-Length, send N bytes (at most length - 1), wait 100 ms, then
    /// reset the connection (RST). The client may see fewer than N bytes: a reset discards
    /// what it had not read yet.
    ResetAfter(usize),
    /// The right body with the full Content-Length, in `chunk`-byte pieces with `delay`
    /// between them (the headers and the first piece go out at once).
    Slow { chunk: usize, delay: Duration },
    /// `Docker-Content-Digest` names another valid-looking sha256 digest (added if the answer
    /// had none). Body unchanged.
    LieDigest,
    /// 307 to this absolute URL followed by the original path and query (for another origin:
    /// another Fake's `url()`).
    RedirectTo(String),
    /// 307 to this same fake, same path, with `fake_loop=<n+1>` in the query, forever.
    RedirectLoop,
    /// The normal answer plus a response header `X-Fake-Huge` of this many bytes.
    HugeHeader(usize),
}

impl Fault {
    /// Faults about the body, which HEAD requests skip.
    fn body_only(&self) -> bool {
        matches!(
            self,
            Fault::CorruptBody
                | Fault::ShortBody(_)
                | Fault::LongBody
                | Fault::TrailingGarbage(_)
                | Fault::NoContentLength
                | Fault::StallAfter(_)
                | Fault::ResetAfter(_)
                | Fault::Slow { .. }
        )
    }
}

#[derive(Clone, Debug)]
pub enum Auth {
    None,
    /// Registry endpoints answer 401 with
    /// `WWW-Authenticate: Bearer realm="<url>/token",service="fake",scope="repository:<repo>:pull"`
    /// (no scope on `/v2/`) unless `Authorization: Bearer <token>` names a token that has not
    /// expired and was issued for that repository (any valid token will do for `/v2/`).
    /// `GET /token?service=fake&scope=repository:<repo>:pull` issues tokens as
    /// `{"token":..,"expires_in":..}`: `service` must be `fake` (400 otherwise); `scope` may be
    /// repeated or hold several space-separated scopes; a repository is granted when its
    /// actions include `pull` or `*`. When `creds` is Some, /token requires them as Basic
    /// credentials (401 with `WWW-Authenticate: Basic realm="fake"` otherwise). Tokens
    /// expire `expires_in` seconds after they are issued.
    Bearer {
        creds: Option<(String, String)>,
        expires_in: u64,
    },
    /// 401 with `WWW-Authenticate: Basic realm="fake"` unless these Basic credentials.
    Basic {
        user: String,
        pass: String,
    },
}

struct FaultRule {
    path_contains: String,
    fault: Fault,
    remaining: Option<usize>,
}

struct Token {
    expires: Instant,
    repos: Vec<String>,
}

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

    /// Requests received (registry and token endpoints), in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// How many requests had this method and a path containing `path_contains`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.contains(path_contains))
            .count()
    }

    /// Forget the recorded requests and the connection count.
    pub fn reset_counts(&self) {
        self.shared.lock().requests.clear();
        self.shared.connections.store(0, Ordering::SeqCst);
    }

    /// Connections accepted so far (since the last `reset_counts`).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
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

// ---------------------------------------------------------------------------------------------
// Requests and responses

struct Request {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Response {
    fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Response {
        self.headers.push((name.to_string(), value.into()));
        self
    }

    fn set_header(&mut self, name: &str, value: String) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value));
    }

    fn body(mut self, body: impl Into<Bytes>) -> Response {
        self.body = body.into();
        self
    }

    fn json(status: u16, value: serde_json::Value) -> Response {
        Response::new(status)
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(&value).unwrap())
    }

    fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(
            status,
            serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}),
        )
    }
}

/// How the body goes out.
enum Mode {
    Normal,
    Chunked,
    Short(usize),
    Long,
    Trailing(usize),
    Stall(usize),
    Reset(usize),
    Slow(usize, Duration),
}

enum Action {
    Respond,
    Refuse,
    Hang,
}

struct Plan {
    action: Action,
    response: Response,
    mode: Mode,
    delay: Option<Duration>,
}

impl Plan {
    fn respond(response: Response) -> Plan {
        Plan {
            action: Action::Respond,
            response,
            mode: Mode::Normal,
            delay: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

enum Route {
    Base,
    Token,
    Blob { repo: String, digest: String },
    Manifest { repo: String, reference: String },
    Tags { repo: String },
    Referrers { repo: String, digest: String },
    Other { repo: Option<String> },
}

impl Route {
    fn parse(path: &str) -> Route {
        if path == "/token" {
            return Route::Token;
        }
        if path == "/v2/" || path == "/v2" {
            return Route::Base;
        }
        let Some(rest) = path.strip_prefix("/v2/") else {
            return Route::Other { repo: None };
        };
        if let Some(repo) = rest.strip_suffix("/tags/list") {
            return Route::Tags {
                repo: percent_decode(repo),
            };
        }
        let split = |marker: &str| {
            rest.rfind(marker).map(|i| {
                (
                    percent_decode(&rest[..i]),
                    percent_decode(&rest[i + marker.len()..]),
                )
            })
        };
        if let Some((repo, reference)) = split("/manifests/") {
            return Route::Manifest { repo, reference };
        }
        if let Some((repo, digest)) = split("/referrers/") {
            return Route::Referrers { repo, digest };
        }
        if let Some(i) = rest.find("/blobs/") {
            let repo = percent_decode(&rest[..i]);
            let digest = percent_decode(&rest[i + "/blobs/".len()..]);
            if digest.contains('/') || digest.starts_with("uploads") {
                return Route::Other { repo: Some(repo) };
            }
            return Route::Blob { repo, digest };
        }
        Route::Other { repo: None }
    }

    fn repo(&self) -> Option<&str> {
        match self {
            Route::Blob { repo, .. }
            | Route::Manifest { repo, .. }
            | Route::Tags { repo }
            | Route::Referrers { repo, .. } => Some(repo),
            Route::Other { repo } => repo.as_deref(),
            Route::Base | Route::Token => None,
        }
    }

    fn not_found_code(&self) -> &'static str {
        match self {
            Route::Blob { .. } => "BLOB_UNKNOWN",
            Route::Manifest { .. } | Route::Referrers { .. } => "MANIFEST_UNKNOWN",
            _ => "NAME_UNKNOWN",
        }
    }
}

impl Shared {
    /// Everything about a request that is decided under the lock: record it, check auth,
    /// pick the fault, build the answer.
    fn plan(&self, req: &Request) -> Plan {
        let mut st = self.lock();
        st.requests.push(Recorded {
            method: req.method.clone(),
            path: req.path.clone(),
            query: req.query.clone(),
            headers: req.headers.clone(),
        });
        let route = Route::parse(&req.path);
        let registry = req.path == "/v2" || req.path.starts_with("/v2/");

        // Auth first: a 401 for a missing or bad token/credentials uses no fault.
        if let Route::Token = route {
            if let Auth::Bearer {
                creds: Some((user, pass)),
                ..
            } = &st.auth
            {
                if !basic_matches(req, user, pass) {
                    return Plan::respond(
                        Response::error(401, "UNAUTHORIZED", "token service: credentials required")
                            .header("WWW-Authenticate", "Basic realm=\"fake\""),
                    );
                }
            }
        } else if registry {
            if let Some(denied) = st.check_auth(req, &route, &self.url) {
                return Plan::respond(denied);
            }
        }

        let fault = st.take_fault(req);
        let ratelimit_remaining = st.ratelimit_remaining.clone();
        let challenge = if let Route::Token = route {
            Some("Basic realm=\"fake\"".to_string())
        } else {
            st.challenge(&route, &self.url)
        };
        drop(st);

        let with_query = |base: &str, query: Option<String>| match query {
            Some(q) if !q.is_empty() => format!("{base}{}?{q}", req.path),
            _ => format!("{base}{}", req.path),
        };
        let mut plan = match &fault {
            Some(Fault::Refuse) => Plan {
                action: Action::Refuse,
                ..Plan::respond(Response::new(0))
            },
            Some(Fault::Hang) => Plan {
                action: Action::Hang,
                ..Plan::respond(Response::new(0))
            },
            Some(Fault::Status(status)) => {
                let status = *status;
                let code = match status {
                    401 => "UNAUTHORIZED",
                    403 => "DENIED",
                    404 => route.not_found_code(),
                    429 => "TOOMANYREQUESTS",
                    503 => "UNAVAILABLE",
                    _ => "UNKNOWN",
                };
                let mut r = Response::error(status, code, &format!("fake fault: status {status}"));
                if status == 401 {
                    if let Some(c) = challenge {
                        r = r.header("WWW-Authenticate", c);
                    }
                }
                Plan::respond(r)
            }
            Some(Fault::TooMany { retry_after }) => Plan::respond(
                Response::error(429, "TOOMANYREQUESTS", "fake fault: too many requests")
                    .header("Retry-After", retry_after.clone()),
            ),
            Some(Fault::RedirectTo(url)) => Plan::respond(Response::new(307).header(
                "Location",
                with_query(url.trim_end_matches('/'), req.query.clone()),
            )),
            Some(Fault::RedirectLoop) => {
                let mut n = 0u64;
                let mut kept = Vec::new();
                for pair in req
                    .query
                    .as_deref()
                    .unwrap_or("")
                    .split('&')
                    .filter(|p| !p.is_empty())
                {
                    match pair
                        .strip_prefix(LOOP_PARAM)
                        .and_then(|v| v.strip_prefix('='))
                    {
                        Some(v) => n = v.parse().unwrap_or(0),
                        None => kept.push(pair.to_string()),
                    }
                }
                kept.push(format!("{LOOP_PARAM}={}", n + 1));
                Plan::respond(
                    Response::new(307)
                        .header("Location", with_query(&self.url, Some(kept.join("&")))),
                )
            }
            _ => Plan::respond(self.route(req, &route)),
        };
        if registry {
            plan.response.headers.push((
                "Docker-Distribution-API-Version".into(),
                "registry/2.0".into(),
            ));
            if let Some(r) = ratelimit_remaining {
                plan.response
                    .headers
                    .push(("ratelimit-remaining".into(), r));
            }
        }
        match fault {
            None
            | Some(Fault::Refuse)
            | Some(Fault::Hang)
            | Some(Fault::Status(_))
            | Some(Fault::TooMany { .. })
            | Some(Fault::RedirectTo(_))
            | Some(Fault::RedirectLoop) => {}
            Some(Fault::Delay(d)) => plan.delay = Some(d),
            Some(Fault::LieDigest) => {
                let mut other = plan.response.body.to_vec();
                other.extend_from_slice(b"fake: a lie");
                plan.response
                    .set_header("Docker-Content-Digest", sha256(&other));
            }
            Some(Fault::HugeHeader(n)) => plan
                .response
                .headers
                .push(("X-Fake-Huge".into(), "h".repeat(n))),
            Some(Fault::CorruptBody) => plan.response.body = corrupt(&plan.response.body),
            Some(Fault::ShortBody(n)) => plan.mode = Mode::Short(n),
            Some(Fault::LongBody) => plan.mode = Mode::Long,
            Some(Fault::TrailingGarbage(n)) => plan.mode = Mode::Trailing(n),
            Some(Fault::NoContentLength) => plan.mode = Mode::Chunked,
            Some(Fault::StallAfter(n)) => plan.mode = Mode::Stall(n),
            Some(Fault::ResetAfter(n)) => plan.mode = Mode::Reset(n),
            Some(Fault::Slow { chunk, delay }) => plan.mode = Mode::Slow(chunk.max(1), delay),
        }
        plan
    }

    /// The normal answer.
    fn route(&self, req: &Request, route: &Route) -> Response {
        let get_or_head = req.method == "GET" || req.method == "HEAD";
        match route {
            Route::Token => {
                if req.method != "GET" {
                    return Response::error(405, "UNSUPPORTED", "token service: GET only");
                }
                self.lock().issue_token(req)
            }
            _ if !get_or_head => {
                Response::error(405, "UNSUPPORTED", "the fake serves GET and HEAD only")
            }
            Route::Base => Response::json(200, serde_json::json!({})),
            Route::Blob { digest, .. } => {
                let Some(data) = self.lock().blobs.get(digest).cloned() else {
                    return Response::error(404, "BLOB_UNKNOWN", "blob unknown to registry");
                };
                let len = data.len() as u64;
                let r = Response::new(200)
                    .header("Content-Type", "application/octet-stream")
                    .header("Docker-Content-Digest", digest.clone())
                    .header("Accept-Ranges", "bytes");
                match req.header("range").map(|h| parse_range(h, len)) {
                    Some(Some(Ok((start, end)))) => {
                        let mut r = r.body(data.slice(start as usize..end as usize + 1));
                        r.status = 206;
                        r.header("Content-Range", format!("bytes {start}-{end}/{len}"))
                    }
                    Some(Some(Err(()))) => {
                        Response::error(416, "RANGE_INVALID", "range not satisfiable")
                            .header("Content-Range", format!("bytes */{len}"))
                    }
                    _ => r.body(data),
                }
            }
            Route::Manifest { repo, reference } => {
                let st = self.lock();
                let digest = if reference.contains(':') {
                    Some(reference.clone())
                } else {
                    st.tags.get(repo).and_then(|t| t.get(reference)).cloned()
                };
                match digest.and_then(|d| st.manifests.get(&d).map(|m| (d, m.clone()))) {
                    Some((digest, (media_type, bytes))) => Response::new(200)
                        .header("Content-Type", media_type)
                        .header("Docker-Content-Digest", digest)
                        .body(bytes),
                    None => Response::error(404, "MANIFEST_UNKNOWN", "manifest unknown"),
                }
            }
            Route::Tags { repo } => self.lock().tag_list(repo, req.query.as_deref()),
            Route::Referrers { repo, digest } => {
                match self
                    .lock()
                    .referrers
                    .get(&(repo.clone(), digest.clone()))
                    .cloned()
                {
                    Some(body) => Response::new(200)
                        .header("Content-Type", OCI_INDEX)
                        .body(body),
                    None => Response::error(404, "MANIFEST_UNKNOWN", "no referrers here"),
                }
            }
            Route::Other { .. } => {
                Response::error(404, "NAME_UNKNOWN", "the fake has no such route")
            }
        }
    }
}

impl Store {
    /// The 401 for a registry request that the auth mode does not let through.
    fn check_auth(&mut self, req: &Request, route: &Route, url: &str) -> Option<Response> {
        let ok = match &self.auth {
            Auth::None => true,
            Auth::Basic { user, pass } => basic_matches(req, user, pass),
            Auth::Bearer { .. } => {
                let token = req
                    .header("authorization")
                    .and_then(|h| strip_scheme(h, "bearer"))
                    .and_then(|t| self.tokens.get(t.trim()));
                match token {
                    Some(t) if t.expires > Instant::now() => match route.repo() {
                        Some(repo) => t.repos.iter().any(|r| r == repo),
                        None => true,
                    },
                    _ => false,
                }
            }
        };
        if ok {
            return None;
        }
        let mut r = Response::error(401, "UNAUTHORIZED", "authentication required")
            .header("Docker-Distribution-API-Version", "registry/2.0");
        if let Some(c) = self.challenge(route, url) {
            r = r.header("WWW-Authenticate", c);
        }
        Some(r)
    }

    fn challenge(&self, route: &Route, url: &str) -> Option<String> {
        match &self.auth {
            Auth::None => None,
            Auth::Basic { .. } => Some("Basic realm=\"fake\"".into()),
            Auth::Bearer { .. } => Some(match route.repo() {
                Some(repo) => format!(
                    "Bearer realm=\"{url}/token\",service=\"fake\",scope=\"repository:{repo}:pull\""
                ),
                None => format!("Bearer realm=\"{url}/token\",service=\"fake\""),
            }),
        }
    }

    /// The fault for this request, if any, its use counted.
    fn take_fault(&mut self, req: &Request) -> Option<Fault> {
        let head = req.method == "HEAD";
        let i = self.faults.iter().rposition(|f| {
            req.path.contains(&f.path_contains)
                && f.remaining != Some(0)
                && !(head && f.fault.body_only())
        })?;
        let rule = &mut self.faults[i];
        let fault = rule.fault.clone();
        if let Some(n) = &mut rule.remaining {
            *n -= 1;
            if *n == 0 {
                self.faults.remove(i);
            }
        }
        Some(fault)
    }

    fn issue_token(&mut self, req: &Request) -> Response {
        let Auth::Bearer { expires_in, .. } = self.auth else {
            return Response::error(
                404,
                "NAME_UNKNOWN",
                "no token service (auth mode is not Bearer)",
            );
        };
        let params = query_pairs(req.query.as_deref().unwrap_or(""));
        if !params.iter().any(|(k, v)| k == "service" && v == "fake") {
            return Response::error(400, "DENIED", "token service: service must be \"fake\"");
        }
        let mut repos = Vec::new();
        for (_, value) in params.iter().filter(|(k, _)| k == "scope") {
            for scope in value.split(' ') {
                let Some(rest) = scope.strip_prefix("repository:") else {
                    continue;
                };
                let Some((repo, actions)) = rest.rsplit_once(':') else {
                    continue;
                };
                if actions.split(',').any(|a| a == "pull" || a == "*") {
                    repos.push(repo.to_string());
                }
            }
        }
        self.issued += 1;
        let token = format!(
            "fake.{}",
            &hex::encode(Sha256::digest(format!(
                "{}:{:?}",
                self.issued,
                Instant::now()
            )))[..32]
        );
        self.tokens.insert(
            token.clone(),
            Token {
                expires: Instant::now() + Duration::from_secs(expires_in),
                repos,
            },
        );
        Response::json(
            200,
            serde_json::json!({"token": token, "expires_in": expires_in}),
        )
    }

    fn tag_list(&self, repo: &str, query: Option<&str>) -> Response {
        let mut tags: Vec<String> = match self.tag_lists.get(repo) {
            Some(list) => list.clone(),
            None => match self.tags.get(repo) {
                Some(t) => t.keys().cloned().collect(),
                None => {
                    return Response::error(
                        404,
                        "NAME_UNKNOWN",
                        "repository name not known to registry",
                    )
                }
            },
        };
        let mut link = None;
        if self.paginate {
            let params = query_pairs(query.unwrap_or(""));
            let param = |name: &str| {
                params
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            };
            let n = match param("n") {
                Some(n) => match n.parse::<usize>() {
                    Ok(n) => Some(n),
                    Err(_) => {
                        return Response::error(400, "PAGINATION_NUMBER_INVALID", "invalid n")
                    }
                },
                None => self.default_page,
            };
            tags.sort();
            if let Some(last) = param("last") {
                tags.retain(|t| *t > last);
            }
            if let Some(n) = n {
                if tags.len() > n {
                    tags.truncate(n);
                    if let Some(last) = tags.last() {
                        link = Some(format!(
                            "</v2/{repo}/tags/list?n={n}&last={last}>; rel=\"next\""
                        ));
                    }
                }
            }
        }
        let mut r = Response::json(200, serde_json::json!({"name": repo, "tags": tags}));
        if let Some(link) = link {
            r = r.header("Link", link);
        }
        r
    }
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest)
}

fn basic_matches(req: &Request, user: &str, pass: &str) -> bool {
    req.header("authorization")
        .and_then(|h| strip_scheme(h, "basic"))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .is_some_and(|d| d == format!("{user}:{pass}").as_bytes())
}

/// One byte changed near the middle: a letter or digit becomes another of its kind when one
/// is near, so text stays text; otherwise the middle byte is inverted.
fn corrupt(body: &Bytes) -> Bytes {
    if body.is_empty() {
        return body.clone();
    }
    let mut v = body.to_vec();
    let mid = v.len() / 2;
    let pick = (0..v.len().min(4096))
        .flat_map(|d| [mid.checked_add(d), mid.checked_sub(d)])
        .flatten()
        .find(|&i| i < v.len() && v[i].is_ascii_alphanumeric());
    match pick {
        Some(i) => {
            v[i] = match v[i] {
                b'9' => b'8',
                b'z' => b'y',
                b'Z' => b'Y',
                c => c + 1,
            }
        }
        None => v[mid] ^= 0xff,
    }
    Bytes::from(v)
}

/// `Range: bytes=...` against a blob of `len` bytes: None to ignore it (the whole blob),
/// Some(Err) for 416, Some(Ok((first, last))) inclusive.
fn parse_range(header: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 || len == 0 {
            return Some(Err(()));
        }
        return Some(Ok((len - n.min(len), len - 1)));
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        u64::MAX
    } else {
        b.parse().ok()?
    };
    if end < start {
        return None;
    }
    if start >= len {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(len - 1))))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hexval = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hexval(b[i + 1]), hexval(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=b&c=d`, percent-decoded, `+` as space.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

// ---------------------------------------------------------------------------------------------
// The connection: hand-written HTTP/1.1

enum ReadError {
    /// Closed, reset, or an IO error: nothing to answer.
    Gone,
    /// Answer this status, then close.
    Bad(u16),
}

impl From<std::io::Error> for ReadError {
    fn from(_: std::io::Error) -> ReadError {
        ReadError::Gone
    }
}

struct Conn {
    sock: TcpStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    /// Read more bytes into the buffer; false at EOF.
    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut tmp = [0u8; 16 << 10];
        let n = self.sock.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    async fn read_line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > 8192 {
                return Err(ReadError::Bad(400));
            }
            if !self.fill().await? {
                return Err(ReadError::Gone);
            }
        }
    }

    async fn discard(&mut self, mut n: u64) -> Result<(), ReadError> {
        loop {
            let take = (self.buf.len() as u64).min(n) as usize;
            self.buf.drain(..take);
            n -= take as u64;
            if n == 0 {
                return Ok(());
            }
            if !self.fill().await? {
                return Err(ReadError::Gone);
            }
        }
    }

    /// The next request, its body read and thrown away; None when the client closed
    /// between requests.
    async fn read_request(&mut self) -> Result<Option<Request>, ReadError> {
        let end = loop {
            while self.buf.starts_with(b"\r\n") {
                self.buf.drain(..2);
            }
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ReadError::Bad(431));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ReadError::Gone)
                };
            }
        };
        if end > MAX_HEAD {
            return Err(ReadError::Bad(431));
        }
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let mut parts = lines.next().unwrap_or("").split_whitespace();
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ReadError::Bad(400));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(ReadError::Bad(505));
        }
        let mut headers = Vec::new();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(ReadError::Bad(400));
            };
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        // Absolute form: keep the path and query.
        let mut target = target.to_string();
        for scheme in ["http://", "https://"] {
            if let Some(rest) = target.strip_prefix(scheme) {
                target = match rest.find('/') {
                    Some(i) => rest[i..].to_string(),
                    None => "/".to_string(),
                };
                break;
            }
        }
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (target, None),
        };
        let req = Request {
            method: method.to_string(),
            path,
            query,
            headers,
            keep_alive: false,
        };
        let connection = req.header("connection").unwrap_or("").to_ascii_lowercase();
        let keep_alive = if version == "HTTP/1.0" {
            connection.contains("keep-alive")
        } else {
            !connection.contains("close")
        };
        let req = Request { keep_alive, ..req };

        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
        let length = match req.header("content-length") {
            Some(v) => Some(v.parse::<u64>().map_err(|_| ReadError::Bad(400))?),
            None => None,
        };
        let has_body = chunked || length.is_some_and(|n| n > 0);
        if has_body
            && req
                .header("expect")
                .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            self.sock
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await?;
        }
        if chunked {
            loop {
                let line = self.read_line().await?;
                let size = line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size, 16).map_err(|_| ReadError::Bad(400))?;
                if size == 0 {
                    while !self.read_line().await?.is_empty() {}
                    break;
                }
                self.discard(size).await?;
                if !self.read_line().await?.is_empty() {
                    return Err(ReadError::Bad(400));
                }
            }
        } else if let Some(n) = length {
            self.discard(n).await?;
        }
        Ok(Some(req))
    }
}

enum After {
    KeepAlive,
    Close,
    Hang,
}

async fn serve_connection(shared: Arc<Shared>, sock: TcpStream) {
    let mut conn = Conn {
        sock,
        buf: Vec::new(),
    };
    loop {
        let req = match conn.read_request().await {
            Ok(Some(req)) => req,
            Ok(None) | Err(ReadError::Gone) => return,
            Err(ReadError::Bad(status)) => {
                let r =
                    Response::error(status, "UNSUPPORTED", "the fake could not read the request");
                let _ = write_response(&mut conn.sock, r, false, Mode::Normal, false).await;
                return;
            }
        };
        let plan = shared.plan(&req);
        match plan.action {
            Action::Respond => {}
            Action::Refuse => {
                let _ = conn.sock.shutdown().await;
                return;
            }
            Action::Hang => std::future::pending::<()>().await,
        }
        if let Some(d) = plan.delay {
            tokio::time::sleep(d).await;
        }
        let head_only = req.method == "HEAD";
        match write_response(
            &mut conn.sock,
            plan.response,
            head_only,
            plan.mode,
            req.keep_alive,
        )
        .await
        {
            Ok(After::KeepAlive) => {}
            Ok(After::Close) | Err(_) => return,
            Ok(After::Hang) => std::future::pending::<()>().await,
        }
    }
}

async fn write_response(
    sock: &mut TcpStream,
    r: Response,
    head_only: bool,
    mode: Mode,
    keep_alive: bool,
) -> std::io::Result<After> {
    let no_body = r.status < 200 || r.status == 204 || r.status == 304;
    let len = r.body.len();
    let mut head = format!("HTTP/1.1 {} {}\r\n", r.status, reason(r.status));
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !no_body {
        match mode {
            Mode::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
            Mode::Long if !head_only => head.push_str(&format!("Content-Length: {}\r\n", len / 2)),
            _ => head.push_str(&format!("Content-Length: {len}\r\n")),
        }
    }
    // A connection that will carry junk after the body is announced as closing, so a client
    // does not put it back in its pool (where the junk would fail an unrelated request).
    let normal = matches!(mode, Mode::Normal | Mode::Chunked | Mode::Slow(..));
    let junk_follows = matches!(mode, Mode::Long | Mode::Trailing(_));
    if (normal && !keep_alive) || junk_follows {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).await?;

    let finish = |keep_alive: bool| {
        if keep_alive {
            After::KeepAlive
        } else {
            After::Close
        }
    };
    if head_only || no_body {
        sock.flush().await?;
        if !keep_alive {
            let _ = sock.shutdown().await;
        }
        return Ok(finish(keep_alive));
    }
    // At most len - 1 bytes, so a cut body is always short.
    let cut = |n: usize| n.min(len.saturating_sub(1));
    let body = &r.body[..];
    match mode {
        Mode::Normal => sock.write_all(body).await?,
        Mode::Chunked => {
            for chunk in body.chunks(64 << 10) {
                sock.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                sock.write_all(chunk).await?;
                sock.write_all(b"\r\n").await?;
            }
            sock.write_all(b"0\r\n\r\n").await?;
        }
        Mode::Slow(chunk, delay) => {
            for (i, piece) in body.chunks(chunk).enumerate() {
                if i > 0 {
                    tokio::time::sleep(delay).await;
                }
                sock.write_all(piece).await?;
                sock.flush().await?;
            }
        }
        Mode::Short(n) => {
            sock.write_all(&body[..cut(n)]).await?;
            sock.flush().await?;
            let _ = sock.shutdown().await;
            return Ok(After::Close);
        }
        Mode::Long => {
            sock.write_all(body).await?;
            sock.write_all(&junk(LONG_EXTRA)).await?;
            sock.flush().await?;
            let _ = sock.shutdown().await;
            return Ok(After::Close);
        }
        Mode::Trailing(n) => {
            sock.write_all(body).await?;
            sock.write_all(&junk(n)).await?;
            sock.flush().await?;
            let _ = sock.shutdown().await;
            return Ok(After::Close);
        }
        Mode::Stall(n) => {
            sock.write_all(&body[..cut(n)]).await?;
            sock.flush().await?;
            return Ok(After::Hang);
        }
        Mode::Reset(n) => {
            sock.write_all(&body[..cut(n)]).await?;
            sock.flush().await?;
            tokio::time::sleep(RESET_PAUSE).await;
            let _ = sock.set_zero_linger();
            return Ok(After::Close); // dropping the socket now sends RST
        }
    }
    sock.flush().await?;
    if !keep_alive {
        let _ = sock.shutdown().await;
    }
    Ok(finish(keep_alive))
}

fn junk(n: usize) -> Vec<u8> {
    b"fake: bytes past the end of the body\r\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}
