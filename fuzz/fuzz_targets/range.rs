//! `Range` headers: `range::parse`, `range::resolve` against a size taken from the input, and
//! `Multipart` framing. Checked against a naive model (a bitmap of selected bytes) when the
//! size is small, and against the structural promises (sorted, disjoint, non-adjacent, within
//! the size, exact Content-Length, header-safe strings) for any size.
//!
//! Input: 8 bytes of size (little endian), 1 byte of flags, then
//! `header \0 content-type \0 boundary` (lossy UTF-8).
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use ocicache::range::{self, ByteRange, Multipart, RangeError, RangeSpec, MAX_RANGES};

fn canonical(specs: &[RangeSpec]) -> String {
    let items: Vec<String> = specs
        .iter()
        .map(|s| match *s {
            RangeSpec::FromTo { first, last: Some(l) } => format!("{first}-{l}"),
            RangeSpec::FromTo { first, last: None } => format!("{first}-"),
            RangeSpec::Suffix(n) => format!("-{n}"),
        })
        .collect();
    format!("bytes={}", items.join(","))
}

fn check_resolved(specs: &[RangeSpec], size: u64, got: &Result<Vec<ByteRange>, RangeError>) {
    match got {
        Ok(ranges) => {
            assert!(!ranges.is_empty() && ranges.len() <= specs.len());
            for r in ranges {
                assert!(r.start <= r.end && r.end < size, "{r:?} of {size}");
                assert_eq!(r.len(), r.end - r.start + 1);
            }
            for w in ranges.windows(2) {
                assert!(w[1].start > w[0].end.saturating_add(1), "not merged: {w:?}");
            }
        }
        Err(e) => assert_eq!(*e, RangeError::Unsatisfiable),
    }
    // Naive model for small sizes: the set of selected offsets.
    if size <= 4096 {
        let mut want = vec![false; size as usize];
        for s in specs.iter().filter(|_| size > 0) {
            let (a, b) = match *s {
                RangeSpec::FromTo { first, last } => {
                    let last = last.unwrap_or(u64::MAX);
                    if first >= size || last < first {
                        continue;
                    }
                    (first, last.min(size - 1))
                }
                RangeSpec::Suffix(0) => continue,
                RangeSpec::Suffix(n) => (size.saturating_sub(n), size - 1),
            };
            for i in a..=b {
                want[i as usize] = true;
            }
        }
        let mut have = vec![false; size as usize];
        if let Ok(ranges) = got {
            for r in ranges {
                for i in r.start..=r.end {
                    have[i as usize] = true;
                }
            }
        }
        assert_eq!(want, have, "specs {specs:?} size {size}: {got:?}");
        assert_eq!(got.is_err(), !want.iter().any(|&b| b));
    }
}

fn check_multipart(ranges: &[ByteRange], size: u64, ct: &str, boundary: &str) {
    let mp = Multipart::new(ranges, size, ct, boundary.to_string());
    let b = &mp.boundary;
    assert!(!b.is_empty() && b.len() <= 70, "{b:?}");
    assert!(
        b.chars().all(|c| c.is_ascii_alphanumeric() || "'+-._".contains(c)),
        "{b:?}"
    );
    HeaderValue::from_str(&mp.content_type()).expect("a valid Content-Type header");
    assert_eq!(mp.parts.len(), ranges.len());
    let mut total: u128 = mp.closing.len() as u128;
    for ((head, r), want) in mp.parts.iter().zip(ranges) {
        assert_eq!(r, want);
        total += head.len() as u128 + r.len() as u128;
        let head = std::str::from_utf8(head).expect("utf-8 part header");
        // Exactly the framing lines: the content type cannot inject a line.
        let lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines.len(), 6, "{head:?}");
        assert_eq!(lines[1], format!("--{b}"));
        assert!(lines[2].starts_with("Content-Type: "));
        assert!(!lines[2].contains('\r') && !lines[2].contains('\n'));
        assert_eq!(lines[3], format!("Content-Range: {}", r.content_range(size)));
        assert!(lines[4].is_empty() && lines[5].is_empty());
    }
    assert_eq!(&mp.closing[..], format!("\r\n--{b}--\r\n").as_bytes());
    let want = u64::try_from(total).unwrap_or(u64::MAX);
    assert_eq!(mp.content_length(), want);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 || data.len() > 4096 {
        return;
    }
    let mut size = u64::from_le_bytes(data[..8].try_into().unwrap());
    let flags = data[8];
    if flags & 1 == 0 {
        size %= 4097; // small enough for the naive model
    }
    let rest = String::from_utf8_lossy(&data[9..]);
    let mut fields = rest.splitn(3, '\0');
    let header = fields.next().unwrap_or("");
    let ct = fields.next().unwrap_or("application/octet-stream");
    let boundary = fields.next().unwrap_or("ocicache-0123456789abcdef");

    let specs = match range::parse(header) {
        Ok(Some(specs)) => specs,
        Ok(None) => {
            // Another unit: a token before '='.
            let unit = header.trim_matches([' ', '\t']).split_once('=').unwrap().0;
            assert!(!unit.eq_ignore_ascii_case("bytes"));
            return;
        }
        Err(RangeError::TooMany) => {
            assert!(header.matches(',').count() >= MAX_RANGES, "{header:?}");
            return;
        }
        Err(RangeError::Malformed) => return,
        Err(RangeError::Unsatisfiable) => panic!("parse said Unsatisfiable"),
    };
    assert!(!specs.is_empty() && specs.len() <= MAX_RANGES);
    for s in &specs {
        if let RangeSpec::FromTo { first, last: Some(l) } = *s {
            assert!(l >= first);
        }
    }
    // The canonical form parses to the same specs.
    assert_eq!(range::parse(&canonical(&specs)), Ok(Some(specs.clone())));

    let got = range::resolve(&specs, size);
    check_resolved(&specs, size, &got);
    if let Ok(ranges) = got {
        for r in &ranges {
            HeaderValue::from_str(&r.content_range(size)).expect("a valid Content-Range");
        }
        check_multipart(&ranges, size, ct, boundary);
    }
});
