//! Names, tags and references: `Name::parse`, `Tag::parse`, `Reference::parse`, their
//! `Display` round trip, their serde form, and the grammar they promise (no path traversal).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::reference::{Digest, Name, Reference, ReferenceError, Tag};

/// Errors echo at most 300 bytes of the input (plus an ellipsis).
fn check_echo(e: &ReferenceError) {
    let echoed = match e {
        ReferenceError::NameInvalid(s)
        | ReferenceError::TagInvalid(s)
        | ReferenceError::DigestInvalid(s)
        | ReferenceError::UnsupportedAlgorithm(s) => s,
    };
    assert!(echoed.len() <= 300 + '…'.len_utf8(), "echo too long: {}", echoed.len());
}

fn name_grammar(s: &str) -> bool {
    // name := component ('/' component)*, component := [a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*
    fn component(c: &str) -> bool {
        let b = c.as_bytes();
        if b.is_empty() || !(b[0].is_ascii_lowercase() || b[0].is_ascii_digit()) {
            return false;
        }
        let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
        let mut i = 0;
        while i < b.len() {
            while i < b.len() && alnum(b[i]) {
                i += 1;
            }
            if i == b.len() {
                return true;
            }
            // a separator, then at least one alnum
            match b[i] {
                b'.' => i += 1,
                b'_' => {
                    i += 1;
                    if i < b.len() && b[i] == b'_' {
                        i += 1;
                    }
                }
                b'-' => {
                    while i < b.len() && b[i] == b'-' {
                        i += 1;
                    }
                }
                _ => return false,
            }
            if i == b.len() || !alnum(b[i]) {
                return false;
            }
        }
        true
    }
    s.len() <= 255 && s.split('/').all(component)
}

fn tag_grammar(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 4096 {
        return;
    }
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    // Name
    match Name::parse(s) {
        Ok(n) => {
            assert!(name_grammar(s), "accepted a name outside the grammar: {s:?}");
            assert_eq!(n.as_str(), s);
            assert_eq!(n.to_string(), s);
            assert_eq!(Name::parse(&n.to_string()).unwrap(), n);
            for c in n.components() {
                assert!(!c.is_empty() && c != "." && c != "..", "{s:?}");
                assert!(!c.contains('%') && !c.contains('\\'), "{s:?}");
            }
            let json = serde_json::to_string(&n).unwrap();
            assert_eq!(serde_json::from_str::<Name>(&json).unwrap(), n);
        }
        Err(e) => {
            assert!(!name_grammar(s), "rejected a name of the grammar: {s:?}");
            check_echo(&e);
        }
    }

    // Tag
    match Tag::parse(s) {
        Ok(t) => {
            assert!(tag_grammar(s), "{s:?}");
            assert_eq!(t.to_string(), s);
            assert_eq!(Tag::parse(t.as_str()).unwrap(), t);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<Tag>(&json).unwrap(), t);
        }
        Err(e) => {
            assert!(!tag_grammar(s), "rejected a tag of the grammar: {s:?}");
            check_echo(&e);
        }
    }

    // Reference: a digest iff there is a ':'.
    match Reference::parse(s) {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            assert_eq!(Reference::parse(&r.to_string()).unwrap(), r);
            match &r {
                Reference::Tag(t) => {
                    assert!(!s.contains(':'));
                    assert_eq!(Tag::parse(s).as_ref(), Ok(t));
                }
                Reference::Digest(d) => {
                    assert!(s.contains(':'));
                    assert_eq!(Digest::parse(s).as_ref(), Ok(d));
                }
            }
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        }
        Err(e) => {
            check_echo(&e);
            if s.contains(':') {
                assert!(Digest::parse(s).is_err());
            } else {
                assert!(Tag::parse(s).is_err());
            }
        }
    }

    // serde from arbitrary JSON: accepted iff the decoded string is valid.
    if let Ok(inner) = serde_json::from_str::<String>(s) {
        assert_eq!(
            serde_json::from_str::<Name>(s).ok(),
            Name::parse(&inner).ok(),
            "{s:?}"
        );
        assert_eq!(
            serde_json::from_str::<Reference>(s).ok(),
            Reference::parse(&inner).ok(),
            "{s:?}"
        );
    }
});
