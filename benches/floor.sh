#!/usr/bin/env bash
# The cached-manifest path against its floor: nginx serving the manifest as a static file,
# a bare hyper server that answers the same bytes and does nothing else (benches/floor.rs),
# and ocicache answering a cached manifest by tag (and by digest). Rounds alternate the
# servers; each line gives requests/s and p99 from `wrk -t2 -c64 --latency`, and the server's
# CPU time per request (utime + stime of all its processes over the run, from /proc), which
# moves far less than requests/s when other work shares the machine.
#
#   benches/floor.sh [ROUNDS] [SECONDS]      (needs wrk, nginx, python3; builds release)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-8}
W=$(mktemp -d /tmp/ocicache-floor.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

cargo build --release --bin ocicache --bench floor >&2
FLOOR=$(ls -t target/release/deps/floor-* | grep -v '\.d$' | head -1)
OCI=target/release/ocicache
ACCEPT="application/vnd.oci.image.manifest.v1+json"

# The manifest: 1,037 bytes, as in benches/compare.sh's `layers:v1`.
python3 - "$W" <<'PY'
import hashlib, json, os, sys
w = sys.argv[1]
layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 1}
m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                "digest": "sha256:" + "a" * 64},
     "layers": [dict(layer, digest="sha256:%064x" % i) for i in range(6)]}
b = json.dumps(m, separators=(",", ":")).encode()
b += b" " * max(0, 1037 - len(b))
d = "sha256:" + hashlib.sha256(b).hexdigest()
for ref in ("v1", d):
    p = os.path.join(w, "www/v2/library/layers/manifests", ref)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    open(p, "wb").write(b)
open(os.path.join(w, "digest"), "w").write(d)
PY
DIGEST=$(cat "$W/digest")

# The upstream of ocicache: the same files, with the headers a registry sends.
cat > "$W/up.py" <<'PY'
import http.server, os, sys
root = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        p = os.path.join(root, self.path.lstrip("/"))
        if "/manifests/" not in self.path or not os.path.isfile(p):
            self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return
        b = open(p, "rb").read()
        import hashlib
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(b).hexdigest())
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        if self.command == "GET": self.wfile.write(b)
    do_HEAD = do_GET
    def log_message(self, *a): print(self.requestline, file=sys.stderr, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$W/up.py" 18940 "$W/www" 2>"$W/up.log" & PIDS+=($!)

mkdir -p "$W/ngx"
cat > "$W/ngx.conf" <<N
worker_processes auto; daemon off; master_process on; user root;
pid $W/ngx/nginx.pid; error_log $W/ngx/error.log warn;
events { worker_connections 4096; }
http {
  access_log $W/ngx/access.log;
  client_body_temp_path $W/ngx/c; proxy_temp_path $W/ngx/p; fastcgi_temp_path $W/ngx/f;
  uwsgi_temp_path $W/ngx/u; scgi_temp_path $W/ngx/s;
  sendfile on; tcp_nopush on; keepalive_requests 1000000;
  server { listen 127.0.0.1:18941; root $W/www; default_type $ACCEPT; }
}
N
/usr/sbin/nginx -p "$W/ngx" -c "$W/ngx.conf" 2>>"$W/ngx/error.log" & PIDS+=($!)
NGINX=$!

"$FLOOR" --serve 18942 2>/dev/null & PIDS+=($!)
FLOORPID=$!

cat > "$W/oci.toml" <<T
listen = "127.0.0.1:18943"
[log]
level = "info"
[cache]
dir = "$W/cache"
[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:18940"
default = true
T
"$OCI" serve --config "$W/oci.toml" 2>"$W/oci.log" & PIDS+=($!)
OCIPID=$!

for port in 18941 18942 18943; do
  for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/v2/library/layers/manifests/v1" -H "Accept: $ACCEPT" && break; sleep 0.1; done
done
curl -sf -o /dev/null -H "Accept: $ACCEPT" "http://127.0.0.1:18943/v2/library/layers/manifests/$DIGEST"

# CPU ticks of a process and its children (nginx: master and workers).
ticks() {
  local total=0 p
  for p in $1 $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$total"
}
HZ=$(getconf CLK_TCK)
run() { # label pid url
  local t0 t1 out n
  t0=$(ticks "$2")
  out=$(wrk -t2 -c64 -d"${SECS}s" --latency -H "Accept: $ACCEPT" "$3")
  t1=$(ticks "$2")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  printf '%-18s req/s %9s  p99 %8s  cpu µs/req %s\n' "$1" \
    "$(echo "$out" | awk '/Requests\/sec/ {print $2}')" \
    "$(echo "$out" | awk '$1 == "99%" {print $2}')" \
    "$(python3 -c "print(round(($t1 - $t0) / $HZ / $n * 1e6, 2))")"
}
up_before=$(wc -l < "$W/up.log")
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  echo "round $r"
  run nginx-file "$NGINX" "http://127.0.0.1:18941/v2/library/layers/manifests/v1"
  run hyper-floor "$FLOORPID" "http://127.0.0.1:18942/v2/library/layers/manifests/v1"
  run ocicache-tag "$OCIPID" "http://127.0.0.1:18943/v2/library/layers/manifests/v1"
  run ocicache-digest "$OCIPID" "http://127.0.0.1:18943/v2/library/layers/manifests/$DIGEST"
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "upstream requests during the runs: $(( $(wc -l < "$W/up.log") - up_before ))"
