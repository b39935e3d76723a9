//! ocicache: a pull-through caching proxy for OCI and Docker container registries.
//!
//! It serves the read side of the OCI distribution spec on a local address, fetches misses
//! from the configured upstream registries, verifies every byte against its digest while
//! streaming it to the clients, and keeps it on disk under an LRU bound.
//!
//! # Layout
//!
//! Requests flow one way, down through layers that each own one decision:
//!
//! - [`server`]: HTTP in and out: the listener loop (`server::run`, over a bound listener),
//!   limits, TLS (`server::tls`), client auth (`server::auth`), the handlers that route a
//!   request to an endpoint and answer with headers and status codes (`server::handlers`),
//!   the response body that writes the request's log line when it ends (`server::body`),
//!   and our error as the spec's envelope (`server::envelope`). Knows nothing of S3 or of
//!   upstream HTTP.
//! - [`manifests`]: what to answer for manifests, tags, tag lists and referrers: TTLs,
//!   stale-if-error, offline, coalescing (`manifests::digest`, `tags`, `lists`,
//!   `referrers`).
//! - [`cache`]: where bytes come from, decided once: the tiers (`cache::tier`, the trait;
//!   `cache::local`, the disk store and its LRU index, always first; `cache::bucket`, the
//!   S3-compatible tier shared by replicas: objects, leases, uploads, GC), the fills that
//!   stream misses in, verified (`cache::fill`, on the disk pool of `cache::disk`), what
//!   their readers and every hit read through (`cache::source`, whose windows of a file a
//!   plain connection sends with `sendfile`, `cache::source::window`),
//!   manifests and records through the tiers (`cache::records`), the outcome of a request
//!   (`cache::outcome`) and the offline commands (`cache::admin`); replicas on one bucket
//!   stream fills from the one responsible for a blob (`cache::peers`: membership,
//!   ownership, signed requests; its endpoint is `server::peers`).
//! - [`upstream`]: a registry client that speaks the domain (blob, blob size, manifest, tag
//!   digest, tags, referrers) and turns an upstream's answer into our error in one place;
//!   HTTP, tokens and redirects in `upstream::client`, `upstream::auth` and
//!   `upstream::challenge`.
//!
//! Beside them, used by all:
//!
//! - [`error`]: the one error type, classified by side, mapped to status and OCI code in
//!   one place.
//! - [`reference`](mod@reference): names, tags and digests, validated by the spec's grammar.
//! - [`route`]: a request path to an endpoint and an upstream (`?ns=`, prefix, default).
//! - [`range`]: `Range` headers and `multipart/byteranges` framing.
//! - [`coalesce`]: concurrent resolutions of one key share one run; an entry lives while
//!   someone waits on it.
//! - [`clock`]: wall and monotonic time that tests pause (`tokio::time::pause`) or skip ahead
//!   (`clock::Clock::advance`).
//! - [`config`]: the configuration (figment: defaults, TOML file, `OCICACHE_` variables).
//! - [`metrics`]: Prometheus metrics.
//! - [`prefetch`]: `ocicache prefetch`, warming a cache through an ocicache.
//! - [`admin`]: the admin API on its own listener (`/api/v1/`: what is cached, purge, pin,
//!   jobs) and the client the `ocicache cache` commands use with `--server`.
//! - [`warm`]: warming the cache inside the server (an image's manifests and blobs, through
//!   the manifests service and the cache's fills), for syncs and admin prefetch jobs.
//! - [`sync`]: scheduled syncs (`[[sync]]`): images kept cached on an interval, one at a
//!   time, with jitter and back-off from the upstream's rate limit.
//! - [`status`]: what the status page shows that the metrics do not keep (upstream health,
//!   recent errors, the most pulled images, the last five minutes).
//!
//! `main.rs` is glue: it parses the command line and calls into these.

pub mod admin;
pub mod cache;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod logbuf;
pub mod manifests;
pub mod metrics;
pub mod prefetch;
pub mod range;
pub mod reference;
pub mod route;
pub mod server;
pub mod status;
pub mod sync;
#[cfg(test)]
mod test_logs;
pub mod upstream;
pub mod warm;
