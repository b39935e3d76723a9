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
    /// Inspect and maintain the cache: through a running server's admin API (--server), or
    /// on a cache folder that no server holds (one that a server holds is refused with exit
    /// code 3, and nothing is done).
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
        #[arg(long, short, global = true, env = "OCICACHE_CONFIG_FILE")]
        config: Option<PathBuf>,
        /// The admin API of a running server, e.g. http://127.0.0.1:5080 (its [admin]
        /// listen): the command asks the server, beside its work.
        #[arg(long, global = true)]
        server: Option<String>,
        /// The admin API's token ([admin] token).
        #[arg(
            long,
            global = true,
            env = "OCICACHE_ADMIN_TOKEN",
            hide_env_values = true,
            conflicts_with = "token_file"
        )]
        token: Option<String>,
        /// A file holding the admin API's token.
        #[arg(long, global = true)]
        token_file: Option<PathBuf>,
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
    /// List the cached images: tags (with when the upstream confirmed them and when they
    /// were last pulled) and manifests cached by digest.
    Ls {
        /// Only this upstream (`docker.io`).
        #[arg(long)]
        upstream: Option<String>,
        /// Only this repository (`library/nginx`).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an image (`nginx:1.27`, `ghcr.io/o/app@sha256:...`: its tags, manifests and
    /// the blobs no other cached image uses), only its tag (--tag), or a blob (a digest).
    Rm {
        target: String,
        /// Forget the tag only: the next pull asks the upstream.
        #[arg(long)]
        tag: bool,
        /// Also remove it from the shared bucket ([cache.s3]).
        #[arg(long)]
        purge_shared: bool,
    },
    /// Pin an image: its manifests and blobs are never evicted.
    Pin { image: String },
    /// Remove an image's pin.
    Unpin { image: String },
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
fn init_logging(config: &Config) -> ocicache::logbuf::Guard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    // Lines gathered in memory and written in batches by one thread (see `logbuf`).
    let (writer, guard) = ocicache::logbuf::spawn(std::io::stderr());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone())
        .with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        // The request line, one per request, is written by its own cheaper path; the same
        // bytes as the default format. Without colours, most go around `tracing` altogether.
        LogFormat::Human => {
            builder
                .event_format(ocicache::server::body::LineFormat::new(
                    tracing_subscriber::fmt::format(),
                ))
                .init();
            if !ansi {
                ocicache::server::body::write_lines_to(writer);
            }
        }
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
        Command::Cache {
            command,
            config,
            server,
            token,
            token_file,
        } => {
            let done = match server {
                Some(server) => admin_token(token, token_file.as_deref())
                    .and_then(|token| remote(command, &server, token)),
                None => {
                    let config = match load(config.as_deref()) {
                        Ok(c) => c,
                        Err(code) => return code,
                    };
                    cache_command(command, config)
                }
            };
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => match held(&e) {
                    Some(held) => {
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

/// The folder's holder, when a `cache` command was refused because another process holds
/// the folder (the offline commands' error, or the store's when opened for a server).
fn held(e: &anyhow::Error) -> Option<&ocicache::cache::store::Held> {
    if let Some(ocicache::cache::admin::Error::Held(held)) = e.downcast_ref() {
        return Some(held);
    }
    match e.downcast_ref::<ocicache::server::StartError>()? {
        ocicache::server::StartError::Cache { source, .. } => source.get_ref()?.downcast_ref(),
        _ => None,
    }
}

/// Why a `cache` command did nothing, and what to do about it: ask the running server.
fn refusal(held: &ocicache::cache::store::Held) -> String {
    let dir = held.dir.display();
    let pid = held.pid_text();
    let ask = "ask it instead with --server URL (its admin API, [admin] listen, e.g. \
               --server http://127.0.0.1:5080)";
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

/// The token given on the command line (`--token` or `--token-file`).
fn admin_token(
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<ocicache::config::Secret>> {
    use ocicache::config::Secret;
    Ok(match (token, file) {
        (Some(t), _) => Some(Secret(t)),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", f.display()))?;
            Some(Secret(text.trim_end_matches(['\r', '\n']).to_string()))
        }
        (None, None) => None,
    })
}

fn cache_command(command: CacheCommand, config: Config) -> anyhow::Result<()> {
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
        command @ (CacheCommand::Ls { .. }
        | CacheCommand::Rm { .. }
        | CacheCommand::Pin { .. }
        | CacheCommand::Unpin { .. }) => on_folder(command, config)?,
    }
    Ok(())
}

/// `ls`, `rm`, `pin`, `unpin` on a folder no server holds: the folder is opened as a server
/// would (its lock taken, so a server holding it refuses this), with the admin API on a
/// loopback port of our own, which the command then asks like a server's.
fn on_folder(command: CacheCommand, mut config: Config) -> anyhow::Result<()> {
    config.tls = None;
    config.auth = None;
    config.admin.token = None;
    config.admin.token_file = None;
    let runtime = tokio::runtime::Runtime::new()?;
    let (server, stop, task) = runtime.block_on(async {
        let state = ocicache::server::State::new(config)?;
        // Sizes and evictions need the whole index.
        while !state.cache.index.scan_done() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let admin = ocicache::admin::Admin::new(state)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ocicache::admin::run(listener, admin, async {
            let _ = stopped.await;
        }));
        Ok::<_, anyhow::Error>((format!("http://{addr}"), stop, task))
    })?;
    let done = runtime.block_on(remote_async(command, &server, None));
    let _ = stop.send(());
    let _ = runtime.block_on(task);
    done
}

/// A `cache` command through the admin API at `server`.
fn remote(
    command: CacheCommand,
    server: &str,
    token: Option<ocicache::config::Secret>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(remote_async(command, server, token))
}

async fn remote_async(
    command: CacheCommand,
    server: &str,
    token: Option<ocicache::config::Secret>,
) -> anyhow::Result<()> {
    use http::Method;
    use ocicache::config::ByteSize;
    let client = ocicache::admin::client::Client::new(server, token)?;
    let bytes = |v: &serde_json::Value| ByteSize(v.as_u64().unwrap_or(0));
    match command {
        CacheCommand::Stats => {
            let r = client.call(Method::GET, "cache", None).await?;
            println!("server:   {server}");
            println!(
                "size:     {} ({} bytes) of max {}",
                bytes(&r["size"]),
                r["size"],
                bytes(&r["max_size"])
            );
            println!("entries:  {}", r["blobs"]);
            println!(
                "pinned:   {}{}",
                bytes(&r["pinned_bytes"]),
                if r["pins_over_bound"] == true {
                    " (over cache.max_size: only unpinned blobs are evicted)"
                } else {
                    ""
                }
            );
            let fills = r["fills"].as_array().map_or(0, Vec::len);
            println!("fills:    {fills} in flight");
            let ratio = r["hit_ratio"]
                .as_f64()
                .map_or("-".into(), |r| format!("{:.1}%", r * 100.0));
            println!(
                "requests: {} hits, {} misses, hit ratio {ratio}",
                r["hits"], r["misses"]
            );
            let served = &r["served_bytes"];
            println!(
                "served:   {} from this cache, {} from other replicas, {} from the bucket, {} from upstreams",
                bytes(&served["local"]),
                bytes(&served["peer"]),
                bytes(&served["bucket"]),
                bytes(&served["upstream"])
            );
        }
        CacheCommand::Verify => {
            let job = client
                .run_job("verify", None, |job| {
                    let p = &job["progress"];
                    if !p.is_null() {
                        eprintln!("verified {}/{}", p["checked"], p["total"]);
                    }
                })
                .await?;
            let r = job_result(&job)?;
            let removed = r["removed"].as_array().cloned().unwrap_or_default();
            for d in &removed {
                println!(
                    "removed {}: content does not match the digest",
                    d.as_str().unwrap_or("")
                );
            }
            println!(
                "checked {} blobs ({}), {} corrupt and removed",
                r["checked"],
                bytes(&r["bytes"]),
                removed.len()
            );
            if !removed.is_empty() {
                anyhow::bail!("{} corrupt blobs found (removed)", removed.len());
            }
        }
        CacheCommand::Gc { shared: true, .. } => {
            anyhow::bail!("--shared runs on the bucket itself: use it without --server")
        }
        CacheCommand::Gc { size, .. } => {
            let body = serde_json::json!({ "size": size });
            let job = client.run_job("gc", Some(&body), |_| {}).await?;
            let r = job_result(&job)?;
            println!(
                "removed {} blobs ({}), {} remain (target {})",
                r["removed"],
                bytes(&r["freed"]),
                bytes(&r["remaining"]),
                bytes(&r["target"])
            );
        }
        CacheCommand::Ls { upstream, name } => ls(&client, upstream, name).await?,
        CacheCommand::Rm {
            target,
            tag,
            purge_shared,
        } => {
            let path = if ocicache::reference::Digest::parse(&target).is_ok() {
                // A bare digest: a blob.
                format!("blobs/{target}")
            } else {
                let kind = if tag { "tags" } else { "images" };
                format!("{kind}/{}", image_path(&target)?)
            };
            let query = if purge_shared {
                "?purge_shared=true"
            } else {
                ""
            };
            let r = client
                .call(Method::DELETE, &format!("{path}{query}"), None)
                .await?;
            for t in r["tags"].as_array().into_iter().flatten() {
                println!("forgot tag {}", t.as_str().unwrap_or(""));
            }
            for d in r["digests"].as_array().into_iter().flatten() {
                println!("removed {}", d.as_str().unwrap_or(""));
            }
            for d in r["kept"].as_array().into_iter().flatten() {
                println!(
                    "kept {} (used by another image, or pinned)",
                    d.as_str().unwrap_or("")
                );
            }
            for d in r["filling"].as_array().into_iter().flatten() {
                println!(
                    "{} was being fetched: it lands again when done",
                    d.as_str().unwrap_or("")
                );
            }
        }
        CacheCommand::Pin { image } => {
            let r = client
                .call(Method::PUT, &format!("pins/{}", image_path(&image)?), None)
                .await?;
            let count = |k: &str| r[k].as_array().map_or(0, Vec::len);
            println!(
                "pinned {image}: {} manifests, {} blobs",
                count("manifests"),
                count("blobs")
            );
        }
        CacheCommand::Unpin { image } => {
            client
                .call(
                    Method::DELETE,
                    &format!("pins/{}", image_path(&image)?),
                    None,
                )
                .await?;
            println!("unpinned {image}");
        }
    }
    Ok(())
}

/// The result of a job that ended, or its error.
fn job_result(job: &serde_json::Value) -> anyhow::Result<&serde_json::Value> {
    if job["state"] != "done" {
        anyhow::bail!("the job failed: {}", job["error"].as_str().unwrap_or("?"));
    }
    Ok(&job["result"])
}

/// `<registry>/<name>/<tag or digest>` of an image as users write it.
fn image_path(image: &str) -> anyhow::Result<String> {
    let r = ocicache::prefetch::ImageRef::parse(image)?;
    Ok(format!("{}/{}/{}", r.registry, r.name, r.reference))
}

/// `cache ls`: every page of the list, one line per image.
async fn ls(
    client: &ocicache::admin::client::Client,
    upstream: Option<String>,
    name: Option<String>,
) -> anyhow::Result<()> {
    use ocicache::config::ByteSize;
    let mut last: Option<String> = None;
    println!(
        "{:<50} {:<20} {:>10} {:<6} {:<20} LAST PULLED",
        "IMAGE", "DIGEST", "SIZE", "PINNED", "CONFIRMED"
    );
    loop {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [("upstream", &upstream), ("name", &name), ("last", &last)] {
            if let Some(v) = v {
                q.append_pair(k, v);
            }
        }
        let page = client
            .call(http::Method::GET, &format!("images?{}", q.finish()), None)
            .await?;
        for i in page["images"].as_array().into_iter().flatten() {
            let text = |k: &str| i[k].as_str().unwrap_or("-").to_string();
            let image = match i["tag"].as_str() {
                Some(tag) => format!("{}/{}:{tag}", text("upstream"), text("name")),
                None => "(by digest)".into(),
            };
            let digest = text("digest");
            println!(
                "{image:<50} {:<20} {:>10} {:<6} {:<20} {}",
                &digest[..digest.len().min(19)],
                ByteSize(i["size"].as_u64().unwrap_or(0)).to_string(),
                if i["pinned"] == true { "yes" } else { "no" },
                text("confirmed"),
                text("last_pulled")
            );
        }
        match page["next"].as_str() {
            Some(next) => last = Some(next.to_string()),
            None => return Ok(()),
        }
    }
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
            // Nor a peer endpoint: the server on this folder's configuration holds its port,
            // and this one is no replica the others should ask.
            if let Some(s3) = config.cache.s3.as_mut() {
                s3.peers = None;
            }
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
