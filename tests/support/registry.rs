//! Integration-test support: a real CNCF distribution registry
//! (`docker-registry`, Debian package `docker-registry`, v2.8) listening on
//! 127.0.0.1, seeding helpers that go through its push API, and a tiny
//! blocking HTTP/1.1 client used both for the registry and for the proxy
//! under test.
//!
//! Everything here is blocking on purpose: tests call it from plain `#[test]`
//! functions (or from `spawn_blocking`) without needing a runtime.
//!
//! Missing binaries: when `CI=true` the helpers panic (a CI run must never
//! skip silently); otherwise they print a loud `SKIPPED: ... not installed`
//! line to stderr and return `None` / `false`.
//!
//! The parts: `binaries` finds the programs tests drive (and applies the CI rule);
//! `layers` makes deterministic data, tars and gzip layers; `push` seeds the registry
//! through its push API; `http` is the tiny blocking client.

#![allow(dead_code)]

mod binaries;
mod http;
mod layers;
mod push;

// The whole public surface stays here under its old names, used by today's tests or not.
pub(crate) use binaries::child_path_env;
pub use binaries::{find_binary, free_port, require_binary, under_ci};
#[allow(unused_imports)]
pub use http::{
    absolute_url, header, http_get, http_request, try_http_request, try_http_request_timeout,
    HttpResponse, HTTP_IO_TIMEOUT,
};
#[allow(unused_imports)]
pub use layers::{
    gzip, host_oci_arch, layer_file_path, make_layer, make_tar, random_bytes, sha256_digest,
};
#[allow(unused_imports)]
pub use push::PushedImage;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How long `Registry::start` waits for `GET /v2/` to answer.
const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The registry process
// ---------------------------------------------------------------------------

/// A running `docker-registry serve` on 127.0.0.1 with filesystem storage in
/// a temp dir, delete enabled, no auth. Killed on drop.
pub struct Registry {
    pub addr: SocketAddr,
    child: Option<Child>,
    bin: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    storage: PathBuf,
    // Last: removed after the child is gone.
    dir: tempfile::TempDir,
}

impl Registry {
    /// Start a registry. `None` (after a loud SKIPPED message) when the binary
    /// is missing and not under CI; panics when it is missing under CI or
    /// fails to come up.
    pub fn start() -> Option<Registry> {
        let bin = require_binary("docker-registry", "docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("ocicache-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).unwrap();
        let config_path = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");

        let mut reg = Registry {
            addr: "127.0.0.1:0".parse().unwrap(),
            child: None,
            bin,
            config_path,
            log_path,
            storage,
            dir,
        };
        let mut last_log = String::new();
        for _attempt in 0..5 {
            reg.addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            fs::write(&reg.config_path, registry_config(&reg.storage, reg.addr)).unwrap();
            match reg.spawn_and_wait() {
                Ok(()) => return Some(reg),
                Err(log) => {
                    // Retry on a new port only when we lost the port race.
                    let retry = log.contains("address already in use");
                    last_log = log;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("docker-registry did not start; its log:\n{last_log}");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open registry log");
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg(&self.config_path)
            .env_clear() // REGISTRY_* variables would override the config
            .env("PATH", child_path_env())
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + REGISTRY_READY_TIMEOUT;
        let url = format!("{}/v2/", self.url());
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "(exited with {status})\n{}",
                    fs::read_to_string(&self.log_path).unwrap_or_default()
                ));
            }
            if let Ok((200, _, _)) =
                try_http_request_timeout("GET", &url, &[], b"", Duration::from_secs(2))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "(no answer on {url} within {REGISTRY_READY_TIMEOUT:?})\n{}",
                    fs::read_to_string(&self.log_path).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT` (what image references use).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Directory holding the registry's storage.
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// Kill the registry (upstream outage). Storage is kept; `restart` brings
    /// it back on the same address.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// True while the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// Start again (same port, same storage) after `stop`. Panics on failure.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.spawn_and_wait() {
            panic!(
                "docker-registry did not restart on {}; log:\n{log}",
                self.addr
            );
        }
    }

    /// Everything the registry wrote (error log and access log).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Access-log lines (Apache combined format), e.g.
    /// `127.0.0.1 - - [..] "GET /v2/library/x/blobs/sha256:.. HTTP/1.1" 200 1234 "" "ua"`.
    /// The registry writes a line after it has sent the response, so a test
    /// that just got a response may need `wait_for_requests` instead.
    pub fn access_log(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" HTTP/1.") && l.contains("] \""))
            .map(str::to_string)
            .collect()
    }

    /// Number of access-log lines for `METHOD <path containing needle>`.
    pub fn count_requests(&self, method: &str, path_contains: &str) -> usize {
        let prefix = format!("] \"{method} ");
        self.access_log()
            .iter()
            .filter(|l| {
                l.split_once(&prefix)
                    .map(|(_, rest)| rest.split(' ').next().unwrap_or("").contains(path_contains))
                    .unwrap_or(false)
            })
            .count()
    }

    /// Waits until every request the registry received before this call is in its access
    /// log: a marker request of our own, logged after them, shows up (the log is written in
    /// order). Counting afterwards needs no sleep.
    pub fn flush_access_log(&self) {
        static MARK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mark = format!(
            "/v2/?flush={}-{}",
            std::process::id(),
            MARK.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let (status, _, _) = http_request("GET", &format!("{}{mark}", self.url()), &[], b"");
        assert!(
            status == 200 || status == 401,
            "the registry answers: {status}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.access_log().iter().any(|l| l.contains(&mark)) {
            assert!(
                Instant::now() < deadline,
                "the marker request is never logged"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Poll `count_requests` until it reaches at least `min` (max 5 s) and
    /// return the final count.
    pub fn wait_for_requests(&self, method: &str, path_contains: &str, min: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = self.count_requests(method, path_contains);
            if n >= min || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

fn registry_config(storage: &Path, addr: SocketAddr) -> String {
    format!(
        r#"version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: "{storage}"
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "{addr}"
  secret: "ocicache-integration-test-secret"
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: false
"#,
        storage = storage.display(),
    )
}
