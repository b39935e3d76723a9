#!/usr/bin/env bash
# Soak test for ocicache (not CI): a real upstream (Debian's docker-registry) on loopback,
# seeded with a few images, an ocicache in front of it with a small max_size (so the LRU
# evicts all the time), and for N minutes a bounded mixed load while faults are injected
# into the upstream. Reports errors by kind (split into "near a fault" and "outside any
# fault"), the proxy's RSS and open file descriptors at the start and the end, its metrics,
# whether a temp file was left in the cache's tmp/ once the load drained, a final
# verification pass, and the graceful shutdown.
#
#   bash benches/soak.sh [--minutes N] [--concurrency N] [--max-size SIZE] [--build] [--keep]
#
#   --minutes N       load duration (default 3)
#   --concurrency N   client threads (default 8)
#   --max-size SIZE   the proxy's cache.max_size (default 12MiB; ~22 MiB of blobs are served)
#   --build           run `cargo build --release` even if the binary exists
#   --keep            keep the work folder (registry storage, cache, logs) for inspection
#
# Environment: OCICACHE_BIN (binary to test; default $CARGO_TARGET_DIR/release/ocicache,
# built if missing), CARGO_TARGET_DIR (default ./target), DOCKER_REGISTRY (default
# /usr/bin/docker-registry; `apt-get install docker-registry`).
#
# Faults, from 20 s in, one every ~25 s, none in the last 20 s (so the load ends on a healthy
# upstream): "stall" = SIGSTOP the registry for 4-8 s then SIGCONT (the proxy sees silent
# connections: read_timeout 5s, stall_timeout 4s are set low so both fire); "down" = stop
# the registry, keep it down 4-8 s, start it again on the same port (refused connections).
#
# Traffic goes only to 127.0.0.1. Every loop is bounded by time and by count; the script stops
# by itself, and kills what it started (only those PIDs) on exit.
#
# Exit status: 0 when no response was corrupt (wrong bytes with a clean end), no unexpected
# error happened outside the fault windows, the proxy survived, the final verification passed
# and tmp/ was empty after the drain; 1 otherwise; 2 on a setup failure.
set -euo pipefail

minutes=3
concurrency=8
max_size="12MiB"
keep=0
build=0
while [ $# -gt 0 ]; do
    case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --minutes=*) minutes="${1#*=}"; shift ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --concurrency=*) concurrency="${1#*=}"; shift ;;
    --max-size) max_size="$2"; shift 2 ;;
    --max-size=*) max_size="${1#*=}"; shift ;;
    --keep) keep=1; shift ;;
    --build) build=1; shift ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
case "$minutes" in '' | *[!0-9.]*) echo "--minutes wants a number" >&2; exit 2 ;; esac
case "$concurrency" in '' | *[!0-9]*) echo "--concurrency wants a number" >&2; exit 2 ;; esac

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
bin="${OCICACHE_BIN:-$target_dir/release/ocicache}"
if [ -z "${OCICACHE_BIN:-}" ] && { [ "$build" = 1 ] || [ ! -x "$bin" ]; }; then
    echo "building ocicache (release) into $target_dir ..." >&2
    (cd "$repo" && CARGO_TARGET_DIR="$target_dir" nice -n 10 cargo build --release --bin ocicache >&2) || {
        echo "build failed" >&2
        exit 2
    }
fi
[ -x "$bin" ] || { echo "no ocicache binary at $bin" >&2; exit 2; }
registry="${DOCKER_REGISTRY:-$(command -v docker-registry || echo /usr/bin/docker-registry)}"
[ -x "$registry" ] || { echo "docker-registry not found: apt-get install docker-registry" >&2; exit 2; }
command -v python3 >/dev/null || { echo "python3 not found" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/ocicache-soak.XXXXXX")"
echo "binary: $bin ($(date -r "$bin" '+%F %T'))" >&2
echo "work folder: $work" >&2

set +e
python3 - "$bin" "$registry" "$work" "$minutes" "$concurrency" "$max_size" <<'PY'
import collections
import hashlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

BIN, REGISTRY_BIN, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
MINUTES = float(sys.argv[4])
CONCURRENCY = int(sys.argv[5])
MAX_SIZE = sys.argv[6]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX,
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json"])

REQUEST_TIMEOUT = 30          # client side, per request
FAULT_GRACE = 8               # a request this close to a fault counts as "near a fault"
MAX_REQUESTS_PER_WORKER = 200_000
KiB, MiB = 1 << 10, 1 << 20

t_origin = time.monotonic()
def now():
    return time.monotonic() - t_origin

def log(msg):
    print(f"[{now():7.1f}s] {msg}", file=sys.stderr, flush=True)

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p

def request(port, method, path, headers=None, body=None, timeout=10):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()

def wait_http(port, path, deadline_s, want=200):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if request(port, "GET", path, timeout=2)[0] == want:
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False

# --------------------------------------------------------------------------- processes

class Registry:
    def __init__(self):
        self.port = free_port()
        self.dir = os.path.join(WORK, "registry")
        os.makedirs(os.path.join(self.dir, "storage"), exist_ok=True)
        self.config = os.path.join(self.dir, "config.yml")
        self.logpath = os.path.join(self.dir, "registry.log")
        with open(self.config, "w") as f:
            f.write(f"""version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: "{self.dir}/storage"
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "127.0.0.1:{self.port}"
  secret: "ocicache-soak-secret"
health:
  storagedriver:
    enabled: false
""")
        self.proc = None
        self.lock = threading.Lock()

    def start(self):
        logf = open(self.logpath, "a")
        env = {"PATH": "/usr/bin:/bin", "HOME": self.dir}
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", self.config], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, env=env)
        logf.close()
        if not wait_http(self.port, "/v2/", 20):
            raise SystemExit(f"docker-registry did not answer on port {self.port}; see {self.logpath}")

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        p, self.proc = self.proc, None
        if p and p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Proxy:
    def __init__(self, upstream_port):
        self.port = free_port()
        self.cache = os.path.join(WORK, "cache")
        self.config = os.path.join(WORK, "ocicache.toml")
        self.logpath = os.path.join(WORK, "ocicache.log")
        with open(self.config, "w") as f:
            f.write(f"""listen = "127.0.0.1:{self.port}"

[cache]
dir = "{self.cache}"
max_size = "{MAX_SIZE}"
stall_timeout = "4s"
fill_deadline = "2m"

[limits]
shutdown_timeout = "15s"

[log]
format = "human"
level = "warn"

[[upstreams]]
name = "soak.local"
url = "http://127.0.0.1:{upstream_port}"
default = true
tag_ttl = "3s"
connect_timeout = "2s"
read_timeout = "5s"
""")
        self.proc = None

    def start(self):
        logf = open(self.logpath, "a")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OCICACHE_", "RUST_LOG"))}
        self.proc = subprocess.Popen([BIN, "serve", "--config", self.config], stdin=subprocess.DEVNULL,
                                     stdout=logf, stderr=logf, env=env)
        logf.close()
        if not wait_http(self.port, "/healthz", 20):
            raise SystemExit(f"ocicache did not answer on port {self.port}; see {self.logpath}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stats(self):
        pid = self.proc.pid
        out = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "Threads"):
                    out[k] = v.strip()
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        return out

    def metrics(self):
        try:
            st, _, body = request(self.port, "GET", "/metrics", timeout=5)
        except OSError as e:
            return {}, f"(metrics unavailable: {e})"
        vals = {}
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.rpartition(" ")
            try:
                vals[name] = float(value)
            except ValueError:
                pass
        return vals, None

# --------------------------------------------------------------------------- the images

def sha256(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()

class Universe:
    """What was pushed: blobs (content known), manifests, tags."""
    def __init__(self):
        self.blobs = {}                 # digest -> bytes
        self.blob_refs = []             # (repo, digest): pullable pairs
        self.manifests = []             # (repo, digest, media_type, body)
        self.tags = collections.defaultdict(dict)  # repo -> tag -> manifest digest

def push(reg_port, uni, rng):
    def put_blob(repo, data):
        d = sha256(data)
        st, h, _ = request(reg_port, "POST", f"/v2/{repo}/blobs/uploads/", body=b"",
                           headers={"Content-Length": "0"})
        assert st == 202, (st, repo)
        loc = h["location"]
        if loc.startswith("http"):
            loc = "/" + loc.split("/", 3)[3]
        sep = "&" if "?" in loc else "?"
        st, _, b = request(reg_port, "PUT", f"{loc}{sep}digest={d}", body=data,
                           headers={"Content-Type": "application/octet-stream",
                                    "Content-Length": str(len(data))}, timeout=60)
        assert st == 201, (st, b[:200])
        uni.blobs[d] = data
        uni.blob_refs.append((repo, d))
        return d

    def put_manifest(repo, ref, body, mt):
        st, _, b = request(reg_port, "PUT", f"/v2/{repo}/manifests/{ref}", body=body,
                           headers={"Content-Type": mt, "Content-Length": str(len(body))})
        assert st == 201, (st, b[:300])
        d = sha256(body)
        if (repo, d) not in [(r, x) for r, x, _, _ in uni.manifests]:
            uni.manifests.append((repo, d, mt, body))
        if ":" not in ref:
            uni.tags[repo][ref] = d
        return d

    def image(repo, layer_sizes, shared, tags, arch="amd64"):
        layers = [rng.randbytes(n) for n in layer_sizes] + shared
        ldesc = []
        for data in layers:
            d = put_blob(repo, data)
            ldesc.append({"mediaType": LAYER, "digest": d, "size": len(data)})
        config = json.dumps({"architecture": arch, "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in ldesc]},
                             "config": {"Labels": {"soak": repo}}}).encode()
        cd = put_blob(repo, config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": len(config)},
                               "layers": ldesc}, separators=(",", ":")).encode()
        d = None
        for t in tags:
            d = put_manifest(repo, t, manifest, OCI_MANIFEST)
        return d, len(manifest)

    shared = [rng.randbytes(1 * MiB)]
    plan = {
        "soak/alpha": [16 * KiB, 512 * KiB, 2 * MiB],
        "soak/beta": [1 * MiB, 4 * MiB],
        "soak/gamma": [64 * KiB, 3 * MiB],
        "soak/delta": [6 * MiB],
        "soak/epsilon": [256 * KiB, 128 * KiB, 1536 * KiB],
    }
    for repo, sizes in plan.items():
        image(repo, sizes, shared, ["v1", "latest"])
    # A second version of one repo, and a two-platform index over both arches.
    amd, amd_len = image("soak/alpha", [3 * MiB // 2], [], ["v2"], "amd64")
    arm, arm_len = image("soak/alpha", [700 * KiB], [], ["v2-arm64"], "arm64")
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": amd, "size": amd_len,
         "platform": {"os": "linux", "architecture": "amd64"}},
        {"mediaType": OCI_MANIFEST, "digest": arm, "size": arm_len,
         "platform": {"os": "linux", "architecture": "arm64"}}]}, separators=(",", ":")).encode()
    put_manifest("soak/alpha", "multi", index, OCI_INDEX)

# --------------------------------------------------------------------------- load

class Outcome(Exception):
    def __init__(self, kind, detail=""):
        super().__init__(kind)
        self.kind, self.detail = kind, detail

def parse_multipart(body, boundary):
    parts, pos = [], 0
    delim = b"\r\n--" + boundary.encode()
    while True:
        if not body.startswith(delim, pos):
            raise Outcome("corrupt", "multipart: no delimiter")
        pos += len(delim)
        if body.startswith(b"--\r\n", pos):
            if pos + 4 != len(body):
                raise Outcome("corrupt", "multipart: bytes after the closing delimiter")
            return parts
        end = body.find(b"\r\n\r\n", pos)
        if end < 0:
            raise Outcome("corrupt", "multipart: no part header end")
        head = body[pos:end].decode(errors="replace")
        m = re.search(r"Content-Range: bytes (\d+)-(\d+)/(\d+)", head)
        if not m:
            raise Outcome("corrupt", "multipart: no Content-Range")
        a, b = int(m.group(1)), int(m.group(2))
        pos = end + 4
        parts.append((a, b, body[pos:pos + b - a + 1]))
        pos += b - a + 1


class Worker(threading.Thread):
    def __init__(self, idx, port, uni, stop_at, record):
        super().__init__(daemon=True)
        self.rng = random.Random(1000 + idx)
        self.port, self.uni, self.stop_at, self.record = port, uni, stop_at, record
        self.conn, self.uses = None, 0

    # One request on the worker's keep-alive connection (renewed every 20 requests, and after
    # any error). A reused connection the server had closed is retried once on a new one.
    def http(self, method, path, headers=None):
        for attempt in (0, 1):
            fresh = self.conn is None
            if fresh:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
                self.uses = 0
            try:
                self.conn.request(method, path, headers=headers or {})
                r = self.conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as e:
                self.drop()
                if not fresh and attempt == 0:
                    continue
                raise Outcome("conn_reset" if isinstance(e, ConnectionResetError) else "conn_closed_before_response")
            except ConnectionRefusedError:
                self.drop()
                raise Outcome("conn_refused")
            except socket.timeout:
                self.drop()
                raise Outcome("timeout_headers")
            try:
                body = r.read()
            except http.client.IncompleteRead as e:
                self.drop()
                raise Outcome("truncated", f"{len(e.partial)} bytes")
            except (ConnectionResetError, BrokenPipeError):
                self.drop()
                raise Outcome("truncated", "reset")
            except socket.timeout:
                self.drop()
                raise Outcome("timeout_body")
            self.uses += 1
            if r.will_close or self.uses >= 20:
                self.drop()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, body

    def drop(self):
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.conn = None

    # -- operations: each returns a kind ("ok", "ok_stale", "rejected_as_expected") or raises
    def blob_full(self):
        repo, d = self.rng.choice(self.uni.blob_refs)
        st, h, body = self.http("GET", f"/v2/{repo}/blobs/{d}")
        if st != 200:
            raise Outcome(f"http_{st}")
        if sha256(body) != d:
            raise Outcome("corrupt", f"{d} full body")
        return "ok"

    def blob_range(self):
        repo, d = self.rng.choice(self.uni.blob_refs)
        data = self.uni.blobs[d]
        n = len(data)
        shape = self.rng.random()
        if shape < 0.15:
            k = self.rng.randint(1, n)
            hdr, (a, b) = f"bytes=-{k}", (n - k, n - 1)
        elif shape < 0.3:
            a = self.rng.randrange(n)
            hdr, (a, b) = f"bytes={a}-", (a, n - 1)
        else:
            a = self.rng.randrange(n)
            b = min(n - 1, a + self.rng.randint(0, 256 * KiB))
            hdr = f"bytes={a}-{b}"
        st, h, body = self.http("GET", f"/v2/{repo}/blobs/{d}", {"Range": hdr})
        if st != 206:
            raise Outcome(f"http_{st}")
        if h.get("content-range") != f"bytes {a}-{b}/{n}" or body != data[a:b + 1]:
            raise Outcome("corrupt", f"{d} {hdr}")
        return "ok"

    def blob_multirange(self):
        repo, d = self.rng.choice(self.uni.blob_refs)
        data = self.uni.blobs[d]
        n = len(data)
        if n < 64:
            return self.blob_full()
        cuts = sorted(self.rng.sample(range(n), 4))
        want = [(cuts[0], cuts[1] - 2), (cuts[2], cuts[3])]
        want = [(a, b) for a, b in want if a <= b]
        if len(want) < 2:
            return self.blob_range()
        hdr = "bytes=" + ",".join(f"{a}-{b}" for a, b in want)
        st, h, body = self.http("GET", f"/v2/{repo}/blobs/{d}", {"Range": hdr})
        if st != 206:
            raise Outcome(f"http_{st}")
        m = re.match(r"multipart/byteranges; boundary=(\S+)", h.get("content-type", ""))
        if not m:
            raise Outcome("corrupt", "multipart content-type")
        parts = parse_multipart(body, m.group(1))
        if [(a, b) for a, b, _ in parts] != want or any(p != data[a:b + 1] for a, b, p in parts):
            raise Outcome("corrupt", f"{d} {hdr}")
        return "ok"

    def manifest_tag(self):
        repo = self.rng.choice(sorted(self.uni.tags))
        tag, d = self.rng.choice(sorted(self.uni.tags[repo].items()))
        method = "HEAD" if self.rng.random() < 0.25 else "GET"
        st, h, body = self.http(method, f"/v2/{repo}/manifests/{tag}", {"Accept": ACCEPT})
        if st != 200:
            raise Outcome(f"http_{st}")
        if h.get("docker-content-digest") != d or (method == "GET" and sha256(body) != d):
            raise Outcome("corrupt", f"{repo}:{tag}")
        return "ok_stale" if "warning" in h else "ok"

    def manifest_digest(self):
        repo, d, mt, _ = self.rng.choice(self.uni.manifests)
        st, h, body = self.http("GET", f"/v2/{repo}/manifests/{d}", {"Accept": ACCEPT})
        if st != 200:
            raise Outcome(f"http_{st}")
        if sha256(body) != d:
            raise Outcome("corrupt", f"{repo}@{d}")
        return "ok"

    def tags_list(self):
        repo = self.rng.choice(sorted(self.uni.tags))
        st, h, body = self.http("GET", f"/v2/{repo}/tags/list")
        if st != 200:
            raise Outcome(f"http_{st}")
        try:
            tags = json.loads(body)["tags"]
        except (ValueError, KeyError, TypeError):
            raise Outcome("corrupt", "tags/list json")
        if sorted(tags) != sorted(self.uni.tags[repo]):
            raise Outcome("corrupt", f"tags of {repo}: {tags}")
        return "ok_stale" if "warning" in h else "ok"

    def invalid(self):
        repo, d = self.rng.choice(self.uni.blob_refs)
        n = len(self.uni.blobs[d])
        # (method, path, headers, statuses that are a correct refusal)
        cases = [
            ("GET", "/v2/soak/alpha/manifests/..%2f..%2fetc%2fpasswd", {}, {400, 404}),
            ("GET", "/v2/../../etc/passwd/manifests/latest", {}, {400, 404}),
            ("GET", "/v2/Soak/Alpha/manifests/latest", {}, {400}),
            ("GET", f"/v2/{repo}/blobs/sha256:zzzz", {}, {400}),
            ("GET", f"/v2/{repo}/blobs/md5:d41d8cd98f00b204e9800998ecf8427e", {}, {400}),
            ("GET", f"/v2/{repo}/manifests/latest?ns=evil.example", {}, {404}),
            ("GET", f"/v2/{repo}/blobs/{d}", {"Range": f"bytes={n + 10}-"}, {416}),
            ("GET", f"/v2/{repo}/blobs/{d}", {"Range": "bytes=9-2"}, {416}),
            ("GET", f"/v2/{repo}/blobs/{d}", {"Range": "bytes=" + ",".join(["0-0"] * 40)}, {416}),
            ("POST", f"/v2/{repo}/blobs/uploads/", {}, {401, 403, 404, 405}),
            ("DELETE", f"/v2/{repo}/manifests/latest", {}, {401, 403, 404, 405}),
            ("GET", "/v2/" + "a/" * 600 + "manifests/x", {}, {400, 404, 414, 431}),
            ("GET", "/nope", {}, {404}),
            # These two ask the upstream, which says 404 (or is down: 5xx during faults).
            ("GET", "/v2/soak/nosuchrepo/manifests/latest", {}, {404}),
            ("GET", f"/v2/{repo}/blobs/sha256:{'0' * 64}", {}, {404}),
        ]
        method, path, headers, ok = self.rng.choice(cases)
        st, h, body = self.http(method, path, headers)
        if st in ok:
            return "rejected_as_expected"
        raise Outcome(f"http_{st}", f"{method} {path[:60]}")

    def raw(self):
        # Bytes that are not HTTP, a header block past the limit, a header value that is not
        # ASCII, a request cut off mid-header. A refusal is a 4xx or a closed connection; the
        # non-ASCII header on /v2/ may also be answered 200 (it is ignored there).
        payloads = [
            (b"GARBAGE\r\n\r\n", (b"HTTP/1.1 4",)),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX: " + b"y" * (100 * KiB) + b"\r\n\r\n", (b"HTTP/1.1 4",)),
            (b"GET /v2/ HTTP/1.1\r\nHost: x\r\nRange: bytes=\xff\xfe\r\nConnection: close\r\n\r\n",
             (b"HTTP/1.1 4", b"HTTP/1.1 200")),
            (b"GET /v2/ HTTP/1.1\r\nHo", ()),
        ]
        p, accepted = self.rng.choice(payloads)
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        try:
            s.sendall(p)
            if not accepted:
                return "rejected_as_expected"   # hang up mid-header
            try:
                first = s.recv(64)
            except (ConnectionResetError, socket.timeout):
                return "rejected_as_expected"
            if first == b"" or first.startswith(accepted):
                return "rejected_as_expected"
            raise Outcome("raw_unexpected", repr(first[:40]))
        except (BrokenPipeError, ConnectionResetError):
            return "rejected_as_expected"
        finally:
            s.close()

    OPS = [("blob_full", 30), ("blob_range", 18), ("blob_multirange", 5), ("manifest_tag", 15),
           ("manifest_digest", 10), ("tags_list", 6), ("invalid", 12), ("raw", 4)]

    def run(self):
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        for _ in range(MAX_REQUESTS_PER_WORKER):
            if now() >= self.stop_at:
                break
            op = self.rng.choices(names, weights)[0]
            t0 = now()
            try:
                kind, detail = getattr(self, op)(), ""
            except Outcome as o:
                kind, detail = o.kind, o.detail
            except socket.timeout:
                self.drop()
                kind, detail = "timeout", ""
            except ConnectionRefusedError:
                self.drop()
                kind, detail = "conn_refused", ""
            except OSError as e:
                self.drop()
                kind, detail = f"os_error_{type(e).__name__}", str(e)[:80]
            self.record(op, kind, detail, t0, now())
            time.sleep(self.rng.random() * 0.01)
        self.drop()

# --------------------------------------------------------------------------- faults

def fault_loop(reg, load_start, stop_at, windows, stop_event):
    rng = random.Random(7)
    t = load_start + 20.0
    kinds = ["stall", "down"]
    i = 0
    while t < stop_at - 20 and not stop_event.is_set():
        while now() < t and not stop_event.is_set():
            time.sleep(0.2)
        if stop_event.is_set():
            break
        kind = kinds[i % 2]
        i += 1
        start = now()
        if kind == "stall":
            d = rng.uniform(4, 8)
            with reg.lock:
                reg.pause()
            time.sleep(d)
            with reg.lock:
                reg.resume()
        else:
            d = rng.uniform(4, 8)
            with reg.lock:
                reg.stop()
            time.sleep(d)
            with reg.lock:
                reg.start()
        end = now()
        windows.append((kind, start, end))
        log(f"fault {kind}: {start:.1f}s .. {end:.1f}s")
        t = end + rng.uniform(20, 28)

# --------------------------------------------------------------------------- main

def main():
    reg = Registry()
    proxy = None
    verdict = {"ok": True, "why": []}
    def fail(why):
        verdict["ok"] = False
        verdict["why"].append(why)
    try:
        reg.start()
        uni = Universe()
        push(reg.port, uni, random.Random(42))
        total = sum(len(b) for b in uni.blobs.values())
        log(f"registry on 127.0.0.1:{reg.port}: {len(uni.blobs)} blobs ({total / MiB:.1f} MiB), "
            f"{len(uni.manifests)} manifests, {sum(len(t) for t in uni.tags.values())} tags in {len(uni.tags)} repos")

        proxy = Proxy(reg.port)
        proxy.start()
        time.sleep(1)
        start_stats = proxy.stats()
        log(f"ocicache on 127.0.0.1:{proxy.port}, max_size {MAX_SIZE}, pid {proxy.proc.pid}")

        records = []
        rec_lock = threading.Lock()
        def record(op, kind, detail, t0, t1):
            with rec_lock:
                records.append((op, kind, detail, t0, t1))

        load_start = now()
        stop_at = load_start + MINUTES * 60
        windows = []
        stop_event = threading.Event()
        faults = threading.Thread(target=fault_loop, args=(reg, load_start, stop_at, windows, stop_event), daemon=True)
        samples = []
        def sampler():
            while now() < stop_at and proxy.alive():
                try:
                    s = proxy.stats()
                    samples.append((now(), s))
                except OSError:
                    break
                time.sleep(5)
        samp = threading.Thread(target=sampler, daemon=True)
        workers = [Worker(i, proxy.port, uni, stop_at, record) for i in range(CONCURRENCY)]
        log(f"load: {CONCURRENCY} clients for {MINUTES:g} min")
        faults.start()
        samp.start()
        for w in workers:
            w.start()
        last_report = now()
        while any(w.is_alive() for w in workers):
            time.sleep(1)
            if now() - last_report >= 30:
                last_report = now()
                with rec_lock:
                    n = len(records)
                    bad = sum(1 for r in records if not r[1].startswith(("ok", "rejected")))
                log(f"{n} requests, {bad} not ok; proxy alive: {proxy.alive()}")
            if now() > stop_at + REQUEST_TIMEOUT + 30:
                log("workers did not finish in time")
                fail("load generator did not drain")
                break
        stop_event.set()
        faults.join(timeout=30)
        if reg.proc is None:
            reg.start()
        load_end = now()
        log(f"load done: {len(records)} requests in {load_end - load_start:.0f}s")

        if not proxy.alive():
            fail(f"ocicache exited during the load (status {proxy.proc.returncode})")
            raise SystemExit(1)

        # Drain: every fill finished (fills outlive their clients).
        drained_after = None
        t_drain = now()
        while now() - t_drain < 90:
            vals, _ = proxy.metrics()
            inflight = sum(v for k, v in vals.items() if "fills_in_flight" in k)
            if inflight == 0:
                drained_after = now() - t_drain
                break
            time.sleep(0.5)
        time.sleep(1)
        tmp_dir = os.path.join(proxy.cache, "tmp")
        tmp_after_drain = sorted(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else None
        end_stats = proxy.stats()
        metrics, merr = proxy.metrics()

        # Verification: everything pulls through, byte for byte, with the upstream up.
        vw = Worker(999, proxy.port, uni, float("inf"), lambda *a: None)
        verified, vfail = 0, []
        for repo, d in uni.blob_refs:
            try:
                st, _, body = vw.http("GET", f"/v2/{repo}/blobs/{d}")
                if st == 200 and sha256(body) == d:
                    verified += 1
                else:
                    vfail.append(f"{repo}@{d[:19]}: {st}")
            except Outcome as o:
                vfail.append(f"{repo}@{d[:19]}: {o.kind}")
        for repo, d, _, _ in uni.manifests:
            try:
                st, _, body = vw.http("GET", f"/v2/{repo}/manifests/{d}", {"Accept": ACCEPT})
                if st == 200 and sha256(body) == d:
                    verified += 1
                else:
                    vfail.append(f"{repo}@{d[:19]}: {st}")
            except Outcome as o:
                vfail.append(f"{repo}@{d[:19]}: {o.kind}")
        vw.drop()
        nverify = len(uni.blob_refs) + len(uni.manifests)

        # Graceful shutdown.
        t_stop = now()
        proxy.proc.send_signal(signal.SIGTERM)
        try:
            rc = proxy.proc.wait(30)
        except subprocess.TimeoutExpired:
            rc = "did not exit within 30s"
            proxy.proc.kill()
            proxy.proc.wait()
        shutdown_s = now() - t_stop
        tmp_after_stop = sorted(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else None

        # ------------------------------------------------------------------ report
        def near_fault(t0, t1):
            return any(t0 <= e + FAULT_GRACE and t1 >= s for _, s, e in windows)

        by_kind = collections.Counter()
        by_kind_near = collections.Counter()
        by_op = collections.defaultdict(collections.Counter)
        details = collections.defaultdict(collections.Counter)
        for op, kind, detail, t0, t1 in records:
            by_kind[kind] += 1
            if near_fault(t0, t1):
                by_kind_near[kind] += 1
            by_op[op][kind] += 1
            if detail:
                details[kind][f"{op}: {detail}"] += 1

        print()
        print("=" * 78)
        print(f"ocicache soak: {MINUTES:g} min, {CONCURRENCY} clients, max_size {MAX_SIZE}, "
              f"{len(uni.blobs)} blobs / {total / MiB:.1f} MiB upstream")
        print(f"binary: {BIN}")
        print(f"faults injected ({len(windows)}): " +
              ", ".join(f"{k} {s:.0f}-{e:.0f}s" for k, s, e in windows))
        dur = load_end - load_start
        print(f"requests: {len(records)} in {dur:.0f}s ({len(records) / max(dur, 1):.0f}/s)")
        print()
        print(f"{'outcome':34} {'total':>8} {'near fault':>11} {'outside':>8}")
        for kind, n in sorted(by_kind.items(), key=lambda kv: (-kv[1], kv[0])):
            near = by_kind_near[kind]
            print(f"{kind:34} {n:8} {near:11} {n - near:8}")
        print("  (near fault = overlapping a fault window or the "
              f"{FAULT_GRACE}s after it)")
        print()
        lat = collections.defaultdict(list)
        for op, kind, detail, t0, t1 in records:
            lat[op].append(t1 - t0)
        def pct(xs, p):
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000
        print("by operation (latency in ms: p50 / p99 / max):")
        for op, c in sorted(by_op.items()):
            xs = lat[op]
            print(f"  {op:16} {pct(xs, .5):6.1f} / {pct(xs, .99):7.1f} / {max(xs) * 1000:7.1f}  " +
                  ", ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1])))
        if details:
            print("details of errors (top 5 per kind):")
            for kind, c in sorted(details.items()):
                for d, n in c.most_common(5):
                    print(f"  {kind}: {n} x {d}")
        print()
        fmt = lambda s: f"VmRSS {s['VmRSS']}, VmHWM {s['VmHWM']}, fds {s['fds']}, threads {s['Threads']}"
        print(f"proxy at start (idle):     {fmt(start_stats)}")
        print(f"proxy at end (drained):    {fmt(end_stats)}")
        if samples:
            fds = [s["fds"] for _, s in samples]
            rss = [int(s["VmRSS"].split()[0]) for _, s in samples]
            print(f"during the load (every 5s, {len(samples)} samples): fds min {min(fds)} max {max(fds)}, "
                  f"VmRSS min {min(rss)} kB max {max(rss)} kB")
        print(f"fills drained: " + (f"after {drained_after:.1f}s" if drained_after is not None else "NO (in flight after 90s)"))
        print(f"cache tmp/ after the drain: " +
              ("empty" if tmp_after_drain == [] else repr(tmp_after_drain)))
        print(f"final verification (upstream up): {verified}/{nverify} ok" +
              (f"; failures: {vfail[:5]}" if vfail else ""))
        print(f"SIGTERM: exit status {rc} after {shutdown_s:.1f}s; tmp/ after exit: " +
              ("empty" if tmp_after_stop == [] else repr(tmp_after_stop)))
        if merr:
            print(merr)
        else:
            keys = ["fills_completed", "fills_failed", "fills_in_flight", "evictions", "cache_size_bytes",
                    "cache_entries", "stale_answers", "cache_hits", "cache_misses", "upstream_requests"]
            print("metrics at the end:")
            for k in sorted(metrics):
                if any(x in k for x in keys):
                    print(f"  {k} {metrics[k]:g}")
        # The proxy's own log: warnings and errors, grouped.
        levels = collections.Counter()
        msgs = collections.Counter()
        try:
            with open(proxy.logpath, errors="replace") as f:
                for line in f:
                    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
                    m = re.search(r"\b(ERROR|WARN|INFO|DEBUG|TRACE)\b\s+(.*)", line)
                    if not m:
                        continue
                    levels[m.group(1)] += 1
                    msg = m.group(2)
                    msg = re.sub(r"sha256:[0-9a-f]{64}", "sha256:…", msg)
                    msg = re.sub(r"\d+(\.\d+)?", "N", msg)
                    msgs[f"{m.group(1)} {msg[:150]}"] += 1
        except OSError:
            pass
        print(f"proxy log lines: {dict(levels)}; most frequent:")
        for m, n in msgs.most_common(8):
            print(f"  {n:6} x {m}")
        print("=" * 78)

        # Verdict.
        if by_kind.get("corrupt"):
            fail(f"{by_kind['corrupt']} corrupt responses")
        good = ("ok", "ok_stale", "rejected_as_expected")
        outside = {k: n - by_kind_near[k] for k, n in by_kind.items() if k not in good and n - by_kind_near[k]}
        if outside:
            fail(f"errors outside fault windows: {outside}")
        if tmp_after_drain:
            fail(f"{len(tmp_after_drain)} temp files left after the drain")
        if drained_after is None:
            fail("fills still in flight 90s after the load")
        if vfail:
            fail(f"final verification: {len(vfail)} failures")
        if rc != 0:
            fail(f"exit status on SIGTERM: {rc}")
    finally:
        reg.stop()
        if proxy is not None and proxy.proc is not None and proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()
    print("verdict: " + ("PASS" if verdict["ok"] else "FAIL: " + "; ".join(verdict["why"])))
    return 0 if verdict["ok"] else 1

sys.exit(main())
PY
rc=$?
set -e
if [ "$keep" = 1 ]; then
    echo "kept: $work (registry/, cache/, ocicache.log)" >&2
else
    rm -rf "$work"
fi
exit "$rc"
