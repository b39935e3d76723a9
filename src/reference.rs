//! Validation of repository names, tags and digests per the OCI grammar.
//!
//! Every value that arrives from a client (a path segment of `/v2/<name>/...`,
//! a manifest reference, a blob digest) is parsed into one of the types here
//! *before* any disk or network I/O is done with it. The parsers are
//! hand-written byte-level state machines, so they never allocate beyond the
//! owned result, never panic, and reject anything that could be used for path
//! traversal (`..`, `%2e`, empty segments, absolute paths, ...), because the
//! grammars below simply do not admit those characters or shapes.
//!
//! Grammars (from the OCI distribution spec and the image spec's
//! `descriptor.md`):
//!
//! ```text
//! name      := [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*
//!              (at most 255 characters in total)
//! tag       := [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
//! digest    := algorithm ":" encoded
//! algorithm := component (separator component)*
//! component := [a-z0-9]+
//! separator := [+._-]
//! encoded   := [a-zA-Z0-9=_-]+
//! ```
//!
//! Of the digests that fit the general grammar only `sha256` (64 lowercase
//! hex characters) and `sha512` (128 lowercase hex characters) are accepted;
//! any other well-formed algorithm is reported as
//! [`ReferenceError::UnsupportedAlgorithm`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;

/// Longest repository name accepted, in bytes (all accepted names are ASCII).
const NAME_MAX_LEN: usize = 255;
/// Longest tag accepted: one leading character plus up to 127 more.
const TAG_MAX_LEN: usize = 128;
/// Inputs longer than this are rejected as digests before any other work.
const DIGEST_MAX_LEN: usize = 256;
/// Rejected input is echoed back in errors; cap how much of it, so that a
/// hostile megabyte-long path does not end up verbatim in every log line.
const ERROR_ECHO_MAX_LEN: usize = 300;

/// Why a name, tag or digest was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The repository name does not match the OCI name grammar.
    #[error("invalid repository name: {0:?}")]
    NameInvalid(String),
    /// The tag does not match the OCI tag grammar.
    #[error("invalid tag: {0:?}")]
    TagInvalid(String),
    /// The digest does not match the digest grammar, or its encoded part is
    /// not valid for its (supported) algorithm.
    #[error("invalid digest: {0:?}")]
    DigestInvalid(String),
    /// The digest is well-formed but names an algorithm other than sha256 or
    /// sha512. Carries the algorithm part.
    #[error("unsupported digest algorithm: {0:?}")]
    UnsupportedAlgorithm(String),
}

/// Copy of `s` for an error message, cut (on a character boundary) to at most
/// [`ERROR_ECHO_MAX_LEN`] bytes plus an ellipsis.
fn echo(s: &str) -> String {
    if s.len() <= ERROR_ECHO_MAX_LEN {
        return s.to_owned();
    }
    let mut end = ERROR_ECHO_MAX_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 3);
    out.push_str(&s[..end]);
    out.push('…');
    out
}

// ---------------------------------------------------------------------------
// Algorithm
// ---------------------------------------------------------------------------

/// A supported digest algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, hex-encoded as 64 lowercase characters.
    Sha256,
    /// SHA-512, hex-encoded as 128 lowercase characters.
    Sha512,
}

impl Algorithm {
    /// The algorithm identifier as written in a digest: `"sha256"` or `"sha512"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// Number of hex characters in the encoded part of a digest of this algorithm.
    pub fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    /// The algorithm with exactly this identifier, if it is supported.
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------
// Digest
// ---------------------------------------------------------------------------

/// A validated content digest such as `sha256:6c3c62...`.
///
/// The encoded part is always lowercase hex of exactly
/// [`Algorithm::hex_len`] characters, so the string form is canonical and
/// safe to use as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

/// `algorithm := component (separator component)*`, `component := [a-z0-9]+`,
/// `separator := [+._-]`.
fn is_digest_algorithm(s: &[u8]) -> bool {
    // `true` while the previous byte was a component character.
    let mut after_component = false;
    for &b in s {
        match b {
            b'a'..=b'z' | b'0'..=b'9' => after_component = true,
            b'+' | b'.' | b'_' | b'-' if after_component => after_component = false,
            _ => return false,
        }
    }
    after_component
}

/// `encoded := [a-zA-Z0-9=_-]+`.
fn is_digest_encoded(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
}

impl Digest {
    /// Parse and validate a digest string such as `sha256:<64 lowercase hex>`.
    ///
    /// Inputs longer than 256 bytes or not matching the general digest
    /// grammar yield [`ReferenceError::DigestInvalid`]; a well-formed digest
    /// of another algorithm yields [`ReferenceError::UnsupportedAlgorithm`];
    /// a sha256/sha512 digest whose encoded part is not exactly the right
    /// number of lowercase hex characters yields `DigestInvalid`.
    pub fn parse(s: &str) -> Result<Digest, ReferenceError> {
        let invalid = || ReferenceError::DigestInvalid(echo(s));
        if s.len() > DIGEST_MAX_LEN {
            return Err(invalid());
        }
        let (alg, encoded) = s.split_once(':').ok_or_else(invalid)?;
        if !is_digest_algorithm(alg.as_bytes()) || !is_digest_encoded(encoded.as_bytes()) {
            return Err(invalid());
        }
        let algorithm = Algorithm::parse(alg)
            .ok_or_else(|| ReferenceError::UnsupportedAlgorithm(alg.to_owned()))?;
        let lower_hex = encoded
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if encoded.len() != algorithm.hex_len() || !lower_hex {
            return Err(invalid());
        }
        Ok(Digest {
            algorithm,
            hex: encoded.to_owned(),
        })
    }

    /// The digest's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The encoded part: lowercase hex, without the `algorithm:` prefix.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(Algorithm::Sha256);
        hasher.update(bytes);
        hasher.finalize()
    }

    /// The digest of `bytes` with this digest's algorithm.
    pub fn of_same_kind(&self, bytes: &[u8]) -> Digest {
        let mut hasher = self.hasher();
        hasher.update(bytes);
        hasher.finalize()
    }

    /// Do `bytes` hash to this digest?
    pub fn matches(&self, bytes: &[u8]) -> bool {
        &self.of_same_kind(bytes) == self
    }

    /// A fresh hasher for this digest's algorithm, for verifying content
    /// against this digest: feed it the bytes and compare its result with
    /// `self`.
    pub fn hasher(&self) -> DigestHasher {
        DigestHasher::new(self.algorithm)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.algorithm.as_str())?;
        f.write_str(":")?;
        f.write_str(&self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// Incremental hasher producing a [`Digest`] of a chosen algorithm.
#[derive(Clone)]
pub struct DigestHasher {
    inner: HasherInner,
}

#[derive(Clone)]
enum HasherInner {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl DigestHasher {
    /// A hasher for `alg` that has seen no data yet.
    pub fn new(alg: Algorithm) -> Self {
        let inner = match alg {
            Algorithm::Sha256 => HasherInner::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => HasherInner::Sha512(sha2::Sha512::new()),
        };
        DigestHasher { inner }
    }

    /// Feed more content.
    pub fn update(&mut self, data: &[u8]) {
        match &mut self.inner {
            HasherInner::Sha256(h) => h.update(data),
            HasherInner::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed so far.
    pub fn finalize(self) -> Digest {
        match self.inner {
            HasherInner::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            HasherInner::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alg = match self.inner {
            HasherInner::Sha256(_) => Algorithm::Sha256,
            HasherInner::Sha512(_) => Algorithm::Sha512,
        };
        f.debug_struct("DigestHasher")
            .field("algorithm", &alg)
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Name
// ---------------------------------------------------------------------------

/// A validated repository name such as `library/nginx`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

/// Where the name parser is, relative to the grammar.
#[derive(Clone, Copy)]
enum NameState {
    /// At the start of a path component: a `[a-z0-9]` must follow.
    ComponentStart,
    /// Just read a `[a-z0-9]`: anything legal may follow, and the name may end.
    Alnum,
    /// Just read a `.` separator: a `[a-z0-9]` must follow.
    Dot,
    /// Just read one `_`: a `[a-z0-9]` or a second `_` must follow.
    Underscore,
    /// Just read `__`: a `[a-z0-9]` must follow.
    DoubleUnderscore,
    /// Just read one or more `-`: a `[a-z0-9]` or another `-` must follow.
    Dashes,
}

fn is_name(s: &[u8]) -> bool {
    use NameState::*;
    if s.len() > NAME_MAX_LEN {
        return false;
    }
    let mut state = ComponentStart;
    for &b in s {
        let alnum = matches!(b, b'a'..=b'z' | b'0'..=b'9');
        state = match (state, b) {
            _ if alnum => Alnum,
            (Alnum, b'.') => Dot,
            (Alnum, b'_') => Underscore,
            (Underscore, b'_') => DoubleUnderscore,
            (Alnum | Dashes, b'-') => Dashes,
            (Alnum, b'/') => ComponentStart,
            _ => return false,
        };
    }
    matches!(state, Alnum)
}

impl Name {
    /// Parse and validate a repository name.
    pub fn parse(s: &str) -> Result<Name, ReferenceError> {
        if is_name(s.as_bytes()) {
            Ok(Name(s.to_owned()))
        } else {
            Err(ReferenceError::NameInvalid(echo(s)))
        }
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `/`-separated path components, each non-empty and matching
    /// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` (so never `.` or `..`).
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl FromStr for Name {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::parse(s)
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// ---------------------------------------------------------------------------
// Tag
// ---------------------------------------------------------------------------

/// A validated tag such as `latest` or `1.25-alpine`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

fn is_tag(s: &[u8]) -> bool {
    match s.split_first() {
        Some((&first, rest)) => {
            s.len() <= TAG_MAX_LEN
                && (first.is_ascii_alphanumeric() || first == b'_')
                && rest
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => false,
    }
}

impl Tag {
    /// Parse and validate a tag.
    pub fn parse(s: &str) -> Result<Tag, ReferenceError> {
        if is_tag(s.as_bytes()) {
            Ok(Tag(s.to_owned()))
        } else {
            Err(ReferenceError::TagInvalid(echo(s)))
        }
    }

    /// The tag as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl FromStr for Tag {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tag::parse(s)
    }
}

impl AsRef<str> for Tag {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

// ---------------------------------------------------------------------------
// Reference
// ---------------------------------------------------------------------------

/// The `<reference>` of `/v2/<name>/manifests/<reference>`: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl Reference {
    /// Parse a reference: anything containing a `:` must be a digest (tags
    /// cannot contain `:`), anything else must be a tag.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            Digest::parse(s).map(Reference::Digest)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => fmt::Display::fmt(t, f),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

// ---------------------------------------------------------------------------
// serde: each type is its string form, validated again on the way in.
// ---------------------------------------------------------------------------

macro_rules! serde_as_validated_string {
    ($ty:ty, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Visitor;
                impl serde::de::Visitor<'_> for Visitor {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$ty, E> {
                        <$ty>::parse(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(Visitor)
            }
        }
    };
}

serde_as_validated_string!(Digest, "an OCI digest string such as \"sha256:<hex>\"");
serde_as_validated_string!(Name, "an OCI repository name");
serde_as_validated_string!(Tag, "an OCI tag");
serde_as_validated_string!(Reference, "an OCI tag or digest");

#[cfg(test)]
mod tests;
