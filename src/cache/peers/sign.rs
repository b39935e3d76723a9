//! Signed peer requests: every request to a replica's peer endpoint carries the time it was
//! made and an HMAC-SHA256, keyed with the secret the replicas share, over its method, its
//! path with the query, and that time. The endpoint answers only a request whose signature
//! is right and whose time is within `WINDOW` of its own clock (a captured request cannot be
//! replayed later, and nothing in the request can be changed without the key).

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock;
use crate::config::Secret;

/// The request's time, in seconds since the epoch.
pub const TIME_HEADER: &str = "x-ocicache-peer-time";
/// The signature, in lower-case hex.
pub const SIGNATURE_HEADER: &str = "x-ocicache-peer-signature";
/// How far a request's time may be from the endpoint's clock, either way: a few seconds
/// cover the replicas' clock drift (NTP keeps it small) and the request's way there.
pub const WINDOW: Duration = Duration::from_secs(5);

/// Why a request was refused: all are a 401, with no bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("unsigned peer request")]
    Unsigned,
    #[error("peer request signed with another key, or altered")]
    BadSignature,
    #[error("peer request outside the replay window")]
    Stale,
}

/// The shared key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Key(Secret);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(REDACTED)")
    }
}

impl Key {
    pub fn new(secret: Secret) -> Key {
        Key(secret)
    }

    fn mac(&self, method: &str, path_and_query: &str, time: u64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.0 .0.as_bytes()).expect("HMAC takes any key");
        mac.update(method.as_bytes());
        mac.update(b"\n");
        mac.update(path_and_query.as_bytes());
        mac.update(b"\n");
        mac.update(time.to_string().as_bytes());
        mac
    }

    /// The headers that sign `method path_and_query` now: `(TIME_HEADER, time)` and
    /// `(SIGNATURE_HEADER, hex)`.
    pub fn sign(&self, method: &str, path_and_query: &str) -> [(&'static str, String); 2] {
        self.sign_at(method, path_and_query, clock::since_epoch().as_secs())
    }

    /// The headers that sign `method path_and_query` as made at `time` (seconds since the
    /// epoch): for tests of the window.
    pub fn sign_at(
        &self,
        method: &str,
        path_and_query: &str,
        time: u64,
    ) -> [(&'static str, String); 2] {
        let sig = self
            .mac(method, path_and_query, time)
            .finalize()
            .into_bytes();
        [
            (TIME_HEADER, time.to_string()),
            (SIGNATURE_HEADER, hex::encode(sig)),
        ]
    }

    /// Checks a request's signature (compared in constant time) and its time.
    pub fn verify(
        &self,
        method: &str,
        path_and_query: &str,
        time: Option<&str>,
        signature: Option<&str>,
    ) -> Result<(), Refused> {
        let (Some(time), Some(signature)) = (time, signature) else {
            return Err(Refused::Unsigned);
        };
        let time: u64 = time.parse().map_err(|_| Refused::BadSignature)?;
        let signature = hex::decode(signature).map_err(|_| Refused::BadSignature)?;
        self.mac(method, path_and_query, time)
            .verify_slice(&signature)
            .map_err(|_| Refused::BadSignature)?;
        let now = clock::since_epoch().as_secs();
        if now.abs_diff(time) > WINDOW.as_secs() {
            return Err(Refused::Stale);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::new(Secret(s.into()))
    }

    fn parts<'a>(h: &'a [(&'static str, String); 2]) -> (Option<&'a str>, Option<&'a str>) {
        (Some(h[0].1.as_str()), Some(h[1].1.as_str()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_signature_holds_for_its_request_within_the_window_only() {
        let k = key("0123456789abcdef-shared");
        let path = "/peer/v1/blobs/sha256:ab?upstream=docker.io&name=library/x";
        let signed = k.sign("GET", path);
        let (t, s) = parts(&signed);
        assert_eq!(k.verify("GET", path, t, s), Ok(()));

        // Another path, method or key: refused.
        let other = "/peer/v1/blobs/sha256:cd?upstream=docker.io&name=library/x";
        assert_eq!(k.verify("GET", other, t, s), Err(Refused::BadSignature));
        assert_eq!(k.verify("HEAD", path, t, s), Err(Refused::BadSignature));
        let wrong = key("another-key-of-16-bytes");
        assert_eq!(wrong.verify("GET", path, t, s), Err(Refused::BadSignature));
        // A time changed without the key: the signature no longer holds.
        let later = (clock::since_epoch().as_secs() + 1).to_string();
        assert_eq!(
            k.verify("GET", path, Some(&later), s),
            Err(Refused::BadSignature)
        );
        assert_eq!(k.verify("GET", path, None, s), Err(Refused::Unsigned));
        assert_eq!(k.verify("GET", path, t, None), Err(Refused::Unsigned));
        assert_eq!(
            k.verify("GET", path, t, Some("not hex")),
            Err(Refused::BadSignature)
        );

        // Replayed later: good until the window has passed, refused after.
        tokio::time::advance(WINDOW).await;
        assert_eq!(k.verify("GET", path, t, s), Ok(()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(k.verify("GET", path, t, s), Err(Refused::Stale));
        // A request from a clock ahead by more than the window is refused too.
        let ahead = (clock::since_epoch().as_secs() + WINDOW.as_secs() + 1).to_string();
        let sig = hex::encode(
            k.mac("GET", path, ahead.parse().unwrap())
                .finalize()
                .into_bytes(),
        );
        assert_eq!(
            k.verify("GET", path, Some(&ahead), Some(&sig)),
            Err(Refused::Stale)
        );
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let k = key("0123456789abcdef-shared");
        assert!(!format!("{k:?}").contains("0123"));
    }
}
