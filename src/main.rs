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
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration and print the result.
    Check {
        #[arg(long, short, env = "OCICACHE_CONFIG_FILE")]
        config: Option<PathBuf>,
    },
}

fn init_logging(config: &Config) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
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
            init_logging(&config);
            let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
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
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("listen {}: {e}", config.listen))?;
    let state = ocicache::server::State::new(config)?;
    ocicache::server::run(listener, state, shutdown_signal()).await?;
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
