//! The `ocicache` binary: command-line glue around the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ocicache::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "ocicache",
    version,
    about = "A pull-through caching proxy for OCI and Docker registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the registry API as a pull-through cache.
    Serve {
        /// Configuration file (TOML); without one, a Docker Hub mirror on 127.0.0.1:5000.
        #[arg(long, short, env = "OCICACHE_CONFIG_FILE")]
        config: Option<PathBuf>,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Warm the cache with images (every platform of an index unless --platform is given),
    /// through a running ocicache (--server) or straight into a cache folder (--config).
    Prefetch {
        /// Images: `nginx:1.27`, `ghcr.io/owner/app@sha256:...`.
        images: Vec<String>,
        /// Base URL of a running ocicache.
        #[arg(long, conflicts_with = "config")]
        server: Option<String>,
        /// Fill the cache of this configuration (no running server needed).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only these platforms of an index, `os/arch[/variant]`; repeatable.
        #[arg(long)]
        platform: Vec<String>,
        /// Read images from this file, one per line (`#` comments).
        #[arg(long)]
        from_file: Option<PathBuf>,
    },
    /// Inspect and maintain a cache folder. Only while no server runs on it: a folder that a
    /// server holds is refused with exit code 3, and nothing is done.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
        #[arg(long, short, global = true, env = "OCICACHE_CONFIG_FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Size, entries, oldest and newest blob.
    Stats,
    /// Rehash every blob; remove those that do not match their digest.
    Verify,
    /// Delete least recently used blobs down to cache.max_size (or --size).
    Gc {
        /// Target size, e.g. "10GiB".
        #[arg(long)]
        size: Option<String>,
        /// Run one GC pass on the shared tier ([cache.s3]) down to cache.s3.max_size instead
        /// (safe while replicas run).
        #[arg(long, conflicts_with = "size")]
        shared: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration and print the result.
    Check {
        #[arg(long, short, env = "OCICACHE_CONFIG_FILE")]
        config: Option<PathBuf>,
    },
}

/// Logs go to stderr through a background writer: a request's log line costs the worker a
/// formatted line in memory, not a write system call. The guard flushes at exit.
fn init_logging(config: &Config) -> tracing_appender::non_blocking::WorkerGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // Buffered: the writer thread flushes once it has drained the lines queued, so a
        // busy proxy writes its log in batches, not a system call per line.
        .finish(std::io::BufWriter::with_capacity(
            64 << 10,
            std::io::stderr(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        // The request line, one per request, is written by its own cheaper path; the same
        // bytes as the default format.
        LogFormat::Human => builder
            .event_format(ocicache::server::body::LineFormat::new(
                tracing_subscriber::fmt::format(),
            ))
            .init(),
    }
    guard
}

fn load(config: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(config).map_err(|e| {
        eprintln!("ocicache: invalid configuration: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let _logs = init_logging(&config);
            // The blocking pool is for short calls (file opens, reads of a blob, the commit's
            // fsync); fills hash and write on their own pool (`cache::disk`). Capped so that a
            // storm of misses cannot grow the process to hundreds of threads.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(32)
                .build()
                .expect("a tokio runtime");
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ocicache: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => match load(config.as_deref()) {
            Ok(c) => {
                println!("configuration OK");
                println!("listen: {}", c.listen);
                println!(
                    "cache: {} (max {})",
                    c.cache.dir.display(),
                    c.cache.max_size
                );
                for u in &c.upstreams {
                    println!(
                        "upstream {}: {}{} tag_ttl={}",
                        u.name,
                        u.url,
                        if u.default { " (default)" } else { "" },
                        humantime::format_duration(u.tag_ttl.0)
                    );
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Prefetch {
            images,
            server,
            config,
            platform,
            from_file,
        } => {
            let mut images = images;
            if let Some(f) = from_file {
                match std::fs::read_to_string(&f) {
                    Ok(text) => images.extend(
                        text.lines()
                            .map(|l| l.split('#').next().unwrap_or("").trim())
                            .filter(|l| !l.is_empty())
                            .map(String::from),
                    ),
                    Err(e) => {
                        eprintln!("ocicache: --from-file {}: {e}", f.display());
                        return ExitCode::from(2);
                    }
                }
            }
            if images.is_empty() {
                eprintln!("ocicache: prefetch needs at least one image (or --from-file)");
                return ExitCode::from(2);
            }
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
            match runtime.block_on(prefetch(images, server, config, platform)) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("ocicache: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cache { command, config } => {
            let config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            match cache_command(command, &config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => match e.downcast_ref::<ocicache::cache::admin::Error>() {
                    Some(ocicache::cache::admin::Error::Held(held)) => {
                        eprintln!("ocicache: {}", refusal(held));
                        ExitCode::from(EXIT_HELD)
                    }
                    _ => {
                        eprintln!("ocicache: {e:#}");
                        ExitCode::FAILURE
                    }
                },
            }
        }
    }
}

/// The exit code of a `cache` command refused because another process holds the folder
/// (distinct from 1, a failure, and 2, a bad command line or configuration): nothing was
/// done, and running it again later may work.
const EXIT_HELD: u8 = 3;

/// Why a `cache` command did nothing, and what to do about it. There is no admin API yet to
/// ask a running server, so the message says what works today.
fn refusal(held: &ocicache::cache::store::Held) -> String {
    let dir = held.dir.display();
    let pid = held.pid_text();
    let ask = "these commands will take --server URL to ask a running server";
    match held.role.as_deref() {
        Some(ocicache::cache::store::SERVER) => {
            format!("a running server ({pid}) holds {dir}; nothing was done. Stop it first: {ask}.")
        }
        Some(role) => format!(
            "`ocicache {role}` ({pid}) is working on {dir}; nothing was done. Run this again \
             when it has finished."
        ),
        None => format!(
            "another ocicache ({pid}) holds {dir}; nothing was done. If it is a server, stop \
             it first: {ask}."
        ),
    }
}

fn cache_command(command: CacheCommand, config: &Config) -> anyhow::Result<()> {
    use ocicache::cache::admin;
    use ocicache::config::ByteSize;
    let dir = &config.cache.dir;
    let time = |t: Option<std::time::SystemTime>| {
        t.map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_else(|| "-".into())
    };
    match command {
        CacheCommand::Stats => {
            let s = admin::stats(dir)?;
            println!("dir:      {}", dir.display());
            println!(
                "size:     {} ({} bytes) of max {}",
                ByteSize(s.bytes),
                s.bytes,
                config.cache.max_size
            );
            println!("entries:  {}", s.entries);
            println!("oldest:   {}", time(s.oldest));
            println!("newest:   {}", time(s.newest));
        }
        CacheCommand::Verify => {
            let r = admin::verify(dir, |done, total| {
                if done % 100 == 0 || done == total {
                    eprintln!("verified {done}/{total}");
                }
            })?;
            for d in &r.removed {
                println!("removed {d}: content does not match the digest");
            }
            println!(
                "checked {} blobs ({}), {} corrupt and removed",
                r.checked,
                ByteSize(r.bytes),
                r.removed.len()
            );
            if !r.removed.is_empty() {
                anyhow::bail!("{} corrupt blobs found (removed)", r.removed.len());
            }
        }
        CacheCommand::Gc { shared: true, .. } => {
            let s3 =
                config.cache.s3.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("--shared: no [cache.s3] in the configuration")
                })?;
            let metrics = std::sync::Arc::new(ocicache::metrics::Metrics::new());
            let runtime = tokio::runtime::Runtime::new()?;
            let r = runtime.block_on(async {
                let shared = ocicache::cache::bucket::Bucket::open(
                    s3,
                    ocicache::cache::bucket::LEASE_TTL,
                    metrics,
                )?;
                shared
                    .gc()
                    .await
                    .map_err(|f| anyhow::anyhow!("the shared store did not answer: {f:?}"))
            })?;
            println!(
                "bucket {}: {} blobs ({}), removed {} ({}), target {}",
                s3.bucket,
                r.blobs,
                ByteSize(r.bytes),
                r.deleted,
                ByteSize(r.deleted_bytes),
                s3.max_size
            );
        }
        CacheCommand::Gc { size, .. } => {
            let target = match size {
                Some(s) => s
                    .parse::<ByteSize>()
                    .map_err(|e| anyhow::anyhow!("--size: {e}"))?,
                None => config.cache.max_size,
            };
            let r = admin::gc(dir, target.0)?;
            println!(
                "removed {} blobs ({}), {} remain (target {})",
                r.removed,
                ByteSize(r.freed),
                ByteSize(r.remaining),
                target
            );
        }
    }
    Ok(())
}

async fn prefetch(
    images: Vec<String>,
    server: Option<String>,
    config: Option<PathBuf>,
    platforms: Vec<String>,
) -> anyhow::Result<ExitCode> {
    use ocicache::prefetch::{human, ImageRef, Prefetcher};
    use std::io::IsTerminal;
    let refs = images
        .iter()
        .map(|i| ImageRef::parse(i))
        .collect::<Result<Vec<_>, _>>()?;
    // Without --server: an ocicache of our own on a loopback port, over the config's cache.
    let mut local = None;
    let server = match server {
        Some(s) => s,
        None => {
            let mut config = Config::load(config.as_deref())?;
            config.offline = false;
            // This server only answers our pulls: no scheduled syncs beside them.
            config.sync.clear();
            config.tls = None;
            config.auth = None;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let state = ocicache::server::State::new(config)?;
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(ocicache::server::run(listener, state, async {
                let _ = rx.await;
            }));
            local = Some((tx, task));
            format!("http://{addr}")
        }
    };
    let mut p = Prefetcher::new(&server, platforms, std::io::stderr().is_terminal());
    let mut failed = 0;
    for (name, image) in images.iter().zip(&refs) {
        if let Err(e) = p.image(image).await {
            eprintln!("failed {name}: {e:#}");
            failed += 1;
        }
    }
    if let Some((tx, task)) = local {
        let _ = tx.send(());
        let _ = tokio::time::timeout(ocicache::prefetch::SHUTDOWN, task).await;
    }
    let s = &p.summary;
    println!(
        "{} images, {} manifests, {} blobs: {} fetched, {} already cached{}",
        images.len() - failed,
        s.manifests,
        s.blobs,
        human(s.fetched_bytes),
        human(s.cached_bytes),
        if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        }
    );
    Ok(if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // The state first: it takes the cache folder's lock, so a second server on the folder is
    // told who holds it even when it would also have failed to bind the same port.
    let (listen, admin_listen) = (config.listen, config.admin.listen);
    let state = ocicache::server::State::new(config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen {listen}: {e}"))?;
    // The admin API beside the public listener, stopped by the same signal.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin = match admin_listen {
        Some(addr) => {
            let admin_listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("admin.listen {addr}: {e}"))?;
            let admin = ocicache::admin::Admin::new(state.clone())?;
            let mut stopped = stopped.clone();
            Some(tokio::spawn(ocicache::admin::run(
                admin_listener,
                admin,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let signal = async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    };
    ocicache::server::run(listener, state, signal).await?;
    if let Some(task) = admin {
        task.await??;
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("signal received");
}
