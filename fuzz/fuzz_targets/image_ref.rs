//! `prefetch::ImageRef::parse` (`nginx`, `nginx:1.27`, `ghcr.io/owner/app@sha256:...`):
//! what it accepts has a valid name and reference, and the canonical spelling
//! `registry/name:tag` or `registry/name@digest` parses back to the same image.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ocicache::prefetch::ImageRef;
use ocicache::reference::{Name, Reference};

fuzz_target!(|data: &[u8]| {
    if data.len() > 2048 {
        return;
    }
    let s = String::from_utf8_lossy(data);
    let Ok(img) = ImageRef::parse(&s) else {
        return;
    };
    assert_eq!(Name::parse(img.name.as_str()).as_ref(), Ok(&img.name));
    assert_eq!(Reference::parse(&img.reference.to_string()).as_ref(), Ok(&img.reference));
    assert!(!img.registry.contains('/'), "{:?}", img.registry);
    assert!(!img.registry.contains('@'), "{:?}", img.registry);
    if img.registry == "docker.io" {
        assert!(img.name.as_str().contains('/'), "hub name without namespace: {img:?}");
    }
    let sep = match img.reference {
        Reference::Tag(_) => ':',
        Reference::Digest(_) => '@',
    };
    let canonical = format!("{}/{}{sep}{}", img.registry, img.name, img.reference);
    let again = ImageRef::parse(&canonical)
        .unwrap_or_else(|e| panic!("{canonical:?} (from {s:?}) does not parse: {e}"));
    assert_eq!(again, img, "{canonical:?} from {s:?}");
});
