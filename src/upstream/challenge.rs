//! `WWW-Authenticate` challenges and registry token responses.
//!
//! An upstream registry answers an anonymous request with `401` and a
//! `WWW-Authenticate` header such as
//! `Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull"`.
//! [`parse`] turns that header into [`Challenge`]s; the client then asks the
//! realm for a token and reads the answer with [`parse_token_response`].
//!
//! Both inputs come from the network and are untrusted: the parsers never
//! panic, do work linear in their (bounded) input, and skip what they cannot
//! understand instead of failing the whole header.

use std::fmt;
use std::time::Duration;

/// Longest `WWW-Authenticate` value [`parse`] looks at; a longer one yields
/// no challenge at all.
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// Most challenges [`parse`] returns from one header; later ones are ignored.
pub const MAX_CHALLENGES: usize = 16;

/// Most parameters kept for one challenge; later ones are parsed and dropped.
pub const MAX_PARAMS: usize = 32;

/// Largest token endpoint body [`parse_token_response`] accepts.
pub const MAX_TOKEN_RESPONSE_LEN: usize = 1024 * 1024;

/// Lifetime assumed when the token response has no usable `expires_in`, and
/// the shortest one accepted (the Docker token spec's minimum).
pub const MIN_EXPIRES_IN: Duration = Duration::from_secs(60);

/// Longest lifetime accepted. Longer values are cut down to it so that a
/// hostile `expires_in` cannot make `Instant::now() + expires_in` overflow,
/// nor pin a token for years; refreshing a still-valid token once a day
/// costs nothing.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(24 * 60 * 60);

/// One authentication challenge: a scheme and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme, ASCII-lowercased (`"bearer"`, `"basic"`, ...).
    pub scheme: String,
    /// The auth-params in header order: names ASCII-lowercased, values with
    /// quotes removed and backslash escapes resolved, otherwise verbatim.
    pub params: Vec<(String, String)>,
}

impl Challenge {
    /// Value of the first parameter called `name` (case-insensitively).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Parse a `WWW-Authenticate` header value (RFC 9110 §11.6.1).
///
/// The value holds one or more comma-separated challenges, each
/// `scheme [ 1*SP ( token68 / #auth-param ) ]`, where an auth-param is
/// `name = value` with optional whitespace around `=` and a value that is
/// either a token or a quoted-string with backslash escapes. Commas inside
/// quoted-strings do not separate anything.
///
/// Leniencies and limits:
/// - Something that is neither a challenge nor a parameter (a stray quote,
///   `name=` without a value, text after a closing quote, ...) is skipped up
///   to the next top-level comma; the rest of the header is still parsed.
/// - Empty list elements (`, ,`) are ignored, and parameters following a
///   scheme after a comma (`Basic, realm="x"`) belong to that scheme.
/// - A token68 (as in `Negotiate abc==`) is recognised so it is not
///   mistaken for anything else, but not kept: registries never use it.
/// - A value longer than [`MAX_HEADER_LEN`] bytes yields an empty `Vec`; at
///   most [`MAX_CHALLENGES`] challenges of at most [`MAX_PARAMS`] parameters
///   each are returned.
pub fn parse(header: &str) -> Vec<Challenge> {
    let mut challenges = Vec::new();
    if header.len() > MAX_HEADER_LEN {
        return challenges;
    }
    let mut cur = Cursor {
        s: header.as_bytes(),
        pos: 0,
    };
    cur.skip_separators();
    while !cur.at_end() && challenges.len() < MAX_CHALLENGES {
        match cur.challenge() {
            Some(challenge) => challenges.push(challenge),
            None => cur.skip_item(),
        }
        cur.skip_separators();
    }
    challenges
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The characters of a token68, before its trailing `=` padding.
fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

/// `qdtext` and the second byte of a `quoted-pair`: HTAB, SP, VCHAR and
/// obs-text (any byte of a non-ASCII UTF-8 character).
fn is_quotable(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// A position in the header. Every method only moves forward, by at most
/// the length of the input, so parsing is linear.
struct Cursor<'a> {
    s: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Some(b)
    }

    fn skip_while(&mut self, pred: impl Fn(u8) -> bool) -> usize {
        let start = self.pos;
        while self.peek().is_some_and(&pred) {
            self.pos += 1;
        }
        self.pos - start
    }

    /// Skip optional whitespace; returns how much there was.
    fn skip_ows(&mut self) -> usize {
        self.skip_while(|b| b == b' ' || b == b'\t')
    }

    /// Skip whitespace and commas, i.e. list separators and empty elements.
    fn skip_separators(&mut self) {
        self.skip_while(|b| b == b' ' || b == b'\t' || b == b',');
    }

    /// `1*tchar`.
    fn token(&mut self) -> Option<&'a str> {
        let start = self.pos;
        if self.skip_while(is_tchar) == 0 {
            return None;
        }
        // Only ASCII bytes were consumed, so this is a char boundary and
        // cannot fail; no unwrap all the same.
        std::str::from_utf8(&self.s[start..self.pos]).ok()
    }

    /// A quoted-string starting at the current `"`, unescaped.
    fn quoted_string(&mut self) -> Option<String> {
        if self.bump()? != b'"' {
            return None;
        }
        let mut value = Vec::new();
        loop {
            match self.bump()? {
                b'"' => break,
                b'\\' => {
                    let b = self.bump()?;
                    if !is_quotable(b) {
                        return None;
                    }
                    value.push(b);
                }
                b if is_quotable(b) => value.push(b),
                _ => return None,
            }
        }
        // Only ASCII backslashes and quotes were removed from valid UTF-8,
        // so this cannot fail.
        String::from_utf8(value).ok()
    }

    /// Skip the rest of a list element: up to (not past) the next comma that
    /// is not inside a quoted-string, or the end.
    fn skip_item(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b',' => return,
                b'"' => {
                    self.pos += 1;
                    while let Some(b) = self.bump() {
                        match b {
                            b'"' => break,
                            b'\\' => {
                                self.bump();
                            }
                            _ => {}
                        }
                    }
                }
                _ => self.pos += 1,
            }
        }
    }

    /// True when the element here is at its end: only whitespace before a
    /// comma or the end of the header. Consumes the whitespace.
    fn element_ends(&mut self) -> bool {
        self.skip_ows();
        matches!(self.peek(), None | Some(b','))
    }

    /// A token68 filling the rest of the element. Leaves the cursor where it
    /// was if there is none.
    ///
    /// `realm=` alone is a valid token68, but when auth-params follow it is
    /// far more likely a parameter with a missing value (as in
    /// `Bearer realm=, service="s"`), so it is not taken as a token68 then.
    fn token68(&mut self) -> bool {
        let start = self.pos;
        if self.skip_while(is_token68_char) > 0 {
            self.skip_while(|b| b == b'=');
            if self.element_ends() {
                let end = self.pos;
                self.skip_separators();
                let params_follow = !self.at_end() && self.looks_like_param();
                if !params_follow {
                    self.pos = end;
                    return true;
                }
            }
        }
        self.pos = start;
        false
    }

    /// Whether the element here starts like an auth-param (`token BWS "="`),
    /// as opposed to a new challenge. Does not move the cursor.
    fn looks_like_param(&mut self) -> bool {
        let start = self.pos;
        let found = self.token().is_some() && {
            self.skip_ows();
            self.peek() == Some(b'=')
        };
        self.pos = start;
        found
    }

    /// `token BWS "=" BWS ( token / quoted-string )` filling the element.
    fn param(&mut self) -> Option<(String, String)> {
        let name = self.token()?.to_ascii_lowercase();
        self.skip_ows();
        if self.bump()? != b'=' {
            return None;
        }
        self.skip_ows();
        let value = if self.peek()? == b'"' {
            self.quoted_string()?
        } else {
            self.token()?.to_owned()
        };
        self.element_ends().then_some((name, value))
    }

    /// One list element that should be an auth-param: keep it if it is one,
    /// skip it otherwise.
    fn param_element(&mut self, params: &mut Vec<(String, String)>) {
        let start = self.pos;
        match self.param() {
            Some(param) if params.len() < MAX_PARAMS => params.push(param),
            Some(_) => {}
            None => {
                self.pos = start;
                self.skip_item();
            }
        }
    }

    /// A challenge starting here (not at a separator). `None` when the
    /// element is not a challenge; the caller then skips it.
    fn challenge(&mut self) -> Option<Challenge> {
        let scheme = self.token()?;
        let space = self.skip_ows();
        match self.peek() {
            // `name=value` where a challenge was expected.
            Some(b'=') => return None,
            // Something glued to the scheme, like `Basic"x"`.
            Some(b) if space == 0 && b != b',' => return None,
            _ => {}
        }
        let scheme = scheme.to_ascii_lowercase();
        let mut params = Vec::new();
        match self.peek() {
            None | Some(b',') => {}
            Some(_) => {
                if self.token68() {
                    return Some(Challenge { scheme, params });
                }
                self.param_element(&mut params);
            }
        }
        loop {
            self.skip_separators();
            if self.at_end() || !self.looks_like_param() {
                break;
            }
            self.param_element(&mut params);
        }
        Some(Challenge { scheme, params })
    }
}

/// What the token endpoint returned, reduced to what the client needs.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenResponse {
    /// The bearer token, to send as `Authorization: Bearer <token>`.
    pub token: String,
    /// How long the token is valid, from when it was received; between
    /// [`MIN_EXPIRES_IN`] and [`MAX_EXPIRES_IN`].
    pub expires_in: Duration,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("token", &"REDACTED")
            .field("expires_in", &self.expires_in)
            .finish()
    }
}

/// Why a token endpoint answer is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not JSON, not an object of the expected shape, or too large. The
    /// message names the kind of problem and its position, never the body's
    /// content (which may hold a token).
    #[error("token response is not valid JSON: {0}")]
    Json(String),
    /// Neither `token` nor `access_token` holds a non-empty string.
    #[error("token response has no token")]
    Missing,
}

/// The fields of the Docker token spec's answer that are used. `issued_at`
/// and any other field are ignored: lifetimes are counted from reception.
#[derive(serde::Deserialize)]
struct RawTokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

/// Parse the token endpoint's JSON answer (Docker token authentication spec).
///
/// `token` wins when it is a non-empty string, else `access_token`; when
/// neither is a non-empty (not all-whitespace) string the answer is
/// [`TokenError::Missing`]. `expires_in` (seconds) defaults to 60 when it is
/// missing, null, not a number, zero or negative, and is clamped to
/// [`MIN_EXPIRES_IN`]..=[`MAX_EXPIRES_IN`]. A body larger than
/// [`MAX_TOKEN_RESPONSE_LEN`] is refused as [`TokenError::Json`].
pub fn parse_token_response(body: &[u8]) -> Result<TokenResponse, TokenError> {
    if body.len() > MAX_TOKEN_RESPONSE_LEN {
        return Err(TokenError::Json(format!(
            "body is larger than {MAX_TOKEN_RESPONSE_LEN} bytes"
        )));
    }
    let raw: RawTokenResponse =
        serde_json::from_slice(body).map_err(|e| TokenError::Json(describe_json_error(&e)))?;
    let usable = |t: &Option<String>| t.as_ref().is_some_and(|t| !t.trim().is_empty());
    let token = if usable(&raw.token) {
        raw.token
    } else if usable(&raw.access_token) {
        raw.access_token
    } else {
        None
    }
    .ok_or(TokenError::Missing)?;
    Ok(TokenResponse {
        token,
        expires_in: expires_in(raw.expires_in.as_ref()),
    })
}

fn expires_in(value: Option<&serde_json::Value>) -> Duration {
    let secs = match value {
        // Integers, and floats cut down to whole seconds (`as` saturates).
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f > 0.0).map(|f| f as u64))
            .unwrap_or(0),
        _ => 0,
    };
    Duration::from_secs(secs).clamp(MIN_EXPIRES_IN, MAX_EXPIRES_IN)
}

/// serde_json's own messages may quote the input ("invalid type: string
/// \"...\""), which could be a token; only keep the category and position.
fn describe_json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "syntax error",
        Category::Data => "unexpected structure or type",
        Category::Eof => "unexpected end of input",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
mod tests;
