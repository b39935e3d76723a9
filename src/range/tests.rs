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
