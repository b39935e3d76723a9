//! HTTP `Range` requests for blobs (RFC 9110 §14).
//!
//! Three steps, each usable on its own:
//!
//! 1. [`parse`] reads a `Range` header value into a list of [`RangeSpec`]s.
//!    Only the `bytes` unit is understood; any other unit yields `Ok(None)`
//!    and the caller serves the full representation (RFC 9110 §14.2).
//! 2. [`resolve`] applies the specs to a representation of known size: it
//!    drops the unsatisfiable ones, clamps the rest, then sorts and merges
//!    overlapping or adjacent ranges, so a client can never make us send the
//!    same bytes twice.
//! 3. [`Multipart`] precomputes the `multipart/byteranges` framing (RFC 9110
//!    §14.6) for a `206` answer with several ranges, including its exact
//!    `Content-Length`.
//!
//! The header is untrusted input: parsing never panics, never overflows, runs
//! in time linear in the header length and stops after [`MAX_RANGES`] specs.

use bytes::Bytes;

/// Most range specs accepted in one `Range` header; more is
/// [`RangeError::TooMany`].
pub const MAX_RANGES: usize = 16;

/// Boundary used by [`Multipart::new`] when the one given has no usable
/// character left after sanitising.
const FALLBACK_BOUNDARY: &str = "ocicache-byteranges";

/// Longest boundary allowed by RFC 2046 §5.1.1.
const MAX_BOUNDARY_LEN: usize = 70;

/// One `range-spec` of a `Range: bytes=...` header, not yet applied to a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSpec {
    /// `first-last` (`last` inclusive) or the open-ended `first-`.
    FromTo { first: u64, last: Option<u64> },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// A satisfiable byte range of a representation, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// Offset of the first byte.
    pub start: u64,
    /// Offset of the last byte (inclusive).
    pub end: u64,
}

// `len` is the number of bytes in an inclusive range; a ByteRange made by
// `resolve` is never empty, so an `is_empty` would only be dead code.
#[allow(clippy::len_without_is_empty)]
impl ByteRange {
    /// Number of bytes in the range: `end - start + 1`.
    ///
    /// Saturates rather than overflowing for `0..=u64::MAX`, and is 0 for a
    /// (hand-built, invalid) range whose `end < start`.
    pub fn len(&self) -> u64 {
        if self.end < self.start {
            0
        } else {
            (self.end - self.start).saturating_add(1)
        }
    }

    /// The `Content-Range` value for this range of a representation of
    /// `size` bytes, e.g. `bytes 0-9/100`.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, size)
    }
}

/// Why a `Range` header cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The header does not follow the `bytes=` grammar.
    #[error("malformed Range header")]
    Malformed,
    /// More than [`MAX_RANGES`] specs.
    #[error("too many ranges")]
    TooMany,
    /// No spec overlaps the representation (answer `416`).
    #[error("range not satisfiable")]
    Unsatisfiable,
}

/// Parse a `Range` header value.
///
/// Returns `Ok(None)` when the range unit is a valid token other than
/// `bytes` (matched case-insensitively): the header is then ignored and the
/// full body served, per RFC 9110 §14.2.
///
/// Grammar: `bytes=` followed by a comma-separated list of `first-last`,
/// `first-` and `-suffix` specs. Whitespace (SP or HTAB) is allowed around
/// the commas and around the whole value, not inside a spec. Numbers are
/// ASCII digits only; a number that does not fit in a `u64`, `last < first`,
/// a missing `=`, an invalid unit or an empty list are
/// [`RangeError::Malformed`]. Empty list elements (`bytes=0-1,,5-6`) are
/// ignored, as RFC 9110 §5.6.1.2 asks of recipients. More than
/// [`MAX_RANGES`] specs is [`RangeError::TooMany`]; parsing stops there.
pub fn parse(header: &str) -> Result<Option<Vec<RangeSpec>>, RangeError> {
    let header = trim_ows(header);
    let (unit, set) = header.split_once('=').ok_or(RangeError::Malformed)?;
    if unit.is_empty() || !unit.bytes().all(is_tchar) {
        return Err(RangeError::Malformed);
    }
    if !unit.eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    let mut specs = Vec::new();
    for element in set.split(',') {
        let element = trim_ows(element);
        if element.is_empty() {
            continue;
        }
        if specs.len() == MAX_RANGES {
            return Err(RangeError::TooMany);
        }
        specs.push(parse_spec(element)?);
    }
    if specs.is_empty() {
        return Err(RangeError::Malformed);
    }
    Ok(Some(specs))
}

/// Parse one non-empty, already trimmed `range-spec`.
fn parse_spec(spec: &str) -> Result<RangeSpec, RangeError> {
    let (first, last) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    if first.is_empty() {
        return Ok(RangeSpec::Suffix(parse_u64(last)?));
    }
    let first = parse_u64(first)?;
    if last.is_empty() {
        return Ok(RangeSpec::FromTo { first, last: None });
    }
    let last = parse_u64(last)?;
    if last < first {
        return Err(RangeError::Malformed);
    }
    Ok(RangeSpec::FromTo {
        first,
        last: Some(last),
    })
}

/// `1*DIGIT` into a `u64`; anything else, or an overflow, is malformed.
/// (`str::parse` would also accept a leading `+`.)
fn parse_u64(digits: &str) -> Result<u64, RangeError> {
    if digits.is_empty() {
        return Err(RangeError::Malformed);
    }
    digits.bytes().try_fold(0u64, |acc, b| {
        if !b.is_ascii_digit() {
            return Err(RangeError::Malformed);
        }
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or(RangeError::Malformed)
    })
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Strip optional whitespace (SP / HTAB) from both ends.
fn trim_ows(s: &str) -> &str {
    s.trim_matches(|c| c == ' ' || c == '\t')
}

/// Apply the specs to a representation of `size` bytes.
///
/// A spec is unsatisfiable, and dropped, when `first >= size`, when it is the
/// suffix `-0`, or (only possible for hand-built specs) when `last < first`.
/// A `last` past the end is clamped to `size - 1`; a suffix longer than the
/// representation selects all of it. The result is sorted, and overlapping or
/// adjacent ranges are merged, so ranges are disjoint and separated by at
/// least one byte. `Err(Unsatisfiable)` when nothing remains, which is always
/// the case when `size == 0`.
pub fn resolve(specs: &[RangeSpec], size: u64) -> Result<Vec<ByteRange>, RangeError> {
    if size == 0 {
        return Err(RangeError::Unsatisfiable);
    }
    let max = size - 1;
    let mut ranges: Vec<ByteRange> = specs
        .iter()
        .filter_map(|spec| match *spec {
            RangeSpec::FromTo { first, last } => {
                let last = last.unwrap_or(max);
                (first <= max && first <= last).then(|| ByteRange {
                    start: first,
                    end: last.min(max),
                })
            }
            RangeSpec::Suffix(n) => (n > 0).then(|| ByteRange {
                start: size.saturating_sub(n),
                end: max,
            }),
        })
        .collect();
    ranges.sort_unstable_by_key(|r| (r.start, r.end));
    let mut merged: Vec<ByteRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            // `cur.end <= max < u64::MAX`, so `+ 1` cannot overflow; saturate anyway.
            Some(cur) if r.start <= cur.end.saturating_add(1) => cur.end = cur.end.max(r.end),
            _ => merged.push(r),
        }
    }
    if merged.is_empty() {
        return Err(RangeError::Unsatisfiable);
    }
    Ok(merged)
}

/// `multipart/byteranges` framing (RFC 9110 §14.6) for a `206` answer with
/// several ranges.
///
/// The body is, for each entry of `parts`, its header bytes followed by the
/// blob bytes of its range, and then `closing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multipart {
    /// The boundary actually used (see [`Multipart::new`]).
    pub boundary: String,
    /// For each range: the part header
    /// (`\r\n--BOUNDARY\r\nContent-Type: CT\r\nContent-Range: bytes a-b/size\r\n\r\n`)
    /// and the range whose bytes follow it.
    pub parts: Vec<(Bytes, ByteRange)>,
    /// `\r\n--BOUNDARY--\r\n`.
    pub closing: Bytes,
}

impl Multipart {
    /// Build the framing for `ranges` of a representation of `size` bytes
    /// whose own type is `content_type`.
    ///
    /// Both strings end up in the body and the boundary also in a header, so
    /// they are sanitised rather than trusted: the boundary keeps only ASCII
    /// letters, digits and `'+-._` (characters valid both in an RFC 2046
    /// boundary and in an unquoted header parameter), at most 70 of them, and
    /// falls back to a fixed value if none remain; the content type loses its
    /// control characters (CR, LF, ...) and falls back to
    /// `application/octet-stream` if it ends up empty. Callers should pass a
    /// random boundary so that it cannot occur in the blob.
    pub fn new(ranges: &[ByteRange], size: u64, content_type: &str, boundary: String) -> Multipart {
        let boundary = sanitize_boundary(boundary);
        let content_type = sanitize_content_type(content_type);
        let parts = ranges
            .iter()
            .map(|r| {
                let head = format!(
                    "\r\n--{boundary}\r\nContent-Type: {content_type}\r\nContent-Range: {}\r\n\r\n",
                    r.content_range(size)
                );
                (Bytes::from(head), *r)
            })
            .collect();
        let closing = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        Multipart {
            boundary,
            parts,
            closing,
        }
    }

    /// Exact length of the whole body: part headers, range bytes and the
    /// closing delimiter (saturating at `u64::MAX`).
    pub fn content_length(&self) -> u64 {
        let parts = self.parts.iter().fold(0u64, |acc, (head, range)| {
            acc.saturating_add(usize_to_u64(head.len()))
                .saturating_add(range.len())
        });
        parts.saturating_add(usize_to_u64(self.closing.len()))
    }

    /// The `Content-Type` of the whole answer:
    /// `multipart/byteranges; boundary=...`.
    pub fn content_type(&self) -> String {
        format!("multipart/byteranges; boundary={}", self.boundary)
    }
}

fn usize_to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn sanitize_boundary(boundary: String) -> String {
    let is_ok = |c: char| c.is_ascii_alphanumeric() || "'+-._".contains(c);
    if boundary.len() <= MAX_BOUNDARY_LEN && boundary.chars().all(is_ok) && !boundary.is_empty() {
        return boundary;
    }
    let cleaned: String = boundary
        .chars()
        .filter(|&c| is_ok(c))
        .take(MAX_BOUNDARY_LEN)
        .collect();
    if cleaned.is_empty() {
        FALLBACK_BOUNDARY.to_owned()
    } else {
        cleaned
    }
}

fn sanitize_content_type(content_type: &str) -> String {
    let cleaned: String = content_type.chars().filter(|c| !c.is_control()).collect();
    let cleaned = cleaned.trim();
    if cleaned.is_empty() {
        "application/octet-stream".to_owned()
    } else {
        cleaned.to_owned()
    }
}

#[cfg(test)]
mod tests;
