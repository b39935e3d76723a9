//! ocicache: a pull-through caching proxy for OCI and Docker container registries.
//!
//! It serves the read side of the OCI distribution spec on a local address, fetches misses
//! from the configured upstream registries, verifies every byte against its digest while
//! streaming it to the clients, and keeps it on disk under an LRU bound.
//!
//! # Layout
//!
//! - [`clock`]: wall and monotonic time that tests can pause (`tokio::time::pause`).
//! - [`coalesce`]: concurrent resolutions of one key share one run; entries live while
//!   someone waits.
//! - [`config`]: the configuration (figment: defaults, TOML file, `OCICACHE_` variables).
//! - [`reference`]: names, tags and digests, validated by the spec's grammar.
//! - [`route`]: a request path to an endpoint and an upstream (`?ns=`, prefix, default).
//! - [`range`]: `Range` headers and `multipart/byteranges` framing.
//! - [`error`]: the one error type, mapped to status and OCI error envelope in one place.
//! - [`upstream`]: the HTTP client per upstream, token auth (`upstream::auth`), redirects.
//! - [`cache`]: the content-addressed store (`cache::store`), the LRU index
//!   (`cache::index`) and the fills that stream misses in, verified (`cache::fill`).
//! - [`manifests`]: manifests by digest, tags with their TTL, stale-if-error, tag lists,
//!   referrers.
//! - [`metrics`]: Prometheus metrics.
//! - [`prefetch`]: `ocicache prefetch`, warming a cache through an ocicache.
//! - [`server`]: the listener loop (`server::run`) and the request handlers.
//!
//! `main.rs` is glue: it parses the command line and calls into these.

pub mod cache;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod error;
pub mod manifests;
pub mod metrics;
pub mod prefetch;
pub mod range;
pub mod reference;
pub mod route;
pub mod server;
pub mod upstream;
