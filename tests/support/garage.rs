//! A real S3-compatible store for the shared-tier tests: a 3-node Garage cluster
//! (replication factor 3, consistent mode) on loopback ports, with a bucket and a key.
//! `tests/run.sh` installs `garage` (`cargo install garage --locked`) when it is missing.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::ports::free_port;

const NODES: usize = 3;
const REGION: &str = "garage";
const BUCKET: &str = "ocicache";

struct Node {
    config: PathBuf,
    s3_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    /// Each node's `<id>@127.0.0.1:<rpc port>`, once known.
    ids: Vec<String>,
    key_id: String,
    secret: String,
}

fn garage_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("garage"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/garage"));
    }
    candidates.into_iter().find(|p| p.is_file()).expect(
        "garage not found: run tests/run.sh, which installs it (cargo install garage --locked)",
    )
}

impl Garage {
    /// Starts a 3-node cluster (replication factor 3), creates bucket "ocicache" and a key
    /// allowed to read, write and own it. Ports are picked free, then bound by Garage a
    /// moment later: another test may take one in between, so a failed start is retried
    /// with new ports.
    pub fn start() -> Garage {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(g) => return g,
                Err(e) => {
                    eprintln!("garage cluster start failed, retrying with new ports: {e}");
                    last = e;
                }
            }
        }
        panic!("garage cluster did not start: {last}");
    }

    fn try_start() -> Result<Garage, String> {
        let bin = garage_bin();
        let dir = tempfile::tempdir().unwrap();
        // A secret of its own per cluster: nodes of two clusters never join each other.
        let secret = {
            use sha2::Digest as _;
            let seed = format!("{:?}{:?}", dir.path(), std::time::SystemTime::now());
            hex::encode(sha2::Sha256::digest(seed.as_bytes()))
        };
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let root = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&root).unwrap();
            let (rpc, s3, admin) = (free_port(), free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "sqlite"
replication_factor = 3
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                    root = root.display()
                ),
            )
            .unwrap();
            nodes.push(Node {
                config,
                s3_port: s3,
                log: root.join("log"),
                child: None,
            });
        }
        let mut g = Garage {
            bin,
            dir,
            nodes,
            ids: Vec::new(),
            key_id: String::new(),
            secret: String::new(),
        };
        for i in 0..NODES {
            g.spawn(i);
        }
        let mut ids = Vec::new();
        for i in 0..NODES {
            ids.push(g.until_ok(i, &["node", "id", "-q"])?.trim().to_string());
        }
        for id in &ids[1..] {
            g.until_ok(0, &["node", "connect", id])?;
        }
        g.ids = ids.clone();
        for id in &ids {
            let short = id.split('@').next().unwrap();
            g.until_ok(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short])?;
        }
        g.until_ok(0, &["layout", "apply", "--version", "1"])?;
        let out = g.until_ok(0, &["key", "create", "ocicache-tests"])?;
        let field = |name: &str| {
            out.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                })
                .unwrap_or_else(|| panic!("no {name} in `garage key create`: {out}"))
        };
        g.key_id = field("Key ID");
        g.secret = field("Secret key");
        g.until_ok(0, &["bucket", "create", BUCKET])?;
        g.until_ok(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                "ocicache-tests",
            ],
        )?;
        g.wait_s3_ready()?;
        Ok(g)
    }

    pub fn endpoint(&self, node: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[node].s3_port)
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn access_key_id(&self) -> &str {
        &self.key_id
    }

    pub fn secret_access_key(&self) -> &str {
        &self.secret
    }

    /// An S3 client of the bucket through node `node`, without retries (a test sees the
    /// store's answer as it is).
    pub fn client(&self, node: usize) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint(node))
            .with_bucket_name(BUCKET)
            .with_region(REGION)
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .with_allow_http(true)
            .with_retry(object_store::RetryConfig {
                max_retries: 0,
                ..Default::default()
            })
            .build()
            .unwrap()
    }

    /// SIGKILLs node `node` (the others keep a quorum of 2 of 3). Garage notices the death
    /// ~9 s later: meanwhile, a request that needs the dead node may take that long.
    pub fn kill_node(&mut self, node: usize) {
        if let Some(mut c) = self.nodes[node].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `node` again, with its data, and returns once every running node sees
    /// every other one and (with a quorum) the node's S3 API answers. A restarted node does not
    /// rejoin by itself (it and the others retry only after ~25 s): they are told to connect.
    pub fn start_node(&mut self, node: usize) {
        if self.nodes[node].child.is_some() {
            return;
        }
        self.spawn(node);
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        let result = self.rejoin(node).and_then(|()| {
            // Alone, the node has no quorum and its S3 API answers 503.
            if running >= 2 {
                self.wait_s3_node_ready(node)
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            panic!("garage node {node} did not rejoin the cluster: {e}");
        }
    }

    fn rejoin(&self, node: usize) -> Result<(), String> {
        let running: Vec<usize> = (0..NODES)
            .filter(|&i| self.nodes[i].child.is_some())
            .collect();
        // Both ways: each node sees a peer as connected by its own connection to it.
        for &i in &running {
            if i != node {
                self.until_ok(node, &["node", "connect", &self.ids[i]])?;
                self.until_ok(i, &["node", "connect", &self.ids[node]])?;
            }
        }
        let start = Instant::now();
        loop {
            let mut seen = String::new();
            let mut all = true;
            for &i in &running {
                let status = self.until_ok(i, &["json-api", "GetClusterStatus"])?;
                let v: serde_json::Value = serde_json::from_str(&status)
                    .map_err(|e| format!("GetClusterStatus: {e}: {status}"))?;
                let up = |j: usize| {
                    let id = self.ids[j].split('@').next().unwrap();
                    v["nodes"].as_array().is_some_and(|nodes| {
                        nodes.iter().any(|n| n["id"] == id && n["isUp"] == true)
                    })
                };
                let sees: Vec<usize> = running.iter().copied().filter(|&j| up(j)).collect();
                all &= sees.len() == running.len();
                seen += &format!("\nnode {i} sees up: {sees:?}");
            }
            if all {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "running nodes {running:?};{seen}\nnode log:\n{}",
                    self.log_tail(node)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&n.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("garage starts");
        n.child = Some(child);
    }

    fn log_tail(&self, node: usize) -> String {
        let log = std::fs::read_to_string(&self.nodes[node].log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs a CLI command against node `node` until it succeeds (the node may still be
    /// starting), for up to 20 s; its stdout, or what went wrong.
    fn until_ok(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let start = Instant::now();
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[node].config)
                .args(args)
                .env("RUST_LOG", "error")
                .output()
                .expect("garage runs");
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "garage {args:?} failed: {}{}\nnode log:\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail(node)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until every node's S3 endpoint takes a PUT and a DELETE.
    fn wait_s3_ready(&self) -> Result<(), String> {
        (0..NODES).try_for_each(|i| self.wait_s3_node_ready(i))
    }

    /// Waits until node `i`'s S3 endpoint takes a PUT and a DELETE.
    fn wait_s3_node_ready(&self, i: usize) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = self.client(i);
        let start = Instant::now();
        loop {
            let ok = rt.block_on(async {
                use object_store::ObjectStore;
                let p = object_store::path::Path::from("ready");
                store
                    .put(&p, object_store::PutPayload::from_static(b"ok"))
                    .await
                    .is_ok()
                    && store.delete(&p).await.is_ok()
            });
            if ok {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err(format!(
                    "garage node {i} S3 API not ready:\n{}",
                    self.log_tail(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill_node(i);
        }
    }
}
