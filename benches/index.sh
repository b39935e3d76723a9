#!/usr/bin/env bash
# Start-up on a large cache (issue 15): builds the release binary, then runs index.py on
# synthetic caches of N blobs. Prints, per N: seconds until /v2/ answers, seconds until
# /readyz is 200 (the index scan is done), RSS once ready, and RSS per blob over an empty
# cache's.
#
#   bash benches/index.sh [--no-build] [N...]       default N: 100000 1000000
#
# OCICACHE_BIN=path tests another binary; BENCH_DIR (default /tmp/ocicache-index-bench) keeps
# the caches between runs (a million blobs take about 4.5 GB of disk and a minute to build)
# and the servers' logs.
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
if [[ "${1:-}" == "--no-build" ]]; then
    build=0
    shift
fi
counts=("$@")
[[ ${#counts[@]} -gt 0 ]] || counts=(100000 1000000)
bin="${OCICACHE_BIN:-${CARGO_TARGET_DIR:-target}/release/ocicache}"
if [[ -z "${OCICACHE_BIN:-}" && $build == 1 ]]; then
    cargo build --release --bin ocicache
fi
exec python3 benches/index.py "$bin" "${BENCH_DIR:-/tmp/ocicache-index-bench}" "${counts[@]}"
