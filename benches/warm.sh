#!/usr/bin/env bash
# Warm throughput against concurrency (issue 15): ocicache serving cached blobs from its own
# folder beside nginx serving the same files with sendfile, 1, 10, 100 and 500 clients, a
# 64 MiB blob and 1,000 blobs of 1 MiB. Builds the release binary, then runs warm.py.
#
#   bash benches/warm.sh [--no-build] [warm.py options: --seconds D --clients 1,10,100,500]
#
# OCICACHE_BIN=path tests another binary; BENCH_DIR (default /tmp/ocicache-warm-bench) keeps
# the cache (about 1.1 GB, built once) and the servers' logs. Needs nginx on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
if [[ "${1:-}" == "--no-build" ]]; then
    build=0
    shift
fi
command -v nginx >/dev/null || export PATH=$PATH:/usr/sbin
command -v nginx >/dev/null || { echo "warm.sh: needs nginx (apt-get install nginx)" >&2; exit 1; }
bin="${OCICACHE_BIN:-${CARGO_TARGET_DIR:-target}/release/ocicache}"
if [[ -z "${OCICACHE_BIN:-}" && $build == 1 ]]; then
    cargo build --release --bin ocicache
fi
exec python3 benches/warm.py "$bin" "${BENCH_DIR:-/tmp/ocicache-warm-bench}" "$@"
