//! The fake's auth modes: Basic, or Bearer tokens from its own token service at `/token`;
//! the 401 and its `WWW-Authenticate` challenge for a request they do not let through.

use std::time::{Duration, Instant};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::http::{query_pairs, Request, Response};
use super::routing::Route;
use super::Store;

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

pub(super) struct Token {
    pub(super) expires: Instant,
    pub(super) repos: Vec<String>,
}

impl Store {
    /// The 401 for a registry request that the auth mode does not let through.
    pub(super) fn check_auth(
        &mut self,
        req: &Request,
        route: &Route,
        url: &str,
    ) -> Option<Response> {
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

    pub(super) fn challenge(&self, route: &Route, url: &str) -> Option<String> {
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

    pub(super) fn issue_token(&mut self, req: &Request) -> Response {
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
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (s, rest) = header.trim().split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then_some(rest)
}

pub(super) fn basic_matches(req: &Request, user: &str, pass: &str) -> bool {
    req.header("authorization")
        .and_then(|h| strip_scheme(h, "basic"))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .is_some_and(|d| d == format!("{user}:{pass}").as_bytes())
}
