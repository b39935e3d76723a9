//! `WWW-Authenticate` values: `challenge::parse`. Beyond not panicking: the limits hold,
//! schemes and parameter names are lowercase tokens, and a header rebuilt from the parsed
//! challenges (every value as a quoted-string) parses back to the same challenges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::upstream::challenge::{self, Challenge, MAX_CHALLENGES, MAX_HEADER_LEN, MAX_PARAMS};

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

fn render(challenges: &[Challenge]) -> String {
    challenges
        .iter()
        .map(|c| {
            let params: Vec<String> = c
                .params
                .iter()
                .map(|(n, v)| {
                    let mut q = String::from("\"");
                    for ch in v.chars() {
                        if ch == '"' || ch == '\\' {
                            q.push('\\');
                        }
                        q.push(ch);
                    }
                    q.push('"');
                    format!("{n}={q}")
                })
                .collect();
            if params.is_empty() {
                c.scheme.clone()
            } else {
                format!("{} {}", c.scheme, params.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_HEADER_LEN + 16 {
        return;
    }
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();
    let got = challenge::parse(s);
    if s.len() > MAX_HEADER_LEN {
        assert!(got.is_empty());
        return;
    }
    assert!(got.len() <= MAX_CHALLENGES);
    for c in &got {
        assert!(is_token(&c.scheme), "{:?}", c.scheme);
        assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
        assert!(c.params.len() <= MAX_PARAMS);
        for (n, v) in &c.params {
            assert!(is_token(n), "{n:?}");
            assert_eq!(*n, n.to_ascii_lowercase());
            // Values hold no CTLs but HTAB: safe to put in a URL query or a log line.
            assert!(
                v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
                "{v:?}"
            );
            assert_eq!(c.param(n).is_some(), true);
        }
    }
    // Round trip through a canonical rendering.
    let rendered = render(&got);
    if rendered.len() <= MAX_HEADER_LEN {
        let again = challenge::parse(&rendered);
        assert_eq!(again, got, "rendered {rendered:?} from {s:?}");
    }
});
