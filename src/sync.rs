//! Scheduled syncs (`[[sync]]`): images the server keeps cached, and pinned if asked.
//!
//! One task runs every entry, one at a time (a queue ordered by when each is due): at start,
//! then `interval` after each run's start plus a jitter (up to a tenth of the interval, at
//! most [`JITTER_MAX`]) so that replicas started together drift apart. A run resolves the
//! entry's tags (a list, or the repository's tag list filtered by `tag_pattern`) and warms
//! each through [`crate::warm`], so `tag_ttl`, the shared tier and coalescing with clients'
//! pulls apply as for any pull.
//!
//! The upstream's rate limit comes first. A run is not started while the upstream's last
//! `ratelimit-remaining` is below [`LOW_RATELIMIT`] (the pulls left are the clients'), and a
//! run that met a 429 stops there; both back off that upstream's entries, exponentially from
//! [`BACKOFF_START`] to [`BACKOFF_MAX`] (and at least a 429's `Retry-After`). A low reading is acted on once: when the back-off
//! ends and no newer reading came, the next run goes ahead (it is how a fresh reading comes).
//! Other failures are retried sooner than the interval ([`ERROR_RETRY`], doubling). The
//! server keeps serving whatever happens here.
//!
//! Sync owns the pins it sets ([`PinOwner::Sync`]): at start-up, and at each run once the
//! entry's tags are known, the pins a sync set for a tag that no entry with `pin = true`
//! keeps any more (its tag, entry or pattern gone from the configuration, or a pattern's tag
//! gone from the repository) are released ([`PinScope`]). Pins an operator set stay.
//!
//! The schedule ([`Scheduler`]) is separate from what a run does ([`Runner`]: the server's is
//! [`ServerRunner`]), and all its time is read on the server's [`Clock`], so tests drive it
//! under a paused runtime or skip the server's clock ahead. Results go to the metrics
//! (`ocicache_sync_*`) and to the [`Board`], whose [`Status`] `GET /api/v1/sync` answers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::cache::pins::{PinKey, PinOwner, PinnedImage};
use crate::clock::{self, Clock, Instant};
use crate::config::{Config, SyncConfig};
use crate::metrics::{Metrics, SyncEntryLabels, SyncRunLabels};
use crate::prefetch::ImageRef;
use crate::reference::{Name, Reference, Tag};
use crate::server::State;
use crate::upstream::{RateSignals, Upstream};
use crate::warm::{warm, Warmed};

/// Below this `ratelimit-remaining`, syncs wait: what is left is kept for clients' pulls.
pub const LOW_RATELIMIT: i64 = 10;
/// The first back-off after a 429 or a low `ratelimit-remaining`; it doubles up to
/// [`BACKOFF_MAX`] while the upstream keeps limiting.
pub const BACKOFF_START: Duration = Duration::from_secs(60);
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);
/// The first retry after a failed run; it doubles, up to the entry's interval.
pub const ERROR_RETRY: Duration = Duration::from_secs(60);
/// The most jitter added to an interval.
pub const JITTER_MAX: Duration = Duration::from_secs(600);

/// How a run ended, as the runner tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ran {
    /// Every tag synced: `images` tags, `bytes` fetched into the cache.
    Synced { images: u64, bytes: u64 },
    /// At least one tag not synced (the others may have been), and why.
    Failed(String),
}

/// What the scheduler runs: one entry's sync, and what its upstream says of its limits.
pub trait Runner: Send + Sync + 'static {
    fn run(&self, entry: usize) -> impl Future<Output = Ran> + Send;
    fn signals(&self, upstream: &str) -> RateSignals;
}

/// One entry as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The metrics' `entry` label.
    pub label: String,
    /// Back-offs are per upstream: its name.
    pub upstream: String,
    pub interval: Duration,
}

/// A small deterministic random source for the jitter (splitmix64): seeded from the time in
/// the server, fixed in tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A duration in `0..=max`, to the millisecond.
    fn up_to(&mut self, max: Duration) -> Duration {
        let ms = max.as_millis() as u64;
        Duration::from_millis(self.next() % (ms + 1))
    }
}

/// The jitter bound of `interval`.
pub fn jitter_bound(interval: Duration) -> Duration {
    (interval / 10).min(JITTER_MAX)
}

/// An upstream's back-off.
#[derive(Debug, Default)]
struct Backoff {
    /// No entry of the upstream runs before this.
    until: Option<Instant>,
    /// The last wait; zero when the upstream is not limiting.
    delay: Duration,
    /// The `readings` count of the last low `ratelimit-remaining` acted on.
    acted_on: Option<u64>,
}

/// The schedule: which entry runs when, one at a time.
pub struct Scheduler<R> {
    /// What a run does (the server's: [`ServerRunner`]; tests': a script).
    runner: R,
    plans: Vec<Plan>,
    /// Every wait and time read: tests pause it or skip it ahead.
    clock: Arc<Clock>,
    metrics: Arc<Metrics>,
    /// Where the admin API reads each entry's state.
    board: Arc<Board>,
    /// The jitter's source.
    rng: Rng,
    /// When each entry is due next.
    due: Vec<Instant>,
    /// Failed runs in a row, per entry.
    failures: Vec<u32>,
    /// Per upstream: its entries share its rate limit.
    backoff: HashMap<String, Backoff>,
}

impl<R: Runner> Scheduler<R> {
    /// Every entry is due now, in order.
    pub fn new(
        runner: R,
        plans: Vec<Plan>,
        clock: Arc<Clock>,
        metrics: Arc<Metrics>,
        board: Arc<Board>,
        rng: Rng,
    ) -> Scheduler<R> {
        let now = clock.instant();
        Scheduler {
            due: vec![now; plans.len()],
            failures: vec![0; plans.len()],
            backoff: HashMap::new(),
            runner,
            plans,
            clock,
            metrics,
            board,
            rng,
        }
    }

    /// Runs the schedule until the task is dropped.
    pub async fn run(mut self) {
        if self.plans.is_empty() {
            return;
        }
        loop {
            self.step().await;
        }
    }

    /// The entry to run next and when: the earliest due, after its upstream's back-off.
    /// The board shows every entry's time.
    fn next(&self) -> (usize, Instant) {
        (0..self.plans.len())
            .map(|i| (i, self.runs_at(i)))
            .inspect(|&(i, at)| self.board.set_next(i, self.wall(at)))
            .min_by_key(|&(i, at)| (at, i))
            .expect("at least one entry")
    }

    /// When entry `i` runs: when it is due, after its upstream's back-off.
    fn runs_at(&self, i: usize) -> Instant {
        let backoff = self.backoff.get(&self.plans[i].upstream);
        match backoff.and_then(|b| b.until) {
            Some(until) => until.max(self.due[i]),
            None => self.due[i],
        }
    }

    /// Waits for the next entry and runs it, or defers it while its upstream is limited.
    async fn step(&mut self) {
        let (i, at) = self.next();
        self.clock.sleep_until(at).await;
        let upstream = self.plans[i].upstream.clone();
        let before = self.runner.signals(&upstream);
        if let Some(remaining) = self.fresh_low_reading(&upstream, before) {
            self.backoff.entry(upstream.clone()).or_default().acted_on = Some(before.readings);
            self.back_off(&upstream);
            let why = format!("the upstream's ratelimit-remaining is {remaining}: waiting");
            tracing::warn!(entry = %self.plans[i].label, %upstream, remaining, "sync deferred: the upstream's rate limit is low");
            self.finish(i, "rate_limited", Some(why), None);
            return;
        }
        let started = self.clock.instant();
        self.board.started(i, self.clock.now());
        let ran = self.runner.run(i).await;
        let after = self.runner.signals(&upstream);
        let throttled = after.throttled > before.throttled;
        if throttled {
            self.back_off(&upstream);
            self.wait_at_least(&upstream, after.retry_after);
        }
        match ran {
            Ran::Synced { images, bytes } => {
                if !throttled && self.fresh_low_reading(&upstream, after).is_none() {
                    // The limit relents; the reading acted on stays acted on (a run served
                    // from the cache brings no newer one).
                    if let Some(b) = self.backoff.get_mut(&upstream) {
                        (b.until, b.delay) = (None, Duration::ZERO);
                    }
                }
                self.failures[i] = 0;
                let interval = self.plans[i].interval;
                self.due[i] = started + interval + self.rng.up_to(jitter_bound(interval));
                self.finish(i, "ok", None, Some((images, bytes)));
            }
            Ran::Failed(why) if throttled => {
                // Due again at once: the back-off decides when.
                self.due[i] = self.clock.instant();
                tracing::warn!(entry = %self.plans[i].label, %upstream, error = %why, "sync stopped: the upstream answered 429");
                self.finish(i, "rate_limited", Some(why), None);
            }
            Ran::Failed(why) => {
                self.failures[i] += 1;
                let retry = ERROR_RETRY
                    .saturating_mul(1 << (self.failures[i] - 1).min(16))
                    .min(self.plans[i].interval);
                self.due[i] = self.clock.instant() + retry;
                tracing::warn!(entry = %self.plans[i].label, error = %why, retry_in = ?retry, "sync failed");
                self.finish(i, "error", Some(why), None);
            }
        }
    }

    /// A low `ratelimit-remaining` not acted on yet.
    fn fresh_low_reading(&self, upstream: &str, s: RateSignals) -> Option<i64> {
        let acted_on = self.backoff.get(upstream).and_then(|b| b.acted_on);
        s.remaining
            .filter(|&r| r < LOW_RATELIMIT && acted_on != Some(s.readings))
    }

    /// The upstream's entries wait: twice as long as the last time, within bounds.
    fn back_off(&mut self, upstream: &str) {
        let now = self.clock.instant();
        let b = self.backoff.entry(upstream.to_string()).or_default();
        b.delay = if b.delay.is_zero() {
            BACKOFF_START
        } else {
            (b.delay * 2).min(BACKOFF_MAX)
        };
        b.until = Some(now + b.delay);
    }

    /// Stretches the upstream's back-off to its `Retry-After` (within [`BACKOFF_MAX`]).
    fn wait_at_least(&mut self, upstream: &str, retry_after: Option<Duration>) {
        let (Some(retry_after), Some(b)) = (retry_after, self.backoff.get_mut(upstream)) else {
            return;
        };
        let until = self.clock.instant() + retry_after.min(BACKOFF_MAX);
        b.until = b.until.max(Some(until));
    }

    /// Counts a run's result and shows it on the board.
    fn finish(
        &mut self,
        i: usize,
        result: &'static str,
        error: Option<String>,
        synced: Option<(u64, u64)>,
    ) {
        let entry = self.plans[i].label.clone();
        self.metrics
            .sync_runs
            .get_or_create(&SyncRunLabels {
                entry: entry.clone(),
                result,
            })
            .inc();
        let now = self.clock.now();
        if let Some((images, bytes)) = synced {
            let labels = SyncEntryLabels { entry };
            self.metrics
                .sync_images
                .get_or_create(&labels)
                .inc_by(images);
            self.metrics.sync_bytes.get_or_create(&labels).inc_by(bytes);
            let epoch = now
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            self.metrics
                .sync_last_success
                .get_or_create(&labels)
                .set(epoch.as_secs() as i64);
        }
        self.board.finished(i, now, result, error, synced);
    }

    /// The wall time of instant `at`.
    fn wall(&self, at: Instant) -> SystemTime {
        let now = self.clock.instant();
        match at.checked_duration_since(now) {
            Some(ahead) => self.clock.now() + ahead,
            None => self.clock.now() - now.duration_since(at),
        }
    }
}

/// What `GET /api/v1/sync` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Whether syncs run: not with `offline = true` nor without entries.
    pub enabled: bool,
    pub entries: Vec<EntryStatus>,
}

/// One `[[sync]]` entry's state. Times are RFC 3339, UTC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryStatus {
    /// The metrics' `entry` label: the image, with `#<n>` when several entries name it.
    pub entry: String,
    pub image: String,
    pub interval_seconds: u64,
    pub pin: bool,
    pub running: bool,
    /// Runs so far (deferred ones included).
    pub runs: u64,
    /// `ok`, `error` or `rate_limited`.
    pub last_result: Option<String>,
    pub last_error: Option<String>,
    pub last_run: Option<String>,
    pub last_success: Option<String>,
    pub next_run: Option<String>,
    /// Each tag synced, with the digest it had then.
    pub tags: BTreeMap<String, String>,
    /// Images and fetched bytes of the last successful run.
    pub images: u64,
    pub bytes: u64,
}

/// The syncs' live status, shared by the scheduler, its runner and the admin API.
#[derive(Debug, Default)]
pub struct Board {
    status: Mutex<Status>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The `entry` label of each entry: its image, with `#<n>` (its place, from 1) when several
/// entries name the same image.
pub fn labels(entries: &[SyncConfig]) -> Vec<String> {
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if entries.iter().filter(|o| o.image == e.image).count() > 1 {
                format!("{}#{}", e.image, i + 1)
            } else {
                e.image.clone()
            }
        })
        .collect()
}

impl Board {
    /// The board of `config`'s entries, none run yet.
    pub fn new(config: &Config) -> Board {
        let entries = labels(&config.sync)
            .into_iter()
            .zip(&config.sync)
            .map(|(entry, e)| EntryStatus {
                entry,
                image: e.image.clone(),
                interval_seconds: e.interval.0.as_secs(),
                pin: e.pin,
                ..EntryStatus::default()
            })
            .collect();
        Board {
            status: Mutex::new(Status {
                enabled: !config.offline && !config.sync.is_empty(),
                entries,
            }),
        }
    }

    /// A snapshot.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn with(&self, i: usize, f: impl FnOnce(&mut EntryStatus)) {
        if let Some(e) = self.lock().entries.get_mut(i) {
            f(e);
        }
    }

    fn set_next(&self, i: usize, at: SystemTime) {
        self.with(i, |e| e.next_run = Some(rfc3339(at)));
    }

    fn started(&self, i: usize, now: SystemTime) {
        self.with(i, |e| {
            e.running = true;
            e.last_run = Some(rfc3339(now));
        });
    }

    fn finished(
        &self,
        i: usize,
        now: SystemTime,
        result: &str,
        error: Option<String>,
        synced: Option<(u64, u64)>,
    ) {
        self.with(i, |e| {
            e.running = false;
            e.runs += 1;
            e.last_result = Some(result.to_string());
            e.last_error = error;
            if let Some((images, bytes)) = synced {
                e.last_success = Some(rfc3339(now));
                (e.images, e.bytes) = (images, bytes);
            }
        });
    }

    /// Records the digest `tag` was synced at; the one it had before, if any.
    fn tag_synced(&self, i: usize, tag: &str, digest: String) -> Option<String> {
        let mut previous = None;
        self.with(i, |e| previous = e.tags.insert(tag.to_string(), digest));
        previous
    }
}

/// The tags whose pins one entry with `pin = true` keeps, in one repository of one
/// upstream: a pin a sync set that no entry's scope holds is released.
#[derive(Debug, Clone)]
pub struct PinScope {
    /// The upstream's name and the repository there, as a pin's key has them.
    pub upstream: String,
    pub name: Name,
    pub tags: ScopeTags,
}

/// The tags of a [`PinScope`].
#[derive(Debug, Clone)]
pub enum ScopeTags {
    /// The entry's `tags`, or the tags its run resolved.
    Listed(Vec<Tag>),
    /// Before its run has read the repository's tag list: what its `tag_pattern` matches.
    Matching(regex::Regex),
}

impl PinScope {
    /// The scope of an entry routed to `upstream` and `name`, as configured: none without
    /// `pin = true`.
    pub fn of(config: &SyncConfig, upstream: String, name: Name) -> Option<PinScope> {
        if !config.pin {
            return None;
        }
        let tags = match (&config.tags, config.pattern()) {
            (Some(tags), _) => {
                ScopeTags::Listed(tags.iter().filter_map(|t| Tag::parse(t).ok()).collect())
            }
            (None, Some(Ok(pattern))) => ScopeTags::Matching(pattern),
            _ => return None,
        };
        Some(PinScope {
            upstream,
            name,
            tags,
        })
    }

    /// Whether the pin of `key` is this scope's (a pin by digest never is).
    pub fn holds(&self, key: &PinKey) -> bool {
        let Reference::Tag(tag) = &key.reference else {
            return false;
        };
        key.upstream == self.upstream
            && key.name == self.name
            && match &self.tags {
                ScopeTags::Listed(tags) => tags.contains(tag),
                ScopeTags::Matching(pattern) => pattern.is_match(tag.as_str()),
            }
    }
}

/// Whether a scope of `scopes` holds the pin of `key`.
pub fn scheduled(scopes: &[PinScope], key: &PinKey) -> bool {
    scopes.iter().any(|s| s.holds(key))
}

/// One entry as the server runs it.
struct Entry {
    config: SyncConfig,
    /// The repository (its reference unused), or why it is not one.
    image: Result<ImageRef, String>,
}

/// The server's runs: tags resolved and warmed through `State`, pinned when asked.
pub struct ServerRunner {
    state: Arc<State>,
    entries: Vec<Entry>,
}

impl ServerRunner {
    pub fn new(state: Arc<State>) -> ServerRunner {
        let entries = state
            .config
            .sync
            .iter()
            .map(|c| Entry {
                config: c.clone(),
                image: ImageRef::parse(&c.image).map_err(|e| e.to_string()),
            })
            .collect();
        ServerRunner { state, entries }
    }

    /// The upstream of an image, as a client's pull of it would be routed.
    fn upstream(
        &self,
        image: &ImageRef,
    ) -> Result<(Arc<Upstream>, crate::reference::Name), String> {
        let target = crate::route::resolve(
            &self.state.upstreams,
            Some(&image.registry),
            image.name.as_str(),
        )
        .map_err(|e| e.to_string())?;
        Ok((self.state.upstreams.0[target.upstream].clone(), target.name))
    }

    /// The scheduler's view of the entries.
    pub fn plans(&self) -> Vec<Plan> {
        labels(&self.state.config.sync)
            .into_iter()
            .zip(&self.entries)
            .map(|(label, e)| Plan {
                label,
                upstream: e
                    .image
                    .as_ref()
                    .ok()
                    .and_then(|i| self.upstream(i).ok())
                    .map(|(up, _)| up.name.clone())
                    .unwrap_or_default(),
                interval: e.config.interval.0,
            })
            .collect()
    }

    /// Entry `i`'s pin scope as configured: none for an image that does not route.
    fn scope(&self, i: usize) -> Option<PinScope> {
        let entry = &self.entries[i];
        let (up, name) = self.upstream(entry.image.as_ref().ok()?).ok()?;
        PinScope::of(&entry.config, up.name.clone(), name)
    }

    /// Releases the pins syncs set that no entry's scope holds any more; with `run`, the
    /// entry running is narrowed to the tags it resolved.
    fn release(&self, run: Option<(usize, &[Tag])>) {
        let scopes: Vec<PinScope> = (0..self.entries.len())
            .filter_map(|i| {
                let mut scope = self.scope(i)?;
                if let Some((_, tags)) = run.filter(|&(r, _)| r == i) {
                    scope.tags = ScopeTags::Listed(tags.to_vec());
                }
                Some(scope)
            })
            .collect();
        match self
            .state
            .cache
            .release_sync_pins(|key| scheduled(&scopes, key))
        {
            Ok(released) => {
                for key in released {
                    tracing::info!(upstream = %key.upstream, name = %key.name, reference = %key.reference, "sync: unpinned, no longer synced");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sync: the pins of tags no longer synced were kept")
            }
        }
    }

    /// The tags of an entry: its list, or those of the repository that match its pattern.
    async fn tags(&self, entry: &Entry, image: &ImageRef) -> Result<Vec<Tag>, String> {
        if let Some(tags) = &entry.config.tags {
            return tags
                .iter()
                .map(|t| Tag::parse(t).map_err(|e| e.to_string()))
                .collect();
        }
        let pattern = match entry.config.pattern() {
            Some(Ok(p)) => p,
            Some(Err(e)) => return Err(format!("tag_pattern: {e}")),
            None => return Err("neither tags nor tag_pattern".into()),
        };
        let (up, name) = self.upstream(image)?;
        let list = self
            .state
            .manifests
            .tag_list(&up, &name)
            .await
            .map_err(|e| format!("tag list: {e}"))?;
        let tags: Vec<Tag> = list
            .value
            .iter()
            .filter(|t| pattern.is_match(t))
            .filter_map(|t| Tag::parse(t).ok())
            .collect();
        if tags.is_empty() {
            return Err(format!(
                "no tag of {} matches {}",
                image.name,
                pattern.as_str()
            ));
        }
        Ok(tags)
    }

    async fn sync(&self, i: usize) -> Ran {
        let entry = &self.entries[i];
        let image = match &entry.image {
            Ok(image) => image,
            Err(e) => return Ran::Failed(e.clone()),
        };
        let tags = match self.tags(entry, image).await {
            Ok(t) => t,
            Err(e) => return Ran::Failed(e),
        };
        self.release(Some((i, &tags)));
        let throttled = |image: &ImageRef| {
            self.upstream(image)
                .map(|(up, _)| up.rate_signals().throttled)
                .unwrap_or_default()
        };
        let throttled_before = throttled(image);
        let (mut images, mut bytes, mut errors) = (0, 0, Vec::new());
        for tag in tags {
            let tagged = ImageRef {
                reference: Reference::Tag(tag.clone()),
                ..image.clone()
            };
            match warm(&self.state, &tagged, &entry.config.platforms, None).await {
                Ok(w) if w.stale => errors.push(format!(
                    "{tag}: the upstream failed; its cached digest {} was kept",
                    w.digest
                )),
                Ok(w) => {
                    images += 1;
                    bytes += w.fetched_bytes;
                    if let Err(e) = self.settle(i, &tag, w) {
                        errors.push(format!("{tag}: {e}"));
                    }
                }
                Err(e) => errors.push(format!("{tag}: {e}")),
            }
            if throttled(image) > throttled_before {
                errors.push("the upstream answered 429: the rest waits".into());
                break;
            }
        }
        if errors.is_empty() {
            Ran::Synced { images, bytes }
        } else {
            Ran::Failed(errors.join("; "))
        }
    }

    /// Records what `tag` was synced at and, with `pin = true`, pins it under the tag: a
    /// pin by tag holds the digests it resolved to, so pinning the tag's new digest releases
    /// the old one (unless another pin holds it).
    fn settle(&self, i: usize, tag: &Tag, warmed: Warmed) -> std::io::Result<()> {
        let entry = &self.entries[i];
        let digest = warmed.digest.to_string();
        let previous = self.state.sync.tag_synced(i, tag.as_str(), digest.clone());
        let moved = previous.filter(|p| *p != digest);
        if let Some(from) = &moved {
            tracing::info!(image = %entry.config.image, %tag, %from, to = %digest, "sync: the tag moved");
        }
        if !entry.config.pin {
            return Ok(());
        }
        let key = PinKey {
            upstream: warmed.upstream,
            name: warmed.name,
            reference: Reference::Tag(tag.clone()),
        };
        let cache = &self.state.cache;
        let held = cache.pins().into_iter().find(|p| p.key == key);
        if held
            .is_some_and(|p| p.image.manifests == warmed.manifests && p.image.blobs == warmed.blobs)
        {
            return Ok(());
        }
        let image = PinnedImage {
            manifests: warmed.manifests,
            blobs: warmed.blobs,
            pinned_at: self.state.clock.now(),
            set_by: PinOwner::Sync,
        };
        cache.pin(key, image)?;
        tracing::info!(image = %entry.config.image, %tag, %digest, unpinned = ?moved, "sync: pinned");
        Ok(())
    }
}

impl Runner for ServerRunner {
    fn run(&self, entry: usize) -> impl Future<Output = Ran> + Send {
        self.sync(entry)
    }

    fn signals(&self, upstream: &str) -> RateSignals {
        self.state
            .upstreams
            .0
            .iter()
            .find(|u| u.name == upstream)
            .map(|u| u.rate_signals())
            .unwrap_or_default()
    }
}

/// Starts the scheduler of `state`'s `[[sync]]` entries on a task of its own; none when
/// there are no entries, or offline (which the log says). First, in every case, the pins
/// syncs set for tags the configuration no longer syncs are released.
pub fn start(state: &Arc<State>) -> Option<tokio::task::JoinHandle<()>> {
    let runner = ServerRunner::new(state.clone());
    runner.release(None);
    let n = state.config.sync.len();
    if n == 0 {
        return None;
    }
    if state.config.offline {
        tracing::info!(entries = n, "offline = true: scheduled syncs are disabled");
        return None;
    }
    let plans = runner.plans();
    let seed = clock::since_epoch().as_nanos() as u64 ^ u64::from(std::process::id());
    let scheduler = Scheduler::new(
        runner,
        plans,
        state.clock.clone(),
        state.metrics.clone(),
        state.sync.clone(),
        Rng::new(seed),
    );
    tracing::info!(entries = n, "scheduled syncs started");
    let peers = state.cache.peers().cloned();
    Some(tokio::spawn(async move {
        if let Some(peers) = peers {
            membership_settled(&peers).await;
        }
        scheduler.run().await
    }))
}

/// Waits until two listings of the membership a heartbeat apart agree (at most
/// `GONE_AFTER`). Replicas started together run their first syncs together, and they agree
/// on who fetches what only once they list the same members: a replica whose first listing
/// missed the others would fetch every blob it then thinks it owns, beside the others.
async fn membership_settled(peers: &crate::cache::peers::Peers) {
    use crate::cache::peers::{GONE_AFTER, HEARTBEAT};
    let settled = async {
        let mut last = peers.members();
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let now = peers.members();
            if !now.is_empty() && now == last {
                return;
            }
            last = now;
        }
    };
    let _ = tokio::time::timeout(GONE_AFTER, settled).await;
}

#[cfg(test)]
mod tests;
