//! Warming and scheduled syncs (`[[sync]]`) against the fake upstream: what is cached at
//! start and served without the upstream, tags that move, tag patterns across pages, 429s
//! and `offline`.

use std::process::Stdio;
use std::time::Duration;

use ocicache::cache::pins::{Pin, PinOwner};
use ocicache::config::{Config, HumanDuration, SyncConfig};
use ocicache::prefetch::ImageRef;
use ocicache::sync::{EntryStatus, Status};
use ocicache::warm::{warm, Progress};

use crate::support::fake::{sha256, Fake, FakeImage, Fault};
use crate::support::proxy::{config, toml_for, ChildProxy, Proxy};
use crate::support::registry::{http_request, random_bytes, Registry};
use crate::support::wait_until;

const HOUR: Duration = Duration::from_secs(3600);
const PLATFORMS: [&str; 3] = ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Warming an index for two of its three platforms fetches exactly their manifests and
/// blobs, verified, reports progress to the end, and leaves them served with no upstream
/// request; warming it again fetches nothing.
#[test]
fn warm_fetches_the_platforms_asked_for_and_the_cache_then_serves_them() {
    let fake = Fake::start();
    let img = fake.add_image(
        "library/app",
        "1",
        &["linux/amd64", "linux/arm64/v8", "linux/arm/v7"],
        200_000,
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(config(dir.path(), &[("docker.io", &fake.url(), true)]));
    let image = ImageRef::parse("docker.io/library/app:1").unwrap();
    let platforms = ["linux/amd64".to_string(), "linux/arm64".to_string()];
    let (tx, rx) = tokio::sync::watch::channel(Progress::default());
    let w = runtime()
        .block_on(warm(&p.state, &image, &platforms, Some(&tx)))
        .unwrap();
    assert_eq!(w.digest.to_string(), img.index);
    let manifests: Vec<String> = w.manifests.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        manifests,
        [&img.index[..], &img.manifests[0], &img.manifests[1]]
    );
    let blobs: Vec<String> = w.blobs.iter().map(|d| d.to_string()).collect();
    assert_eq!(blobs, img.blobs[..4]);
    assert!(w.fetched_bytes > 400_000 && w.cached_bytes == 0 && !w.stale);
    let done = rx.borrow().clone();
    assert_eq!(
        (done.manifests, done.blobs_done, done.blobs_total),
        (3, 4, 4)
    );
    assert_eq!(
        (done.bytes_done, done.bytes_total),
        (w.fetched_bytes, w.fetched_bytes)
    );
    assert_eq!(fake.count("GET", &img.blobs[4]), 0, "arm/v7 is not fetched");
    assert_eq!(fake.count("GET", &img.manifests[2]), 0);

    fake.reset_counts();
    for d in &img.manifests[..2] {
        assert_eq!(p.get(&format!("/v2/app/manifests/{d}"), &[]).0, 200);
    }
    for d in &img.blobs[..4] {
        let (s, _, body) = p.get(&format!("/v2/app/blobs/{d}"), &[]);
        assert_eq!((s, crate::support::fake::sha256(&body)), (200, d.clone()));
    }
    assert_eq!(p.get("/v2/app/manifests/1", &[]).0, 200);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());

    let again = runtime()
        .block_on(warm(&p.state, &image, &platforms, None))
        .unwrap();
    assert_eq!(
        (again.fetched_bytes, again.cached_bytes),
        (0, w.fetched_bytes)
    );
    assert!(
        fake.requests().is_empty(),
        "within the tag's TTL: no request"
    );
}

/// A `[[sync]]` entry of `docker.io/library/<repo>`, every hour.
fn entry(repo: &str, tags: Option<&[&str]>, pattern: Option<&str>, pin: bool) -> SyncConfig {
    SyncConfig {
        image: format!("docker.io/library/{repo}"),
        tags: tags.map(|t| t.iter().map(|s| s.to_string()).collect()),
        tag_pattern: pattern.map(String::from),
        platforms: vec!["linux/amd64".into(), "linux/arm64".into()],
        interval: HumanDuration(HOUR),
        pin,
    }
}

/// A proxy of the fake as `docker.io`, with these sync entries and an admin listener.
fn proxy(fake: &Fake, dir: &std::path::Path, entries: Vec<SyncConfig>) -> Proxy {
    let mut c: Config = config(dir, &[("docker.io", &fake.url(), true)]);
    c.sync = entries;
    c.validate().expect("a valid configuration");
    Proxy::start(c)
}

fn status(p: &Proxy) -> Status {
    p.state.sync.status()
}

/// Waits for entry 0's `runs`-th run to end; its status then.
fn after_run(p: &Proxy, runs: u64) -> EntryStatus {
    wait_until("a sync run", Duration::from_secs(20), || {
        let e = &status(p).entries[0];
        e.runs >= runs && !e.running
    });
    status(p).entries[0].clone()
}

fn pin_of<'a>(pins: &'a [Pin], tag: &str) -> &'a Pin {
    pins.iter()
        .find(|p| p.key.reference.to_string() == tag)
        .unwrap_or_else(|| panic!("no pin of {tag}: {pins:?}"))
}

fn strings(digests: &[ocicache::reference::Digest]) -> Vec<String> {
    digests.iter().map(|d| d.to_string()).collect()
}

/// The manifests (by tag and by digest) and blobs of the two synced platforms of `img`.
fn pull(p: &Proxy, repo: &str, tag: &str, img: &FakeImage) {
    for path in [format!("/v2/{repo}/manifests/{tag}")].into_iter().chain(
        img.manifests[..2]
            .iter()
            .map(|d| format!("/v2/{repo}/manifests/{d}")),
    ) {
        assert_eq!(p.get(&path, &[]).0, 200, "{path}");
    }
    for d in &img.blobs[..4] {
        let (s, _, body) = p.get(&format!("/v2/{repo}/blobs/{d}"), &[]);
        assert_eq!((s, sha256(&body)), (200, d.clone()));
    }
}

/// The issue's scenario: an entry of two tags and two platforms is cached (and pinned) at
/// start, then served with no upstream request; the tag moves upstream; after the interval
/// (the server's clock skipped ahead) the new digest is cached and pinned and the old one
/// is no longer pinned; the admin API shows it.
#[test]
fn a_synced_entry_is_cached_at_start_and_follows_a_moved_tag() {
    let fake = Fake::start();
    let one = fake.add_image("library/app", "1", &PLATFORMS, 50_000, 1);
    let stable = fake.add_image("library/app", "stable", &PLATFORMS, 50_000, 2);
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        &fake,
        dir.path(),
        vec![entry("app", Some(&["1", "stable"]), None, true)],
    );

    let e = after_run(&p, 1);
    assert_eq!(e.last_result.as_deref(), Some("ok"), "{e:?}");
    assert_eq!((e.images, e.tags.len()), (2, 2));
    assert_eq!(e.tags["1"], one.index);
    // Four layers of 50,000 bytes and four small configs.
    assert!(
        e.bytes > 4 * 50_000 && e.bytes < 4 * 50_000 + 1000,
        "{}",
        e.bytes
    );
    let pins = p.state.cache.pins();
    assert_eq!(pins.len(), 2);
    assert_eq!(
        strings(&pin_of(&pins, "1").image.manifests),
        [&one.index[..], &one.manifests[0], &one.manifests[1]]
    );
    assert_eq!(
        strings(&pin_of(&pins, "stable").image.blobs),
        stable.blobs[..4]
    );
    assert_eq!(fake.count("GET", &one.blobs[4]), 0, "arm/v7 is not synced");

    fake.reset_counts();
    pull(&p, "app", "1", &one);
    pull(&p, "app", "stable", &stable);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());

    let moved = fake.add_image("library/app", "1", &PLATFORMS, 50_000, 3);
    p.state.clock.advance(HOUR + ocicache::sync::JITTER_MAX);
    let e = after_run(&p, 2);
    assert_eq!(e.last_result.as_deref(), Some("ok"), "{e:?}");
    assert_eq!(e.tags["1"], moved.index);
    assert_eq!(e.tags["stable"], stable.index);
    let pins = p.state.cache.pins();
    assert_eq!(strings(&pin_of(&pins, "1").image.manifests)[0], moved.index);
    let digest = |d: &str| d.parse::<ocicache::reference::Digest>().unwrap();
    for d in moved.blobs[..4].iter().chain(&stable.blobs[..4]) {
        assert!(p.state.cache.is_pinned(&digest(d)), "{d}");
    }
    for d in one.blobs[..4].iter().chain([&one.index]) {
        assert!(
            !p.state.cache.is_pinned(&digest(d)),
            "the old digest is unpinned: {d}"
        );
    }
    fake.reset_counts();
    pull(&p, "app", "1", &moved);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
    let runs = r#"ocicache_sync_runs_total{entry="docker.io/library/app",result="ok"}"#;
    assert_eq!(p.metric(runs), 2.0);
    assert_eq!(
        p.metric(r#"ocicache_sync_images_total{entry="docker.io/library/app"}"#),
        4.0
    );
    assert!(p.metric("ocicache_sync_last_success_timestamp_seconds{") > 1.7e9);

    let (s, _, body) = http_request("GET", &format!("{}/api/v1/sync", p.admin_url()), &[], b"");
    assert_eq!(s, 200);
    let answered: Status = serde_json::from_slice(&body).unwrap();
    assert_eq!(answered, status(&p));
    assert!(answered.enabled);
    assert_eq!(answered.entries[0].tags["1"], moved.index);
}

/// A 429 stops the sync and backs it off (its next run a minute or more later) while the
/// server keeps serving other pulls; once the upstream relents and the back-off has passed,
/// the entry is synced.
#[test]
fn a_429_during_a_sync_backs_off_and_the_server_keeps_serving() {
    let fake = Fake::start();
    let img = fake.add_image("library/app", "1", &PLATFORMS, 20_000, 4);
    let other = fake.add_image("library/other", "1", &PLATFORMS, 20_000, 5);
    fake.fault(
        "/library/app/manifests/",
        Fault::TooMany {
            retry_after: "60".into(),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        &fake,
        dir.path(),
        vec![entry("app", Some(&["1"]), None, true)],
    );
    let e = after_run(&p, 1);
    assert_eq!(e.last_result.as_deref(), Some("rate_limited"), "{e:?}");
    let rfc = |s: &Option<String>| humantime::parse_rfc3339(s.as_deref().unwrap()).unwrap();
    wait_until("the next run planned", Duration::from_secs(5), || {
        let e = &status(&p).entries[0];
        e.next_run.is_some() && rfc(&e.next_run) > rfc(&e.last_run)
    });
    let e = status(&p).entries[0].clone();
    let wait = rfc(&e.next_run).duration_since(rfc(&e.last_run)).unwrap();
    assert!(wait >= ocicache::sync::BACKOFF_START, "{wait:?}");
    assert!(p.state.cache.pins().is_empty());
    let limited =
        r#"ocicache_sync_runs_total{entry="docker.io/library/app",result="rate_limited"}"#;
    assert_eq!(p.metric(limited), 1.0);

    // Meanwhile the server serves.
    pull(&p, "other", "1", &other);

    fake.clear_faults();
    p.state
        .clock
        .advance(ocicache::sync::BACKOFF_START + Duration::from_secs(1));
    let e = after_run(&p, 2);
    assert_eq!(e.last_result.as_deref(), Some("ok"), "{e:?}");
    assert_eq!(e.tags["1"], img.index);
    fake.reset_counts();
    pull(&p, "app", "1", &img);
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());
}

/// The upstream's `ratelimit-remaining` runs low: the run that saw it completes, the next
/// one is deferred by a minute (rate_limited, no request), and once that reading has been
/// acted on and no newer one came, the run after the back-off goes ahead.
#[test]
fn a_low_ratelimit_remaining_defers_the_next_sync() {
    let fake = Fake::start();
    let img = fake.add_image("library/app", "1", &PLATFORMS, 1000, 7);
    fake.set_ratelimit_remaining(Some("3;w=21600"));
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        &fake,
        dir.path(),
        vec![entry("app", Some(&["1"]), None, false)],
    );
    let e = after_run(&p, 1);
    assert_eq!(e.last_result.as_deref(), Some("ok"), "{e:?}");
    assert_eq!(p.metric("ocicache_upstream_ratelimit_remaining{"), 3.0);

    fake.reset_counts();
    p.state.clock.advance(HOUR + ocicache::sync::JITTER_MAX);
    let e = after_run(&p, 2);
    assert_eq!(e.last_result.as_deref(), Some("rate_limited"), "{e:?}");
    assert!(e.last_error.unwrap().contains("ratelimit-remaining is 3"));
    assert!(fake.requests().is_empty(), "deferred without asking");

    p.state
        .clock
        .advance(ocicache::sync::BACKOFF_START + Duration::from_secs(1));
    let e = after_run(&p, 3);
    assert_eq!(e.last_result.as_deref(), Some("ok"), "{e:?}");
    assert_eq!(fake.count("HEAD", "/manifests/1"), 1, "the tag revalidated");
    assert_eq!(e.tags["1"], img.index);
}

/// `tag_pattern` keeps exactly the repository's tags that match it, read across the pages
/// of its tag list.
#[test]
fn a_tag_pattern_picks_exactly_the_matching_tags_across_pages() {
    let fake = Fake::start();
    let tags = ["1.25.0", "1.26.1", "1.27.0", "1.27.1", "2.0.0", "latest"];
    for (i, t) in tags.iter().enumerate() {
        fake.add_image("library/app", t, &PLATFORMS[..1], 1000, 10 + i as u64);
    }
    fake.paginate_tags(true);
    fake.set_default_tag_page(Some(2));
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(
        &fake,
        dir.path(),
        vec![entry("app", None, Some(r"^1\.2[6-9]\."), false)],
    );
    let e = after_run(&p, 1);
    assert_eq!(e.last_result.as_deref(), Some("ok"), "{e:?}");
    let synced: Vec<&str> = e.tags.keys().map(String::as_str).collect();
    assert_eq!(synced, ["1.26.1", "1.27.0", "1.27.1"]);
    assert_eq!(fake.count("GET", "/tags/list"), 3, "three pages of two");
    for t in ["1.25.0", "2.0.0", "latest"] {
        assert_eq!(fake.count("GET", &format!("/manifests/{t}")), 0, "{t}");
    }
    assert!(p.state.cache.pins().is_empty(), "pin = false");
}

/// `offline = true`: no sync runs, and the log says so.
#[test]
fn offline_runs_no_sync() {
    let fake = Fake::start();
    fake.add_image("library/app", "1", &PLATFORMS, 1000, 6);
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "offline = true\n[admin]\nlisten = \"\"\n{}[[sync]]\nimage = \"docker.io/library/app\"\ntags = [\"1\"]\n",
        toml_for(&dir.path().join("cache"), &fake.url(), "")
    );
    let child = ChildProxy::start(dir.path(), &toml, Stdio::piped());
    let out = child.terminate();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(logs.contains("scheduled syncs are disabled"), "{logs}");
    assert!(!logs.contains("scheduled syncs started"), "{logs}");
    assert!(fake.requests().is_empty(), "{:?}", fake.requests());

    // The same configuration without `offline` does sync: the test above would see it.
    let toml = toml.replacen("offline = true\n", "", 1);
    let child = ChildProxy::start(dir.path(), &toml, Stdio::piped());
    wait_until("a sync's requests", Duration::from_secs(10), || {
        fake.count("GET", "/manifests/1") > 0
    });
    let logs = String::from_utf8_lossy(&child.terminate().stderr).into_owned();
    assert!(logs.contains("scheduled syncs started"), "{logs}");
}

/// Sync owns the pins it sets (against the real registry): a pattern's tag deleted upstream
/// loses its pin at the entry's next run; a tag taken out of an entry's list, and the tags
/// of an entry taken out of the configuration, lose theirs at the next start (offline
/// here, so no run does it); a pin set by hand through the admin API stays through both.
#[test]
fn tags_no_longer_synced_lose_their_sync_pins_and_a_hand_pin_stays() {
    let Some(reg) = Registry::start() else { return };
    let push = |tag: &str, seed| reg.push_image("library/app", tag, &[random_bytes(5_000, seed)]);
    let (one, two, hand) = (push("1", 1), push("2", 2), push("3", 3));
    let (dot_zero, beta) = (push("1.0", 4), push("1.1-beta", 5));
    let dir = tempfile::tempdir().unwrap();
    let start = |entries: Vec<SyncConfig>, offline: bool| {
        let mut c: Config = config(dir.path(), &[("docker.io", &reg.url(), true)]);
        (c.sync, c.offline) = (entries, offline);
        c.validate().expect("a valid configuration");
        Proxy::start(c)
    };
    let owners = |p: &Proxy| -> Vec<(String, PinOwner)> {
        let pins = p.state.cache.pins();
        pins.iter()
            .map(|p| (p.key.reference.to_string(), p.image.set_by))
            .collect()
    };
    let runs_ended = |p: &Proxy, runs: u64| {
        wait_until("every entry's run", Duration::from_secs(20), || {
            status(p)
                .entries
                .iter()
                .all(|e| e.runs >= runs && !e.running)
        })
    };
    let pinned = |p: &Proxy, img: &crate::support::registry::PushedImage| {
        let digest = |d: &str| d.parse::<ocicache::reference::Digest>().unwrap();
        p.state.cache.is_pinned(&digest(&img.layer_digests[0]))
    };
    let sync = PinOwner::Sync;

    let p = start(
        vec![
            entry("app", Some(&["1", "2"]), None, true),
            entry("app", None, Some(r"^1\."), true),
        ],
        false,
    );
    runs_ended(&p, 1);
    let (s, _, body) = http_request(
        "PUT",
        &format!("{}/api/v1/pins/docker.io/library/app/3", p.admin_url()),
        &[],
        b"",
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let all = |tags: &[(&str, PinOwner)]| -> Vec<(String, PinOwner)> {
        tags.iter().map(|(t, o)| (t.to_string(), *o)).collect()
    };
    assert_eq!(
        owners(&p),
        all(&[
            ("1", sync),
            ("1.0", sync),
            ("1.1-beta", sync),
            ("2", sync),
            ("3", PinOwner::Operator)
        ])
    );

    // The pattern's tag deleted upstream: its pin goes at the entry's next run.
    assert_eq!(
        reg.delete_manifest("library/app", &beta.manifest_digest),
        202
    );
    p.state.clock.advance(HOUR + ocicache::sync::JITTER_MAX);
    runs_ended(&p, 2);
    assert_eq!(status(&p).entries[1].last_result.as_deref(), Some("ok"));
    assert_eq!(
        owners(&p),
        all(&[
            ("1", sync),
            ("1.0", sync),
            ("2", sync),
            ("3", PinOwner::Operator)
        ])
    );
    assert!(!pinned(&p, &beta) && pinned(&p, &dot_zero));
    p.stop();

    // Tag 2 out of the list, the pattern's entry out of the configuration: at start.
    let p = start(vec![entry("app", Some(&["1"]), None, true)], true);
    // The pins' list changes just before the index's pinned set: wait for both.
    wait_until("the start-up release", Duration::from_secs(10), || {
        owners(&p).len() == 2 && !pinned(&p, &two) && !pinned(&p, &dot_zero)
    });
    assert_eq!(owners(&p), all(&[("1", sync), ("3", PinOwner::Operator)]));
    assert!(pinned(&p, &one) && pinned(&p, &hand));
    assert_eq!(status(&p).entries[0].runs, 0, "offline: no run did it");
}

/// A pin (the admin API) and a warm (syncs, prefetch jobs) walk an image the same way: an
/// index to every platform's manifest when no platform is asked for, then their configs and
/// layers; an artifact manifest to its `blobs`. The warm fetches exactly what the pin keeps.
#[test]
fn a_pin_and_a_warm_walk_an_image_alike() {
    let fake = Fake::start();
    let img = fake.add_image("library/app", "1", &PLATFORMS, 1000, 8);
    let parts = [fake.add_blob(b"part one"), fake.add_blob(b"part two")];
    let artifact = serde_json::json!({
        "mediaType": "application/vnd.oci.artifact.manifest.v1+json",
        "artifactType": "application/vnd.example",
        "blobs": parts.iter().map(|d| serde_json::json!({
            "mediaType": "application/octet-stream", "digest": d, "size": 8,
        })).collect::<Vec<_>>(),
    });
    let art = fake.add_manifest(
        "library/app",
        Some("art"),
        "application/vnd.oci.artifact.manifest.v1+json",
        &serde_json::to_vec(&artifact).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let p = proxy(&fake, dir.path(), vec![]);
    for (tag, manifests, blobs) in [
        (
            "1",
            [&img.index[..]]
                .into_iter()
                .chain(img.manifests.iter().map(String::as_str))
                .map(String::from)
                .collect::<Vec<_>>(),
            img.blobs.clone(),
        ),
        ("art", vec![art.clone()], parts.to_vec()),
    ] {
        let url = format!("{}/api/v1/pins/docker.io/library/app/{tag}", p.admin_url());
        let (s, _, body) = http_request("PUT", &url, &[], b"");
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
        let pin: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(pin["manifests"], serde_json::json!(manifests), "{tag}");
        assert_eq!(pin["blobs"], serde_json::json!(blobs), "{tag}");

        let image = ImageRef::parse(&format!("docker.io/library/app:{tag}")).unwrap();
        let w = runtime()
            .block_on(warm(&p.state, &image, &[], None))
            .unwrap();
        assert_eq!(
            (strings(&w.manifests), strings(&w.blobs)),
            (manifests, blobs)
        );
        for d in &w.blobs {
            assert_eq!(fake.count("GET", &d.to_string()), 1, "{tag}: {d} fetched");
        }
    }
}
