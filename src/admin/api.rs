//! The admin API's endpoints: each takes the parsed request and answers JSON, or an error
//! that `mod.rs` writes in the OCI envelope.

use std::sync::Arc;
use std::time::SystemTime;

use http::{Response, StatusCode};
use serde::Serialize;

use super::{json, Admin};
use crate::cache::inventory::{references, rfc3339, FillStatus, ImageDigests};
use crate::cache::pins::{Pin, PinKey, PinOwner, PinnedImage};
use crate::error::{Error, ErrorCode};
use crate::reference::{Digest, Name, Reference, Tag};
use crate::route;
use crate::server::body::Body;
use crate::upstream::Upstream;

/// `GET /api/v1/cache`.
#[derive(Debug, Serialize)]
pub struct CacheReport {
    /// Bytes in the local tier's index.
    pub size: u64,
    /// `cache.max_size`.
    pub max_size: u64,
    /// Blobs (and manifests) in the index.
    pub blobs: u64,
    /// Bytes of pinned blobs (counted in `size`), and whether they alone exceed the bound.
    pub pinned_bytes: u64,
    pub pins_over_bound: bool,
    /// Whether the index's rebuild at start is done (until then `size` may be short).
    pub index_scan_done: bool,
    pub fills: Vec<FillStatus>,
    /// Requests answered from the cache and from elsewhere since start (blobs, manifests,
    /// tags), and hits / (hits + misses), `null` before any.
    pub hits: u64,
    pub misses: u64,
    pub hit_ratio: Option<f64>,
    /// Body bytes sent to clients since start, by source: `cache`, `upstream`, `bucket`.
    pub served_bytes: std::collections::BTreeMap<&'static str, u64>,
    /// When this report was made.
    #[serde(with = "crate::cache::inventory::rfc3339")]
    pub at: SystemTime,
}

pub async fn cache(admin: &Arc<Admin>) -> Result<Response<Body>, Error> {
    let cache = &admin.state.cache;
    let metrics = &admin.state.metrics;
    let (size, blobs) = cache.usage();
    let (pinned_bytes, pins_over_bound) = cache.index.pinned_usage();
    let (hits, misses) = metrics.hits_and_misses();
    let report = CacheReport {
        size,
        max_size: cache.index.max_size(),
        blobs,
        pinned_bytes,
        pins_over_bound,
        index_scan_done: cache.index.scan_done(),
        fills: cache.fills_status(),
        hits,
        misses,
        hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
        served_bytes: metrics.served_bytes_by_source().into_iter().collect(),
        at: crate::clock::now(),
    };
    Ok(json(StatusCode::OK, &report))
}

/// An image named by an admin path, `<upstream>/<name>/<tag or digest>`: validated like
/// the public API (the upstream must be configured; Docker Hub's one-component names get
/// `library/`).
pub struct ImagePath {
    pub upstream: Arc<Upstream>,
    pub name: Name,
    pub reference: Reference,
}

impl ImagePath {
    pub fn parse(admin: &Admin, segments: &[&str]) -> Result<ImagePath, Error> {
        let [upstream, name @ .., reference] = segments else {
            return Err(Error::client(
                ErrorCode::NameInvalid,
                "expected <upstream>/<name>/<tag or digest>",
            ));
        };
        if name.is_empty() {
            return Err(Error::client(
                ErrorCode::NameInvalid,
                "expected <upstream>/<name>/<tag or digest>",
            ));
        }
        let upstreams = &admin.state.upstreams;
        let target = route::resolve(upstreams, Some(upstream), &name.join("/"))?;
        Ok(ImagePath {
            upstream: upstreams.0[target.upstream].clone(),
            name: target.name,
            reference: route::reference(reference)?,
        })
    }

    pub fn pin_key(&self) -> PinKey {
        PinKey {
            upstream: self.upstream.name.clone(),
            name: self.name.clone(),
            reference: self.reference.clone(),
        }
    }
}

/// `GET /api/v1/pins`.
pub fn pins(admin: &Arc<Admin>) -> Result<Response<Body>, Error> {
    Ok(json(StatusCode::OK, &admin.state.cache.pins()))
}

/// `PUT /api/v1/pins/<upstream>/<name>/<tag or digest>`: resolves the image (asking the
/// upstream if the cache cannot answer) and pins every digest of it. Its blobs are fetched
/// by pulls (or a prefetch) and kept from then on.
pub async fn pin(admin: &Arc<Admin>, segments: &[&str]) -> Result<Response<Body>, Error> {
    let image = ImagePath::parse(admin, segments)?;
    let state = &admin.state;
    let (digests, _) = state
        .manifests
        .resolve_image(&image.upstream, &image.name, &image.reference)
        .await?;
    let pin = Pin {
        key: image.pin_key(),
        image: PinnedImage {
            manifests: digests.manifests,
            blobs: digests.blobs,
            pinned_at: crate::clock::now(),
            set_by: PinOwner::Operator,
        },
    };
    let (cache, key, kept) = (state.cache.clone(), pin.key.clone(), pin.image.clone());
    // The pins file is written and fsynced: off the runtime's workers.
    tokio::task::spawn_blocking(move || cache.pin(key, kept))
        .await
        .map_err(std::io::Error::other)??;
    tracing::info!(upstream = %pin.key.upstream, name = %pin.key.name, reference = %pin.key.reference, "pinned");
    Ok(json(StatusCode::OK, &pin))
}

/// `DELETE /api/v1/pins/<upstream>/<name>/<tag or digest>`.
pub async fn unpin(admin: &Arc<Admin>, segments: &[&str]) -> Result<Response<Body>, Error> {
    let key = ImagePath::parse(admin, segments)?.pin_key();
    let (cache, k) = (admin.state.cache.clone(), key.clone());
    let found = tokio::task::spawn_blocking(move || cache.unpin(&k))
        .await
        .map_err(std::io::Error::other)??;
    if !found {
        return Err(Error::client(ErrorCode::ManifestUnknown, "not pinned"));
    }
    tracing::info!(upstream = %key.upstream, name = %key.name, reference = %key.reference, "unpinned");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "unpinned": key }),
    ))
}

/// One cached image of `GET /api/v1/images`: a tag (with its record) or a manifest cached
/// by digest that no tag names and no cached index holds (upstream and name unknown).
#[derive(Debug, Serialize)]
pub struct ImageEntry {
    pub upstream: Option<String>,
    pub name: Option<Name>,
    pub tag: Option<Tag>,
    pub digest: Digest,
    pub media_type: Option<String>,
    /// Bytes of the image's manifests and blobs in the local tier.
    pub size: u64,
    /// When the upstream last confirmed the tag.
    #[serde(with = "rfc3339::option")]
    pub confirmed: Option<SystemTime>,
    /// When a client last pulled the manifest (kept in memory only: `null` after a restart
    /// until the next pull).
    #[serde(with = "rfc3339::option")]
    pub last_pulled: Option<SystemTime>,
    /// Whether a pin keeps the manifest.
    pub pinned: bool,
    /// The page position of this entry: what `last` takes to continue after it.
    pub key: String,
}

/// A page of `GET /api/v1/images`.
#[derive(Debug, Serialize)]
pub struct ImagesPage {
    pub images: Vec<ImageEntry>,
    /// The `last` of the next page, `null` at the end (also in a `Link` header).
    pub next: Option<String>,
}

/// The entries per page when `n` is not given, and the most `n` may ask for.
const PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

/// `GET /api/v1/images?upstream=&name=&n=&last=`: the cached tags and manifests, ordered
/// by `key`, paginated like tag lists.
pub async fn images(admin: &Arc<Admin>, query: &str) -> Result<Response<Body>, Error> {
    let param = |k| route::query_param(Some(query), k).filter(|v| !v.is_empty());
    let n = match param("n") {
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| Error::client(ErrorCode::PaginationNumberInvalid, "n must be a number"))?,
        None => PAGE,
    }
    .min(MAX_PAGE);
    let upstream = param("upstream");
    let name = match (&upstream, param("name")) {
        (Some(up), Some(name)) => {
            let upstreams = &admin.state.upstreams;
            Some(route::resolve(upstreams, Some(up), &name)?.name)
        }
        (None, Some(name)) => Some(Name::parse(&name)?),
        (_, None) => None,
    };
    let last = param("last");
    let state = &admin.state;
    let mut entries: Vec<ImageEntry> = state
        .manifests
        .cached_tags()
        .await?
        .into_iter()
        .filter(|t| upstream.as_ref().map_or(true, |u| *u == t.upstream))
        .filter(|t| name.as_ref().map_or(true, |n| *n == t.name))
        .map(|t| ImageEntry {
            key: format!("{}/{}:{}", t.upstream, t.name, t.tag),
            upstream: Some(t.upstream),
            name: Some(t.name),
            tag: Some(t.tag),
            digest: t.digest,
            media_type: Some(t.media_type),
            size: 0,
            confirmed: Some(t.confirmed),
            last_pulled: None,
            pinned: false,
        })
        .collect();
    if upstream.is_none() && name.is_none() {
        entries.extend(untagged(admin, &entries).await?);
    }
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    entries.retain(|e| last.as_ref().map_or(true, |l| e.key.as_str() > l.as_str()));
    let more = entries.len() > n;
    entries.truncate(n);
    for e in &mut entries {
        let image = cached_image(admin, &e.digest).await;
        e.size = state.cache.cached_bytes(&image);
        e.last_pulled = state.manifests.last_pulled(&e.digest);
        e.pinned = state.cache.is_pinned(&e.digest);
    }
    let next = more
        .then(|| entries.last().map(|e| e.key.clone()))
        .flatten();
    let mut resp = json(
        StatusCode::OK,
        &ImagesPage {
            images: entries,
            next: next.clone(),
        },
    );
    if let Some(next) = &next {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("n", &n.to_string()).append_pair("last", next);
        if let Some(u) = &upstream {
            q.append_pair("upstream", u);
        }
        if let Some(name) = &name {
            q.append_pair("name", name.as_str());
        }
        let link = format!("</api/v1/images?{}>; rel=\"next\"", q.finish());
        if let Ok(v) = http::HeaderValue::from_str(&link) {
            resp.headers_mut().insert(http::header::LINK, v);
        }
    }
    Ok(resp)
}

/// The digests of the image whose manifest is `digest`, from the local tier alone (what
/// is not cached is not asked for).
async fn cached_image(admin: &Admin, digest: &Digest) -> ImageDigests {
    let cache = &admin.state.cache;
    let max = admin.state.manifests.max_size();
    let Some(bytes) = cache.local_manifest(digest, max).await else {
        return ImageDigests {
            manifests: vec![digest.clone()],
            blobs: vec![],
        };
    };
    let walked = ImageDigests::walk(digest, &bytes, |d| async move {
        Ok::<_, Error>(cache.local_manifest(&d, max).await)
    })
    .await;
    walked.expect("reading the cache alone does not fail")
}

/// The manifests cached by digest that no tag in `tagged` names and no cached index holds.
async fn untagged(admin: &Admin, tagged: &[ImageEntry]) -> Result<Vec<ImageEntry>, Error> {
    let cache = &admin.state.cache;
    let max = admin.state.manifests.max_size();
    let manifests = cache.cached_manifests().await?;
    let mut children = std::collections::HashSet::new();
    for d in &manifests {
        if let Some(bytes) = cache.local_manifest(d, max).await {
            children.extend(references(&bytes).0);
        }
    }
    let named: std::collections::HashSet<&Digest> = tagged.iter().map(|e| &e.digest).collect();
    Ok(manifests
        .into_iter()
        .filter(|d| !named.contains(d) && !children.contains(d))
        .map(|d| ImageEntry {
            key: format!("@{d}"),
            upstream: None,
            name: None,
            tag: None,
            media_type: cache.store.media_type(&d),
            digest: d,
            size: 0,
            confirmed: None,
            last_pulled: None,
            pinned: false,
        })
        .collect())
}

/// What a `DELETE` did.
#[derive(Debug, Default, Serialize)]
pub struct Deleted {
    /// Tags forgotten (`upstream/name:tag`): their next pull asks the upstream.
    pub tags: Vec<String>,
    /// Manifests and blobs removed from the local tier (and, with `purge_shared`, from the
    /// bucket).
    pub digests: Vec<Digest>,
    /// Digests of the image kept: another cached manifest or tag refers to them, or a pin
    /// holds them.
    pub kept: Vec<Digest>,
    /// Removed, but a fill of it was under way: it lands again when the fill is done.
    pub filling: Vec<Digest>,
}

/// The `purge_shared` parameter: also remove from the bucket.
fn purge_shared(query: &str) -> Result<bool, Error> {
    match route::query_param(Some(query), "purge_shared").as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(v) => Err(super::bad_request(format!(
            "purge_shared must be true or false, not {v:?}"
        ))),
    }
}

/// `DELETE /api/v1/tags/<upstream>/<name>/<tag>`: forgets the tag's record.
pub async fn delete_tag(
    admin: &Arc<Admin>,
    segments: &[&str],
    query: &str,
) -> Result<Response<Body>, Error> {
    let image = ImagePath::parse(admin, segments)?;
    let shared = purge_shared(query)?;
    let Reference::Tag(tag) = &image.reference else {
        return Err(Error::client(
            ErrorCode::ManifestInvalid,
            "a tag, not a digest: DELETE /api/v1/images/... removes a manifest",
        ));
    };
    let up = &image.upstream.name;
    if admin
        .state
        .manifests
        .forget_tag(up, &image.name, tag, shared)
        .await
        .is_none()
    {
        return Err(Error::client(
            ErrorCode::ManifestUnknown,
            "no such cached tag",
        ));
    }
    tracing::info!(upstream = %up, name = %image.name, %tag, shared, "tag forgotten");
    let deleted = Deleted {
        tags: vec![format!("{up}/{}:{tag}", image.name)],
        ..Deleted::default()
    };
    Ok(json(StatusCode::OK, &deleted))
}

/// `DELETE /api/v1/images/<upstream>/<name>/<tag or digest>`: forgets the image's tags (of
/// this repository) and removes its manifests and blobs, except what another cached
/// manifest or tag refers to or a pin holds.
pub async fn delete_image(
    admin: &Arc<Admin>,
    segments: &[&str],
    query: &str,
) -> Result<Response<Body>, Error> {
    let image = ImagePath::parse(admin, segments)?;
    let shared = purge_shared(query)?;
    let state = &admin.state;
    let up = image.upstream.name.clone();
    let tags = state.manifests.cached_tags().await?;
    let top = match &image.reference {
        Reference::Digest(d) => d.clone(),
        Reference::Tag(t) => tags
            .iter()
            .find(|c| c.upstream == up && c.name == image.name && c.tag == *t)
            .map(|c| c.digest.clone())
            .ok_or_else(|| Error::client(ErrorCode::ManifestUnknown, "no such cached tag"))?,
    };
    let max = state.manifests.max_size();
    let known = state.cache.local_manifest(&top, max).await.is_some()
        || tags.iter().any(|c| c.digest == top);
    if !known {
        return Err(Error::client(
            ErrorCode::ManifestUnknown,
            "no such cached image",
        ));
    }
    // The tags of this repository that name it go; the others keep what they name.
    let (going, staying): (Vec<_>, Vec<_>) = tags
        .into_iter()
        .partition(|c| c.upstream == up && c.name == image.name && c.digest == top);
    let mut deleted = Deleted::default();
    for t in &going {
        state
            .manifests
            .forget_tag(&up, &t.name, &t.tag, shared)
            .await;
        deleted.tags.push(format!("{up}/{}:{}", t.name, t.tag));
    }
    let candidates = cached_image(admin, &top).await;
    let referenced = referenced_elsewhere(admin, &candidates, &staying).await?;
    for d in candidates.all() {
        if referenced.contains(d) || state.cache.is_pinned(d) {
            deleted.kept.push(d.clone());
            continue;
        }
        remove(admin, d, shared, &mut deleted).await;
    }
    tracing::info!(upstream = %up, name = %image.name, reference = %image.reference, removed = deleted.digests.len(), kept = deleted.kept.len(), shared, "image deleted");
    Ok(json(StatusCode::OK, &deleted))
}

/// Removes one digest through the cache (and the manifests service's memory), noting it.
async fn remove(admin: &Admin, d: &Digest, shared: bool, deleted: &mut Deleted) {
    let state = &admin.state;
    state.manifests.forget_manifest(d);
    if state.cache.filling(d) {
        deleted.filling.push(d.clone());
    }
    if state.cache.remove_blob(d, shared).await || shared {
        deleted.digests.push(d.clone());
    }
}

/// Of the digests of `image`, those another cached manifest (not itself one of the image's
/// that goes) or a remaining tag refers to. A manifest of the image that something else
/// refers to stays, and with it what it refers to: repeated until nothing changes.
async fn referenced_elsewhere(
    admin: &Admin,
    image: &ImageDigests,
    staying: &[crate::manifests::CachedTag],
) -> Result<std::collections::HashSet<Digest>, Error> {
    let cache = &admin.state.cache;
    let max = admin.state.manifests.max_size();
    let mut refs = std::collections::HashMap::new();
    for m in cache.cached_manifests().await? {
        if let Some(bytes) = cache.local_manifest(&m, max).await {
            let (children, blobs) = references(&bytes);
            refs.insert(m, [children, blobs].concat());
        }
    }
    let mut going: std::collections::HashSet<&Digest> = image.manifests.iter().collect();
    loop {
        let mut referenced: std::collections::HashSet<Digest> =
            staying.iter().map(|t| t.digest.clone()).collect();
        for (m, r) in &refs {
            if !going.contains(m) {
                referenced.extend(r.iter().cloned());
            }
        }
        let before = going.len();
        going.retain(|m| !referenced.contains(*m));
        if going.len() == before {
            return Ok(referenced);
        }
    }
}

/// `DELETE /api/v1/blobs/<digest>`: removes one blob (or manifest) from the cache. A
/// pinned one is refused: unpin it first.
pub async fn delete_blob(
    admin: &Arc<Admin>,
    digest: &str,
    query: &str,
) -> Result<Response<Body>, Error> {
    let digest = route::digest(digest)?;
    let shared = purge_shared(query)?;
    if admin.state.cache.is_pinned(&digest) {
        return Err(super::bad_request(
            "a pin holds this blob: unpin its image first",
        ));
    }
    let mut deleted = Deleted::default();
    remove(admin, &digest, shared, &mut deleted).await;
    if deleted.digests.is_empty() && deleted.filling.is_empty() {
        return Err(Error::client(ErrorCode::BlobUnknown, "blob not cached"));
    }
    tracing::info!(%digest, shared, "blob deleted");
    Ok(json(StatusCode::OK, &deleted))
}

/// `GET /api/v1/jobs/<id>`.
pub fn job(admin: &Arc<Admin>, id: &str) -> Result<Response<Body>, Error> {
    let job = id
        .parse()
        .ok()
        .and_then(|id| admin.jobs.get(id))
        .ok_or_else(|| Error::client(ErrorCode::NameUnknown, "no such job"))?;
    Ok(json(StatusCode::OK, &job))
}

/// A job's answer: 202 with the job, and where to follow it.
fn accepted(job: &super::jobs::JobView) -> Response<Body> {
    let mut resp = json(StatusCode::ACCEPTED, job);
    if let Ok(v) = http::HeaderValue::from_str(&format!("/api/v1/jobs/{}", job.id)) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    resp
}

/// Runs `f` on a thread of its own (a walk of the whole cache blocks for seconds to hours:
/// no work for the runtime's blocking pool) and waits for it.
async fn on_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| e.to_string())?;
    rx.await
        .map_err(|_| format!("the {name} thread ended abnormally"))?
}

/// `POST /api/v1/verify`: rehashes every cached blob beside the fills, as a job; corrupt
/// ones are removed through the cache.
pub fn verify(admin: &Arc<Admin>) -> Response<Body> {
    let cache = admin.state.cache.clone();
    let job = admin.jobs.start("verify", move |reporter| {
        on_thread("admin-verify", move || {
            cache
                .verify_blobs(|checked, total| {
                    if checked % 100 == 0 || checked == total {
                        reporter
                            .progress(serde_json::json!({ "checked": checked, "total": total }));
                    }
                })
                .map_err(|e| e.to_string())
        })
    });
    accepted(&job)
}

/// The body of `POST /api/v1/gc`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Target size, e.g. `"10GiB"`; default `cache.max_size`.
    pub size: Option<String>,
}

/// `POST /api/v1/gc`: evicts least recently used, unpinned blobs down to the target, as a
/// job, through the index (fills under way are untouched).
pub fn gc(admin: &Arc<Admin>, req: GcRequest) -> Result<Response<Body>, Error> {
    let cache = admin.state.cache.clone();
    let target = match &req.size {
        Some(s) => {
            s.parse::<crate::config::ByteSize>()
                .map_err(|e| super::bad_request(format!("size: {e}")))?
                .0
        }
        None => cache.index.max_size(),
    };
    let job = admin.jobs.start("gc", move |_| {
        on_thread("admin-gc", move || {
            let (removed, freed, remaining) = cache.gc_to(target);
            Ok(serde_json::json!({
                "removed": removed, "freed": freed, "remaining": remaining, "target": target
            }))
        })
    });
    Ok(accepted(&job))
}

/// The body of `POST /api/v1/prefetch`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    /// Images as users write them: `nginx:1.27`, `ghcr.io/owner/app@sha256:...`.
    pub images: Vec<String>,
    /// Only these platforms of an index (`os/arch[/variant]`); none: every platform.
    #[serde(default)]
    pub platforms: Vec<String>,
}

/// One image of a prefetch job's result.
#[derive(Debug, Serialize)]
pub struct Prefetched {
    pub image: String,
    /// What it resolved to and fetched, once done.
    pub warmed: Option<crate::warm::Warmed>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A prefetch job's progress.
#[derive(Debug, Serialize)]
struct PrefetchProgress<'a> {
    images_done: usize,
    images_total: usize,
    current: &'a str,
    image: crate::warm::Progress,
}

/// `POST /api/v1/prefetch` `{"images": [...], "platforms": [...]}`: fetches the images
/// into the cache inside the server (`warm`: the paths a pull takes), one after the other,
/// as a job. Every image is validated, and its registry must be configured, before the job
/// starts.
pub fn prefetch(admin: &Arc<Admin>, req: PrefetchRequest) -> Result<Response<Body>, Error> {
    if req.images.is_empty() {
        return Err(super::bad_request("images: at least one image is needed"));
    }
    let mut images = Vec::new();
    for text in &req.images {
        let image = crate::prefetch::ImageRef::parse(text)
            .map_err(|e| Error::client(ErrorCode::NameInvalid, e.to_string()))?;
        route::resolve(
            &admin.state.upstreams,
            Some(&image.registry),
            image.name.as_str(),
        )?;
        images.push((text.clone(), image));
    }
    for p in &req.platforms {
        let parts: Vec<&str> = p.split('/').collect();
        let ok = (2..=3).contains(&parts.len())
            && parts.iter().all(|c| {
                !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
        if !ok {
            return Err(super::bad_request(format!(
                "platforms: {p:?} is not os/arch[/variant]"
            )));
        }
    }
    let state = admin.state.clone();
    let platforms = req.platforms;
    let job = admin.jobs.start("prefetch", move |reporter| async move {
        let total = images.len();
        let mut results = Vec::new();
        for (done, (text, image)) in images.into_iter().enumerate() {
            let (tx, mut rx) = tokio::sync::watch::channel(crate::warm::Progress::default());
            let warm = crate::warm::warm(&state, &image, &platforms, Some(&tx));
            tokio::pin!(warm);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut warm => break outcome,
                    Ok(()) = rx.changed() => reporter.progress(PrefetchProgress {
                        images_done: done,
                        images_total: total,
                        current: &text,
                        image: rx.borrow_and_update().clone(),
                    }),
                }
            };
            let (warmed, error) = match outcome {
                Ok(w) => (Some(w), None),
                Err(e) => (None, Some(e.to_string())),
            };
            results.push(Prefetched {
                image: text,
                warmed,
                error,
            });
        }
        let failed = results.iter().filter(|r| r.error.is_some()).count();
        Ok::<_, String>(serde_json::json!({ "images": results, "failed": failed }))
    });
    Ok(accepted(&job))
}
