use super::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

const HOUR: Duration = Duration::from_secs(3600);
const RUN_TIME: Duration = Duration::from_secs(10);

/// What a scripted run does.
#[derive(Debug, Clone, Copy)]
enum Step {
    Ok,
    /// Fails after a 429 from the upstream.
    Throttled,
    /// Fails after a 429 with this `Retry-After`.
    ThrottledFor(Duration),
    /// Fails for another reason.
    Error,
    /// Succeeds, and the upstream's answers said this `ratelimit-remaining`.
    OkWithRemaining(i64),
}

/// A runner that takes `RUN_TIME` per run, follows a script per entry (then succeeds),
/// and records when each run started and how many ran at once.
struct Script {
    t0: Instant,
    steps: Mutex<HashMap<usize, VecDeque<Step>>>,
    starts: Mutex<Vec<(usize, Duration)>>,
    signals: Mutex<RateSignals>,
    running: AtomicUsize,
    most_at_once: AtomicUsize,
}

impl Runner for Arc<Script> {
    async fn run(&self, entry: usize) -> Ran {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        self.starts
            .lock()
            .unwrap()
            .push((entry, Instant::now() - self.t0));
        tokio::time::sleep(RUN_TIME).await;
        let step = self
            .steps
            .lock()
            .unwrap()
            .get_mut(&entry)
            .and_then(|s| s.pop_front())
            .unwrap_or(Step::Ok);
        self.running.fetch_sub(1, Ordering::SeqCst);
        let mut signals = self.signals.lock().unwrap();
        match step {
            Step::Ok => Ran::Synced {
                images: 1,
                bytes: 100,
            },
            Step::Throttled => {
                signals.throttled += 1;
                Ran::Failed("429".into())
            }
            Step::ThrottledFor(d) => {
                signals.throttled += 1;
                signals.retry_after = Some(d);
                Ran::Failed("429".into())
            }
            Step::Error => Ran::Failed("broken".into()),
            Step::OkWithRemaining(r) => {
                signals.remaining = Some(r);
                signals.readings += 1;
                Ran::Synced {
                    images: 1,
                    bytes: 100,
                }
            }
        }
    }

    fn signals(&self, _upstream: &str) -> RateSignals {
        *self.signals.lock().unwrap()
    }
}

/// Starts a scheduler of `n` entries of one upstream, every `interval`, on the paused
/// clock; `steps` scripts their runs.
fn schedule(
    n: usize,
    interval: Duration,
    steps: &[(usize, &[Step])],
    signals: RateSignals,
) -> (Arc<Script>, Arc<Metrics>, tokio::task::JoinHandle<()>) {
    let script = Arc::new(Script {
        t0: Instant::now(),
        steps: Mutex::new(
            steps
                .iter()
                .map(|(i, s)| (*i, s.iter().copied().collect()))
                .collect(),
        ),
        starts: Mutex::default(),
        signals: Mutex::new(signals),
        running: AtomicUsize::new(0),
        most_at_once: AtomicUsize::new(0),
    });
    let plans = (0..n)
        .map(|i| Plan {
            label: format!("e{i}"),
            upstream: "docker.io".into(),
            interval,
        })
        .collect();
    let metrics = Arc::new(Metrics::new());
    let scheduler = Scheduler::new(
        script.clone(),
        plans,
        Arc::new(Clock::default()),
        metrics.clone(),
        Arc::new(Board::default()),
        Rng::new(7),
    );
    (script, metrics, tokio::spawn(scheduler.run()))
}

fn starts_of(script: &Script, entry: usize) -> Vec<Duration> {
    let starts = script.starts.lock().unwrap();
    starts
        .iter()
        .filter(|(e, _)| *e == entry)
        .map(|(_, t)| *t)
        .collect()
}

fn runs(metrics: &Metrics, entry: &str, result: &'static str) -> u64 {
    metrics
        .sync_runs
        .get_or_create(&SyncRunLabels {
            entry: entry.into(),
            result,
        })
        .get()
}

/// Every entry runs at start, one after the other; then each every interval plus a
/// jitter within bounds, counted from its run's start.
#[tokio::test(start_paused = true)]
async fn entries_run_at_start_one_at_a_time_then_every_interval_with_jitter() {
    let (script, metrics, task) = schedule(3, HOUR, &[], RateSignals::default());
    tokio::time::sleep(10 * HOUR + Duration::from_secs(1)).await;
    task.abort();
    assert_eq!(script.most_at_once.load(Ordering::SeqCst), 1);
    for entry in 0..3 {
        let starts = starts_of(&script, entry);
        assert_eq!(starts[0], RUN_TIME * entry as u32, "at start, in order");
        assert!(starts.len() >= 9, "{entry}: {starts:?}");
        for pair in starts.windows(2) {
            let gap = pair[1] - pair[0];
            // Another entry's run may hold it back by up to two runs.
            assert!(
                gap >= HOUR && gap <= HOUR + jitter_bound(HOUR) + 2 * RUN_TIME,
                "{entry}: {gap:?}"
            );
        }
    }
    let gaps: Vec<Duration> = starts_of(&script, 0)
        .windows(2)
        .map(|p| p[1] - p[0])
        .collect();
    assert!(gaps.windows(2).any(|g| g[0] != g[1]), "jittered: {gaps:?}");
    assert!(runs(&metrics, "e0", "ok") >= 9);
}

#[test]
fn the_jitter_is_a_tenth_of_the_interval_up_to_ten_minutes_and_seeded() {
    assert_eq!(jitter_bound(HOUR), Duration::from_secs(360));
    assert_eq!(jitter_bound(24 * HOUR), JITTER_MAX);
    let (mut a, mut b) = (Rng::new(1), Rng::new(1));
    let drawn: Vec<Duration> = (0..1000)
        .map(|_| a.up_to(Duration::from_secs(360)))
        .collect();
    assert!(drawn.iter().all(|d| *d <= Duration::from_secs(360)));
    assert!(drawn.iter().any(|d| *d < Duration::from_secs(60)));
    assert!(drawn.iter().any(|d| *d > Duration::from_secs(300)));
    assert_eq!(
        drawn[..10],
        (0..10)
            .map(|_| b.up_to(Duration::from_secs(360)))
            .collect::<Vec<_>>()[..]
    );
    assert_eq!(Rng::new(1).up_to(Duration::ZERO), Duration::ZERO);
}

/// A 429 stops the run and holds back every entry of the upstream: one minute, then
/// two, then (once a run succeeds) the interval again.
#[tokio::test(start_paused = true)]
async fn a_429_backs_off_exponentially_and_holds_the_upstreams_other_entries() {
    let steps: &[(usize, &[Step])] = &[(0, &[Step::Throttled, Step::Throttled])];
    let (script, metrics, task) = schedule(2, HOUR, steps, RateSignals::default());
    tokio::time::sleep(HOUR / 2).await;
    task.abort();
    let minute = BACKOFF_START;
    let e0 = starts_of(&script, 0);
    // 0: 429 at 10 s; again 1 min later (70 s): 429 at 80 s; again 2 min later.
    assert_eq!(
        e0,
        [Duration::ZERO, RUN_TIME + minute, 2 * RUN_TIME + 3 * minute]
    );
    // Entry 1 waited for the back-offs too: it runs after entry 0's third run.
    assert_eq!(starts_of(&script, 1), [3 * RUN_TIME + 3 * minute]);
    assert_eq!(runs(&metrics, "e0", "rate_limited"), 2);
    assert_eq!(runs(&metrics, "e0", "ok"), 1);
}

/// A 429's `Retry-After` longer than the back-off is waited out (within the cap).
#[tokio::test(start_paused = true)]
async fn a_429s_retry_after_stretches_the_back_off() {
    let steps: &[(usize, &[Step])] = &[(0, &[Step::ThrottledFor(Duration::from_secs(600))])];
    let (script, _, task) = schedule(1, HOUR, steps, RateSignals::default());
    tokio::time::sleep(HOUR / 2).await;
    task.abort();
    assert_eq!(
        starts_of(&script, 0),
        [Duration::ZERO, RUN_TIME + Duration::from_secs(600)]
    );
}

/// A low `ratelimit-remaining` defers runs (a minute, then two), but a reading already
/// acted on does not hold forever: with no newer one, the run goes ahead.
#[tokio::test(start_paused = true)]
async fn a_low_ratelimit_remaining_defers_runs_until_a_newer_reading() {
    let low = RateSignals {
        remaining: Some(LOW_RATELIMIT - 1),
        readings: 1,
        ..RateSignals::default()
    };
    let steps: &[(usize, &[Step])] = &[(0, &[Step::OkWithRemaining(2)])];
    let (script, metrics, task) = schedule(2, HOUR, steps, low);
    tokio::time::sleep(HOUR / 2).await;
    task.abort();
    let minute = BACKOFF_START;
    // Deferred at start; after a minute the same reading is stale: entry 0 runs and
    // brings a new low reading, so entry 1 waits two minutes more.
    assert_eq!(starts_of(&script, 0), [minute]);
    assert_eq!(starts_of(&script, 1), [minute + RUN_TIME + 2 * minute]);
    assert_eq!(runs(&metrics, "e0", "rate_limited"), 1);
    assert_eq!(runs(&metrics, "e1", "rate_limited"), 1);
}

/// A low reading acted on once does not defer later runs while no newer one comes (runs
/// answered from the cache ask the upstream nothing).
#[tokio::test(start_paused = true)]
async fn a_low_reading_acted_on_does_not_defer_the_runs_after_it() {
    let low = RateSignals {
        remaining: Some(1),
        readings: 1,
        ..RateSignals::default()
    };
    let (script, metrics, task) = schedule(1, HOUR, &[], low);
    tokio::time::sleep(3 * HOUR).await;
    task.abort();
    let e0 = starts_of(&script, 0);
    assert_eq!(e0[0], BACKOFF_START);
    for pair in e0.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= HOUR && gap <= HOUR + jitter_bound(HOUR), "{gap:?}");
    }
    assert_eq!(runs(&metrics, "e0", "rate_limited"), 1);
}

/// Other failures are retried after a minute, then two, ..., never later than the
/// interval; a success goes back to the interval.
#[tokio::test(start_paused = true)]
async fn failures_are_retried_sooner_than_the_interval() {
    let steps: &[(usize, &[Step])] = &[(0, &[Step::Error, Step::Error, Step::Error])];
    let interval = Duration::from_secs(150);
    let (script, metrics, task) = schedule(1, interval, steps, RateSignals::default());
    tokio::time::sleep(Duration::from_secs(600)).await;
    task.abort();
    let e0 = starts_of(&script, 0);
    let gaps: Vec<Duration> = e0.windows(2).map(|p| p[1] - p[0]).collect();
    let minute = ERROR_RETRY;
    assert_eq!(
        gaps[..3],
        [
            RUN_TIME + minute,
            RUN_TIME + 2 * minute,
            RUN_TIME + interval
        ]
    );
    assert!(gaps[3] >= interval && gaps[3] <= interval + jitter_bound(interval));
    assert_eq!(runs(&metrics, "e0", "error"), 3);
}

fn sync_entry(tags: Option<&[&str]>, pattern: Option<&str>, pin: bool) -> SyncConfig {
    SyncConfig {
        image: "docker.io/library/app".into(),
        tags: tags.map(|t| t.iter().map(|s| s.to_string()).collect()),
        tag_pattern: pattern.map(String::from),
        platforms: vec![],
        interval: crate::config::HumanDuration(HOUR),
        pin,
    }
}

fn pin_key(upstream: &str, name: &str, reference: &str) -> PinKey {
    PinKey {
        upstream: upstream.into(),
        name: Name::parse(name).unwrap(),
        reference: Reference::parse(reference).unwrap(),
    }
}

fn scope_of(config: &SyncConfig) -> Option<PinScope> {
    PinScope::of(
        config,
        "docker.io".into(),
        Name::parse("library/app").unwrap(),
    )
}

#[test]
fn a_scope_holds_the_pins_of_its_tags_in_its_repository_only() {
    let listed = scope_of(&sync_entry(Some(&["1", "stable"]), None, true)).unwrap();
    let held = |scope: &PinScope, up: &str, name: &str, reference: &str| {
        scope.holds(&pin_key(up, name, reference))
    };
    assert!(held(&listed, "docker.io", "library/app", "1"));
    assert!(held(&listed, "docker.io", "library/app", "stable"));
    assert!(
        !held(&listed, "docker.io", "library/app", "2"),
        "not listed"
    );
    assert!(
        !held(&listed, "ghcr.io", "library/app", "1"),
        "another upstream"
    );
    assert!(
        !held(&listed, "docker.io", "library/other", "1"),
        "another repository"
    );
    let digest = crate::reference::Digest::sha256_of(b"x").to_string();
    assert!(
        !held(&listed, "docker.io", "library/app", &digest),
        "by digest"
    );

    let pattern = scope_of(&sync_entry(None, Some(r"^1\.2[6-9]\."), true)).unwrap();
    assert!(held(&pattern, "docker.io", "library/app", "1.27.1"));
    assert!(!held(&pattern, "docker.io", "library/app", "1.25.0"));

    assert!(
        scope_of(&sync_entry(Some(&["1"]), None, false)).is_none(),
        "pin = false"
    );
}

#[test]
fn a_sync_pin_is_scheduled_while_any_entry_holds_it() {
    let scopes = [
        scope_of(&sync_entry(Some(&["1"]), None, true)).unwrap(),
        scope_of(&sync_entry(None, Some("^2"), true)).unwrap(),
    ];
    assert!(scheduled(
        &scopes,
        &pin_key("docker.io", "library/app", "1")
    ));
    assert!(scheduled(
        &scopes,
        &pin_key("docker.io", "library/app", "2.1")
    ));
    assert!(!scheduled(
        &scopes,
        &pin_key("docker.io", "library/app", "3")
    ));
    assert!(!scheduled(&[], &pin_key("docker.io", "library/app", "1")));
    // A run narrows its entry to the tags it resolved: a pattern's tag gone upstream goes.
    let mut ran = scopes[1].clone();
    ran.tags = ScopeTags::Listed(vec![Tag::parse("2.1").unwrap()]);
    assert!(ran.holds(&pin_key("docker.io", "library/app", "2.1")));
    assert!(!ran.holds(&pin_key("docker.io", "library/app", "2.0")));
}

/// With peers, the first run waits for the membership to settle: two listings a heartbeat
/// apart that agree (here the second replica shows up in the second listing, so the third
/// is the one that agrees), or `GONE_AFTER` when no listing ever comes.
#[tokio::test(start_paused = true)]
async fn the_first_run_waits_for_the_membership_to_settle() {
    use crate::cache::bucket::testing::{tier, TestStore};
    use crate::cache::bucket::LEASE_TTL;
    use crate::cache::peers::{Peers, GONE_AFTER, HEARTBEAT};
    let store = TestStore::new();
    let replica = |url: &str| {
        let cfg = crate::config::PeersConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: url.to_string(),
            secret: Some(crate::config::Secret("0123456789abcdef".into())),
            secret_file: None,
        };
        let bucket = tier(&store, LEASE_TTL, 1 << 30);
        Peers::new(&cfg, bucket, Duration::from_secs(5), &Metrics::new()).unwrap()
    };
    let settling = |peers: Arc<Peers>| {
        let t0 = tokio::time::Instant::now();
        tokio::spawn(async move {
            membership_settled(&peers).await;
            t0.elapsed()
        })
    };
    let (a, b) = (replica("http://a:1"), replica("http://b:1"));
    let settled = settling(a.clone());
    tokio::time::sleep(HEARTBEAT / 4).await;
    a.beat().await; // a alone
    tokio::time::sleep(HEARTBEAT).await;
    b.beat().await;
    a.beat().await; // a and b
    assert_eq!(settled.await.unwrap(), HEARTBEAT * 3);

    let never_listed = settling(replica("http://c:1"));
    assert_eq!(never_listed.await.unwrap(), GONE_AFTER);
}
