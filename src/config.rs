//! Configuration: built-in defaults, then a TOML file, then `OCICACHE_` environment variables
//! (nested keys split on `__`, e.g. `OCICACHE_CACHE__DIR`).
//!
//! Every struct is `#[serde(default, deny_unknown_fields)]`: a key we do not know is an error
//! that names it, never silently ignored (a typo in `max_size` must not give an unbounded
//! cache). [`Config::load`] runs [`Config::validate`], whose messages name the key and value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer};

/// The whole configuration of one `ocicache` process.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Never contact an upstream: serve what is cached (tags regardless of age), 404 otherwise.
    pub offline: bool,
    pub cache: CacheConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    /// Serve clients over TLS when set.
    pub tls: Option<TlsConfig>,
    /// Require HTTP Basic authentication from clients when set.
    pub auth: Option<AuthConfig>,
    /// The registries this proxy mirrors. Only these are ever contacted.
    pub upstreams: Vec<UpstreamConfig>,
    /// The admin API's listener and token (`[admin]`).
    pub admin: AdminConfig,
    /// Images the server keeps cached, refreshed on an interval (`[[sync]]`).
    pub sync: Vec<SyncConfig>,
}

/// `[admin]`: the admin API (`/api/v1/...`), on a listener of its own, never the public one.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the admin API listens; `""` turns it off.
    #[serde(deserialize_with = "listen_or_off")]
    pub listen: Option<SocketAddr>,
    /// A bearer token every admin request must carry; none: the API is open to whoever
    /// reaches `listen` (loopback by default).
    pub token: Option<Secret>,
    /// A file holding the token (trailing newline ignored); exclusive with `token`.
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 5080))),
            token: None,
            token_file: None,
        }
    }
}

impl AdminConfig {
    /// The token, from `token` or `token_file`.
    pub fn token(&self) -> std::io::Result<Option<Secret>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        match &self.token_file {
            Some(f) => read_secret(f).map(Some),
            None => Ok(None),
        }
    }
}

/// An address, or `""` for none.
fn listen_or_off<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.trim().parse().map(Some).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not an address such as \"127.0.0.1:5080\" (or \"\" for none): {e}"
        ))
    })
}

/// A secret read from a file, its trailing newline ignored.
fn read_secret(file: &Path) -> std::io::Result<Secret> {
    let s = std::fs::read_to_string(file)?;
    Ok(Secret(s.trim_end_matches(['\r', '\n']).to_string()))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Root of the content-addressed store (`blobs/`, `tmp/`, `tags/`).
    pub dir: PathBuf,
    /// Bound of the LRU index over everything on disk.
    pub max_size: ByteSize,
    /// A fill that receives no byte for this long is failed (and its temp file deleted).
    pub stall_timeout: HumanDuration,
    /// A fill that has not completed after this long is failed, even if bytes still arrive.
    pub fill_deadline: HumanDuration,
    /// Fills (upstream downloads) running at once; further misses wait their turn, in
    /// order, within their `fill_deadline`.
    pub max_fills: usize,
    /// A shared tier on an S3-compatible bucket, for several replicas. With it, the local
    /// `dir` is a bounded tier in front of the bucket.
    pub s3: Option<S3Config>,
}

/// `[cache.s3]`: the shared tier. Credentials come from `access_key_id` and
/// `secret_access_key` (or their `_file` forms), else from the usual `AWS_*` variables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The store's URL, e.g. `http://garage:3900`; none for AWS S3 itself.
    pub endpoint: Option<String>,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Key prefix of every object ocicache writes, e.g. `mirror/` (empty: the bucket root).
    #[serde(default)]
    pub prefix: String,
    pub access_key_id: Option<String>,
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key: Option<Secret>,
    pub secret_access_key_file: Option<PathBuf>,
    /// `https://endpoint/bucket/key` (what MinIO, Garage and Ceph expect) rather than
    /// `https://bucket.endpoint/key`.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Bound of the bucket's content, kept by a GC that every replica runs.
    #[serde(default = "default_s3_max_size")]
    pub max_size: ByteSize,
    /// How often each replica runs the bucket's GC.
    #[serde(default = "default_gc_interval")]
    pub gc_interval: HumanDuration,
    /// How long a replica waits for another one's fill of the same blob (announced by a
    /// lease object) before it fetches the blob itself.
    #[serde(default = "default_lease_wait")]
    pub lease_wait: HumanDuration,
    /// Bound of one request to the store (a streamed GET: of each read).
    #[serde(default = "default_s3_timeout")]
    pub timeout: HumanDuration,
    /// Answer blob GETs the bucket holds with a `307` to a presigned URL of it.
    #[serde(default)]
    pub redirect: bool,
    /// `[cache.s3.peers]`: replicas stream cold blobs from each other instead of waiting for
    /// them to land in the bucket. Without it, one replica fetches under a lease and the
    /// others wait.
    #[serde(default)]
    pub peers: Option<PeersConfig>,
}

/// `[cache.s3.peers]`: the internal endpoint replicas stream fills from, and how they find
/// and trust each other (membership through the bucket, requests signed with `secret`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeersConfig {
    /// The internal listener of the peer endpoint, e.g. `0.0.0.0:5001`.
    pub listen: SocketAddr,
    /// The URL the other replicas reach this one's peer endpoint at, e.g.
    /// `http://10.1.2.3:5001` (the pod IP).
    pub advertise: String,
    /// The key shared by the replicas (at least 16 bytes); or `secret_file`.
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
}

impl PeersConfig {
    /// The shared key, from `secret` or `secret_file` (a trailing newline is dropped).
    pub fn secret(&self) -> std::io::Result<Secret> {
        match (&self.secret, &self.secret_file) {
            (Some(s), _) => Ok(s.clone()),
            (None, Some(f)) => {
                let s = std::fs::read_to_string(f)?;
                Ok(Secret(s.trim_end_matches(['\r', '\n']).to_string()))
            }
            (None, None) => Err(std::io::Error::other(
                "cache.s3.peers: secret or secret_file is needed",
            )),
        }
    }
}

/// Default of `cache.max_fills`: enough to keep a link busy with many slow upstream streams,
/// few enough that their buffers and connections stay small.
pub const DEFAULT_MAX_FILLS: usize = 64;

fn default_region() -> String {
    "us-east-1".into()
}
fn default_true() -> bool {
    true
}
fn default_s3_max_size() -> ByteSize {
    ByteSize(100 << 30)
}
fn default_gc_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_lease_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_s3_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

impl S3Config {
    /// The credentials configured here (inline or from files), if any.
    pub fn credentials(&self) -> std::io::Result<(Option<String>, Option<Secret>)> {
        let read = |f: &PathBuf| {
            std::fs::read_to_string(f).map(|s| s.trim_end_matches(['\r', '\n']).to_string())
        };
        let id = match (&self.access_key_id, &self.access_key_id_file) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(f)) => Some(read(f)?),
            (None, None) => None,
        };
        let secret = match (&self.secret_access_key, &self.secret_access_key_file) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(f)) => Some(Secret(read(f)?)),
            (None, None) => None,
        };
        Ok((id, secret))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest manifest accepted from an upstream.
    pub max_manifest_size: ByteSize,
    /// A client must send its request headers within this time (slowloris). A connection
    /// that sends nothing, or an HTTP/1.1 keep-alive connection idle between requests, is
    /// closed after it.
    pub header_read_timeout: HumanDuration,
    /// HTTP/2 keep-alive ping interval on idle connections.
    pub idle_timeout: HumanDuration,
    /// Connections served at once; further ones wait in the accept queue.
    pub max_connections: usize,
    /// Largest request header block accepted from a client.
    pub max_header_size: ByteSize,
    /// How long in-flight responses may run after SIGTERM before the process exits.
    pub shutdown_timeout: HumanDuration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `ocicache=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// An htpasswd file with bcrypt entries.
    pub htpasswd: PathBuf,
    /// Ask for credentials on `/metrics` too.
    #[serde(default)]
    pub protect_metrics: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry host clients mean: matched against `?ns=` and the first path component.
    pub name: String,
    /// Base URL of the registry API (`https://registry-1.docker.io`).
    pub url: String,
    /// Serves requests that carry neither `ns` nor a prefix naming an upstream.
    #[serde(default)]
    pub default: bool,
    /// How long a resolved tag is answered from the cache without asking the upstream.
    #[serde(default = "default_tag_ttl")]
    pub tag_ttl: HumanDuration,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (trailing newline ignored), e.g. a mounted secret.
    pub password_file: Option<PathBuf>,
    /// An extra PEM CA bundle trusted for this upstream, besides the webpki roots.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Longest wait for response headers, and for each chunk of a manifest body.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: HumanDuration,
}

fn default_tag_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            offline: false,
            cache: CacheConfig::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            tls: None,
            auth: None,
            upstreams: vec![UpstreamConfig::docker_hub()],
            admin: AdminConfig::default(),
            sync: Vec::new(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        let dir = dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("ocicache");
        CacheConfig {
            dir,
            max_size: ByteSize(20 << 30),
            stall_timeout: HumanDuration(Duration::from_secs(30)),
            fill_deadline: HumanDuration(Duration::from_secs(3600)),
            max_fills: DEFAULT_MAX_FILLS,
            s3: None,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_manifest_size: ByteSize(4 << 20),
            header_read_timeout: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            max_connections: 4096,
            max_header_size: ByteSize(64 << 10),
            shutdown_timeout: HumanDuration(Duration::from_secs(30)),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

impl UpstreamConfig {
    /// Docker Hub, the upstream of a configuration without any.
    pub fn docker_hub() -> Self {
        UpstreamConfig::new("docker.io", "https://registry-1.docker.io", true)
    }

    /// An upstream with default timeouts and no credentials.
    pub fn new(name: &str, url: &str, default: bool) -> Self {
        UpstreamConfig {
            name: name.into(),
            url: url.into(),
            default,
            tag_ttl: default_tag_ttl(),
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            connect_timeout: default_connect_timeout(),
            read_timeout: default_read_timeout(),
        }
    }
}

/// A configuration that cannot be used, with the key and value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Parse(Box<figment::Error>),
    #[error("{key}: {message} (value: {value:?})")]
    Invalid {
        key: String,
        value: String,
        message: String,
    },
}

fn invalid(key: impl Into<String>, value: impl fmt::Display, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        message: message.into(),
    }
}

/// Checks that each file named (by its key) is there, so a typo fails at start, not at the
/// first request that needs the file.
fn files_exist<const N: usize>(
    files: [(String, Option<&std::path::Path>); N],
) -> Result<(), ConfigError> {
    for (key, file) in files {
        if let Some(f) = file {
            if !f.is_file() {
                return Err(invalid(key, f.display(), "no such file"));
            }
        }
    }
    Ok(())
}

/// The keys of [`Config`], the only ones read from `OCICACHE_` variables.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "offline",
    "cache",
    "limits",
    "log",
    "tls",
    "auth",
    "upstreams",
    "admin",
    "sync",
];

impl Config {
    /// Defaults, then `file` (if any), then `OCICACHE_*` variables; validated.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(file) = file {
            if !file.exists() {
                return Err(invalid("--config", file.display(), "no such file"));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only variables naming a key of ours: Kubernetes injects OCICACHE_SERVICE_HOST,
        // OCICACHE_PORT and others for a Service named ocicache.
        figment = figment.merge(Env::prefixed("OCICACHE_").split("__").filter(|k| {
            let top = k.as_str().split(['.', '_']).next().unwrap_or("");
            TOP_LEVEL_KEYS.iter().any(|t| t.eq_ignore_ascii_case(top))
        }));
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot: URLs, names, exclusive keys, files that must exist.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cache.max_size.0 < 1 << 20 {
            return Err(invalid(
                "cache.max_size",
                self.cache.max_size,
                "must be at least 1MiB",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", 0, "must be at least 1"));
        }
        if self.limits.max_header_size.0 < 1024 {
            return Err(invalid(
                "limits.max_header_size",
                self.limits.max_header_size,
                "must be at least 1KiB",
            ));
        }
        if self.cache.stall_timeout.0.is_zero() {
            return Err(invalid("cache.stall_timeout", "0s", "must be above zero"));
        }
        if self.cache.max_fills == 0 {
            return Err(invalid("cache.max_fills", 0, "must be at least 1"));
        }
        if self.upstreams.is_empty() {
            return Err(invalid(
                "upstreams",
                "[]",
                "at least one upstream is needed",
            ));
        }
        let mut defaults = 0;
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            if up.name.is_empty()
                || up.name.len() > 253
                || !up
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b))
            {
                return Err(invalid(key("name"), &up.name, "not a registry host name"));
            }
            if self.upstreams[..i].iter().any(|o| o.name == up.name) {
                return Err(invalid(key("name"), &up.name, "used by two upstreams"));
            }
            match url::Url::parse(&up.url) {
                Ok(u)
                    if (u.scheme() == "http" || u.scheme() == "https")
                        && u.host_str().is_some()
                        && (u.path() == "/" || u.path().is_empty())
                        && u.query().is_none()
                        && u.username().is_empty() => {}
                _ => {
                    return Err(invalid(
                        key("url"),
                        &up.url,
                        "must be an http:// or https:// URL with a host and no path",
                    ))
                }
            }
            if up.default {
                defaults += 1;
            }
            if let (Some(_), Some(file)) = (&up.password, &up.password_file) {
                return Err(invalid(
                    key("password_file"),
                    file.display(),
                    "password and password_file are exclusive",
                ));
            }
            if (up.password.is_some() || up.password_file.is_some()) && up.username.is_none() {
                return Err(invalid(key("username"), "", "a password needs a username"));
            }
            files_exist([
                (key("password_file"), up.password_file.as_deref()),
                (key("ca_file"), up.ca_file.as_deref()),
            ])?;
        }
        if defaults > 1 {
            return Err(invalid(
                "upstreams.default",
                defaults,
                "at most one upstream can be the default",
            ));
        }
        if let Some(tls) = &self.tls {
            files_exist([
                ("tls.cert".into(), Some(tls.cert.as_path())),
                ("tls.key".into(), Some(tls.key.as_path())),
            ])?;
        }
        if let Some(s3) = &self.cache.s3 {
            if s3.bucket.is_empty()
                || s3.bucket.len() > 63
                || !s3
                    .bucket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b))
            {
                return Err(invalid("cache.s3.bucket", &s3.bucket, "not a bucket name"));
            }
            if let Some(e) = &s3.endpoint {
                match url::Url::parse(e) {
                    Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                    _ => return Err(invalid("cache.s3.endpoint", e, "not an http(s) URL")),
                }
            }
            if s3.prefix.split('/').any(|c| c == "." || c == "..")
                || s3
                    .prefix
                    .bytes()
                    .any(|b| b.is_ascii_control() || b == b'\\')
            {
                return Err(invalid("cache.s3.prefix", &s3.prefix, "not a key prefix"));
            }
            if s3.access_key_id.is_some() && s3.access_key_id_file.is_some() {
                return Err(invalid(
                    "cache.s3.access_key_id_file",
                    "",
                    "access_key_id and access_key_id_file are exclusive",
                ));
            }
            if s3.secret_access_key.is_some() && s3.secret_access_key_file.is_some() {
                return Err(invalid(
                    "cache.s3.secret_access_key_file",
                    "",
                    "secret_access_key and secret_access_key_file are exclusive",
                ));
            }
            files_exist([
                (
                    "cache.s3.access_key_id_file".into(),
                    s3.access_key_id_file.as_deref(),
                ),
                (
                    "cache.s3.secret_access_key_file".into(),
                    s3.secret_access_key_file.as_deref(),
                ),
            ])?;
            if s3.max_size.0 < 1 << 20 {
                return Err(invalid(
                    "cache.s3.max_size",
                    s3.max_size,
                    "must be at least 1MiB",
                ));
            }
            if s3.timeout.0.is_zero() || s3.gc_interval.0.is_zero() {
                return Err(invalid(
                    "cache.s3.timeout",
                    humantime::format_duration(s3.timeout.0),
                    "timeout and gc_interval must be above zero",
                ));
            }
            if let Some(peers) = &s3.peers {
                self.validate_peers(peers)?;
            }
        }
        if let Some(auth) = &self.auth {
            files_exist([("auth.htpasswd".into(), Some(auth.htpasswd.as_path()))])?;
        }
        for (i, entry) in self.sync.iter().enumerate() {
            entry.validate(&format!("sync[{i}]"), &self.upstreams)?;
        }
        self.validate_admin()
    }

    /// `[admin]`: never the public address; one token source, not empty.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        let admin = &self.admin;
        if let Some(listen) = admin.listen {
            if same_port(listen, self.listen) {
                return Err(invalid(
                    "admin.listen",
                    listen,
                    "must not be the public listen address: the admin API has its own",
                ));
            }
        }
        if admin.token.is_some() && admin.token_file.is_some() {
            return Err(invalid(
                "admin.token_file",
                "",
                "token and token_file are exclusive",
            ));
        }
        if admin.token.as_ref().is_some_and(|t| t.0.trim().is_empty()) {
            return Err(invalid("admin.token", "", "must not be empty"));
        }
        files_exist([("admin.token_file".into(), admin.token_file.as_deref())])
    }
}

/// Would two listeners take the same port: the same address, or one of them on every
/// address? (Port 0, "any free port", never clashes.)
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl Config {
    /// `[cache.s3.peers]`: a reachable http(s) URL, a listener of its own, a long enough
    /// secret from one place.
    fn validate_peers(&self, peers: &PeersConfig) -> Result<(), ConfigError> {
        match url::Url::parse(&peers.advertise) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && (u.path() == "/" || u.path().is_empty())
                    && u.query().is_none()
                    && u.username().is_empty() => {}
            _ => {
                return Err(invalid(
                    "cache.s3.peers.advertise",
                    &peers.advertise,
                    "must be an http:// or https:// URL with a host and no path",
                ))
            }
        }
        if same_port(peers.listen, self.listen) {
            return Err(invalid(
                "cache.s3.peers.listen",
                peers.listen,
                "must differ from listen (the peer endpoint has a listener of its own)",
            ));
        }
        if self
            .admin
            .listen
            .is_some_and(|a| same_port(peers.listen, a))
        {
            return Err(invalid(
                "cache.s3.peers.listen",
                peers.listen,
                "must differ from admin.listen (the peer endpoint has a listener of its own)",
            ));
        }
        if peers.secret.is_some() && peers.secret_file.is_some() {
            return Err(invalid(
                "cache.s3.peers.secret_file",
                "",
                "secret and secret_file are exclusive",
            ));
        }
        files_exist([(
            "cache.s3.peers.secret_file".into(),
            peers.secret_file.as_deref(),
        )])?;
        let key = if peers.secret_file.is_some() {
            "cache.s3.peers.secret_file"
        } else {
            "cache.s3.peers.secret"
        };
        match peers.secret() {
            Ok(s) if s.0.len() >= 16 => Ok(()),
            // The value is never echoed: it is a credential.
            Ok(_) => Err(invalid(key, "REDACTED", "must be at least 16 bytes")),
            Err(e) => Err(invalid(key, "", &e.to_string())),
        }
    }
}

impl UpstreamConfig {
    /// The password, from `password` or `password_file`.
    pub fn password(&self) -> std::io::Result<Option<Secret>> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        match &self.password_file {
            Some(f) => {
                let s = std::fs::read_to_string(f)?;
                Ok(Some(Secret(s.trim_end_matches(['\r', '\n']).to_string())))
            }
            None => Ok(None),
        }
    }
}

/// A credential: its `Debug` never shows it, so it cannot reach a log by accident.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("REDACTED")
    }
}

/// A size in bytes, written `"20GiB"`, `"512MB"`, `"4096"` or as a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "unknown size unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ))
            }
        };
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size such as \"20GiB\""))?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{s:?} is out of range"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [
            (1u64 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (m, u) in units {
            if self.0 >= m {
                let v = self.0 as f64 / m as f64;
                return if self.0 % m == 0 {
                    write!(f, "{}{u}", self.0 / m)
                } else {
                    write!(f, "{v:.1}{u}")
                };
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written `"5m"`, `"30s"`, `"1h 30m"`, `"0s"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!("{s:?} is not a duration such as \"5m\": {e}"))
            })
    }
}

mod sync;
pub use sync::SyncConfig;

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests;
