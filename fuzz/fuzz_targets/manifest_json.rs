//! The JSON that ocicache reads from upstreams and from its own cache folder, deserialized into
//! `ocicache::prefetch::ManifestDoc` (with its `Descriptor` and `Platform`) and structs shaped
//! like the private ones in `src/manifests.rs` (`media_type_in`'s struct, the tag list `Page`, the
//! referrers answer as a `serde_json::Value`), followed by what the code then does with the
//! strings: `Reference::parse`/`Digest::parse` of descriptor digests, `Tag::parse` of tags.
//! Bounded input (64 KiB), as the code bounds bodies by `max_size`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::prefetch::ManifestDoc;
use ocicache::reference::{Digest, Reference, Tag};
use serde::Deserialize;

#[derive(Deserialize)]
struct MediaType {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    if let Ok(doc) = serde_json::from_slice::<ManifestDoc>(data) {
        for d in doc.manifests.iter().chain(doc.config.iter()).chain(doc.layers.iter()) {
            if let Ok(r) = Reference::parse(&d.digest) {
                assert_eq!(r.to_string(), d.digest);
            }
            if let Ok(dg) = Digest::parse(&d.digest) {
                assert_eq!(dg.to_string(), d.digest);
            }
            if let Some(p) = &d.platform {
                let _ = match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                };
            }
        }
    }
    if let Ok(m) = serde_json::from_slice::<MediaType>(data) {
        if let Some(mt) = m.media_type {
            // Stored as a blob's media type and later sent as Content-Type: it must either be
            // a valid header value or be refused by HeaderValue (no panic either way).
            let _ = http::HeaderValue::from_str(&mt);
        }
    }
    if let Ok(p) = serde_json::from_slice::<Page>(data) {
        let mut tags: Vec<String> = p
            .tags
            .unwrap_or_default()
            .into_iter()
            .filter(|t| Tag::parse(t).is_ok())
            .collect();
        tags.sort();
        tags.dedup();
        for w in tags.windows(2) {
            assert!(w[0] < w[1]);
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        // What is passed through (referrers) re-serializes and reads back the same.
        let again = serde_json::to_vec(&v).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&again).unwrap();
        if !has_float(&v) {
            assert_eq!(back, v);
        }
    }
});

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(m) => m.values().any(has_float),
        _ => false,
    }
}
