//! Shared test support: the real registry and clients, the fake upstream, the proxy.
pub mod clients;
pub mod fake;
pub mod garage;
pub mod proxy;
pub mod registry;
