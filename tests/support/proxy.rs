//! Runs ocicache in-process on 127.0.0.1:0, on a thread with its own runtime, for blocking
//! tests. Stopped (gracefully) on drop.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ocicache::config::{Config, UpstreamConfig};
use ocicache::server::State;

use super::registry::{http_request, HttpResponse};

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin API's address, when the configuration has `[admin] listen` (bound here on
    /// a free loopback port, whatever the address configured).
    pub admin_addr: Option<SocketAddr>,
    pub state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A configuration for tests: the cache in `dir`, these upstreams (name, url, default),
/// short timeouts.
pub fn config(dir: &Path, upstreams: &[(&str, &str, bool)]) -> Config {
    let mut c = Config::default();
    c.cache.dir = dir.to_path_buf();
    // Short enough for the stall tests, long enough that the whole suite running in parallel
    // on 2 loaded cores (Garage clusters, replicas streaming from each other) does not read
    // a busy moment as a stalled stream: at 2 s it did, about one full run in five.
    c.cache.stall_timeout.0 = Duration::from_secs(5);
    c.limits.shutdown_timeout.0 = Duration::from_secs(2);
    c.upstreams = upstreams
        .iter()
        .map(|(name, url, default)| {
            let mut u = UpstreamConfig::new(name, url, *default);
            u.read_timeout.0 = Duration::from_secs(3);
            u.connect_timeout.0 = Duration::from_secs(2);
            u
        })
        .collect();
    c
}

impl Proxy {
    pub fn start(mut config: Config) -> Proxy {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                config.listen = listener.local_addr().unwrap();
                let admin_listener = match config.admin.listen {
                    Some(_) => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
                    None => None,
                };
                let admin_addr = admin_listener.as_ref().map(|l| l.local_addr().unwrap());
                config.admin.listen = admin_addr;
                let state = State::new(config).expect("proxy state");
                ready_tx
                    .send((listener.local_addr().unwrap(), admin_addr, state.clone()))
                    .unwrap();
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let admin = admin_listener.map(|l| {
                    let admin = ocicache::admin::Admin::new(state.clone()).expect("admin");
                    let mut stopped = stopped.clone();
                    tokio::spawn(ocicache::admin::run(l, admin, async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    }))
                });
                ocicache::server::run(listener, state, async {
                    let _ = rx.await;
                    let _ = stop.send(true);
                })
                .await
                .unwrap();
                if let Some(admin) = admin {
                    admin.await.unwrap().unwrap();
                }
            });
        });
        let (addr, admin_addr, state) = ready_rx.recv().expect("proxy started");
        // The index is rebuilt in the background: tests start from a whole one.
        while !state.cache.index.scan_done() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Proxy {
            addr,
            admin_addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// "http://127.0.0.1:PORT" of the admin API (the configuration must have one).
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr.expect("an admin listener"))
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.state.config.cache.dir.clone()
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_request("GET", &format!("{}{path}", self.url()), headers, b"")
    }

    pub fn head(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_request("HEAD", &format!("{}{path}", self.url()), headers, b"")
    }

    /// The value of a metric line starting with `prefix` (summed over matching lines).
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, _, body) = self.get("/metrics", &[]);
        String::from_utf8(body)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stops the proxy and waits for it.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}

/// `ocicache serve` as a child process (for signals and kills), listening on a free port.
pub struct ChildProxy {
    pub base: String,
    /// The admin API's base URL (on a free port, set through `OCICACHE_ADMIN__LISTEN`).
    pub admin: String,
    pub child: std::process::Child,
}

/// The TOML of a cache in `cache` with one default upstream `docker.io` at `url`.
pub fn toml_for(cache: &Path, url: &str, upstream_extra: &str) -> String {
    format!(
        "[cache]\ndir = \"{}\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{url}\"\ndefault = true\n{upstream_extra}",
        cache.display()
    )
}

impl ChildProxy {
    /// Writes `listen` plus `toml` to `dir/c.toml`, starts the binary, waits until it answers.
    pub fn start(dir: &Path, toml: &str, stderr: std::process::Stdio) -> ChildProxy {
        let port = super::registry::free_port();
        let cfg = dir.join("c.toml");
        std::fs::write(&cfg, format!("listen = \"127.0.0.1:{port}\"\n{toml}")).unwrap();
        let admin = format!("127.0.0.1:{}", super::registry::free_port());
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ocicache"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("OCICACHE_ADMIN__LISTEN", &admin)
            .env_remove("RUST_LOG")
            .stderr(stderr)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let start = std::time::Instant::now();
        while super::registry::try_http_request("GET", &format!("{base}/v2/"), &[], b"").is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the child did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ChildProxy {
            base,
            admin: format!("http://{admin}"),
            child,
        }
    }

    /// Sends SIGTERM and waits for the exit; returns the process output.
    pub fn terminate(self) -> std::process::Output {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait_with_output().unwrap()
    }
}
