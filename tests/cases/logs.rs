//! The request log line, as an operator reads it: the binary with `log.format = "json"`, its
//! stderr parsed line by line. It is written when the body ends, so it says the bytes actually
//! sent and whether the response was aborted; a 5xx is at WARN with its upstream and cause.

use std::io::BufRead;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::support::fake::{Fake, Fault};
use crate::support::proxy::ChildProxy;
use crate::support::registry::{free_port, header, random_bytes, try_http_request, HttpResponse};
use crate::support::wait_until;

/// `ocicache serve` with JSON logs on a piped stderr, read by a thread; killed on drop.
struct Logged {
    child: std::process::Child,
    base: String,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Logged {
    /// Starts the binary with `upstreams` (TOML of `[[upstreams]]` tables) and a cache in
    /// `dir`.
    fn start(dir: &std::path::Path, upstreams: &str) -> Logged {
        let toml = format!(
            "[log]\nformat = \"json\"\nlevel = \"info\"\n[cache]\ndir = \"{}\"\n{upstreams}",
            dir.join("cache").display()
        );
        let ChildProxy {
            base, mut child, ..
        } = ChildProxy::start(dir, &toml, Stdio::piped());
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
                sink.lock().unwrap().push(v);
            }
        });
        Logged { child, base, lines }
    }

    fn request(&self, method: &str, path: &str) -> Option<HttpResponse> {
        try_http_request(method, &format!("{}{path}", self.base), &[], b"").ok()
    }

    /// The `n`th (from 0) request line of `method` on `path`, once it is written.
    fn line(&self, method: &str, path: &str, n: usize) -> Value {
        let matching = || -> Vec<Value> {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .filter(|v| {
                    let f = &v["fields"];
                    f["message"] == "request" && f["method"] == method && f["path"] == path
                })
                .cloned()
                .collect()
        };
        wait_until(
            &format!("log line {n} of {method} {path}"),
            Duration::from_secs(10),
            || matching().len() > n,
        );
        matching().swap_remove(n)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn docker_io(url: &str, extra: &str) -> String {
    format!("[[upstreams]]\nname = \"docker.io\"\nurl = \"{url}\"\ndefault = true\n{extra}")
}

#[test]
fn a_blob_is_logged_when_its_body_ends_with_the_bytes_sent_and_whether_it_was_aborted() {
    let fake = Fake::start();
    let data = random_bytes(3 << 20, 41);
    let good = fake.add_blob(&data);
    let bad_data = random_bytes(3 << 20, 42);
    let bad = fake.add_blob(&bad_data);
    fake.fault(&bad, Fault::CorruptBody, None);
    let dir = tempfile::tempdir().unwrap();
    let p = Logged::start(dir.path(), &docker_io(&fake.url(), ""));

    // Whole bodies: a fill, then a hit; a HEAD sends no body and is not an abort.
    let path = format!("/v2/a/blobs/{good}");
    for (n, cache) in [(0, "fill"), (1, "hit")] {
        let (s, _, body) = p.request("GET", &path).unwrap();
        assert_eq!((s, body.len()), (200, data.len()));
        let f = &p.line("GET", &path, n)["fields"];
        assert_eq!(f["status"], 200, "{f}");
        assert_eq!(f["bytes"], data.len() as u64, "{f}");
        assert_eq!(f["aborted"], false, "{f}");
        assert_eq!(f["cache"], cache, "{f}");
        assert_eq!(f["upstream"], "docker.io", "{f}");
    }
    let (s, h, _) = p.request("HEAD", &path).unwrap();
    assert_eq!(
        header(&h, "content-length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(s, 200);
    let f = &p.line("HEAD", &path, 0)["fields"];
    assert_eq!(
        (&f["bytes"], &f["aborted"]),
        (&Value::from(0), &Value::from(false)),
        "{f}"
    );

    // The fill fails by digest mismatch once the whole body is in: the client got its
    // headers (200, the full Content-Length) and all but the held-back end, then an abort.
    let path = format!("/v2/a/blobs/{bad}");
    let answer = p.request("GET", &path);
    assert!(
        answer
            .as_ref()
            .is_none_or(|(_, _, b)| b.len() < bad_data.len()),
        "the client never sees a clean end of a wrong body"
    );
    let line = p.line("GET", &path, 0);
    let f = &line["fields"];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(f["status"], 200, "{f}");
    let sent = f["bytes"].as_u64().unwrap();
    assert!(sent < bad_data.len() as u64, "bytes actually sent: {f}");
    assert_eq!(f["aborted"], true, "{f}");
    assert_eq!(f["upstream"], "docker.io", "{f}");
    assert!(
        f["error"]
            .as_str()
            .unwrap()
            .contains("does not match digest"),
        "the cause: {f}"
    );
}

#[test]
fn a_dead_or_silent_upstream_is_logged_at_warn_with_its_name_and_the_cause() {
    let hanging = Fake::start();
    hanging.fault("/manifests/", Fault::Hang, None);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let upstreams = format!(
        "{}[[upstreams]]\nname = \"ghcr.io\"\nurl = \"{}\"\nread_timeout = \"1s\"\n",
        docker_io(&dead, "connect_timeout = \"2s\"\n"),
        hanging.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let p = Logged::start(dir.path(), &upstreams);

    let path = "/v2/a/manifests/1";
    assert_eq!(p.request("GET", path).unwrap().0, 502);
    let line = p.line("GET", path, 0);
    let f = &line["fields"];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(
        (&f["status"], &f["upstream"]),
        (&Value::from(502), &Value::from("docker.io")),
        "{f}"
    );
    let error = f["error"].as_str().unwrap().to_lowercase();
    assert!(error.contains("connection refused"), "the cause: {f}");

    let path = "/v2/ghcr.io/owner/app/manifests/v1";
    assert_eq!(p.request("GET", path).unwrap().0, 504);
    let line = p.line("GET", path, 0);
    let f = &line["fields"];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(
        (&f["status"], &f["upstream"]),
        (&Value::from(504), &Value::from("ghcr.io")),
        "{f}"
    );
    assert!(
        f["error"].as_str().unwrap().contains("timed out"),
        "the cause: {f}"
    );
}

#[test]
fn an_upstream_404_names_the_upstream_and_a_stale_tag_list_is_logged_stale() {
    let fake = Fake::start();
    fake.set_tags("library/t", &["a", "b"]);
    let dir = tempfile::tempdir().unwrap();
    let p = Logged::start(
        dir.path(),
        &docker_io(&fake.url(), "read_timeout = \"1s\"\n"),
    );

    for method in ["HEAD", "GET"] {
        let path = format!("/v2/a/blobs/sha256:{}", "e".repeat(64));
        assert_eq!(p.request(method, &path).unwrap().0, 404);
        let line = p.line(method, &path, 0);
        let f = &line["fields"];
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(
            (&f["status"], &f["upstream"]),
            (&Value::from(404), &Value::from("docker.io")),
            "{f}"
        );
    }
    let path = "/v2/a/manifests/nope";
    assert_eq!(p.request("GET", path).unwrap().0, 404);
    assert_eq!(p.line("GET", path, 0)["fields"]["upstream"], "docker.io");

    let path = "/v2/t/tags/list";
    let (s, h, _) = p.request("GET", path).unwrap();
    assert_eq!((s, header(&h, "x-cache")), (200, Some("MISS")));
    assert_eq!(p.line("GET", path, 0)["fields"]["cache"], "miss");
    fake.fault("/tags/list", Fault::Status(503), None);
    let (s, h, body) = p.request("GET", path).unwrap();
    assert_eq!((s, header(&h, "x-cache")), (200, Some("HIT")));
    assert!(header(&h, "warning").is_some());
    assert!(String::from_utf8_lossy(&body).contains("\"b\""));
    let line = p.line("GET", path, 1);
    let f = &line["fields"];
    assert_eq!(
        (&f["cache"], &f["upstream"]),
        (&Value::from("stale"), &Value::from("docker.io")),
        "{f}"
    );
    assert_eq!(f["status"], 200, "{f}");
}

#[test]
fn a_client_that_goes_away_mid_body_is_logged_aborted_with_what_it_was_sent() {
    let fake = Fake::start();
    let data = random_bytes(4 << 20, 43);
    let d = fake.add_blob(&data);
    // A slow fill: the client leaves long before its end.
    fake.fault(
        &d,
        Fault::Slow {
            chunk: 64 << 10,
            delay: Duration::from_millis(50),
        },
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let p = Logged::start(dir.path(), &docker_io(&fake.url(), ""));
    let path = format!("/v2/a/blobs/{d}");
    {
        use std::io::{Read, Write};
        let addr = p.base.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut got = vec![0u8; 200 << 10];
        let mut n = 0;
        while n < got.len() {
            n += s.read(&mut got[n..]).unwrap();
        }
        assert!(String::from_utf8_lossy(&got[..12]).starts_with("HTTP/1.1 200"));
    } // closed here, mid-body
    let line = p.line("GET", &path, 0);
    let f = &line["fields"];
    assert_eq!(f["aborted"], true, "{f}");
    let sent = f["bytes"].as_u64().unwrap();
    assert!(
        sent > 0 && sent < data.len() as u64,
        "bytes actually sent: {f}"
    );
    // The client's choice, not a fault: no cause, not a warning.
    assert_eq!(line["level"], "INFO", "{line}");
    assert!(f.get("error").is_none(), "{f}");
}

#[test]
fn a_client_that_leaves_before_the_answer_is_logged_499_with_the_upstream_it_waited_for() {
    let fake = Fake::start();
    fake.fault("/manifests/", Fault::Hang, None);
    let dir = tempfile::tempdir().unwrap();
    let p = Logged::start(
        dir.path(),
        &docker_io(&fake.url(), "read_timeout = \"30s\"\n"),
    );
    let path = "/v2/a/manifests/slow";
    {
        use std::io::Write;
        let addr = p.base.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        wait_until("the upstream is asked", Duration::from_secs(10), || {
            fake.count("GET", "/manifests/slow") == 1
        });
    } // closed here, long before the upstream's read timeout
    let line = p.line("GET", path, 0);
    let f = &line["fields"];
    assert_eq!(f["status"], 499, "{f}");
    assert_eq!(
        (&f["aborted"], &f["bytes"]),
        (&Value::from(true), &Value::from(0)),
        "{f}"
    );
    assert_eq!(f["upstream"], "docker.io", "{f}");
    assert!(
        f["ms"].as_u64().unwrap() < 20_000,
        "not the read timeout's answer: {f}"
    );
}

#[test]
fn a_head_that_fails_sends_no_body_and_is_not_an_abort() {
    let fake = Fake::start();
    let dir = tempfile::tempdir().unwrap();
    let p = Logged::start(dir.path(), &docker_io(&fake.url(), ""));
    let path = format!("/v2/a/blobs/sha256:{}", "d".repeat(64));
    let (s, h, body) = p.request("HEAD", &path).unwrap();
    assert_eq!((s, body.len()), (404, 0));
    assert!(header(&h, "content-length").is_some());
    let f = &p.line("HEAD", &path, 0)["fields"];
    assert_eq!(f["status"], 404, "{f}");
    assert_eq!(
        (&f["bytes"], &f["aborted"]),
        (&Value::from(0), &Value::from(false)),
        "{f}"
    );
    fake.fault(
        "/blobs/",
        Fault::TooMany {
            retry_after: "9".into(),
        },
        None,
    );
    let (s, h, body) = p.request("HEAD", &path).unwrap();
    assert_eq!((s, body.len()), (429, 0));
    assert_eq!(header(&h, "retry-after"), Some("9"));
    let f = &p.line("HEAD", &path, 1)["fields"];
    assert_eq!(
        (&f["bytes"], &f["aborted"]),
        (&Value::from(0), &Value::from(false)),
        "{f}"
    );
}
