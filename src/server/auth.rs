//! Optional client authentication: HTTP Basic checked against an htpasswd file with bcrypt
//! entries. bcrypt is slow on purpose (tens of milliseconds), so a successful check is
//! remembered for a few minutes under a hash of the credentials, never the credentials.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue, Response};

use super::body::Body;
use super::StartError;
use crate::error::{Error, ErrorCode};
use crate::reference::Digest;

pub struct ClientAuth {
    /// User name to bcrypt hash.
    users: HashMap<String, String>,
    /// Hashes of `user:password` pairs checked recently.
    verified: moka::sync::Cache<Digest, ()>,
    pub protect_metrics: bool,
}

impl ClientAuth {
    pub fn load(htpasswd: &Path, protect_metrics: bool) -> Result<ClientAuth, StartError> {
        let bad = |problem: String| StartError::file("auth.htpasswd", htpasswd, problem);
        let text = std::fs::read_to_string(htpasswd).map_err(|e| bad(e.to_string()))?;
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("line {}: not user:hash", n + 1)))?;
            if !hash.starts_with("$2") {
                return Err(bad(format!(
                    "line {}: only bcrypt entries are supported (htpasswd -B)",
                    n + 1
                )));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(ClientAuth {
            users,
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
            protect_metrics,
        })
    }

    /// Checks the request's Basic credentials.
    pub async fn check(&self, headers: &HeaderMap) -> bool {
        let Some((user, pass)) = basic_credentials(headers) else {
            return false;
        };
        let Some(hash) = self.users.get(&user).cloned() else {
            return false;
        };
        let key = Digest::sha256_of(format!("{user}\0{pass}\0{hash}").as_bytes());
        if self.verified.contains_key(&key) {
            return true;
        }
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(pass, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_string(), pass.to_string()))
}

/// The spec's 401: a challenge and the error envelope.
pub fn challenge() -> Response<Body> {
    let mut resp =
        Error::client(ErrorCode::Unauthorized, "authentication required").into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"ocicache\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn basic_credentials_are_checked_against_bcrypt() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(&file, format!("# users\nalice:{hash}\n")).unwrap();
        let auth = ClientAuth::load(&file, false).unwrap();
        let mut h = HeaderMap::new();
        assert!(!auth.check(&h).await);
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {}", enc("alice:s3cret")).parse().unwrap(),
        );
        assert!(auth.check(&h).await);
        assert!(auth.check(&h).await, "cached");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {}", enc("alice:wrong")).parse().unwrap(),
        );
        assert!(!auth.check(&h).await);
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {}", enc("bob:s3cret")).parse().unwrap(),
        );
        assert!(!auth.check(&h).await);
        h.insert(header::AUTHORIZATION, "Basic !!!".parse().unwrap());
        assert!(!auth.check(&h).await);
    }

    #[test]
    fn non_bcrypt_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("htpasswd");
        std::fs::write(&file, "alice:{SHA}abc\n").unwrap();
        assert!(ClientAuth::load(&file, false).is_err());
    }
}
