//! What `manifests.rs` reads from headers: `next_link` (a `Link` header of a tag list page,
//! whose target is then requested from the same upstream) and `accepts` (a client's `Accept`).
//!
//! Input: 1 byte selector, then `link \0 accept \0 media-type` (lossy UTF-8).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::manifests::accepts;
use ocicache::upstream::next_link;

const BASES: &[&str] = &[
    "https://registry.example",
    "http://127.0.0.1:5000",
    "https://registry.example:8443/mirror/",
];
const NAMES: &[&str] = &["library/nginx", "a", "owner/app/sub"];

fuzz_target!(|data: &[u8]| {
    if data.is_empty() || data.len() > 8192 {
        return;
    }
    let sel = data[0] as usize;
    let rest = String::from_utf8_lossy(&data[1..]);
    let mut fields = rest.splitn(3, '\0');
    let link = fields.next().unwrap_or("");
    let accept = fields.next();
    let media_type = fields.next().unwrap_or("application/vnd.oci.image.manifest.v1+json");

    // next_link: the target is what stood between '<' and '>' in the header.
    if let Some(target) = next_link(link) {
        assert!(link.contains(&format!("<{target}>")), "{target:?} not in {link:?}");
        // fetch_tag_list follows it only when it is a tag list path of the same repository;
        // then it must stay on the upstream's origin.
        let name = NAMES[sel % NAMES.len()];
        let base = url::Url::parse(BASES[(sel / NAMES.len()) % BASES.len()]).unwrap();
        if target.starts_with(&format!("/v2/{name}/tags/list")) {
            if let Ok(u) = base.join(&target) {
                assert_eq!(u.origin(), base.origin(), "{target:?} leaves {base}");
                // And it can be sent as a request URI.
                let _ = http::Uri::try_from(u.as_str());
            }
        }
    }

    // accepts: no list, an empty list or a wildcard admit everything; an exact item admits,
    // unless it says `q=0` (RFC 9110 §12.4.2: "not acceptable").
    let a = accepts(accept, media_type);
    match accept {
        None => assert!(a),
        Some(acc) if acc.trim().is_empty() => assert!(a),
        Some(acc) => {
            // (type, has a q of zero by the RFC's qvalue grammar: "0" [ "." 0*3("0") ])
            let items: Vec<(&str, bool)> = acc
                .split(',')
                .map(|i| {
                    let mut parts = i.split(';');
                    let t = parts.next().unwrap_or("").trim();
                    let zero = parts.any(|p| {
                        p.trim().strip_prefix("q=").is_some_and(|q| {
                            let frac = q.strip_prefix("0").and_then(|r| {
                                if r.is_empty() { Some("") } else { r.strip_prefix('.') }
                            });
                            frac.is_some_and(|f| f.len() <= 3 && f.bytes().all(|b| b == b'0'))
                        })
                    });
                    (t, zero)
                })
                .collect();
            let matches = |t: &str| t == "*/*" || t.eq_ignore_ascii_case(media_type);
            // An item with no parameter at all that names the type (or */*) admits it.
            if acc.split(',').any(|i| !i.contains(';') && matches(i.trim())) {
                assert!(a, "{acc:?} should admit {media_type:?}");
            }
            // Admitted only through a matching item (or application/*) that is not q=0.
            if a {
                assert!(
                    items
                        .iter()
                        .any(|(t, zero)| !zero && (matches(t) || *t == "application/*")),
                    "{acc:?} admitted {media_type:?}"
                );
            }
        }
    }
    // Adding "*/*" to any list admits any type.
    let with_wild = format!("{}, */*", accept.unwrap_or(""));
    assert!(accepts(Some(&with_wild), media_type));
});
