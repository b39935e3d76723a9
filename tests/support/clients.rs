//! Integration-test support: real registry clients.
//!
//! * `skopeo` (Debian package `skopeo`), run hermetically: empty
//!   registries.conf (no mirrors/rewrites), a permissive policy file of our
//!   own, no credentials, HOME/XDG dirs in a temp dir, no retries.
//! * containerd + `ctr` (Debian package `containerd`): a private daemon with
//!   root/state/socket in a temp dir, the CRI plugin disabled and the
//!   `native` snapshotter for unpacking (no overlayfs needed).
//!
//! Same CI rule as `registry.rs`: a missing binary panics under `CI=true`,
//! otherwise prints `SKIPPED: ...` and the helper returns `None`/`false`.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::registry::{child_path_env, find_binary, require_binary};

/// Upper bound for one skopeo / ctr invocation.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long `Containerd::start` waits for the daemon to answer.
const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Run `cmd` (stdin closed, stdout/stderr captured), killing it after
/// `timeout`. On timeout the status is "killed by signal" (not success) and a
/// note is appended to stderr.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    }
    let out_t = drain(child.stdout.take().unwrap());
    let err_t = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait child") {
            break s;
        }
        if Instant::now() > deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait killed child");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap_or_default();
    let mut stderr = err_t.join().unwrap_or_default();
    if timed_out {
        stderr.extend_from_slice(
            format!("\n[test harness] killed after {timeout:?} timeout: {cmd:?}\n").as_bytes(),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Render an `Output` for assertion messages.
pub fn describe_output(o: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Panic with the command's output unless it succeeded.
pub fn assert_success(what: &str, o: &Output) {
    assert!(o.status.success(), "{what} failed:\n{}", describe_output(o));
}

fn hash_file(p: &Path) -> String {
    let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

// ---------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------

/// Is skopeo installed? (CI rule: panics under `CI=true` when missing.)
pub fn skopeo_available() -> bool {
    require_binary("skopeo", "skopeo").is_some()
}

/// Run `skopeo GLOBAL-FLAGS ARGS...` hermetically. `args` starts with the
/// subcommand, e.g. `["inspect", "--tls-verify=false", "--raw", "docker://..."]`.
/// Global flags added: `--policy` (insecureAcceptAnything, our own file),
/// `--registries.d` (empty dir), `--tmpdir`, `--command-timeout`.
/// Environment: cleared; PATH, HOME/XDG dirs in a temp dir whose
/// `.config/containers/registries.conf` is empty and whose
/// `registries.conf.d/` is empty (this replaces /etc/containers/registries.conf
/// AND its drop-ins, so nothing can redirect or add mirrors),
/// `REGISTRY_AUTH_FILE` = a missing file.
pub fn skopeo(args: &[&str]) -> Output {
    let bin = find_binary("skopeo").expect("skopeo not installed (check skopeo_available() first)");
    let tmp = tempfile::Builder::new()
        .prefix("ocicache-skopeo-")
        .tempdir()
        .unwrap();
    let t = tmp.path();
    let home = t.join("home");
    let run = t.join("run");
    let regd = t.join("registries.d");
    let scratch = t.join("tmp");
    for d in [&home, &run, &regd, &scratch] {
        fs::create_dir_all(d).unwrap();
    }
    // skopeo 1.9 ignores CONTAINERS_REGISTRIES_CONF, and its hidden
    // --registries-conf flag still loads /etc/containers/registries.conf.d/*.
    // A user-level registries.conf plus an (empty) user-level drop-in dir
    // replace both system locations, so nothing can add mirrors/rewrites.
    let user_conf_dir = home.join(".config").join("containers");
    fs::create_dir_all(user_conf_dir.join("registries.conf.d")).unwrap();
    fs::write(
        user_conf_dir.join("registries.conf"),
        "unqualified-search-registries = []\n",
    )
    .unwrap();
    let containers_conf = t.join("containers.conf");
    fs::write(&containers_conf, "").unwrap();
    let policy = t.join("policy.json");
    fs::write(
        &policy,
        r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
    )
    .unwrap();

    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", child_path_env())
        .env("HOME", &home)
        .env("XDG_RUNTIME_DIR", &run)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("CONTAINERS_CONF", &containers_conf)
        .env("REGISTRY_AUTH_FILE", t.join("auth.json"))
        .env("DOCKER_CONFIG", t.join("docker"))
        .env("TMPDIR", &scratch)
        .arg("--policy")
        .arg(&policy)
        .arg("--registries.d")
        .arg(&regd)
        .arg("--tmpdir")
        .arg(&scratch)
        .arg("--command-timeout")
        .arg(format!("{}s", CLIENT_TIMEOUT.as_secs()))
        .args(args);
    let out = run_with_timeout(&mut cmd, CLIENT_TIMEOUT + Duration::from_secs(10));
    drop(tmp);
    out
}

/// `skopeo copy --retry-times 0 --src-tls-verify=false --src-no-creds
/// docker://IMAGE dir:DEST`. `image` is `"127.0.0.1:PORT/repo:tag"` (or
/// `@sha256:...`). `dest` should not exist or be empty. Over plain HTTP
/// skopeo first tries HTTPS on the same port, then falls back to HTTP.
pub fn skopeo_copy(image: &str, dest: &Path) -> Output {
    skopeo_copy_with(image, dest, &[])
}

/// `skopeo_copy` with extra `copy` flags, e.g. `["--all"]` or
/// `["--override-arch" ...]` (global flags must go through `skopeo`).
pub fn skopeo_copy_with(image: &str, dest: &Path, extra: &[&str]) -> Output {
    let src = format!("docker://{image}");
    let dst = format!("dir:{}", dest.display());
    let mut args = vec![
        "copy",
        "--retry-times",
        "0",
        "--src-tls-verify=false",
        "--src-no-creds",
    ];
    args.extend_from_slice(extra);
    args.push(&src);
    args.push(&dst);
    skopeo(&args)
}

/// The `manifest.json` skopeo wrote into a `dir:` destination.
pub fn dir_manifest(dest: &Path) -> Vec<u8> {
    fs::read(dest.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{}/manifest.json: {e}", dest.display()))
}

/// Rehash every blob skopeo wrote into a `dir:` destination (files named by
/// their hex digest, and `<hex>.manifest.json` per-instance manifests of
/// `--all` copies), panic on any mismatch, check that everything
/// `manifest.json` references is present, and return the sorted digests
/// verified.
pub fn verify_dir_copy(dest: &Path) -> Vec<String> {
    let mut verified = Vec::new();
    for entry in fs::read_dir(dest).unwrap_or_else(|e| panic!("read_dir {}: {e}", dest.display())) {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let hex_name = name
            .strip_suffix(".manifest.json")
            .or_else(|| name.strip_suffix(".tar"))
            .unwrap_or(&name);
        if !is_hex64(hex_name) {
            continue;
        }
        let expected = format!("sha256:{hex_name}");
        let actual = hash_file(&entry.path());
        assert_eq!(
            actual,
            expected,
            "skopeo wrote {} whose content does not match its digest",
            entry.path().display()
        );
        verified.push(expected);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&dir_manifest(dest))
        .unwrap_or_else(|e| panic!("{}/manifest.json is not JSON: {e}", dest.display()));
    let mut referenced = Vec::new();
    if let Some(d) = manifest["config"]["digest"].as_str() {
        referenced.push(d.to_string());
    }
    for key in ["layers", "manifests"] {
        if let Some(arr) = manifest[key].as_array() {
            referenced.extend(
                arr.iter()
                    .filter_map(|l| l["digest"].as_str().map(str::to_string)),
            );
        }
    }
    for d in &referenced {
        assert!(
            verified.contains(d),
            "manifest.json in {} references {d} but skopeo wrote no such blob (have {verified:?})",
            dest.display()
        );
    }
    verified.sort();
    verified.dedup();
    verified
}

// ---------------------------------------------------------------------------
// containerd
// ---------------------------------------------------------------------------

/// A private containerd daemon (root/state/socket in a temp dir). Killed on drop.
pub struct Containerd {
    /// The gRPC socket (`ctr -a`).
    pub socket: PathBuf,
    root: PathBuf,
    hosts_dir: PathBuf,
    log_path: PathBuf,
    ctr_bin: PathBuf,
    child: Option<Child>,
    // Last: removed after the daemon is gone.
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Start containerd. `None` (after SKIPPED) when containerd/ctr are
    /// missing outside CI; panics under CI or when the daemon does not come up.
    pub fn start() -> Option<Containerd> {
        let bin = require_binary("containerd", "containerd")?;
        let ctr_bin = require_binary("ctr", "containerd")?;
        // Unix socket paths are limited to 107 bytes: keep the dir short.
        let base = std::env::temp_dir();
        let base = if base.as_os_str().len() > 40 {
            PathBuf::from("/tmp")
        } else {
            base
        };
        let dir = tempfile::Builder::new()
            .prefix("ocictd-")
            .tempdir_in(base)
            .unwrap();
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let hosts_dir = dir.path().join("hosts");
        for d in [&root, &state, &hosts_dir] {
            fs::create_dir_all(d).unwrap();
        }
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{ttrpc}"

[debug]
  address = ""
  level = "warn"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
                root = root.display(),
                state = state.display(),
                sock = socket.display(),
                ttrpc = dir.path().join("t.sock").display(),
                opt = root.join("opt").display(),
            ),
        )
        .unwrap();
        let log_path = dir.path().join("containerd.log");
        let log = fs::File::create(&log_path).unwrap();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .env_clear()
            .env("PATH", child_path_env())
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut c = Containerd {
            socket,
            root,
            hosts_dir,
            log_path,
            ctr_bin,
            child: Some(child),
            dir,
        };
        let deadline = Instant::now() + CONTAINERD_READY_TIMEOUT;
        loop {
            if let Some(status) = c.child.as_mut().unwrap().try_wait().unwrap() {
                c.child = None;
                panic!(
                    "containerd exited during start-up with {status}; log:\n{}",
                    c.log()
                );
            }
            if c.socket.exists()
                && c.ctr_timeout(&["version"], Duration::from_secs(5))
                    .status
                    .success()
            {
                return Some(c);
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer within {CONTAINERD_READY_TIMEOUT:?}; log:\n{}",
                    c.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Run `ctr -a SOCK ARGS...` (clean environment, timeout `CLIENT_TIMEOUT`).
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_timeout(args, CLIENT_TIMEOUT)
    }

    fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new(&self.ctr_bin);
        cmd.env_clear()
            .env("PATH", child_path_env())
            .env("HOME", self.dir.path())
            .arg("--address")
            .arg(&self.socket)
            .args(args);
        run_with_timeout(&mut cmd, timeout)
    }

    /// Pull `image` (`"docker.io/library/NAME:TAG"`) through `mirror`:
    /// writes `HOSTS/docker.io/hosts.toml` (server registry-1.docker.io, one
    /// `[host."http://MIRROR"]` with pull+resolve; containerd then adds
    /// `?ns=docker.io` to every request) and runs
    /// `ctr images pull --plain-http --hosts-dir HOSTS --snapshotter native IMAGE`.
    pub fn pull_via_mirror(&self, mirror: SocketAddr, image: &str) -> Output {
        self.pull_via_mirror_ns(mirror, "docker.io", image)
    }

    /// Same for any registry host (`"ghcr.io"`, `"quay.io"`, ...); `image`
    /// must start with `registry_host/`. The server entry is
    /// `https://registry_host` (`registry-1.docker.io` for docker.io). If the
    /// mirror fails, containerd falls back to that server, which has no
    /// network here and fails fast with a DNS error.
    pub fn pull_via_mirror_ns(
        &self,
        mirror: SocketAddr,
        registry_host: &str,
        image: &str,
    ) -> Output {
        self.write_hosts_toml(mirror, registry_host);
        let hosts = self.hosts_dir.display().to_string();
        self.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--hosts-dir",
            &hosts,
            "--snapshotter",
            "native",
            image,
        ])
    }

    /// Write `HOSTS/<registry_host>/hosts.toml` pointing at `mirror`.
    pub fn write_hosts_toml(&self, mirror: SocketAddr, registry_host: &str) -> PathBuf {
        let server = if registry_host == "docker.io" {
            "https://registry-1.docker.io".to_string()
        } else {
            format!("https://{registry_host}")
        };
        let d = self.hosts_dir.join(registry_host);
        fs::create_dir_all(&d).unwrap();
        let p = d.join("hosts.toml");
        fs::write(
            &p,
            format!(
                "server = \"{server}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
        p
    }

    /// The hosts directory passed as `--hosts-dir`.
    pub fn hosts_dir(&self) -> &Path {
        &self.hosts_dir
    }

    /// Digests of every blob in containerd's content store (`ctr content ls -q`).
    pub fn content_digests(&self) -> Vec<String> {
        let o = self.ctr(&["content", "ls", "--quiet"]);
        assert_success("ctr content ls", &o);
        let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("sha256:"))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Image names known to containerd (`ctr images ls -q`).
    pub fn images(&self) -> Vec<String> {
        let o = self.ctr(&["images", "ls", "--quiet"]);
        assert_success("ctr images ls", &o);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// `ctr images rm --sync IMAGE`: removes the image and (synchronous GC)
    /// its content and snapshots, so a later pull fetches everything again.
    pub fn remove_image(&self, image: &str) -> Output {
        self.ctr(&["images", "rm", "--sync", image])
    }

    /// Paths of `rel` (e.g. `"data/layer0.bin"`) inside every unpacked
    /// native snapshot: non-empty means a layer was really unpacked.
    pub fn find_unpacked_file(&self, rel: &str) -> Vec<PathBuf> {
        let snaps = self
            .root
            .join("io.containerd.snapshotter.v1.native")
            .join("snapshots");
        let mut found = Vec::new();
        if let Ok(rd) = fs::read_dir(&snaps) {
            for e in rd.flatten() {
                let p = e.path().join(rel.trim_start_matches('/'));
                if p.is_file() {
                    found.push(p);
                }
            }
        }
        found.sort();
        found
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
