//! Prometheus metrics (prometheus-client), served at `/metrics` in the text format.

use std::hash::Hash;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamStatusLabels {
    pub upstream: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SharedLabels {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncRunLabels {
    pub entry: String,
    /// `ok`, `error` or `rate_limited` (skipped or cut short by the upstream's rate limit).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncEntryLabels {
    pub entry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcomeLabels {
    pub route: &'static str,
    /// How the cache answered (`Outcome::as_str`), `error` for an error answer, `none` for
    /// an answer the cache had no part in (`/v2/`, `/metrics`).
    pub outcome: &'static str,
}

/// A latency histogram's constructor: 1 ms to about 16 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// Every metric of the process. Cheap to update from any task: atomics behind `Arc`s.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub hits: Family<KindLabels, Counter>,
    pub misses: Family<KindLabels, Counter>,
    pub bytes_served: Family<SourceLabels, Counter>,
    pub upstream_requests: Family<UpstreamStatusLabels, Counter>,
    pub fills_in_flight: Gauge,
    /// Fills waiting for their turn (`cache.max_fills`).
    pub fills_queued: Gauge,
    pub fills_completed: Counter,
    pub fills_failed: Family<ReasonLabels, Counter>,
    pub evictions: Counter,
    pub cache_bytes: Gauge,
    pub cache_entries: Gauge,
    pub stale_answers: Family<UpstreamLabels, Counter>,
    pub token_fetches: Family<UpstreamStatusLabels, Counter>,
    pub ratelimit_remaining: Family<UpstreamLabels, Gauge>,
    pub ratelimit_limit: Family<UpstreamLabels, Gauge>,
    pub shared_ops: Family<SharedLabels, Counter>,
    /// 1 once the index's rebuild at start is done, 0 while it runs.
    pub index_scan_done: Gauge,
    /// Blobs the index's rebuild at start has found so far.
    pub index_scanned_blobs: Gauge,
    /// Bytes of pinned blobs in the cache (they count toward `cache.max_size`).
    pub pinned_bytes: Gauge,
    /// 1 while pinned blobs alone exceed `cache.max_size` (only unpinned ones are evicted).
    pub pins_over_bound: Gauge,
    /// Scheduled syncs (`[[sync]]`): runs by result, images synced, bytes they fetched,
    /// when each entry last succeeded.
    pub sync_runs: Family<SyncRunLabels, Counter>,
    pub sync_images: Family<SyncEntryLabels, Counter>,
    pub sync_bytes: Family<SyncEntryLabels, Counter>,
    pub sync_last_success: Family<SyncEntryLabels, Gauge>,
    /// Time to the answer's headers (what a client waits before bytes flow), by route and
    /// outcome: a blob's body streams after it.
    pub request_duration: Family<RouteOutcomeLabels, Histogram, fn() -> Histogram>,
    /// `cache.max_size`, so that dashboards draw the usage against its bound.
    pub cache_max_size: Gauge,
    /// When this process started (seconds since the epoch): a change is a restart.
    pub process_start_time: Gauge,
    /// Live replicas this one counts on the bucket, itself included (`[cache.s3.peers]`).
    pub peers_members: Gauge,
    /// The label sets of `requests`, `request_duration` and `hits` that requests use, each
    /// looked up in its family once (see [`Resolved`]); grouped by route.
    requests_resolved: Resolved<RequestLabels, Counter, fn() -> Counter, 8>,
    durations_resolved: Resolved<RouteOutcomeLabels, Histogram, fn() -> Histogram, 8>,
    hits_resolved: Resolved<KindLabels, Counter, fn() -> Counter, 3>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ocicache");
        let requests = Family::default();
        let hits = Family::default();
        let request_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let m = Metrics {
            requests: requests.clone(),
            hits: hits.clone(),
            misses: Family::default(),
            bytes_served: Family::default(),
            upstream_requests: Family::default(),
            fills_in_flight: Gauge::default(),
            fills_queued: Gauge::default(),
            fills_completed: Counter::default(),
            fills_failed: Family::default(),
            evictions: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            stale_answers: Family::default(),
            token_fetches: Family::default(),
            ratelimit_remaining: Family::default(),
            ratelimit_limit: Family::default(),
            shared_ops: Family::default(),
            index_scan_done: Gauge::default(),
            index_scanned_blobs: Gauge::default(),
            pinned_bytes: Gauge::default(),
            pins_over_bound: Gauge::default(),
            sync_runs: Family::default(),
            sync_images: Family::default(),
            sync_bytes: Family::default(),
            sync_last_success: Family::default(),
            request_duration: request_duration.clone(),
            cache_max_size: Gauge::default(),
            process_start_time: Gauge::default(),
            peers_members: Gauge::default(),
            requests_resolved: Resolved::new(&requests, ROUTES.len()),
            durations_resolved: Resolved::new(&request_duration, ROUTES.len()),
            hits_resolved: Resolved::new(&hits, 1),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "Requests served, by route and status",
            m.requests.clone(),
        );
        registry.register(
            "cache_hits",
            "Requests answered from the cache",
            m.hits.clone(),
        );
        registry.register(
            "cache_misses",
            "Requests that needed the upstream",
            m.misses.clone(),
        );
        registry.register(
            "served_bytes",
            "Body bytes sent to clients, by source",
            m.bytes_served.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent to upstreams, by status",
            m.upstream_requests.clone(),
        );
        registry.register(
            "fills_in_flight",
            "Blob fills running (each holds one of cache.max_fills turns)",
            m.fills_in_flight.clone(),
        );
        registry.register(
            "fills_queued",
            "Blob fills waiting for their turn (cache.max_fills)",
            m.fills_queued.clone(),
        );
        registry.register(
            "fills_completed",
            "Blob fills verified and committed",
            m.fills_completed.clone(),
        );
        registry.register(
            "fills_failed",
            "Blob fills failed, by reason",
            m.fills_failed.clone(),
        );
        registry.register(
            "evictions",
            "Blobs evicted by the LRU bound",
            m.evictions.clone(),
        );
        registry.register(
            "cache_size_bytes",
            "Bytes in the cache index",
            m.cache_bytes.clone(),
        );
        registry.register(
            "cache_entries",
            "Blobs in the cache index",
            m.cache_entries.clone(),
        );
        registry.register(
            "stale_answers",
            "Cached answers served because the upstream failed",
            m.stale_answers.clone(),
        );
        registry.register(
            "token_fetches",
            "Bearer token requests, by result",
            m.token_fetches.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "The upstream's ratelimit-remaining",
            m.ratelimit_remaining.clone(),
        );
        registry.register(
            "upstream_ratelimit_limit",
            "The upstream's ratelimit-limit",
            m.ratelimit_limit.clone(),
        );
        registry.register(
            "shared_store_operations",
            "Calls to the shared store (S3), by operation and result; result=error counts \
             failures and timeouts, result=skipped calls avoided while it is down",
            m.shared_ops.clone(),
        );
        registry.register(
            "index_scan_done",
            "1 once the cache index's rebuild from the disk at start is done, 0 while it runs",
            m.index_scan_done.clone(),
        );
        registry.register(
            "index_scanned_blobs",
            "Blobs found on disk so far by the cache index's rebuild at start",
            m.index_scanned_blobs.clone(),
        );
        registry.register(
            "pinned_bytes",
            "Bytes of pinned blobs in the cache (they count toward cache.max_size)",
            m.pinned_bytes.clone(),
        );
        registry.register(
            "pins_over_bound",
            "1 while pinned blobs alone exceed cache.max_size (only unpinned ones are evicted)",
            m.pins_over_bound.clone(),
        );
        registry.register(
            "sync_runs",
            "Runs of [[sync]] entries, by result (ok, error, rate_limited)",
            m.sync_runs.clone(),
        );
        registry.register(
            "sync_images",
            "Images (one tag each) a [[sync]] entry has synced",
            m.sync_images.clone(),
        );
        registry.register(
            "sync_bytes",
            "Blob bytes [[sync]] runs brought into the cache",
            m.sync_bytes.clone(),
        );
        registry.register(
            "sync_last_success_timestamp_seconds",
            "When a [[sync]] entry last ran without error (Unix time)",
            m.sync_last_success.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from a request to its answer's headers, by route and outcome (a blob's body \
             streams after)",
            m.request_duration.clone(),
        );
        registry.register(
            "cache_max_size_bytes",
            "The bound of the cache index (cache.max_size)",
            m.cache_max_size.clone(),
        );
        registry.register(
            "process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
            m.process_start_time.clone(),
        );
        registry.register(
            "peers_members",
            "Live replicas on the shared bucket as this one last listed them, itself included \
             ([cache.s3.peers]; 0 without peers or before the first listing)",
            m.peers_members.clone(),
        );
        m.process_start_time
            .set(crate::clock::since_epoch().as_secs() as i64);
        Metrics { registry, ..m }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    pub fn fill_failed(&self, reason: &'static str) {
        self.fills_failed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn hit(&self, kind: &'static str) {
        self.hits_resolved.with(0, &KindLabels { kind }, |c| {
            c.inc();
        });
    }

    /// Counts a request in `http_requests`.
    pub fn request(&self, labels: &RequestLabels) {
        self.requests_resolved
            .with(route_group(labels.route), labels, |c| {
                c.inc();
            });
    }

    /// Adds a request's time to its answer's headers to `http_request_duration_seconds`.
    pub fn request_took(&self, labels: &RouteOutcomeLabels, seconds: f64) {
        self.durations_resolved
            .with(route_group(labels.route), labels, |h| h.observe(seconds));
    }

    pub fn miss(&self, kind: &'static str) {
        self.misses.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn upstream_request(&self, upstream: &str, status: &str) {
        self.upstream_requests
            .get_or_create(&UpstreamStatusLabels {
                upstream: upstream.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn shared(&self, op: &'static str, result: &'static str) {
        self.shared_ops
            .get_or_create(&SharedLabels { op, result })
            .inc();
    }

    pub fn stale(&self, upstream: &str) {
        self.stale_answers
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    /// Hits and misses since start, of every kind (`blob`, `manifest`, `tag`): for the
    /// admin API's hit ratio.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        let sum = |family: &Family<KindLabels, Counter>| {
            HIT_KINDS
                .iter()
                .map(|&kind| family.get_or_create(&KindLabels { kind }).get())
                .sum()
        };
        (sum(&self.hits), sum(&self.misses))
    }

    /// Body bytes sent to clients since start, by source (`local`, `peer`, `bucket`, `upstream`).
    pub fn served_bytes_by_source(&self) -> Vec<(&'static str, u64)> {
        SERVED_SOURCES
            .iter()
            .map(|&source| {
                let n = self
                    .bytes_served
                    .get_or_create(&SourceLabels { source })
                    .get();
                (source, n)
            })
            .collect()
    }
}

/// The `route` labels of requests, in the order of their groups of resolved label sets (the
/// hottest first: a group is found by comparing names).
const ROUTES: [&str; 10] = [
    "manifest",
    "blob",
    "base",
    "tags",
    "referrers",
    "upload",
    "metrics",
    "healthz",
    "readyz",
    "unknown",
];

/// The group of a route's resolved label sets; any other name shares the first.
fn route_group(route: &str) -> usize {
    ROUTES.iter().position(|r| *r == route).unwrap_or(0)
}

/// A family's metrics for the label sets a hot path uses, each looked up in the family once.
/// `Family::get_or_create` takes the family's lock and hashes the label set with SipHash on
/// every call: a cached manifest's answer made three such lookups, about 1,100 of its 27,800
/// instructions, and three atomic writes to lock words every worker thread shares.
///
/// Slots come in groups of `N` that the caller picks with a cheap key (a request's route). A
/// label set takes the first free slot of its group for good, and is found there by
/// comparing label sets, so a wrong group costs time, never a wrong count. A slot holds a
/// clone of the family's own metric (the same atomics), taken with `get_or_create` as before:
/// `/metrics` shows the same values, and a label set appears in it on its first use, as
/// before. A label set that finds its group full is looked up in the family every time.
/// Nothing removes label sets from these families: a slot would go on counting on a metric
/// that `/metrics` no longer shows.
struct Resolved<S, M, C, const N: usize> {
    family: Family<S, M, C>,
    groups: Box<[[Slot<S, M>; N]]>,
}

/// A label set and its metric, once taken.
type Slot<S, M> = OnceLock<(S, M)>;

impl<S, M, C, const N: usize> Resolved<S, M, C, N>
where
    S: Clone + Hash + Eq,
    M: Clone,
    C: MetricConstructor<M> + Clone,
{
    fn new(family: &Family<S, M, C>, groups: usize) -> Self {
        Resolved {
            family: family.clone(),
            groups: (0..groups.max(1))
                .map(|_| std::array::from_fn(|_| OnceLock::new()))
                .collect(),
        }
    }

    /// Calls `f` with the metric of `labels`, kept in (or added to) group `group`.
    fn with<R>(&self, group: usize, labels: &S, f: impl FnOnce(&M) -> R) -> R {
        for slot in &self.groups[group % self.groups.len()] {
            let (held, metric) = slot.get_or_init(|| {
                let metric = self.family.get_or_create(labels).clone();
                (labels.clone(), metric)
            });
            if held == labels {
                return f(metric);
            }
        }
        f(&self.family.get_or_create(labels))
    }
}

/// The `kind` labels of hits and misses.
const HIT_KINDS: [&str; 3] = ["blob", "manifest", "tag"];
/// The `source` labels of served bytes.
const SERVED_SOURCES: [&str; 4] = ["local", "peer", "bucket", "upstream"];

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(route: &'static str, method: &'static str, status: u16) -> RequestLabels {
        RequestLabels {
            route,
            method,
            status,
        }
    }

    /// More label sets than a group has slots, some asked for in two groups: each is
    /// counted on its own metric of the family, whichever slot (or none) holds it.
    #[test]
    fn resolved_label_sets_count_on_their_own_metric() {
        let family: Family<RequestLabels, Counter> = Family::default();
        let resolved: Resolved<_, _, _, 2> = Resolved::new(&family, 2);
        let sets = [
            labels("manifest", "GET", 200),
            labels("manifest", "HEAD", 200),
            labels("manifest", "GET", 404),
            labels("blob", "GET", 200),
            labels("manifest", "GET", 500),
        ];
        // Set i is counted i + 1 times, interleaved, in group 0 and (every third) group 1.
        let mut expected = [0u64; 5];
        for round in 0..5 {
            for (i, set) in sets.iter().enumerate().skip(round) {
                let group = if (round + i) % 3 == 0 { 1 } else { 0 };
                resolved.with(group, set, |c| c.inc());
                expected[i] += 1;
            }
        }
        assert_eq!(expected, [1, 2, 3, 4, 5]);
        for (set, n) in sets.iter().zip(expected) {
            assert_eq!(family.get_or_create(set).get(), n, "{set:?}");
        }
        let mut registry = Registry::default();
        registry.register("r", "r", family.clone());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert_eq!(text.matches("r_total{").count(), 5, "no label set made up");
    }

    /// Threads racing for the slots of one group, each with its own label set: the slots
    /// go to some of them, and every count lands on its own label set.
    #[test]
    fn racing_label_sets_keep_their_counts_apart() {
        let family: Family<RequestLabels, Counter> = Family::default();
        let resolved: Resolved<_, _, _, 2> = Resolved::new(&family, 1);
        let sets = [
            labels("manifest", "GET", 200),
            labels("manifest", "HEAD", 200),
            labels("blob", "GET", 206),
            labels("blob", "HEAD", 404),
        ];
        std::thread::scope(|s| {
            for (i, set) in sets.iter().enumerate() {
                let resolved = &resolved;
                s.spawn(move || {
                    for _ in 0..10_000 * (i + 1) {
                        resolved.with(0, set, |c| c.inc());
                    }
                });
            }
        });
        for (i, set) in sets.iter().enumerate() {
            assert_eq!(family.get_or_create(set).get(), 10_000 * (i as u64 + 1));
        }
    }

    /// The lines of `/metrics`, sorted: a family's label sets come in hash order.
    fn sorted_lines(m: &Metrics) -> Vec<String> {
        let mut lines: Vec<String> = m.encode().lines().map(str::to_owned).collect();
        lines.sort();
        lines
    }

    /// `request`, `request_took` and `hit` show in `/metrics` exactly what updating the
    /// families directly shows: the same label sets, counts and sums.
    #[test]
    fn resolved_updates_show_as_the_families_updated_directly() {
        let (resolved, direct) = (Metrics::new(), Metrics::new());
        let routes = ["manifest", "blob", "base", "tags", "metrics", "elsewhere"];
        let outcomes = [
            "hit",
            "miss",
            "revalidated",
            "stale",
            "fill",
            "error",
            "none",
        ];
        for (i, route) in routes.iter().enumerate() {
            for (j, status) in [200u16, 404, 206, 304, 307, 401, 416, 429, 500, 502]
                .iter()
                .enumerate()
            {
                for method in ["GET", "HEAD", "other"] {
                    let l = labels(route, method, *status);
                    for _ in 0..(i + j) % 4 {
                        resolved.request(&l);
                        direct.requests.get_or_create(&l).inc();
                    }
                }
            }
            for (j, outcome) in outcomes.iter().enumerate() {
                let l = RouteOutcomeLabels { route, outcome };
                for k in 0..(i + j) % 3 {
                    let seconds = 0.0005 * (1 << (2 * k + j)) as f64;
                    resolved.request_took(&l, seconds);
                    direct.request_duration.get_or_create(&l).observe(seconds);
                }
            }
        }
        for kind in ["tag", "tag", "manifest", "blob", "tag"] {
            resolved.hit(kind);
            direct.hits.get_or_create(&KindLabels { kind }).inc();
        }
        let lines = sorted_lines(&resolved);
        assert!(lines
            .iter()
            .any(|l| l.starts_with("ocicache_http_requests_total{")));
        assert_eq!(lines, sorted_lines(&direct));
    }
}
