use super::*;
use proptest::prelude::*;

const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const SHA512_EMPTY: &str = "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
                                47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";
const SHA512_ABC: &str = "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                              2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f";

// ----- names ---------------------------------------------------------

#[test]
fn valid_names() {
    let long = "a".repeat(255);
    let long_path = ["abc"; 64].join("/"); // 64*3 + 63 = 255
    assert_eq!(long_path.len(), 255);
    for s in [
        "a",
        "0",
        "nginx",
        "library/nginx",
        "library/ubuntu",
        "a/b/c/d/e",
        "my.repo",
        "my_repo",
        "my__repo",
        "my-repo",
        "my--repo",
        "my---------repo",
        "a.b_c__d-e--f",
        "org/team-1/app.v2",
        "123/456",
        long.as_str(),
        long_path.as_str(),
    ] {
        let n = Name::parse(s).unwrap_or_else(|e| panic!("{s:?} rejected: {e}"));
        assert_eq!(n.as_str(), s);
        assert_eq!(n.to_string(), s);
        assert_eq!(n.as_ref(), s);
        assert_eq!(s.parse::<Name>().unwrap(), n);
    }
}

#[test]
fn invalid_names() {
    let too_long = "a".repeat(256);
    let too_long_path = ["abc"; 64].join("/") + "a";
    for s in [
        "",
        "/",
        "/a",
        "a/",
        "a//b",
        "//",
        "..",
        ".",
        "../etc",
        "../../etc/passwd",
        "a/../b",
        "a/./b",
        "a/..",
        "./a",
        "a..b",
        "a._b",
        "a_.b",
        "a-.b",
        "a.-b",
        "a___b",
        ".a",
        "a.",
        "_a",
        "a_",
        "-a",
        "a-",
        "__a",
        "a__",
        "%2e%2e",
        "%2e%2e/etc",
        "a%2fb",
        "a%2Fb",
        "Nginx",
        "library/Nginx",
        "ABC",
        "a b",
        " a",
        "a\n",
        "a\0b",
        "a\\b",
        "a:b",
        "a@b",
        "a+b",
        "a?b",
        "a#b",
        "é",
        "ａ",
        "a/é",
        too_long.as_str(),
        too_long_path.as_str(),
    ] {
        match Name::parse(s) {
            Err(ReferenceError::NameInvalid(_)) => {}
            other => panic!("{s:?} should be NameInvalid, got {other:?}"),
        }
    }
}

#[test]
fn name_components() {
    let n = Name::parse("library/my-app/x.y").unwrap();
    assert_eq!(
        n.components().collect::<Vec<_>>(),
        ["library", "my-app", "x.y"]
    );
    let n = Name::parse("single").unwrap();
    assert_eq!(n.components().collect::<Vec<_>>(), ["single"]);
}

#[test]
fn name_error_echo_is_bounded() {
    let huge = "A".repeat(10_000);
    match Name::parse(&huge) {
        Err(ReferenceError::NameInvalid(echoed)) => assert!(echoed.len() < 400),
        other => panic!("{other:?}"),
    }
    // Cutting must respect char boundaries.
    let huge = "é".repeat(1000);
    assert!(Name::parse(&huge).is_err());
    let huge = "a".repeat(299) + &"é".repeat(10);
    assert!(Name::parse(&huge).is_err());
}

// ----- tags ----------------------------------------------------------

#[test]
fn valid_tags() {
    let max = "a".repeat(128);
    let max_underscore = format!("_{}", "-".repeat(127));
    for s in [
        "latest",
        "1",
        "_",
        "_x",
        "v1.2.3",
        "1.25-alpine",
        "UPPER_case",
        "a..b",
        "x--",
        "9.",
        max.as_str(),
        max_underscore.as_str(),
    ] {
        let t = Tag::parse(s).unwrap_or_else(|e| panic!("{s:?} rejected: {e}"));
        assert_eq!(t.as_str(), s);
        assert_eq!(t.to_string(), s);
        assert_eq!(s.parse::<Tag>().unwrap(), t);
    }
}

#[test]
fn invalid_tags() {
    let too_long = "a".repeat(129);
    for s in [
        "",
        ".",
        "..",
        "../etc",
        "-latest",
        ".hidden",
        "a/b",
        "a:b",
        "a@b",
        "a b",
        "%2e%2e",
        "a\n",
        "é",
        "v1+build",
        too_long.as_str(),
    ] {
        match Tag::parse(s) {
            Err(ReferenceError::TagInvalid(_)) => {}
            other => panic!("{s:?} should be TagInvalid, got {other:?}"),
        }
    }
}

// ----- digests -------------------------------------------------------

#[test]
fn valid_digests() {
    let s = format!("sha256:{SHA256_ABC}");
    let d = Digest::parse(&s).unwrap();
    assert_eq!(d.algorithm(), Algorithm::Sha256);
    assert_eq!(d.hex(), SHA256_ABC);
    assert_eq!(d.to_string(), s);
    assert_eq!(format!("{d:?}"), s);
    assert_eq!(s.parse::<Digest>().unwrap(), d);

    let s = format!("sha512:{SHA512_ABC}");
    let d = Digest::parse(&s).unwrap();
    assert_eq!(d.algorithm(), Algorithm::Sha512);
    assert_eq!(d.hex(), SHA512_ABC);
    assert_eq!(d.to_string(), s);
}

#[test]
fn invalid_digests() {
    let h64 = SHA256_ABC;
    let cases: Vec<String> = vec![
        String::new(),
        ":".into(),
        "sha256".into(),
        "sha256:".into(),
        format!(":{h64}"),
        format!("sha256:{}", &h64[..63]),
        format!("sha256:{h64}0"),
        format!("sha256:{}", h64.to_uppercase()),
        format!("sha256:{}A", &h64[..63]),
        format!("sha256:{}g", &h64[..63]),
        format!("sha256:{h64}:{h64}"),
        format!("sha512:{h64}"),
        format!("sha256:{SHA512_ABC}"),
        format!("SHA256:{h64}"),
        format!("sha256 :{h64}"),
        format!("sha256: {h64}"),
        format!("sha256:{h64}\n"),
        format!("sha256:../{h64}"),
        format!("sha256:{}/..", &h64[..61]),
        "sha256:%2e%2e".into(),
        format!("+sha256:{h64}"),
        format!("sha256+:{h64}"),
        format!("sha..256:{h64}"),
        format!("sha256:{}==", &h64[..62]),
        format!("sha256:{}", "a".repeat(300)),
        format!("sha256:{}é", &h64[..62]),
        "../etc/passwd".into(),
        "a//b".into(),
    ];
    for s in &cases {
        match Digest::parse(s) {
            Err(ReferenceError::DigestInvalid(_)) => {}
            other => panic!("{s:?} should be DigestInvalid, got {other:?}"),
        }
    }
}

#[test]
fn unsupported_algorithms() {
    for (s, alg) in [
        ("md5:d41d8cd98f00b204e9800998ecf8427e", "md5"),
        (
            "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
            "multihash+base58",
        ),
        (
            "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
            "sha256+b64u",
        ),
        ("sha384:abc", "sha384"),
        ("a.b_c-d+e:x=", "a.b_c-d+e"),
    ] {
        assert_eq!(
            Digest::parse(s),
            Err(ReferenceError::UnsupportedAlgorithm(alg.to_owned())),
            "{s:?}"
        );
    }
}

#[test]
fn digest_too_long_rejected_early() {
    let s = format!("sha256:{}", "0".repeat(250));
    assert!(s.len() > 256);
    assert!(matches!(
        Digest::parse(&s),
        Err(ReferenceError::DigestInvalid(_))
    ));
    let s = format!("foo:{}", "0".repeat(253)); // would be unsupported if shorter
    assert!(matches!(
        Digest::parse(&s),
        Err(ReferenceError::DigestInvalid(_))
    ));
    let s = format!("foo:{}", "0".repeat(252)); // exactly 256: grammar applies
    assert_eq!(s.len(), 256);
    assert!(matches!(
        Digest::parse(&s),
        Err(ReferenceError::UnsupportedAlgorithm(_))
    ));
}

#[test]
fn algorithm_basics() {
    assert_eq!(Algorithm::parse("sha256"), Some(Algorithm::Sha256));
    assert_eq!(Algorithm::parse("sha512"), Some(Algorithm::Sha512));
    assert_eq!(Algorithm::parse("SHA256"), None);
    assert_eq!(Algorithm::parse("sha384"), None);
    assert_eq!(Algorithm::parse(""), None);
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        assert_eq!(Algorithm::parse(alg.as_str()), Some(alg));
        assert_eq!(alg.to_string(), alg.as_str());
    }
    assert_eq!(Algorithm::Sha256.hex_len(), 64);
    assert_eq!(Algorithm::Sha512.hex_len(), 128);
}

#[test]
fn hasher_known_vectors() {
    assert_eq!(Digest::sha256_of(b"").hex(), SHA256_EMPTY);
    assert_eq!(Digest::sha256_of(b"abc").hex(), SHA256_ABC);
    assert_eq!(
        Digest::sha256_of(b"abc").to_string(),
        format!("sha256:{SHA256_ABC}")
    );

    for (alg, input, expected) in [
        (Algorithm::Sha256, &b""[..], SHA256_EMPTY),
        (Algorithm::Sha256, b"abc", SHA256_ABC),
        (Algorithm::Sha512, b"", SHA512_EMPTY),
        (Algorithm::Sha512, b"abc", SHA512_ABC),
    ] {
        let mut h = DigestHasher::new(alg);
        h.update(input);
        let d = h.finalize();
        assert_eq!(d.algorithm(), alg);
        assert_eq!(d.hex(), expected);
        // The result always re-parses: hex is canonical lowercase.
        assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
    }

    // Incremental feeding equals one-shot.
    let mut h = DigestHasher::new(Algorithm::Sha512);
    h.update(b"a");
    h.update(b"");
    h.update(b"bc");
    assert_eq!(h.finalize().hex(), SHA512_ABC);
}

#[test]
fn hasher_from_digest_verifies_content() {
    let expected = Digest::parse(&format!("sha512:{SHA512_ABC}")).unwrap();
    let mut h = expected.hasher();
    h.update(b"abc");
    assert_eq!(h.finalize(), expected);

    let expected = Digest::sha256_of(b"abc");
    let mut h = expected.hasher();
    h.update(b"abd");
    assert_ne!(h.finalize(), expected);
    assert!(format!("{:?}", expected.hasher()).contains("Sha256"));
}

// ----- references ----------------------------------------------------

#[test]
fn references() {
    assert_eq!(
        Reference::parse("latest").unwrap(),
        Reference::Tag(Tag::parse("latest").unwrap())
    );
    let ds = format!("sha256:{SHA256_EMPTY}");
    assert_eq!(
        Reference::parse(&ds).unwrap(),
        Reference::Digest(Digest::parse(&ds).unwrap())
    );
    assert_eq!(Reference::parse(&ds).unwrap().to_string(), ds);
    assert_eq!(Reference::parse("v1.0").unwrap().to_string(), "v1.0");
    assert_eq!(ds.parse::<Reference>().unwrap().to_string(), ds);

    assert!(matches!(
        Reference::parse(""),
        Err(ReferenceError::TagInvalid(_))
    ));
    assert!(matches!(
        Reference::parse("../x"),
        Err(ReferenceError::TagInvalid(_))
    ));
    assert!(matches!(
        Reference::parse("latest:"),
        Err(ReferenceError::DigestInvalid(_))
    ));
    assert!(matches!(
        Reference::parse("md5:abc"),
        Err(ReferenceError::UnsupportedAlgorithm(_))
    ));
}

#[test]
fn error_messages() {
    assert_eq!(
        Name::parse("A").unwrap_err().to_string(),
        "invalid repository name: \"A\""
    );
    assert_eq!(
        Tag::parse("-").unwrap_err().to_string(),
        "invalid tag: \"-\""
    );
    assert_eq!(
        Digest::parse("x").unwrap_err().to_string(),
        "invalid digest: \"x\""
    );
    assert_eq!(
        Digest::parse("md5:00").unwrap_err().to_string(),
        "unsupported digest algorithm: \"md5\""
    );
}

// ----- serde ---------------------------------------------------------

#[test]
fn serde_round_trip_and_validation() {
    let d = Digest::sha256_of(b"abc");
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(json, format!("\"sha256:{SHA256_ABC}\""));
    assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);

    let n = Name::parse("library/nginx").unwrap();
    let json = serde_json::to_string(&n).unwrap();
    assert_eq!(json, "\"library/nginx\"");
    assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), n);

    let t = Tag::parse("1.25").unwrap();
    let json = serde_json::to_string(&t).unwrap();
    assert_eq!(json, "\"1.25\"");
    assert_eq!(serde_json::from_str::<Tag>(&json).unwrap(), t);

    let r = Reference::Digest(d.clone());
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);

    // Escaped strings (not borrowable) go through the same validation.
    assert_eq!(
        serde_json::from_str::<Name>("\"library\\/nginx\"").unwrap(),
        n
    );

    for bad in ["\"../etc\"", "\"A\"", "\"\"", "42", "null", "[\"a\"]"] {
        assert!(serde_json::from_str::<Name>(bad).is_err(), "{bad}");
    }
    for bad in ["\"sha256:00\"", "\"md5:00\"", "\"SHA256\"", "1"] {
        assert!(serde_json::from_str::<Digest>(bad).is_err(), "{bad}");
    }
    assert!(serde_json::from_str::<Tag>("\"-x\"").is_err());
    let err = serde_json::from_str::<Digest>("\"md5:00\"").unwrap_err();
    assert!(err.to_string().contains("unsupported digest algorithm"));
}

// ----- properties ----------------------------------------------------

/// Independent checker for the name grammar: split into maximal runs of
/// `[a-z0-9]` and of other bytes; the name must start and end with an
/// alphanumeric run and every other run must be exactly one separator
/// (`.`, `_`, `__`, one or more `-`) or exactly `/`.
fn reference_name_check(s: &str) -> bool {
    if s.is_empty() || s.len() > 255 {
        return false;
    }
    let is_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let mut runs: Vec<(bool, String)> = Vec::new();
    for c in s.chars() {
        let a = is_alnum(c);
        match runs.last_mut() {
            Some((kind, run)) if *kind == a => run.push(c),
            _ => runs.push((a, c.to_string())),
        }
    }
    if !runs.first().unwrap().0 || !runs.last().unwrap().0 {
        return false;
    }
    runs.iter().filter(|(a, _)| !a).all(|(_, run)| {
        run == "." || run == "_" || run == "__" || run == "/" || run.chars().all(|c| c == '-')
    })
}

fn reference_tag_check(s: &str) -> bool {
    let mut chars = s.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    s.chars().count() <= 128
        && (first.is_ascii_alphanumeric() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn name_component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,8}((\\.|_|__|-{1,3})[a-z0-9]{1,8}){0,3}"
}

fn valid_name() -> impl Strategy<Value = String> {
    prop::collection::vec(name_component(), 1..6)
        .prop_map(|parts| parts.join("/"))
        .prop_filter("at most 255 bytes", |s| s.len() <= 255)
}

fn valid_tag() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
}

fn valid_digest_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{64}".prop_map(|h| format!("sha256:{h}")),
        "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
    ]
}

/// Strings over an alphabet rich in the characters the grammars care
/// about, so that near-misses are common.
fn tricky_string() -> impl Strategy<Value = String> {
    "[a-cA-C0-9._/:%+=@ é-]{0,40}"
}

/// A valid name with one or two separator-ish characters inserted at
/// random places: about half of these are still valid, the rest are
/// near misses (`a___b`, `a/-b`, `a..b`, `a//b`, trailing `/`, ...).
fn near_miss_name() -> impl Strategy<Value = String> {
    let insertion = (
        any::<prop::sample::Index>(),
        prop::sample::select(vec!['.', '_', '/', '-', 'A', '%']),
    );
    (valid_name(), prop::collection::vec(insertion, 1..3)).prop_map(|(mut s, edits)| {
        for (at, c) in edits {
            s.insert(at.index(s.len() + 1), c);
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn name_round_trip(s in valid_name()) {
        let n = Name::parse(&s).unwrap();
        prop_assert_eq!(n.as_str(), s.as_str());
        prop_assert_eq!(&Name::parse(&format!("{n}")).unwrap(), &n);
        let json = serde_json::to_string(&n).unwrap();
        prop_assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), n.clone());
        prop_assert_eq!(n.components().collect::<Vec<_>>().join("/"), s);
    }

    #[test]
    fn tag_round_trip(s in valid_tag()) {
        let t = Tag::parse(&s).unwrap();
        prop_assert_eq!(&Tag::parse(&format!("{t}")).unwrap(), &t);
        let r = Reference::parse(&s).unwrap();
        prop_assert_eq!(&r, &Reference::Tag(t.clone()));
        prop_assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
        let json = serde_json::to_string(&t).unwrap();
        prop_assert_eq!(serde_json::from_str::<Tag>(&json).unwrap(), t);
    }

    #[test]
    fn digest_round_trip(s in valid_digest_string()) {
        let d = Digest::parse(&s).unwrap();
        prop_assert_eq!(d.to_string(), s.clone());
        prop_assert_eq!(format!("{d:?}"), s.clone());
        prop_assert_eq!(d.hex().len(), d.algorithm().hex_len());
        prop_assert_eq!(&Digest::parse(&d.to_string()).unwrap(), &d);
        let r = Reference::parse(&s).unwrap();
        prop_assert_eq!(&r, &Reference::Digest(d.clone()));
        prop_assert_eq!(r.to_string(), s);
        let json = serde_json::to_string(&d).unwrap();
        prop_assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn computed_digests_round_trip(data in prop::collection::vec(any::<u8>(), 0..256),
                                   sha512 in any::<bool>()) {
        let alg = if sha512 { Algorithm::Sha512 } else { Algorithm::Sha256 };
        let mut h = DigestHasher::new(alg);
        h.update(&data);
        let d = h.finalize();
        prop_assert_eq!(d.algorithm(), alg);
        prop_assert_eq!(Digest::parse(&d.to_string()).unwrap(), d.clone());
        if !sha512 {
            prop_assert_eq!(Digest::sha256_of(&data), d);
        }
    }

    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        let _ = Name::parse(&s);
        let _ = Tag::parse(&s);
        let _ = Digest::parse(&s);
        let _ = Reference::parse(&s);
        let _ = serde_json::from_str::<Digest>(&serde_json::to_string(&s).unwrap());
    }

    #[test]
    fn long_arbitrary_strings_never_panic(s in "\\PC{250,700}") {
        let _ = Name::parse(&s).map(|n| n.to_string());
        let _ = Tag::parse(&s).map(|t| t.to_string());
        let _ = Digest::parse(&s).map(|d| d.to_string());
        let _ = Reference::parse(&s).map(|r| r.to_string());
        if let Err(e) = Name::parse(&s) {
            prop_assert!(e.to_string().len() < 1500);
        }
    }

    #[test]
    fn accepted_names_match_grammar(s in prop_oneof![4 => near_miss_name(), 1 => tricky_string(), 1 => valid_name(), 1 => any::<String>()]) {
        prop_assert_eq!(Name::parse(&s).is_ok(), reference_name_check(&s), "{:?}", s);
    }

    #[test]
    fn accepted_tags_match_grammar(s in prop_oneof![tricky_string(), valid_tag(), any::<String>()]) {
        prop_assert_eq!(Tag::parse(&s).is_ok(), reference_tag_check(&s), "{:?}", s);
    }

    #[test]
    fn accepted_digests_are_canonical(s in prop_oneof![
        tricky_string(),
        valid_digest_string(),
        "sha(256|512):[0-9a-fA-F]{60,130}",
    ]) {
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(d.to_string(), s.clone());
            prop_assert!(d.hex().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
            prop_assert_eq!(d.hex().len(), d.algorithm().hex_len());
        }
    }

    #[test]
    fn accepted_values_contain_no_traversal(s in tricky_string()) {
        if let Ok(n) = Name::parse(&s) {
            prop_assert!(n.components().all(|c| !c.is_empty() && c != "." && c != ".."));
            prop_assert!(!s.contains("..") && !s.contains('%') && !s.starts_with('/'));
        }
        if let Ok(t) = Tag::parse(&s) {
            prop_assert!(!t.as_str().contains('/') && !t.as_str().starts_with('.'));
        }
    }
}
