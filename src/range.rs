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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ft(first: u64, last: u64) -> RangeSpec {
        RangeSpec::FromTo {
            first,
            last: Some(last),
        }
    }

    fn open(first: u64) -> RangeSpec {
        RangeSpec::FromTo { first, last: None }
    }

    fn br(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    fn specs(header: &str) -> Vec<RangeSpec> {
        match parse(header) {
            Ok(Some(specs)) => specs,
            other => panic!("{header:?} gave {other:?}"),
        }
    }

    // ---- parse: accepted forms ----

    #[test]
    fn parses_closed_range() {
        assert_eq!(specs("bytes=0-499"), vec![ft(0, 499)]);
        assert_eq!(specs("bytes=500-999"), vec![ft(500, 999)]);
        assert_eq!(specs("bytes=5-5"), vec![ft(5, 5)]);
    }

    #[test]
    fn parses_open_range() {
        assert_eq!(specs("bytes=9500-"), vec![open(9500)]);
        assert_eq!(specs("bytes=0-"), vec![open(0)]);
    }

    #[test]
    fn parses_suffix() {
        assert_eq!(specs("bytes=-500"), vec![RangeSpec::Suffix(500)]);
        assert_eq!(specs("bytes=-0"), vec![RangeSpec::Suffix(0)]);
    }

    #[test]
    fn parses_several_specs_in_order() {
        assert_eq!(
            specs("bytes=500-600,601-999,-5,10-"),
            vec![ft(500, 600), ft(601, 999), RangeSpec::Suffix(5), open(10)]
        );
    }

    #[test]
    fn whitespace_around_commas_and_value() {
        assert_eq!(specs("bytes=0-1 , 3-4"), vec![ft(0, 1), ft(3, 4)]);
        assert_eq!(specs("bytes=0-1,\t3-4"), vec![ft(0, 1), ft(3, 4)]);
        assert_eq!(specs("  bytes=0-1  "), vec![ft(0, 1)]);
        assert_eq!(specs("bytes= 0-1"), vec![ft(0, 1)]);
    }

    #[test]
    fn unit_is_case_insensitive() {
        assert_eq!(specs("BYTES=0-1"), vec![ft(0, 1)]);
        assert_eq!(specs("Bytes=0-1"), vec![ft(0, 1)]);
        assert_eq!(specs("bYtEs=-3"), vec![RangeSpec::Suffix(3)]);
    }

    #[test]
    fn leading_zeros_and_u64_max() {
        assert_eq!(specs("bytes=007-0010"), vec![ft(7, 10)]);
        let max = u64::MAX;
        assert_eq!(specs(&format!("bytes=0-{max}")), vec![ft(0, max)]);
        assert_eq!(specs(&format!("bytes={max}-")), vec![open(max)]);
        assert_eq!(
            specs(&format!("bytes=-{max}")),
            vec![RangeSpec::Suffix(max)]
        );
        let zeros = "0".repeat(10_000);
        assert_eq!(specs(&format!("bytes={zeros}1-{zeros}2")), vec![ft(1, 2)]);
    }

    #[test]
    fn empty_list_elements_are_ignored() {
        assert_eq!(specs("bytes=0-1,,3-4"), vec![ft(0, 1), ft(3, 4)]);
        assert_eq!(specs("bytes=,0-1,"), vec![ft(0, 1)]);
        assert_eq!(specs("bytes= , 0-1 , "), vec![ft(0, 1)]);
    }

    #[test]
    fn other_units_are_ignored() {
        assert_eq!(parse("items=0-1"), Ok(None));
        assert_eq!(parse("none=0-1"), Ok(None));
        assert_eq!(parse("bytesx=0-1"), Ok(None));
        assert_eq!(parse("x=whatever, at all"), Ok(None));
    }

    #[test]
    fn exactly_max_ranges_is_fine() {
        let header = format!("bytes={}", vec!["0-0"; MAX_RANGES].join(","));
        assert_eq!(specs(&header).len(), MAX_RANGES);
    }

    // ---- parse: rejected forms ----

    #[test]
    fn malformed_headers() {
        let bad = [
            "",
            " ",
            "bytes",
            "bytes=",
            "bytes= ",
            "bytes=,",
            "bytes=, ,",
            "=0-1",
            "bytes =0-1",
            "by tes=0-1",
            "bytes\t=0-1",
            "bytes=-",
            "bytes=--1",
            "bytes=1-2-3",
            "bytes=1--2",
            "bytes=5-4",
            "bytes=1",
            "bytes=abc",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes=-+2",
            "bytes=-1-",
            "bytes=0x10-0x20",
            "bytes=1 -2",
            "bytes=1- 2",
            "bytes=1 2-3",
            "bytes=0-1;2-3",
            "bytes=0-1,x",
            "bytes=0-1, 5-4",
            "bytes=1.5-2",
            "bytes=1e3-",
            "bytes=\u{663}-\u{665}",
            "bytes=１-２",
            "bytes=0-1\u{a0}",
            "bytes=0-1\r\n",
            "bÿtes=0-1",
            "bytes=0-1\0",
        ];
        for header in bad {
            assert_eq!(parse(header), Err(RangeError::Malformed), "{header:?}");
        }
    }

    #[test]
    fn overflow_is_malformed() {
        let over = "18446744073709551616"; // u64::MAX + 1
        assert_eq!(parse(&format!("bytes={over}-")), Err(RangeError::Malformed));
        assert_eq!(
            parse(&format!("bytes=0-{over}")),
            Err(RangeError::Malformed)
        );
        assert_eq!(parse(&format!("bytes=-{over}")), Err(RangeError::Malformed));
        let huge = "9".repeat(100_000);
        assert_eq!(parse(&format!("bytes={huge}-")), Err(RangeError::Malformed));
        assert_eq!(parse(&format!("bytes=-{huge}")), Err(RangeError::Malformed));
    }

    #[test]
    fn too_many_ranges() {
        let header = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse(&header), Err(RangeError::TooMany));
        let hostile = format!("bytes={}", vec!["1-2"; 10_000].join(", "));
        assert_eq!(parse(&hostile), Err(RangeError::TooMany));
        // Empty elements do not count towards the limit.
        let sparse = format!("bytes={}0-1", ",".repeat(10_000));
        assert_eq!(specs(&sparse), vec![ft(0, 1)]);
    }

    #[test]
    fn first_error_wins() {
        // A malformed spec before the limit is reported as such...
        let header = format!("bytes=x,{}", vec!["0-0"; 100].join(","));
        assert_eq!(parse(&header), Err(RangeError::Malformed));
        // ...and parsing stops at the limit, whatever follows.
        let header = format!("bytes={},x", vec!["0-0"; 100].join(","));
        assert_eq!(parse(&header), Err(RangeError::TooMany));
    }

    // ---- ByteRange ----

    #[test]
    fn byte_range_len_and_content_range() {
        assert_eq!(br(0, 0).len(), 1);
        assert_eq!(br(0, 9).len(), 10);
        assert_eq!(br(5, 4).len(), 0);
        assert_eq!(br(0, u64::MAX).len(), u64::MAX);
        assert_eq!(br(1, u64::MAX).len(), u64::MAX);
        assert_eq!(br(0, 9).content_range(100), "bytes 0-9/100");
        assert_eq!(br(90, 99).content_range(100), "bytes 90-99/100");
    }

    // ---- resolve ----

    #[test]
    fn resolve_simple_forms() {
        assert_eq!(resolve(&[ft(0, 9)], 100), Ok(vec![br(0, 9)]));
        assert_eq!(resolve(&[open(90)], 100), Ok(vec![br(90, 99)]));
        assert_eq!(resolve(&[RangeSpec::Suffix(10)], 100), Ok(vec![br(90, 99)]));
        assert_eq!(resolve(&[ft(99, 99)], 100), Ok(vec![br(99, 99)]));
    }

    #[test]
    fn resolve_clamps() {
        assert_eq!(resolve(&[ft(50, 1_000)], 100), Ok(vec![br(50, 99)]));
        assert_eq!(resolve(&[ft(0, u64::MAX)], 100), Ok(vec![br(0, 99)]));
        assert_eq!(resolve(&[RangeSpec::Suffix(500)], 100), Ok(vec![br(0, 99)]));
        assert_eq!(
            resolve(&[RangeSpec::Suffix(u64::MAX)], 100),
            Ok(vec![br(0, 99)])
        );
        assert_eq!(resolve(&[open(0)], u64::MAX), Ok(vec![br(0, u64::MAX - 1)]));
    }

    #[test]
    fn resolve_drops_unsatisfiable_specs() {
        assert_eq!(
            resolve(
                &[ft(100, 200), ft(0, 1), RangeSpec::Suffix(0), open(150)],
                100
            ),
            Ok(vec![br(0, 1)])
        );
        // Hand-built inverted spec.
        assert_eq!(resolve(&[ft(5, 4), ft(7, 8)], 100), Ok(vec![br(7, 8)]));
    }

    #[test]
    fn resolve_unsatisfiable() {
        assert_eq!(
            resolve(&[ft(100, 200)], 100),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(resolve(&[open(100)], 100), Err(RangeError::Unsatisfiable));
        assert_eq!(
            resolve(&[RangeSpec::Suffix(0)], 100),
            Err(RangeError::Unsatisfiable)
        );
        assert_eq!(resolve(&[], 100), Err(RangeError::Unsatisfiable));
        assert_eq!(resolve(&[ft(5, 4)], 100), Err(RangeError::Unsatisfiable));
    }

    #[test]
    fn resolve_empty_representation() {
        for spec in [
            ft(0, 0),
            open(0),
            RangeSpec::Suffix(1),
            RangeSpec::Suffix(0),
        ] {
            assert_eq!(resolve(&[spec], 0), Err(RangeError::Unsatisfiable));
        }
    }

    #[test]
    fn resolve_sorts_and_merges() {
        // Out of order, disjoint.
        assert_eq!(
            resolve(&[ft(50, 59), ft(0, 9)], 100),
            Ok(vec![br(0, 9), br(50, 59)])
        );
        // Overlapping.
        assert_eq!(resolve(&[ft(0, 10), ft(5, 20)], 100), Ok(vec![br(0, 20)]));
        // Adjacent.
        assert_eq!(resolve(&[ft(0, 9), ft(10, 19)], 100), Ok(vec![br(0, 19)]));
        // Separated by one byte: kept apart.
        assert_eq!(
            resolve(&[ft(0, 9), ft(11, 19)], 100),
            Ok(vec![br(0, 9), br(11, 19)])
        );
        // Contained.
        assert_eq!(resolve(&[ft(0, 50), ft(10, 20)], 100), Ok(vec![br(0, 50)]));
        // Duplicates.
        assert_eq!(resolve(&[ft(3, 4), ft(3, 4)], 100), Ok(vec![br(3, 4)]));
        // Suffix merged with a prefix covering the rest.
        assert_eq!(
            resolve(&[open(0), RangeSpec::Suffix(10)], 100),
            Ok(vec![br(0, 99)])
        );
        assert_eq!(
            resolve(&[ft(0, 89), RangeSpec::Suffix(10)], 100),
            Ok(vec![br(0, 99)])
        );
    }

    #[test]
    fn resolve_many_specs() {
        let many: Vec<RangeSpec> = (0..10_000u64).map(|i| ft(i * 2, i * 2)).collect();
        let out = resolve(&many, 1_000).unwrap();
        assert_eq!(out.len(), 500);
        assert!(out.iter().all(|r| r.len() == 1));
    }

    #[test]
    fn parse_then_resolve() {
        let parsed = specs("bytes=-5, 0-0,1-1 ,90-");
        assert_eq!(resolve(&parsed, 100), Ok(vec![br(0, 1), br(90, 99)]));
    }

    // ---- Multipart ----

    fn body(m: &Multipart, blob: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for (head, r) in &m.parts {
            out.extend_from_slice(head);
            out.extend_from_slice(&blob[r.start as usize..=r.end as usize]);
        }
        out.extend_from_slice(&m.closing);
        out
    }

    #[test]
    fn multipart_framing() {
        let m = Multipart::new(
            &[br(0, 1), br(5, 6)],
            10,
            "application/octet-stream",
            "BOUND".to_owned(),
        );
        assert_eq!(m.boundary, "BOUND");
        assert_eq!(m.content_type(), "multipart/byteranges; boundary=BOUND");
        assert_eq!(m.parts.len(), 2);
        assert_eq!(
            &m.parts[0].0[..],
            b"\r\n--BOUND\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/10\r\n\r\n"
        );
        assert_eq!(m.parts[1].1, br(5, 6));
        assert_eq!(&m.closing[..], b"\r\n--BOUND--\r\n");
        let blob = b"0123456789";
        let expected = "\r\n--BOUND\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 0-1/10\r\n\r\n01\
                        \r\n--BOUND\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 5-6/10\r\n\r\n56\
                        \r\n--BOUND--\r\n";
        assert_eq!(body(&m, blob), expected.as_bytes());
        assert_eq!(m.content_length(), expected.len() as u64);
    }

    #[test]
    fn multipart_sanitises_boundary_and_content_type() {
        let m = Multipart::new(
            &[br(0, 0)],
            1,
            "text/plain\r\nX-Evil: 1",
            "a b\r\n\"c\";d".to_owned(),
        );
        assert_eq!(m.boundary, "abcd");
        let head = std::str::from_utf8(&m.parts[0].0).unwrap();
        assert!(head.contains("Content-Type: text/plainX-Evil: 1\r\n"));
        assert_eq!(head.matches("\r\n").count(), 5);

        let m = Multipart::new(&[br(0, 0)], 1, "\r\n", "\r\n\u{e9}".to_owned());
        assert_eq!(m.boundary, FALLBACK_BOUNDARY);
        assert!(std::str::from_utf8(&m.parts[0].0)
            .unwrap()
            .contains("Content-Type: application/octet-stream\r\n"));

        let m = Multipart::new(&[], 1, "x/y", "z".repeat(500));
        assert_eq!(m.boundary.len(), MAX_BOUNDARY_LEN);
        assert_eq!(m.content_length(), m.closing.len() as u64);
    }

    #[test]
    fn multipart_content_length_saturates() {
        let m = Multipart::new(
            &[br(0, u64::MAX - 1), br(0, u64::MAX - 1)],
            u64::MAX,
            "x/y",
            "b".to_owned(),
        );
        assert_eq!(m.content_length(), u64::MAX);
    }

    // ---- properties ----

    fn arb_spec() -> impl Strategy<Value = RangeSpec> {
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| ft(a.min(b), a.max(b))),
            any::<u64>().prop_map(open),
            any::<u64>().prop_map(RangeSpec::Suffix),
        ]
    }

    /// Specs with values near a small size, so that they overlap often.
    fn small_spec(size: u64) -> impl Strategy<Value = RangeSpec> {
        let bound = size + 5;
        prop_oneof![
            (0..bound, 0..bound).prop_map(|(a, b)| ft(a.min(b), a.max(b))),
            (0..bound).prop_map(open),
            (0..bound).prop_map(RangeSpec::Suffix),
        ]
    }

    fn render(spec: &RangeSpec) -> String {
        match *spec {
            RangeSpec::FromTo {
                first,
                last: Some(last),
            } => format!("{first}-{last}"),
            RangeSpec::FromTo { first, last: None } => format!("{first}-"),
            RangeSpec::Suffix(n) => format!("-{n}"),
        }
    }

    /// Independent definition: is byte `p` selected by `spec` in a
    /// representation of `size` bytes?
    fn selects(spec: &RangeSpec, size: u64, p: u64) -> bool {
        if p >= size {
            return false;
        }
        match *spec {
            RangeSpec::FromTo { first, last } => p >= first && !matches!(last, Some(l) if p > l),
            RangeSpec::Suffix(n) => size - p <= n,
        }
    }

    fn check_resolved(specs: &[RangeSpec], size: u64, out: &[ByteRange]) {
        for r in out {
            assert!(r.start <= r.end && r.end < size, "{r:?} outside 0..{size}");
        }
        for w in out.windows(2) {
            // Sorted, disjoint and not even adjacent (else they would have been merged).
            assert!(w[0].end.saturating_add(1) < w[1].start, "{w:?}");
        }
        // Both sets are unions of intervals; their membership can only change
        // at 0 or at some interval's start or end + 1, so comparing at all
        // those points (and their neighbours) proves they are equal.
        let mut points = vec![0, size - 1];
        let mut add = |p: u64| {
            points.extend([p.saturating_sub(1), p, p.saturating_add(1)]);
        };
        for s in specs {
            match *s {
                RangeSpec::FromTo { first, last } => {
                    add(first);
                    if let Some(l) = last {
                        add(l);
                    }
                }
                RangeSpec::Suffix(n) => add(size.saturating_sub(n)),
            }
        }
        for r in out {
            add(r.start);
            add(r.end);
        }
        for p in points.into_iter().filter(|&p| p < size) {
            let want = specs.iter().any(|s| selects(s, size, p));
            let got = out.iter().any(|r| r.start <= p && p <= r.end);
            assert_eq!(
                want, got,
                "byte {p} of {size}, specs {specs:?}, out {out:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(header in any::<String>()) {
            let _ = parse(&header);
        }

        #[test]
        fn parse_never_panics_on_rangeish_input(
            header in "[bBytes=0-9, \\t+-]{0,64}",
        ) {
            if let Ok(Some(specs)) = parse(&header) {
                prop_assert!(!specs.is_empty() && specs.len() <= MAX_RANGES);
            }
        }

        #[test]
        fn rendered_specs_parse_back(
            specs in prop::collection::vec(arb_spec(), 1..=MAX_RANGES),
            seps in prop::collection::vec("[ \\t]{0,2},[ \\t]{0,2}", MAX_RANGES),
            upper in prop::collection::vec(any::<bool>(), 5),
        ) {
            let unit: String = "bytes"
                .chars()
                .zip(&upper)
                .map(|(c, &u)| if u { c.to_ascii_uppercase() } else { c })
                .collect();
            let mut header = format!("{unit}=");
            for (i, spec) in specs.iter().enumerate() {
                if i > 0 {
                    header.push_str(&seps[i]);
                }
                header.push_str(&render(spec));
            }
            prop_assert_eq!(parse(&header), Ok(Some(specs)));
        }

        #[test]
        fn more_than_max_is_too_many(
            specs in prop::collection::vec(arb_spec(), MAX_RANGES + 1..200),
        ) {
            let header = format!(
                "bytes={}",
                specs.iter().map(render).collect::<Vec<_>>().join(",")
            );
            prop_assert_eq!(parse(&header), Err(RangeError::TooMany));
        }

        #[test]
        fn resolve_covers_exactly_the_union(
            specs in prop::collection::vec(arb_spec(), 0..20),
            size in prop_oneof![1..u64::MAX, Just(u64::MAX), 1..1_000u64],
        ) {
            match resolve(&specs, size) {
                Ok(out) => {
                    prop_assert!(!out.is_empty());
                    check_resolved(&specs, size, &out);
                }
                Err(e) => {
                    prop_assert_eq!(e, RangeError::Unsatisfiable);
                    check_resolved(&specs, size, &[]);
                }
            }
        }

        #[test]
        fn resolve_small_sizes_byte_by_byte(
            (size, specs) in (1..64u64).prop_flat_map(|size| {
                (Just(size), prop::collection::vec(small_spec(size), 0..8))
            }),
        ) {
            let out = resolve(&specs, size).unwrap_or_default();
            check_resolved(&specs, size, &out);
            for p in 0..size {
                let want = specs.iter().any(|s| selects(s, size, p));
                let got = out.iter().any(|r| r.start <= p && p <= r.end);
                prop_assert_eq!(want, got);
            }
        }

        #[test]
        fn resolve_zero_size_is_unsatisfiable(specs in prop::collection::vec(arb_spec(), 0..8)) {
            prop_assert_eq!(resolve(&specs, 0), Err(RangeError::Unsatisfiable));
        }

        #[test]
        fn multipart_length_matches_body(
            (size, specs) in (1..512u64).prop_flat_map(|size| {
                (Just(size), prop::collection::vec(small_spec(size), 1..8))
            }),
            content_type in "[ -~]{0,40}",
            boundary in "[0-9A-Za-z'+_.-]{1,70}",
        ) {
            let blob: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            if let Ok(ranges) = resolve(&specs, size) {
                let m = Multipart::new(&ranges, size, &content_type, boundary.clone());
                prop_assert_eq!(&m.boundary, &boundary);
                let actual = body(&m, &blob);
                prop_assert_eq!(m.content_length(), actual.len() as u64);
                for (head, r) in &m.parts {
                    let head = std::str::from_utf8(head).unwrap();
                    let wanted = format!("Content-Range: {}\r\n\r\n", r.content_range(size));
                    let opening = format!("\r\n--{boundary}\r\n");
                    prop_assert!(head.starts_with(&opening));
                    prop_assert!(head.ends_with(&wanted));
                }
                let closing = format!("\r\n--{boundary}--\r\n");
                prop_assert_eq!(&m.closing[..], closing.as_bytes());
            }
        }

        #[test]
        fn multipart_length_is_sum_for_any_ranges(
            ranges in prop::collection::vec((any::<u64>(), any::<u64>()), 0..10),
            size in any::<u64>(),
            content_type in any::<String>(),
            boundary in any::<String>(),
        ) {
            let ranges: Vec<ByteRange> = ranges
                .into_iter()
                .map(|(a, b)| br(a.min(b), a.max(b)))
                .collect();
            let m = Multipart::new(&ranges, size, &content_type, boundary);
            prop_assert!(!m.boundary.is_empty() && m.boundary.len() <= MAX_BOUNDARY_LEN);
            let expected = m
                .parts
                .iter()
                .map(|(h, r)| h.len() as u128 + u128::from(r.len()))
                .sum::<u128>()
                + m.closing.len() as u128;
            prop_assert_eq!(u128::from(m.content_length()), expected.min(u128::from(u64::MAX)));
            for (head, _) in &m.parts {
                // Exactly the four CRLFs of the framing plus the blank line.
                prop_assert_eq!(head.windows(2).filter(|w| w == b"\r\n").count(), 5);
            }
        }
    }
}
