//! What the status page shows that the Prometheus metrics do not keep: each upstream's health
//! as its client saw it ([`Health`]: last success, last error and its cause, answers by
//! status class, rate limit), the recent errors (a small ring), the most pulled images
//! (bounded counts), and the hit ratio and bytes by source over the last five minutes (a
//! ring of samples of the metrics taken every ten seconds).
//!
//! Fed from a few call points: the upstream client's answers (`Health`), the request
//! handler's outcomes (errors, pulls by tag) and a sampler task. A hit costs nothing here:
//! the five-minute figures are differences of the metrics' own counters, sampled off the
//! request path, so they agree with `/metrics` by construction. The locks are held for a
//! few field updates, never across I/O; what allocates (an error's text, an image's name
//! the first time it is pulled) is off the path of a hit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;

use crate::clock;
use crate::metrics::Metrics;

/// How often the sampler reads the metrics: the resolution of the five-minute figures.
pub const BUCKET: Duration = Duration::from_secs(10);
/// The span of the "recent" figures.
pub const WINDOW: Duration = Duration::from_secs(300);
/// Errors kept for the page.
pub const ERRORS_KEPT: usize = 20;
/// Images whose pulls are counted; beyond it the least pulled is forgotten.
pub const IMAGES_KEPT: usize = 100;

/// A poisoned lock only means another thread panicked mid-update of a few counters: the
/// figures are still worth showing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn from_millis(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms))
}

/// The classes an upstream's answers are counted in.
pub const CLASSES: [&str; 7] = ["2xx", "3xx", "4xx", "429", "5xx", "timeout", "error"];

/// An upstream's health as its client saw its answers. Updated with atomics on every answer;
/// the last error's text is kept under a lock taken only on errors and reads.
#[derive(Debug)]
pub struct Health {
    /// The last answer that was not a failure, in ms since the epoch (0: never).
    last_success_ms: AtomicU64,
    last_error: Mutex<Option<(SystemTime, String)>>,
    /// Answers by [`CLASSES`].
    classes: [AtomicU64; CLASSES.len()],
    /// The last `ratelimit-remaining` / `ratelimit-limit` seen; `i64::MIN`: none yet.
    ratelimit_remaining: AtomicI64,
    ratelimit_limit: AtomicI64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            last_success_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            classes: Default::default(),
            ratelimit_remaining: AtomicI64::new(i64::MIN),
            ratelimit_limit: AtomicI64::new(i64::MIN),
        }
    }
}

/// Is the upstream answering, as of its last request?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpState {
    /// Not asked anything yet.
    Unused,
    /// Its last answer was a success.
    Up,
    /// Its last answer was a failure (5xx, 429, timeout, no connection).
    Failing,
}

impl UpState {
    pub fn as_str(self) -> &'static str {
        match self {
            UpState::Unused => "not contacted yet",
            UpState::Up => "up",
            UpState::Failing => "failing",
        }
    }
}

/// A [`Health`] read at one moment.
#[derive(Debug, Clone)]
pub struct HealthView {
    pub state: UpState,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
    /// Answers by class, in the order of [`CLASSES`].
    pub classes: [u64; CLASSES.len()],
    pub ratelimit_remaining: Option<i64>,
    pub ratelimit_limit: Option<i64>,
}

impl Health {
    /// The upstream answered with `status`: a 5xx or a 429 is a failure, anything else
    /// (a 404 included) means it is up.
    pub fn answered(&self, status: StatusCode) {
        let class = match status.as_u16() {
            429 => 3,
            s if s >= 500 => 4,
            s if s >= 400 => 2,
            s if s >= 300 => 1,
            _ => 0,
        };
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        if class >= 3 {
            self.failure(format!("HTTP {status}"));
        } else {
            self.last_success_ms
                .store(millis(clock::now()), Ordering::Relaxed);
        }
    }

    /// The upstream did not answer: `timeout` (no headers in time) or another `cause`.
    pub fn failed(&self, timeout: bool, cause: &dyn std::fmt::Display) {
        self.classes[if timeout { 5 } else { 6 }].fetch_add(1, Ordering::Relaxed);
        self.failure(cause.to_string());
    }

    fn failure(&self, cause: String) {
        *lock(&self.last_error) = Some((clock::now(), cause));
    }

    /// The rate limit headers of an answer, when it carried them.
    pub fn rate_limit(&self, remaining: Option<i64>, limit: Option<i64>) {
        if let Some(r) = remaining {
            self.ratelimit_remaining.store(r, Ordering::Relaxed);
        }
        if let Some(l) = limit {
            self.ratelimit_limit.store(l, Ordering::Relaxed);
        }
    }

    pub fn view(&self) -> HealthView {
        let last_success = from_millis(self.last_success_ms.load(Ordering::Relaxed));
        let last_error = lock(&self.last_error).clone();
        let state = match (last_success, &last_error) {
            (None, None) => UpState::Unused,
            (Some(_), None) => UpState::Up,
            (None, Some(_)) => UpState::Failing,
            // Millisecond stamps: a success in the same millisecond as an error wins.
            (Some(ok), Some((err, _))) if millis(ok) >= millis(*err) => UpState::Up,
            (Some(_), Some(_)) => UpState::Failing,
        };
        let known = |v: &AtomicI64| Some(v.load(Ordering::Relaxed)).filter(|v| *v != i64::MIN);
        HealthView {
            state,
            last_success,
            last_error,
            classes: std::array::from_fn(|i| self.classes[i].load(Ordering::Relaxed)),
            ratelimit_remaining: known(&self.ratelimit_remaining),
            ratelimit_limit: known(&self.ratelimit_limit),
        }
    }
}

/// The counters the page's hit ratio and bytes by source come from, as `/metrics` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// `ocicache_cache_hits_total`, all kinds.
    pub hits: u64,
    /// `ocicache_cache_misses_total`, all kinds.
    pub misses: u64,
    /// `ocicache_served_bytes_total` by source.
    pub bytes: BTreeMap<&'static str, u64>,
}

impl Totals {
    /// The counters now, read through the same accessors as the admin API's `/api/v1/cache`.
    pub fn read(metrics: &Metrics) -> Totals {
        let (hits, misses) = metrics.hits_and_misses();
        Totals {
            hits,
            misses,
            bytes: metrics.served_bytes_by_source().into_iter().collect(),
        }
    }

    /// What was counted since `earlier`.
    pub fn since(&self, earlier: &Totals) -> Totals {
        Totals {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            bytes: self
                .bytes
                .iter()
                .map(|(k, v)| {
                    let before = earlier.bytes.get(k).copied().unwrap_or(0);
                    (*k, v.saturating_sub(before))
                })
                .collect(),
        }
    }

    /// Hits over hits and misses; `None` before any.
    pub fn hit_ratio(&self) -> Option<f64> {
        let all = self.hits + self.misses;
        (all > 0).then(|| self.hits as f64 / all as f64)
    }

    pub fn bytes_total(&self) -> u64 {
        self.bytes.values().sum()
    }
}

/// The figures of the last [`WINDOW`].
#[derive(Debug, Clone)]
pub struct Recent {
    /// The counters now.
    pub now: Totals,
    /// What they counted over `span`.
    pub delta: Totals,
    /// How far back `delta` reaches: [`WINDOW`], or less since the start.
    pub span: Duration,
    /// Bytes served in each [`BUCKET`] of the window, oldest first.
    pub bytes_per_bucket: Vec<u64>,
}

/// One error kept for the page; repeats of the newest are counted in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorEntry {
    pub first: SystemTime,
    pub last: SystemTime,
    /// What failed (`GET /v2/library/nginx/manifests/1.27`, `blob body`).
    pub what: String,
    pub cause: String,
    pub count: u64,
}

/// Pulls of one image (by tag).
#[derive(Debug, Clone, PartialEq)]
pub struct Pulls {
    /// `upstream/name:tag`.
    pub image: String,
    pub count: u64,
    pub last: SystemTime,
}

/// The status kept beside the metrics; one per server.
pub struct Status {
    metrics: Arc<Metrics>,
    /// Samples of the totals, oldest first, reaching back [`WINDOW`].
    samples: Mutex<VecDeque<(SystemTime, Totals)>>,
    errors: Mutex<VecDeque<ErrorEntry>>,
    /// Pulls by a hash of `(upstream, name, tag)`: counting a known image hashes and
    /// allocates nothing.
    images: Mutex<HashMap<u64, Pulls, foldhash::fast::RandomState>>,
    /// Seeded per process; a fraction of SipHash's cost on the request's path.
    hasher: foldhash::fast::RandomState,
}

impl Status {
    /// The status of a server whose metrics are `metrics`; the window starts now.
    pub fn new(metrics: Arc<Metrics>) -> Status {
        let first = (clock::now(), Totals::read(&metrics));
        Status {
            metrics,
            samples: Mutex::new(VecDeque::from([first])),
            errors: Mutex::new(VecDeque::new()),
            images: Mutex::new(HashMap::default()),
            hasher: Default::default(),
        }
    }

    /// Starts the sampler: a sample every [`BUCKET`] while the status lives.
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(BUCKET);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            every.tick().await;
            loop {
                every.tick().await;
                let Some(status) = weak.upgrade() else { break };
                status.sample();
            }
        });
    }

    /// Reads the metrics into the window and forgets samples older than it.
    pub fn sample(&self) {
        let totals = Totals::read(&self.metrics);
        let now = clock::now();
        let mut samples = lock(&self.samples);
        samples.push_back((now, totals));
        while samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).unwrap_or_default() > WINDOW)
        {
            samples.pop_front();
        }
    }

    /// The counters now, and what they counted over the last [`WINDOW`] (or since the start).
    pub fn recent(&self) -> Recent {
        let now_totals = Totals::read(&self.metrics);
        let now = clock::now();
        let samples = lock(&self.samples);
        let base = samples
            .iter()
            .find(|(t, _)| now.duration_since(*t).unwrap_or_default() <= WINDOW)
            .or(samples.back())
            .expect("the window always holds a sample");
        let bytes_per_bucket = samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|((_, a), (_, b))| b.bytes_total().saturating_sub(a.bytes_total()))
            .collect();
        Recent {
            delta: now_totals.since(&base.1),
            span: now.duration_since(base.0).unwrap_or_default(),
            now: now_totals,
            bytes_per_bucket,
        }
    }

    /// Keeps an error for the page; a repeat of the newest one is counted in it.
    pub fn error(&self, what: &str, cause: &dyn std::fmt::Display) {
        let cause = cause.to_string();
        let now = clock::now();
        let mut errors = lock(&self.errors);
        if let Some(newest) = errors.back_mut() {
            if newest.what == what && newest.cause == cause {
                newest.count += 1;
                newest.last = now;
                return;
            }
        }
        if errors.len() == ERRORS_KEPT {
            errors.pop_front();
        }
        errors.push_back(ErrorEntry {
            first: now,
            last: now,
            what: what.to_string(),
            cause,
            count: 1,
        });
    }

    /// The errors kept, newest first.
    pub fn errors(&self) -> Vec<ErrorEntry> {
        lock(&self.errors).iter().rev().cloned().collect()
    }

    /// Counts a pull of `name:tag` from `upstream`. When [`IMAGES_KEPT`] images are counted
    /// already, the least pulled (the least recent among equals) makes room.
    pub fn pulled(&self, upstream: &str, name: &str, tag: &str) {
        let key = self.hasher.hash_one((upstream, name, tag));
        let now = clock::now();
        let mut images = lock(&self.images);
        if let Some(p) = images.get_mut(&key) {
            p.count += 1;
            p.last = now;
            return;
        }
        if images.len() >= IMAGES_KEPT {
            let least = images
                .iter()
                .min_by_key(|(_, p)| (p.count, p.last))
                .map(|(k, _)| *k);
            if let Some(k) = least {
                images.remove(&k);
            }
        }
        images.insert(
            key,
            Pulls {
                image: format!("{upstream}/{name}:{tag}"),
                count: 1,
                last: now,
            },
        );
    }

    /// The `n` most pulled images, most pulled first.
    pub fn top_images(&self, n: usize) -> Vec<Pulls> {
        let mut all: Vec<Pulls> = lock(&self.images).values().cloned().collect();
        all.sort_by(|a, b| b.count.cmp(&a.count).then(b.last.cmp(&a.last)));
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SourceLabels;

    fn served(m: &Metrics, source: &'static str, n: u64) {
        m.bytes_served
            .get_or_create(&SourceLabels { source })
            .inc_by(n);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_keeps_the_last_five_minutes() {
        let metrics = Arc::new(Metrics::new());
        let status = Status::new(metrics.clone());
        metrics.hit("blob");
        metrics.miss("blob");
        served(&metrics, "upstream", 1000);
        // Since the start: all of it.
        let r = status.recent();
        assert_eq!((r.delta.hits, r.delta.misses), (1, 1));
        assert_eq!(r.delta.hit_ratio(), Some(0.5));
        // Ten minutes of samples with three hits and 100 bytes from the cache every 10 s.
        for _ in 0..60 {
            tokio::time::advance(BUCKET).await;
            for _ in 0..3 {
                metrics.hit("blob");
            }
            served(&metrics, "local", 100);
            status.sample();
        }
        let r = status.recent();
        assert_eq!(r.span, WINDOW);
        assert_eq!((r.delta.hits, r.delta.misses), (90, 0), "the miss is older");
        assert_eq!(r.delta.bytes.get("local"), Some(&3000));
        assert_eq!(r.delta.bytes.get("upstream"), Some(&0));
        assert_eq!((r.now.hits, r.now.misses), (181, 1), "since the start");
        assert_eq!(r.now.bytes_total(), 7000);
        assert_eq!(r.bytes_per_bucket, vec![100; 30]);
        assert_eq!(r.delta.hit_ratio(), Some(1.0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_samples_every_bucket() {
        let metrics = Arc::new(Metrics::new());
        let status = Arc::new(Status::new(metrics.clone()));
        status.start();
        for i in 1..=3u64 {
            served(&metrics, "local", i);
            tokio::time::sleep(BUCKET).await;
            // Let the sampler run after the tick.
            tokio::task::yield_now().await;
        }
        let r = status.recent();
        assert_eq!(r.bytes_per_bucket, vec![1, 2, 3]);
        assert_eq!(r.span, BUCKET * 3);
    }

    #[test]
    fn totals_read_the_metrics() {
        let m = Metrics::new();
        m.hit("blob");
        m.hit("tag");
        m.miss("manifest");
        served(&m, "local", 7);
        served(&m, "bucket", 5);
        let t = Totals::read(&m);
        assert_eq!((t.hits, t.misses, t.bytes_total()), (2, 1, 12));
        assert_eq!(t.bytes.get("bucket"), Some(&5));
        assert_eq!(Totals::default().hit_ratio(), None);
    }

    #[test]
    fn errors_are_a_small_ring_that_counts_repeats() {
        let status = Status::new(Arc::new(Metrics::new()));
        status.error("blob body", &"digest mismatch");
        status.error("blob body", &"digest mismatch");
        assert_eq!(status.errors().len(), 1);
        assert_eq!(status.errors()[0].count, 2);
        for i in 0..ERRORS_KEPT + 5 {
            status.error("GET /v2/", &i);
        }
        let kept = status.errors();
        assert_eq!(kept.len(), ERRORS_KEPT);
        assert_eq!(kept[0].cause, (ERRORS_KEPT + 4).to_string(), "newest first");
        assert_eq!(kept[ERRORS_KEPT - 1].cause, "5", "the oldest went");
    }

    #[tokio::test(start_paused = true)]
    async fn image_counts_are_bounded_and_keep_the_most_pulled() {
        let status = Status::new(Arc::new(Metrics::new()));
        for _ in 0..3 {
            status.pulled("docker.io", "library/nginx", "1.27");
        }
        status.pulled("docker.io", "library/redis", "7");
        status.pulled("docker.io", "library/redis", "7");
        for i in 0..IMAGES_KEPT + 10 {
            tokio::time::advance(Duration::from_millis(1)).await;
            status.pulled("ghcr.io", &format!("o/app{i}"), "v1");
        }
        let top = status.top_images(3);
        assert_eq!(top[0].image, "docker.io/library/nginx:1.27");
        assert_eq!(top[0].count, 3);
        assert_eq!(top[1].image, "docker.io/library/redis:7");
        assert_eq!(status.top_images(usize::MAX).len(), IMAGES_KEPT);
        assert!(
            status
                .top_images(usize::MAX)
                .iter()
                .any(|p| p.image == format!("ghcr.io/o/app{}:v1", IMAGES_KEPT + 9)),
            "the newest is counted"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn health_follows_the_last_answer() {
        let h = Health::default();
        assert_eq!(h.view().state, UpState::Unused);
        h.answered(StatusCode::OK);
        h.answered(StatusCode::NOT_FOUND);
        assert_eq!(h.view().state, UpState::Up);
        tokio::time::advance(Duration::from_secs(1)).await;
        h.answered(StatusCode::SERVICE_UNAVAILABLE);
        let v = h.view();
        assert_eq!(v.state, UpState::Failing);
        assert_eq!(v.last_error.unwrap().1, "HTTP 503 Service Unavailable");
        tokio::time::advance(Duration::from_secs(1)).await;
        h.failed(true, &"timed out");
        h.failed(false, &"connection refused");
        h.rate_limit(Some(7), Some(100));
        let v = h.view();
        assert_eq!(v.classes, [1, 0, 1, 0, 1, 1, 1]);
        assert_eq!(
            (v.ratelimit_remaining, v.ratelimit_limit),
            (Some(7), Some(100))
        );
        assert_eq!(v.last_error.unwrap().1, "connection refused");
        tokio::time::advance(Duration::from_secs(1)).await;
        h.answered(StatusCode::OK);
        assert_eq!(h.view().state, UpState::Up);
    }
}
