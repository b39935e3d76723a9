//! The fake's normal answers: a request path to its endpoint, and what each endpoint
//! answers from the store (blobs with ranges, manifests, tag lists with pagination,
//! referrers, the token service).

use super::http::{percent_decode, query_pairs, Request, Response};
use super::{Shared, Store, OCI_INDEX};

pub(super) enum Route {
    Base,
    Token,
    Blob { repo: String, digest: String },
    Manifest { repo: String, reference: String },
    Tags { repo: String },
    Referrers { repo: String, digest: String },
    Other { repo: Option<String> },
}

impl Route {
    pub(super) fn parse(path: &str) -> Route {
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

    pub(super) fn repo(&self) -> Option<&str> {
        match self {
            Route::Blob { repo, .. }
            | Route::Manifest { repo, .. }
            | Route::Tags { repo }
            | Route::Referrers { repo, .. } => Some(repo),
            Route::Other { repo } => repo.as_deref(),
            Route::Base | Route::Token => None,
        }
    }

    pub(super) fn not_found_code(&self) -> &'static str {
        match self {
            Route::Blob { .. } => "BLOB_UNKNOWN",
            Route::Manifest { .. } | Route::Referrers { .. } => "MANIFEST_UNKNOWN",
            _ => "NAME_UNKNOWN",
        }
    }
}

impl Shared {
    /// The normal answer.
    pub(super) fn route(&self, req: &Request, route: &Route) -> Response {
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
