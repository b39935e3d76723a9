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

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// How long `Registry::start` waits for `GET /v2/` to answer.
const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect timeout of the HTTP helper.
const HTTP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout of the HTTP helper (per socket operation).
pub const HTTP_IO_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Binaries and the CI rule
// ---------------------------------------------------------------------------

/// True when the environment says we run under CI (`CI=true`, also `1`).
pub fn under_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => v.eq_ignore_ascii_case("true") || v == "1",
        Err(_) => false,
    }
}

/// Locate an executable on `PATH` (plus the usual system directories, in
/// case the test runner's `PATH` is trimmed). `name` may also be a path.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    fn is_exec(p: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| is_exec(p))
}

/// Find `name`, applying the CI rule when it is missing: under `CI=true`
/// panic, otherwise print `SKIPPED: NAME not installed` and return `None`.
/// `package` is the Debian package that provides it (for the message).
pub fn require_binary(name: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = find_binary(name) {
        return Some(p);
    }
    if under_ci() {
        panic!(
            "`{name}` is not installed but CI=true: integration tests must not be skipped \
             under CI. Install the Debian package `{package}` (apt-get install -y {package})."
        );
    }
    eprintln!(
        "\n==================================================================\n\
         SKIPPED: {name} not installed (Debian package `{package}`); \
         this test did NOT run\n\
         ==================================================================\n"
    );
    None
}

/// A PATH value for child processes (we clear their environment).
pub(crate) fn child_path_env() -> String {
    let base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{p}:{base}"),
        _ => base.to_string(),
    }
}

/// A free TCP port on 127.0.0.1 (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// Hashing, random data, layers
// ---------------------------------------------------------------------------

/// `"sha256:<hex>"` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Deterministic pseudo-random bytes (splitmix64-seeded xorshift64*).
/// Random data does not compress, so gzip layers stay about `len` bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    // splitmix64 so that small / zero seeds still give a good, non-zero state
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut state = z ^ (z >> 31);
    if state == 0 {
        state = 0x2545_F491_4F6C_DD1D;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Path (inside the image's root filesystem, no leading slash) of the file
/// that layer `index` of a `push_image` image holds.
pub fn layer_file_path(index: usize) -> String {
    format!("data/layer{index}.bin")
}

fn tar_header(path: &str, size: u64, mode: u32, typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(
        path.len() < 100,
        "tar path too long for this tiny writer: {path}"
    );
    h[..path.len()].copy_from_slice(path.as_bytes());
    fn octal(field: &mut [u8], value: u64) {
        // width-1 octal digits, NUL terminated
        let s = format!("{:0width$o}", value, width = field.len() - 1);
        assert!(s.len() == field.len() - 1, "tar field overflow");
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    }
    octal(&mut h[100..108], mode as u64); // mode
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], size); // size
    octal(&mut h[136..148], 0); // mtime: fixed, for reproducible layers
    h[148..156].copy_from_slice(b"        "); // checksum placeholder
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root"); // uname
    h[297..301].copy_from_slice(b"root"); // gname
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}");
    h[148..154].copy_from_slice(s.as_bytes());
    h[154] = 0;
    h[155] = b' ';
    h
}

/// A reproducible uncompressed ustar archive holding the directories leading
/// to `path` and one regular file `path` (mode 0644, uid/gid 0, mtime 0).
pub fn make_tar(path: &str, content: &[u8]) -> Vec<u8> {
    let path = path.trim_start_matches('/');
    let mut out = Vec::with_capacity(content.len() + 4096);
    let parts: Vec<&str> = path.split('/').collect();
    for i in 1..parts.len() {
        let dir = format!("{}/", parts[..i].join("/"));
        out.extend_from_slice(&tar_header(&dir, 0, 0o755, b'5'));
    }
    out.extend_from_slice(&tar_header(path, content.len() as u64, 0o644, b'0'));
    out.extend_from_slice(content);
    let pad = (512 - content.len() % 512) % 512;
    out.resize(out.len() + pad, 0);
    out.resize(out.len() + 1024, 0); // end-of-archive marker
    out
}

/// Deterministic gzip (mtime 0, no file name) of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(
        Vec::with_capacity(data.len() / 2 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// One image layer: `(uncompressed tar, gzip-compressed tar)` holding the
/// single file `layer_file_path(index)` with `content`.
pub fn make_layer(index: usize, content: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let tar = make_tar(&layer_file_path(index), content);
    let gz = gzip(&tar);
    (tar, gz)
}

/// OCI architecture name of the host (`amd64`, `arm64`, ...).
pub fn host_oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// Split `"arch"` or `"arch/variant"` (a leading `"linux/"` is accepted).
fn split_platform(p: &str) -> (String, Option<String>) {
    let p = p.strip_prefix("linux/").unwrap_or(p);
    match p.split_once('/') {
        Some((a, v)) => (a.to_string(), Some(v.to_string())),
        None => (p.to_string(), None),
    }
}

/// What `Registry::push_image` pushed.
#[derive(Clone, Debug)]
pub struct PushedImage {
    pub repo: String,
    pub tag: String,
    pub manifest_digest: String,
    /// Manifest bytes exactly as pushed (hash them to get `manifest_digest`).
    pub manifest: Vec<u8>,
    pub media_type: String,
    pub config_digest: String,
    pub config: Vec<u8>,
    /// Compressed layer digests, in manifest order.
    pub layer_digests: Vec<String>,
    /// Compressed layer bytes as pushed, in manifest order.
    pub layer_blobs: Vec<Vec<u8>>,
    /// sha256 of each uncompressed tar (the config's rootfs.diff_ids).
    pub diff_ids: Vec<String>,
    /// Platform architecture written into the config (`amd64`, `arm64`, ...).
    pub arch: String,
}

impl PushedImage {
    /// Every digest a full pull must fetch: manifest, config, layers.
    pub fn all_digests(&self) -> Vec<String> {
        let mut v = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        v.extend(self.layer_digests.iter().cloned());
        v
    }
}

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

    // ---------------- seeding through the push API ----------------

    /// Upload a blob (POST upload session, then monolithic PUT with digest).
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.url());
        let (st, h, body) = http_request("POST", &start, &[], b"");
        assert_eq!(st, 202, "POST {start}: {}", String::from_utf8_lossy(&body));
        let loc = header(&h, "location").expect("upload Location header");
        let loc = absolute_url(&self.url(), loc);
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        let (st, h, body) = http_request(
            "PUT",
            &put,
            &[("Content-Type", "application/octet-stream")],
            data,
        );
        assert_eq!(
            st,
            201,
            "PUT blob {digest} to {repo}: {}",
            String::from_utf8_lossy(&body)
        );
        if let Some(d) = header(&h, "docker-content-digest") {
            assert_eq!(d, digest, "registry computed a different blob digest");
        }
        digest
    }

    /// PUT a manifest (or index) under `reference` (tag or digest).
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = sha256_digest(bytes);
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.url());
        let (st, h, body) = http_request("PUT", &url, &[("Content-Type", media_type)], bytes);
        assert_eq!(st, 201, "PUT {url}: {}", String::from_utf8_lossy(&body));
        if let Some(d) = header(&h, "docker-content-digest") {
            assert_eq!(d, digest, "registry computed a different manifest digest");
        }
        digest
    }

    /// Push a single-platform OCI image for the host's architecture. Each
    /// entry of `layers` is the content of one file, `layer_file_path(i)`,
    /// packed as its own gzip tar layer. Deterministic: the same inputs give
    /// the same digests.
    pub fn push_image(&self, repo: &str, tag: &str, layers: &[Vec<u8>]) -> PushedImage {
        self.push_image_for_arch(repo, tag, layers, host_oci_arch())
    }

    /// Like `push_image` but for the given platform (`"arm64"`, `"arm/v7"`).
    pub fn push_image_for_arch(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        arch: &str,
    ) -> PushedImage {
        let (architecture, variant) = split_platform(arch);
        let mut layer_digests = Vec::new();
        let mut layer_blobs = Vec::new();
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        let mut layer_descs = Vec::new();
        for (i, content) in layers.iter().enumerate() {
            let (tar, gz) = make_layer(i, content);
            diff_ids.push(sha256_digest(&tar));
            let d = self.push_blob(repo, &gz);
            layer_descs.push(serde_json::json!({
                "mediaType": OCI_LAYER_GZIP,
                "digest": d,
                "size": gz.len(),
            }));
            history.push(serde_json::json!({
                "created": "1970-01-01T00:00:00Z",
                "created_by": format!("ocicache test: ADD {} /", layer_file_path(i)),
            }));
            layer_digests.push(d);
            layer_blobs.push(gz);
        }
        let mut config = serde_json::json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": architecture,
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Cmd": ["/bin/sh"],
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": history,
        });
        if let Some(v) = &variant {
            config["variant"] = serde_json::Value::String(v.clone());
        }
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.push_blob(repo, &config);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_descs,
        }))
        .unwrap();
        let manifest_digest = self.push_manifest(repo, tag, OCI_MANIFEST, &manifest);
        PushedImage {
            repo: repo.to_string(),
            tag: tag.to_string(),
            manifest_digest,
            manifest,
            media_type: OCI_MANIFEST.to_string(),
            config_digest,
            config,
            layer_digests,
            layer_blobs,
            diff_ids,
            arch: arch.to_string(),
        }
    }

    /// Push an OCI image index under `tag` in `repo`. Each image must already
    /// be in `repo` (the registry checks). `arch` is `"amd64"`, `"arm64"`,
    /// `"arm/v7"`, ...; os is always linux.
    pub fn push_index(
        &self,
        repo: &str,
        tag: &str,
        manifests: &[(&PushedImage, &str)],
    ) -> (String, Vec<u8>) {
        let entries: Vec<serde_json::Value> = manifests
            .iter()
            .map(|(img, arch)| {
                let (architecture, variant) = split_platform(arch);
                let mut platform =
                    serde_json::json!({ "architecture": architecture, "os": "linux" });
                if let Some(v) = variant {
                    platform["variant"] = serde_json::Value::String(v);
                }
                serde_json::json!({
                    "mediaType": img.media_type,
                    "digest": img.manifest_digest,
                    "size": img.manifest.len(),
                    "platform": platform,
                })
            })
            .collect();
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": entries,
        }))
        .unwrap();
        let digest = self.push_manifest(repo, tag, OCI_INDEX, &index);
        (digest, index)
    }

    /// DELETE a manifest by digest (delete is enabled in the config).
    pub fn delete_manifest(&self, repo: &str, digest: &str) -> u16 {
        let url = format!("{}/v2/{repo}/manifests/{digest}", self.url());
        http_request("DELETE", &url, &[], b"").0
    }

    /// DELETE a blob by digest.
    pub fn delete_blob(&self, repo: &str, digest: &str) -> u16 {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.url());
        http_request("DELETE", &url, &[], b"").0
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

// ---------------------------------------------------------------------------
// Tiny blocking HTTP/1.1 client
// ---------------------------------------------------------------------------

/// Status, headers (names lower-cased, in order), body.
pub type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

/// First value of header `name` (case-insensitive).
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `GET url`. Panics on a connection/IO error (use `try_http_request` to
/// observe those).
pub fn http_get(url: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_request("GET", url, headers, b"")
}

/// Any method (`HEAD` responses have an empty body). Redirects are NOT
/// followed. Sends `Connection: close` unless a Connection header is given.
/// Panics on a connection/IO error.
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http_request(method, url, headers, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// Like `http_request` but returns IO errors (connection refused, timeout,
/// malformed response) instead of panicking.
pub fn try_http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    try_http_request_timeout(method, url, headers, body, HTTP_IO_TIMEOUT)
}

/// Resolve a possibly relative `Location` against `base` ("http://host:port").
pub fn absolute_url(base: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", base.trim_end_matches('/'))
    } else {
        format!("{}/{location}", base.trim_end_matches('/'))
    }
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// `(authority, host for DNS, port, path-and-query)` of an `http://` URL.
fn split_url(url: &str) -> std::io::Result<(String, String, u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad(format!("only http:// URLs are supported: {url}")))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("bad IPv6 authority"))?;
        let port = after.strip_prefix(':').map(|p| p.parse()).transpose();
        (
            h.to_string(),
            port.map_err(|_| bad("bad port"))?.unwrap_or(80),
        )
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
            None => (authority.to_string(), 80),
        }
    };
    Ok((authority.to_string(), host, port, path))
}

/// `try_http_request` with an explicit per-operation IO timeout.
pub fn try_http_request_timeout(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let (authority, host, port, path) = split_url(url)?;
    let mut last_err = None;
    let mut stream = None;
    for a in (host.as_str(), port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, HTTP_CONNECT_TIMEOUT.min(timeout)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let stream = match stream {
        Some(s) => s,
        None => return Err(last_err.unwrap_or_else(|| bad("no address"))),
    };
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let _ = stream.set_nodelay(true);

    let has = |n: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(n));
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !has("host") {
        req.push_str(&format!("Host: {authority}\r\n"));
    }
    if !has("connection") {
        req.push_str("Connection: close\r\n");
    }
    if !has("user-agent") {
        req.push_str("User-Agent: ocicache-test-harness/1\r\n");
    }
    let wants_len = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if wants_len && !has("content-length") && !has("transfer-encoding") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut w = &stream;
    w.write_all(req.as_bytes())?;
    // A server may answer (e.g. 413/400) and close before reading the whole
    // body: then report its response rather than the write error.
    let mut write_err = w.write_all(body).and_then(|_| w.flush()).err();

    let mut r = BufReader::new(&stream);
    let (status, resp_headers) = loop {
        let (status, hs) = match read_head(&mut r) {
            Ok(v) => v,
            Err(e) => return Err(write_err.take().unwrap_or(e)),
        };
        // skip interim responses (100 Continue, 103 Early Hints)
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        break (status, hs);
    };
    let no_body = method.eq_ignore_ascii_case("HEAD")
        || status == 204
        || status == 304
        || (100..200).contains(&status);
    let mut out = Vec::new();
    if !no_body {
        let chunked = header(&resp_headers, "transfer-encoding")
            .map(|v| v.to_ascii_lowercase().contains("chunked"))
            .unwrap_or(false);
        if chunked {
            read_chunked(&mut r, &mut out)?;
        } else if let Some(len) = header(&resp_headers, "content-length") {
            let len: usize = len.trim().parse().map_err(|_| bad("bad Content-Length"))?;
            out.resize(len, 0);
            r.read_exact(&mut out)?;
        } else {
            r.read_to_end(&mut out)?;
        }
    }
    Ok((status, resp_headers, out))
}

fn read_line_crlf<R: BufRead>(r: &mut R) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let n = r.read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a complete response",
        ));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    String::from_utf8(buf).map_err(|_| bad("non-UTF-8 header line"))
}

fn read_head<R: BufRead>(r: &mut R) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let status_line = read_line_crlf(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line: {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line: {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line_crlf(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line: {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((status, headers))
}

fn read_chunked<R: BufRead>(r: &mut R, out: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        let line = read_line_crlf(r)?;
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|_| bad(format!("bad chunk size line: {line:?}")))?;
        if size == 0 {
            // trailers until the empty line
            loop {
                if read_line_crlf(r)?.is_empty() {
                    return Ok(());
                }
            }
        }
        let start = out.len();
        out.resize(start + size, 0);
        r.read_exact(&mut out[start..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(bad("chunk not followed by CRLF"));
        }
    }
}
