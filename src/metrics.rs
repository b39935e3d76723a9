//! Prometheus metrics (prometheus-client), served at `/metrics` in the text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ocicache");
        let m = Metrics {
            requests: Family::default(),
            hits: Family::default(),
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
            request_duration: Family::new_with_constructor(latency_histogram),
            cache_max_size: Gauge::default(),
            process_start_time: Gauge::default(),
            peers_members: Gauge::default(),
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
        self.hits.get_or_create(&KindLabels { kind }).inc();
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

/// The `kind` labels of hits and misses.
const HIT_KINDS: [&str; 3] = ["blob", "manifest", "tag"];
/// The `source` labels of served bytes.
const SERVED_SOURCES: [&str; 4] = ["local", "peer", "bucket", "upstream"];
