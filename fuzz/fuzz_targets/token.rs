//! Token endpoint answers: `challenge::parse_token_response`. A token, when found, is a
//! non-blank string taken from the body; the lifetime is clamped; error messages never quote
//! the body (it may hold a token).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::upstream::challenge::{
    self, TokenError, MAX_EXPIRES_IN, MAX_TOKEN_RESPONSE_LEN, MIN_EXPIRES_IN,
};

fn error_message_is_generic(msg: &str) -> bool {
    if msg == format!("body is larger than {MAX_TOKEN_RESPONSE_LEN} bytes") {
        return true;
    }
    // "<category> at line N column M"
    let Some((what, pos)) = msg.split_once(" at line ") else {
        return false;
    };
    let cat_ok = matches!(
        what,
        "I/O error" | "syntax error" | "unexpected structure or type" | "unexpected end of input"
    );
    let pos_ok = pos
        .split_once(" column ")
        .is_some_and(|(l, c)| l.parse::<u64>().is_ok() && c.parse::<u64>().is_ok());
    cat_ok && pos_ok
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    match challenge::parse_token_response(data) {
        Ok(t) => {
            assert!(!t.token.trim().is_empty());
            assert!(t.expires_in >= MIN_EXPIRES_IN && t.expires_in <= MAX_EXPIRES_IN);
            // Instant + expires_in must not overflow.
            let _ = std::time::Instant::now() + t.expires_in;
            // Debug redacts it.
            let dbg = format!("{t:?}");
            assert!(dbg.contains("REDACTED"));
            if t.token != "REDACTED" {
                assert!(!dbg.contains(&format!("{:?}", t.token)), "Debug shows the token");
            }
            // The token is one of the body's strings. (serde_json skips ignored fields without
            // checking them the way `Value` does: invalid UTF-8 inside their strings, floats
            // out of range. Such bodies are valid for the token parser, not for `Value`.)
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
                let found = match &v {
                    serde_json::Value::Object(m) => ["token", "access_token"]
                        .iter()
                        .any(|k| m.get(*k).and_then(|x| x.as_str()) == Some(t.token.as_str())),
                    serde_json::Value::Array(a) => {
                        a.iter().any(|x| x.as_str() == Some(t.token.as_str()))
                    }
                    _ => false,
                };
                assert!(found, "token not from the body");
            }
        }
        Err(TokenError::Json(msg)) => {
            assert!(error_message_is_generic(&msg), "message quotes input? {msg:?}");
        }
        Err(TokenError::Missing) => {}
    }
});
