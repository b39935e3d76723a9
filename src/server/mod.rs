//! The HTTP server: accepts connections on a bound listener (HTTP/1.1 and HTTP/2), applies
//! the connection limits, and hands each request to `handlers`.

pub mod body;
pub mod handlers;

use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::config::Config;
use crate::manifests::Manifests;
use crate::metrics::Metrics;
use crate::upstream::{Upstream, Upstreams};

/// Everything a request handler needs, shared by all connections.
pub struct State {
    pub config: Config,
    pub upstreams: Upstreams,
    pub cache: Arc<Cache>,
    pub manifests: Manifests,
    pub metrics: Arc<Metrics>,
}

impl State {
    /// Opens the cache (rebuilding its index) and builds the upstream clients.
    pub fn new(config: Config) -> anyhow::Result<Arc<State>> {
        let metrics = Arc::new(Metrics::new());
        let cache = Cache::open(&config.cache, metrics.clone())
            .map_err(|e| anyhow::anyhow!("cache.dir {}: {e}", config.cache.dir.display()))?;
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| {
                Upstream::new(u, metrics.clone())
                    .map(Arc::new)
                    .map_err(|e| anyhow::anyhow!("upstream {}: {e}", u.name))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let manifests = Manifests::new(
            cache.clone(),
            metrics.clone(),
            config.offline,
            config.limits.max_manifest_size.0,
        );
        Ok(Arc::new(State {
            config,
            upstreams: Upstreams(upstreams),
            cache,
            manifests,
            metrics,
        }))
    }
}

/// Serves `listener` until `shutdown` completes, then lets responses in flight finish for
/// up to `limits.shutdown_timeout`.
pub async fn run(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let limits = state.config.limits.clone();
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        .max_buf_size(limits.max_header_size.0.max(8192) as usize)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_size.0.min(u32::MAX as u64) as u32)
        .keep_alive_interval(Some(limits.idle_timeout.0));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    tracing::info!(addr = %listener.local_addr()?, "serving");
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, std::convert::Infallible>(handlers::handle(state, req, peer).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("shutting down: waiting for responses in flight");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_timeout.0) => {
            tracing::warn!("shutdown deadline reached with responses still in flight");
        }
    }
    Ok(())
}
