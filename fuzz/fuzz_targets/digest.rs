//! Digests: `Digest::parse` against the grammar (sha256/sha512 only, lowercase hex of the
//! exact length), the `Display`/serde round trip, and `DigestHasher` agreeing with `sha256_of`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::reference::{Algorithm, Digest, DigestHasher, ReferenceError};

fn is_algorithm(s: &str) -> bool {
    // component (separator component)*, component := [a-z0-9]+, separator := [+._-]
    !s.is_empty()
        && s.split(['+', '.', '_', '-']).all(|c| {
            !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

fn is_encoded(s: &str) -> bool {
    !s.is_empty()
        && s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'=' | b'_' | b'-'))
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 1024 {
        return;
    }
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    let expected_ok = s.len() <= 256
        && s.split_once(':').is_some_and(|(alg, enc)| {
            let alg_ok = Algorithm::parse(alg).is_some();
            alg_ok
                && Algorithm::parse(alg).unwrap().hex_len() == enc.len()
                && enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });

    match Digest::parse(s) {
        Ok(d) => {
            assert!(expected_ok, "accepted {s:?}");
            assert_eq!(d.to_string(), s);
            assert_eq!(format!("{d:?}"), s);
            assert_eq!(d.hex().len(), d.algorithm().hex_len());
            assert_eq!(s.split_once(':').unwrap().0, d.algorithm().as_str());
            assert_eq!(Digest::parse(&d.to_string()).unwrap(), d);
            // Safe as a file name: no separators, no dots.
            assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
            // A hasher of the same algorithm over the input gives a digest that parses back.
            let mut h = d.hasher();
            h.update(data);
            let got = h.finalize();
            assert_eq!(got.algorithm(), d.algorithm());
            assert_eq!(Digest::parse(&got.to_string()).unwrap(), got);
        }
        Err(e) => {
            assert!(!expected_ok, "rejected {s:?}: {e}");
            match &e {
                ReferenceError::UnsupportedAlgorithm(alg) => {
                    // Only for inputs that fit the general grammar.
                    let (a, enc) = s.split_once(':').unwrap();
                    assert_eq!(alg, a);
                    assert!(is_algorithm(a) && is_encoded(enc), "{s:?}");
                    assert!(Algorithm::parse(a).is_none());
                }
                ReferenceError::DigestInvalid(echo) => {
                    assert!(echo.len() <= 300 + '…'.len_utf8());
                }
                other => panic!("unexpected error kind {other:?}"),
            }
        }
    }

    // sha256_of agrees with an incremental hasher fed in two pieces.
    let cut = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut h = DigestHasher::new(Algorithm::Sha256);
    h.update(&data[..cut]);
    h.update(&data[cut..]);
    assert_eq!(h.finalize(), Digest::sha256_of(data));
});
