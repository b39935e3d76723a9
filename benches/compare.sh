#!/usr/bin/env bash
# Side-by-side performance comparison of ocicache with its peers, on one machine, all on
# loopback. See benches/README.md for what it measures and how to read the table.
#
#   bash benches/compare.sh            # 1 GiB blob
#   bash benches/compare.sh --quick    # 128 MiB blob, shorter wrk runs
#
# Options: --quick, --no-build (use the binary as it is), --keep (keep the data files, not
# only the logs), --big-mib N (blob size), --cold-runs N (cold pulls per server, fresh
# each, alternated; the row gives medians; default 3, 1 with --quick), --cold-only (row 1
# alone, then the table),
# --manifests-only (rows 1 and 2 on an 8 MiB blob, seconds, then row 4 for ocicache and
# nginx from disk alone, then the table). Environment: OCICACHE_BIN (binary to test,
# default $CARGO_TARGET_DIR or target/, release), BENCH_DIR (parent of the temp dir).
set -euo pipefail

QUICK=0
BUILD=1
KEEP=0
BIG_MIB=""
COLD_ONLY=0
COLD_RUNS=""
MANIFESTS_ONLY=0
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --keep) KEEP=1 ;;
    --big-mib) BIG_MIB="$2"; shift ;;
    --cold-only) COLD_ONLY=1 ;;
    --cold-runs) COLD_RUNS="$2"; shift ;;
    --manifests-only) MANIFESTS_ONLY=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="$REPO/benches"
LAYER_MIB=4
CLIENTS=20
WARM_RUNS=5
# Row 4 alone needs no big blob: seeding it and rows 1 and 2 then take seconds.
if ((MANIFESTS_ONLY)); then : "${BIG_MIB:=8}"; fi
if ((QUICK)); then
  : "${BIG_MIB:=128}"; WRK_DURATION=5s; : "${COLD_RUNS:=1}"
else
  : "${BIG_MIB:=1024}"; WRK_DURATION=10s; : "${COLD_RUNS:=3}"
fi
MODE=$([ "$QUICK" = 1 ] && echo quick || echo full)
ACCEPT="application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json"
HZ=$(getconf CLK_TCK)

# Everything is on loopback: no proxy may get in the way.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY
export NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost

# ---------------------------------------------------------------- what it needs
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v wrk >/dev/null || need+=(wrk)
{ command -v containerd >/dev/null && command -v ctr >/dev/null; } || need+=(containerd)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -n "${OCICACHE_BIN:-}" ]; then
  BIN="$OCICACHE_BIN"
else
  BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/ocicache"
  if ((BUILD)); then
    (cd "$REPO" && cargo build --release --bin ocicache)
  fi
fi
[ -x "$BIN" ] || { echo "no ocicache binary at $BIN (build it, or set OCICACHE_BIN)" >&2; exit 1; }

WORK="$(mktemp -d "${BENCH_DIR:-/tmp}/ocicache-bench.XXXXXX")"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
echo "mode: $MODE, blob ${BIG_MIB} MiB; logs and data in $WORK"

# ---------------------------------------------------------------- processes
declare -A PID=() PORT=() DATA=()
CONTAINERD_PID=""

stop() { # stop NAME: TERM, wait up to 10 s, then KILL
  local p="${PID[$1]:-}"
  [ -n "$p" ] || return 0
  kill -TERM "$p" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  PID[$1]=""
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for n in "${!PID[@]}"; do stop "$n"; done
  if [ -n "$CONTAINERD_PID" ]; then
    kill -TERM "$CONTAINERD_PID" 2>/dev/null || true
    wait "$CONTAINERD_PID" 2>/dev/null || true
  fi
  if ((!KEEP)); then # keep the logs, drop the gigabytes
    rm -rf "$WORK"/data "$WORK"/seed/big.blob "$WORK"/seed/disk "$WORK"/containerd/root
  fi
  echo "logs: $WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # wait_http NAME URL: any HTTP answer within 20 s
  for _ in $(seq 200); do
    kill -0 "${PID[$1]}" 2>/dev/null || { echo "$1 exited; its log:"; tail -30 "$WORK/$1.log"; exit 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$2" || true)
    [ "$code" != "000" ] && return 0
    sleep 0.1
  done
  echo "$1 did not answer on $2; its log:"; tail -30 "$WORK/$1.log"; exit 1
}

registry_config() { # registry_config ADDR STORAGE [REMOTE]
  cat <<EOF
version: 0.1
log:
  level: warn
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: "$2"
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: "$1"
  secret: "ocicache-bench-secret"
health:
  storagedriver:
    enabled: false
EOF
  if [ -n "${3:-}" ]; then
    printf 'proxy:\n  remoteurl: "%s"\n' "$3"
  fi
}

start_registry() { # start_registry NAME [REMOTE]
  local n=$1 d="$WORK/data/$1"
  mkdir -p "$d/storage"
  registry_config "127.0.0.1:${PORT[$n]}" "$d/storage" "${2:-}" >"$WORK/$n.yml"
  env -i PATH="$PATH" HOME="$d" docker-registry serve "$WORK/$n.yml" >>"$WORK/$n.log" 2>&1 &
  PID[$n]=$!
  wait_http "$n" "http://127.0.0.1:${PORT[$n]}/v2/"
}

start_ocicache() {
  local d="$WORK/data/ocicache"
  mkdir -p "$d"
  cat >"$WORK/ocicache.toml" <<EOF
listen = "127.0.0.1:${PORT[ocicache]}"

[cache]
dir = "$d"
max_size = "100GiB"

[log]
level = "info"

[[upstreams]]
name = "docker.io"
url = "http://127.0.0.1:${PORT[upstream]}"
default = true
EOF
  "$BIN" serve --config "$WORK/ocicache.toml" >>"$WORK/ocicache.log" 2>&1 &
  PID[ocicache]=$!
  wait_http ocicache "http://127.0.0.1:${PORT[ocicache]}/healthz"
}

nginx_common() { # the http{} prelude shared by both nginx instances
  local d=$1
  cat <<EOF
worker_processes auto;
daemon off;
master_process on;
user root;
pid $d/nginx.pid;
error_log $WORK/$2.error.log warn;
events { worker_connections 4096; }
http {
  access_log $WORK/$2.access.log;
  client_body_temp_path $d/client_temp;
  proxy_temp_path $d/proxy_temp;
  fastcgi_temp_path $d/fastcgi_temp;
  uwsgi_temp_path $d/uwsgi_temp;
  scgi_temp_path $d/scgi_temp;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
EOF
}

start_nginx_cache() {
  # The common DIY mirror: proxy_cache with proxy_cache_lock. The lock timeout and age are
  # raised from their 5 s defaults so that nginx keeps its one-download promise for a 1 GiB
  # blob too (with the defaults, the waiting clients go to the upstream after 5 s).
  local d="$WORK/data/nginx-cache"
  mkdir -p "$d/cache"
  { nginx_common "$d" nginx-cache; cat <<EOF
  proxy_cache_path $d/cache levels=1:2 keys_zone=registry:10m max_size=100g inactive=1d use_temp_path=off;
  upstream registry { server 127.0.0.1:${PORT[upstream]}; keepalive 32; }
  server {
    listen 127.0.0.1:${PORT[nginx-cache]};
    location /v2/ {
      proxy_pass http://registry;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_cache registry;
      proxy_cache_valid 200 5m;
      proxy_ignore_headers Cache-Control Expires Set-Cookie;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 1h;
      proxy_cache_lock_age 1h;
      proxy_read_timeout 300s;
    }
  }
}
EOF
  } >"$WORK/nginx-cache.conf"
  "$NGINX" -p "$d" -c "$WORK/nginx-cache.conf" >>"$WORK/nginx-cache.log" 2>&1 &
  PID[nginx-cache]=$!
  wait_http nginx-cache "http://127.0.0.1:${PORT[nginx-cache]}/v2/"
}

start_nginx_disk() {
  # The reference: the blob file served straight from disk (page cache) with sendfile.
  local d="$WORK/data/nginx-disk"
  mkdir -p "$d"
  FLOOR_BYTES=$(stat -c %s "$WORK/seed/disk/v2/library/layers/manifests/v1")
  { nginx_common "$d" nginx-disk; cat <<EOF
  server {
    listen 127.0.0.1:${PORT[nginx-disk]};
    root $WORK/seed/disk;
    default_type application/octet-stream;
    location ~ /manifests/ { default_type application/vnd.oci.image.manifest.v1+json; }
    # The harness's floor for row 4: an answer of the manifest's size that reads no file
    # and does no work (see the end of row 4).
    location = /floor { default_type application/vnd.oci.image.manifest.v1+json; return 200 '$(head -c "$FLOOR_BYTES" /dev/zero | tr '\0' x)'; }
  }
}
EOF
  } >"$WORK/nginx-disk.conf"
  "$NGINX" -p "$d" -c "$WORK/nginx-disk.conf" >>"$WORK/nginx-disk.log" 2>&1 &
  PID[nginx-disk]=$!
  wait_http nginx-disk "http://127.0.0.1:${PORT[nginx-disk]}/"
}

start() {
  case "$1" in
    upstream) start_registry upstream ;;
    regproxy) start_registry regproxy "http://127.0.0.1:${PORT[upstream]}" ;;
    ocicache) start_ocicache ;;
    nginx-cache) start_nginx_cache ;;
    nginx-disk) start_nginx_disk ;;
  esac
}

fresh() { # fresh NAME: restart with an empty cache (and a fresh VmHWM)
  stop "$1"
  rm -rf "$WORK/data/$1"
  start "$1"
}

pids_of() { # the process and its children (nginx workers)
  local p="${PID[$1]}"
  echo "$p"
  pgrep -P "$p" || true
}

cpu_ticks() { # utime+stime of NAME's processes, in clock ticks
  local t=0 p s
  for p in $(pids_of "$1"); do
    s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    s=${s##*) }
    set -- $s
    t=$((t + ${12} + ${13}))
  done
  echo "$t"
}

status_kib() { # status_kib NAME FIELD: sum of FIELD (VmHWM, VmRSS) over NAME's processes
  local n=$1 f=$2 t=0 p k v
  for p in $(pids_of "$n"); do
    while read -r k v _; do
      [ "$k" = "$f:" ] && t=$((t + v))
    done <"/proc/$p/status" 2>/dev/null || true
  done
  echo "$t"
}

rss_poller() { # rss_poller NAME OUT: peak VmRSS (KiB) while OUT.run exists
  local peak=0 r
  while [ -e "$2.run" ]; do
    r=$(status_kib "$1" VmRSS)
    ((r > peak)) && peak=$r
    sleep 0.05
  done
  echo "$peak" >"$2"
}

now() { date +%s.%N; }
calc() { python3 -c "print($1)"; }
wrk_rps() { awk '/^Requests\/sec:/ {print $2}' "$1"; } # wrk_rps WRK_OUTPUT
wrk_p99_ms() { # wrk_p99_ms WRK_OUTPUT: the 99th percentile of a --latency run, in ms
  awk '$1 == "99%" {v = $2; if (v ~ /us$/) {sub(/us$/, "", v); v /= 1000} else if (v ~ /ms$/) {sub(/ms$/, "", v)} else if (v ~ /s$/) {sub(/s$/, "", v); v *= 1000}; print v}' "$1"
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
rec() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

url_of() { echo "http://127.0.0.1:${PORT[$1]}"; }
UPLOG="$WORK/upstream.log"
uplines() { grep -c 'HTTP/1\.[01]" ' "$UPLOG" || true; }
wait_upstream_quiet() { # until the upstream's access log has not grown for 1.5 s (max 120 s)
  local last=-1 cur same=0
  for _ in $(seq 1200); do
    cur=$(uplines)
    if [ "$cur" = "$last" ]; then same=$((same + 1)); else same=0; last=$cur; fi
    ((same >= 15)) && return 0
    sleep 0.1
  done
}
wait_idle() { # wait_idle NAME: until NAME's processes used no CPU for 2 s (max 120 s); prints their ticks
  local last=-1 cur same=0
  for _ in $(seq 1200); do
    cur=$(cpu_ticks "$1")
    if [ "$cur" = "$last" ]; then same=$((same + 1)); else same=0; last=$cur; fi
    ((same >= 20)) && break
    sleep 0.1
  done
  echo "$last"
}
# upstream_blob_gets FROM_LINE PATH: "count bytes" of GETs of PATH with status 200 after line FROM
upstream_blob_gets() {
  grep 'HTTP/1\.[01]" ' "$UPLOG" | tail -n "+$(($1 + 1))" |
    awk -v p="$2" '$6 == "\"GET" && index($7, p) == 1 && $9 == 200 { n++; b += $10 } END { printf "%d %.0f\n", n, b }'
}

fetch() { # fetch URL: one GET to /dev/null; prints "code size ttfb total"
  curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' "$1" || echo "000 0 0 0"
}
check_fetch() { # check_fetch WHAT "code size ttfb total"
  set -- "$1" $2
  if [ "$2" != 200 ] || [ "$3" != "$BIG_SIZE" ]; then
    echo "  WARNING: $1 answered $2 with $3 bytes (expected 200 with $BIG_SIZE)" >&2
    return 1
  fi
}

# ---------------------------------------------------------------- start and seed
TARGETS=(upstream ocicache regproxy nginx-cache nginx-disk)
PROXIES=(ocicache regproxy nginx-cache)
for t in "${TARGETS[@]}"; do PORT[$t]=$(free_port); done
start upstream
echo "seeding the upstream (127.0.0.1:${PORT[upstream]}) ..."
python3 "$BENCH/seed.py" "$(url_of upstream)" "$WORK/seed" "$BIG_MIB" "$LAYER_MIB"
# shellcheck disable=SC1091
source "$WORK/seed/seed.env"
BLOB_PATH="/v2/library/big/blobs/$BIG_DIGEST"
GIB=$(calc "$BIG_SIZE / 2**30")
for t in ocicache regproxy nginx-cache nginx-disk; do start "$t"; done
{
  echo "mode $MODE"
  echo "big_size $BIG_SIZE"
  echo "clients $CLIENTS"
  echo "warm_runs $WARM_RUNS"
  echo "wrk_duration $WRK_DURATION"
  echo "ocicache $("$BIN" --version 2>/dev/null || echo "$BIN")"
  echo "nginx $("$NGINX" -v 2>&1 | sed 's/.*\///')"
  echo "registry $(docker-registry --version | awk '{print $3}')"
  echo "containerd $(containerd --version | awk '{print $3}')"
  echo "cpu $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //') x $(nproc)"
  echo "load_start $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$WORK/meta.txt"

# Sanity: every target serves the same bytes (the 5-layer image's first layer).
for t in "${TARGETS[@]}"; do
  got=$(curl -sf "$(url_of "$t")/v2/library/layers/blobs/$LAYERS_FIRST" | sha256sum | cut -d' ' -f1)
  [ "sha256:$got" = "$LAYERS_FIRST" ] || { echo "$t served wrong bytes for $LAYERS_FIRST" >&2; exit 1; }
done
# ... and ocicache the index by tag.
got=$(curl -sf -H "Accept: $ACCEPT" "$(url_of ocicache)/v2/library/layers/manifests/multi" | sha256sum | cut -d' ' -f1)
[ "sha256:$got" = "$INDEX_DIGEST" ] || { echo "ocicache served a wrong index" >&2; exit 1; }
wait_upstream_quiet

# ---------------------------------------------------------------- 1. cold, one client
# One pull is a coin toss on a shared VM (a server's pull has taken 3x its usual time, its
# CPU with it, in one run of three): each server pulls COLD_RUNS times, from a fresh cache
# each time, the servers alternated, and the row gives the medians.
echo "1. cold blob, one client, $COLD_RUNS pulls each (fresh cache each, alternated; medians)"
declare -A COLD_MBPS COLD_TTFB COLD_CPU COLD_IDLE COLD_GETS
for round in $(seq "$COLD_RUNS"); do
  for t in upstream ocicache regproxy nginx-cache; do
    if ((round > 1)) && [ "$t" != upstream ]; then fresh "$t"; fi
    n0=$(uplines)
    c0=$(cpu_ticks "$t")
    r=$(fetch "$(url_of "$t")$BLOB_PATH")
    c1=$(cpu_ticks "$t")
    # The registry in proxy mode streams the client's copy straight from the upstream,
    # unverified, and stores the blob from a second download in the background, which goes
    # on after the client has its last byte: its CPU until idle is what the cached GiB cost,
    # and the next server's pull must not run beside it.
    c2=$(wait_idle "$t")
    wait_upstream_quiet
    read -r gets _ < <(upstream_blob_gets "$n0" "$BLOB_PATH")
    echo "  $t: $r (then idle after $(calc "($c2 - $c1) / $HZ") CPU-s more; upstream blob GETs: $gets)"
    check_fetch "$t cold" "$r" || continue
    set -- $r
    COLD_MBPS[$t]+="$(calc "$2 / $4 / 1e6") "
    COLD_TTFB[$t]+="$(calc "$3 * 1000") "
    COLD_CPU[$t]+="$(calc "($c1 - $c0) / $HZ / $GIB") "
    COLD_IDLE[$t]+="$(calc "($c2 - $c0) / $HZ / $GIB") "
    COLD_GETS[$t]+="$gets "
  done
done
for t in upstream ocicache regproxy nginx-cache; do
  [ -n "${COLD_MBPS[$t]:-}" ] || continue
  rec cold_mbps "$t" "$(median ${COLD_MBPS[$t]})"
  rec cold_ttfb_ms "$t" "$(median ${COLD_TTFB[$t]})"
  rec cold_cpu "$t" "$(median ${COLD_CPU[$t]})"
  rec cold_cpu_idle "$t" "$(median ${COLD_IDLE[$t]})"
  # The most GETs any pull cost, not a median: one pull with two downloads shows.
  [ "$t" = upstream ] || rec cold_upstream_gets "$t" "$(printf '%s\n' ${COLD_GETS[$t]} | sort -g | tail -1)"
done

report() {
  echo "load_end $(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/meta.txt"
  echo
  python3 "$BENCH/report.py" "$WORK" | tee "$WORK/report.txt"
}
if ((COLD_ONLY)); then
  report
  exit 0
fi

# ---------------------------------------------------------------- 2. warm, one client
echo "2. warm blob, one client, $WARM_RUNS runs"
for t in "${TARGETS[@]}"; do
  speeds=()
  c0=$(cpu_ticks "$t")
  for _ in $(seq "$WARM_RUNS"); do
    r=$(fetch "$(url_of "$t")$BLOB_PATH")
    check_fetch "$t warm" "$r" || continue
    set -- $r
    speeds+=("$(calc "$2 / $4 / 1e6")")
  done
  c1=$(cpu_ticks "$t")
  echo "  $t: MB/s ${speeds[*]}"
  ((${#speeds[@]} == WARM_RUNS)) || continue
  rec warm_mbps "$t" "$(printf '%s\n' "${speeds[@]}" | sort -g | sed -n "$(((WARM_RUNS + 1) / 2))p")"
  rec warm_cpu "$t" "$(calc "($c1 - $c0) / $HZ / ($GIB * $WARM_RUNS)")"
done

# ---------------------------------------------------------------- 4. manifests under wrk
echo "4. cached manifest under wrk -t2 -c64 -d$WRK_DURATION"
ROW4=("${TARGETS[@]}")
((MANIFESTS_ONLY)) && ROW4=(ocicache nginx-disk)
for t in "${ROW4[@]}"; do
  for kind in tag digest; do
    ref=$([ "$kind" = tag ] && echo v1 || echo "$LAYERS_MANIFEST")
    u="$(url_of "$t")/v2/library/layers/manifests/$ref"
    got=$(curl -sf -H "Accept: $ACCEPT" "$u" | sha256sum | cut -d' ' -f1) # primes the caches
    [ "sha256:$got" = "$LAYERS_MANIFEST" ] || { echo "  $t: wrong manifest by $kind" >&2; continue; }
    wait_upstream_quiet
    n0=$(uplines)
    out="$WORK/wrk-$t-$kind.txt"
    wrk -t2 -c64 -d"$WRK_DURATION" --latency -H "Accept: $ACCEPT" "$u" >"$out" 2>&1 || true
    wait_upstream_quiet
    n1=$(uplines)
    rps=$(wrk_rps "$out")
    p99=$(wrk_p99_ms "$out")
    bad=$(awk '/Non-2xx or 3xx responses:/ {print $5}' "$out")
    echo "  $t by $kind: ${rps:-?} req/s, p99 ${p99:-?} ms, upstream requests $((n1 - n0))${bad:+, NON-2XX $bad}"
    if [ -n "$bad" ] || [ -z "$rps" ]; then echo "  WARNING: see $out" >&2; continue; fi
    rec "${kind}_rps" "$t" "$rps"
    rec "${kind}_p99_ms" "$t" "$p99"
    rec "${kind}_upstream" "$t" "$((n1 - n0))"
  done
done
# The floor of this harness: nginx answering the same number of bytes with `return 200`, no
# file and no work, under the same wrk. On 2 cores shared with wrk's two threads, its p99 is
# mostly the scheduling of the load generator and the server, which no server's own cost
# moves: a p99 of row 4 is read against it.
out="$WORK/wrk-floor.txt"
wrk -t2 -c64 -d"$WRK_DURATION" --latency "$(url_of nginx-disk)/floor" >"$out" 2>&1 || true
rps=$(wrk_rps "$out")
p99=$(wrk_p99_ms "$out")
echo "  floor (nginx return 200, ${FLOOR_BYTES} B): ${rps:-?} req/s, p99 ${p99:-?} ms"
if [ -n "$rps" ] && [ -n "$p99" ]; then
  rec floor_rps nginx-disk "$rps"
  rec floor_p99_ms nginx-disk "$p99"
fi
if ((MANIFESTS_ONLY)); then
  report
  exit 0
fi

# ---------------------------------------------------------------- 3. 20 clients, same cold blob
echo "3. $CLIENTS clients, the same cold blob at once (fresh cache each)"
for t in nginx-disk ocicache regproxy nginx-cache upstream; do
  [ "$t" = upstream ] || fresh "$t"
  wait_upstream_quiet
  n0=$(uplines)
  d="$WORK/c20-$t"
  mkdir -p "$d"
  touch "$d/rss.run"
  rss_poller "$t" "$d/rss" &
  poller=$!
  # One curl with CLIENTS parallel transfers, each on its own connection, all started at
  # once: starting 20 curl processes on 2 cores would add tens of ms of process start-up
  # to every TTFB. Its -w lines come in completion order.
  args=()
  for _ in $(seq "$CLIENTS"); do args+=(-o /dev/null "$(url_of "$t")$BLOB_PATH"); done
  t0=$(now)
  curl -s -Z --parallel-max "$CLIENTS" --parallel-immediate \
    -w '%{http_code} %{size_download} %{time_starttransfer} %{time_total}\n' "${args[@]}" \
    >"$d/clients" 2>"$d/curl.err" || true
  t1=$(now)
  rm -f "$d/rss.run"
  wait "$poller"
  hwm=$(status_kib "$t" VmHWM)
  wait_upstream_quiet
  read -r gets bytes < <(upstream_blob_gets "$n0" "$BLOB_PATH")
  ok=1
  [ "$(wc -l <"$d/clients")" = "$CLIENTS" ] || { echo "  WARNING: $t: $(wc -l <"$d/clients") of $CLIENTS transfers reported" >&2; ok=0; }
  while read -r line; do check_fetch "$t client" "$line" || ok=0; done <"$d/clients"
  ttfb=$(awk '{print $3 * 1000}' "$d/clients" | sort -g)
  med=$(echo "$ttfb" | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
  max=$(echo "$ttfb" | tail -1)
  # Peak RSS: VmHWM of the freshly started processes (exact); the upstream was not
  # restarted, so for it the VmRSS polled every 50 ms during the test.
  if [ "$t" = upstream ]; then rss=$(cat "$d/rss"); else rss=$hwm; fi
  wall=$(calc "$t1 - $t0")
  echo "  $t: wall ${wall}s, TTFB median ${med} ms max ${max} ms, upstream GETs $gets ($bytes B), peak RSS $((rss / 1024)) MiB (polled $(($(cat "$d/rss") / 1024)) MiB)"
  ((ok)) || { echo "  WARNING: $t: some clients failed; figures skipped" >&2; continue; }
  rec c20_wall_s "$t" "$wall"
  rec c20_ttfb_med_ms "$t" "$med"
  rec c20_ttfb_max_ms "$t" "$max"
  if [ "$t" != nginx-disk ]; then
    rec c20_upstream_gets "$t" "$gets"
    rec c20_upstream_blobs "$t" "$(calc "$bytes / $BIG_SIZE")"
  fi
  rec c20_rss_mib "$t" "$(calc "$rss / 1024")"
done

# ---------------------------------------------------------------- 5. containerd pulls
echo "5. containerd pull of library/layers:v1 (5 x $LAYER_MIB MiB), cold then warm"
C="$WORK/containerd"
mkdir -p "$C/root" "$C/state"
cat >"$C/config.toml" <<EOF
version = 2
root = "$C/root"
state = "$C/state"
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
  address = "$C/containerd.sock"
[ttrpc]
  address = "$C/ttrpc.sock"
[debug]
  address = ""
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$C/root/opt"
EOF
containerd --config "$C/config.toml" >>"$WORK/containerd.log" 2>&1 &
CONTAINERD_PID=$!
CTR=(ctr -a "$C/containerd.sock" -n bench)
for _ in $(seq 100); do "${CTR[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
IMAGE=docker.io/library/layers:v1
pull() { # pull TARGET: seconds, or nothing on failure
  local t0 t1
  t0=$(now)
  "${CTR[@]}" images pull --plain-http --hosts-dir "$C/hosts-$1" --snapshotter native "$IMAGE" \
    >>"$WORK/ctr-$1.log" 2>&1 || return 1
  t1=$(now)
  calc "$t1 - $t0"
}
remove() { "${CTR[@]}" images rm --sync "$IMAGE" >/dev/null 2>&1 || true; }
for t in upstream ocicache regproxy nginx-cache; do
  [ "$t" = upstream ] || fresh "$t"
  mkdir -p "$C/hosts-$t/docker.io"
  cat >"$C/hosts-$t/docker.io/hosts.toml" <<EOF
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:${PORT[$t]}"]
  capabilities = ["pull", "resolve"]
EOF
  remove
  left=$("${CTR[@]}" content ls -q | wc -l)
  ((left == 0)) || echo "  WARNING: $left blobs left in containerd's store before the cold pull" >&2
  wait_upstream_quiet
  n0=$(uplines)
  cold=$(pull "$t") || { echo "  $t: cold pull failed, see $WORK/ctr-$t.log" >&2; continue; }
  wait_upstream_quiet
  n1=$(uplines)
  remove
  warm=$(pull "$t") || { echo "  $t: warm pull failed, see $WORK/ctr-$t.log" >&2; continue; }
  wait_upstream_quiet
  n2=$(uplines)
  remove
  echo "  $t: cold ${cold}s ($((n1 - n0)) upstream requests), warm ${warm}s ($((n2 - n1)) upstream requests)"
  rec ctr_cold_s "$t" "$cold"
  rec ctr_warm_s "$t" "$warm"
  rec ctr_warm_upstream "$t" "$((n2 - n1))"
done

# ---------------------------------------------------------------- the table
report
