//! The HTTP server: accepts connections on a bound listener (HTTP/1.1 and HTTP/2), applies
//! the connection limits, and hands each request to `handlers`.

pub mod auth;
pub mod body;
mod envelope;
pub mod handlers;
pub mod peers;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::clock::Clock;
use crate::config::Config;
use crate::manifests::Manifests;
use crate::metrics::Metrics;
use crate::upstream::{Upstream, Upstreams};

/// Why the server could not start; each names the configuration key at fault.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cache.dir {}: {source}", dir.display())]
    Cache {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
    #[error("{key} {}: {problem}", path.display())]
    File {
        key: &'static str,
        path: std::path::PathBuf,
        problem: String,
    },
    #[error("tls: {0}")]
    Tls(rustls::Error),
}

impl StartError {
    fn file(key: &'static str, path: &std::path::Path, problem: String) -> StartError {
        StartError::File {
            key,
            path: path.to_path_buf(),
            problem,
        }
    }
}

/// Everything a request handler needs, shared by all connections.
pub struct State {
    pub config: Config,
    pub upstreams: Upstreams,
    pub cache: Arc<Cache>,
    pub manifests: Manifests,
    pub metrics: Arc<Metrics>,
    /// The clock of TTLs (tests skip it ahead with `Clock::advance`).
    pub clock: Arc<Clock>,
    /// Client authentication, when `[auth]` is configured.
    pub auth: Option<auth::ClientAuth>,
    /// TLS for clients, when `[tls]` is configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The scheduled syncs' status (`[[sync]]`), for the admin API.
    pub sync: Arc<crate::sync::Board>,
    /// What the status page shows beside the metrics.
    pub status: Arc<crate::status::Status>,
}

impl State {
    /// Opens the cache (rebuilding its index) and builds the upstream clients.
    pub fn new(config: Config) -> Result<Arc<State>, StartError> {
        let metrics = Arc::new(Metrics::new());
        metrics.cache_max_size.set(config.cache.max_size.0 as i64);
        let clock = Arc::new(Clock::default());
        let cache =
            Cache::open(&config.cache, metrics.clone()).map_err(|source| StartError::Cache {
                dir: config.cache.dir.clone(),
                source,
            })?;
        let upstreams = config
            .upstreams
            .iter()
            .map(|u| Upstream::new(u, metrics.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let manifests = Manifests::new(
            cache.clone(),
            metrics.clone(),
            config.offline,
            config.limits.max_manifest_size.0,
            clock.clone(),
        );
        let auth = match &config.auth {
            Some(a) => Some(auth::ClientAuth::load(&a.htpasswd, a.protect_metrics)?),
            None => None,
        };
        let tls = match &config.tls {
            Some(t) => Some(tls::acceptor(&t.cert, &t.key)?),
            None => None,
        };
        Ok(Arc::new(State {
            sync: Arc::new(crate::sync::Board::new(&config)),
            status: Arc::new(crate::status::Status::new(metrics.clone())),
            auth,
            tls,
            config,
            upstreams: Upstreams(upstreams),
            cache,
            manifests,
            metrics,
            clock,
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
    state.cache.start();
    let syncs = crate::sync::start(&state);
    state.status.start();
    // The peer endpoint, with `[cache.s3.peers]`: its own listener, until we stop.
    let peer_endpoint = peers::start(&state).await?;
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
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.header_read_timeout.0;
        tokio::spawn(async move {
            // A client that connects and says nothing is dropped: hyper's header timeout
            // starts only with the first byte.
            let mut first = [0u8; 1];
            if !matches!(
                tokio::time::timeout(handshake_timeout, stream.peek(&mut first)).await,
                Ok(Ok(1))
            ) {
                tracing::debug!(%peer, "connection closed: nothing received");
                return;
            }
            match state.tls.clone() {
                None => {
                    // Blobs go out with sendfile (see `cache::source::window`).
                    let io = TokioIo::new(crate::cache::source::window::Sendfile::new(stream));
                    serve_connection(&builder, io, state, peer, watcher).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            serve_connection(&builder, TokioIo::new(tls), state, peer, watcher)
                                .await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if let Some(syncs) = syncs {
        syncs.abort();
    }
    tracing::info!("shutting down: waiting for responses in flight");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(limits.shutdown_timeout.0) => {
            tracing::warn!("shutdown deadline reached with responses still in flight");
        }
    }
    state.cache.drain_fills(limits.shutdown_timeout.0).await;
    if let Some(endpoint) = peer_endpoint {
        endpoint.abort();
        if let Some(p) = state.cache.peers() {
            p.leave().await;
        }
    }
    Ok(())
}

/// Serves one connection (plain or TLS) until it ends or shutdown drains it.
async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: TokioIo<I>,
    state: Arc<State>,
    peer: std::net::SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // Formatted once: every request's log line names the peer.
    let peer_text: Arc<str> = Arc::from(peer.to_string());
    let service = service_fn(move |req| {
        let state = state.clone();
        let peer = peer_text.clone();
        async move { Ok::<_, std::convert::Infallible>(handlers::handle(state, req, peer).await) }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
