#!/usr/bin/env bash
# Replicas that stream cold blobs from each other ([cache.s3.peers]): the issue's two timing
# targets, on the test suite's 3-node Garage cluster (garage on PATH or in ~/.cargo/bin) and
# its fake upstream, all on 127.0.0.1:
#
#   1. a cold 32 MiB blob throttled to 4 MiB/s; a client on the responsible replica A, then
#      0.5 s later one on B and one on C: each one's first byte and total time (B's and C's
#      from their own request), and the upstream GETs (target: B/C first byte under 1 s,
#      total within 1.2x of A's, 1 GET);
#   2. a cold pull (manifest by tag, config and 5 layers of 4 MiB, 3 blobs at a time) through
#      one ocicache without a shared tier, one replica of three with peers, and one of three
#      with the shared tier and leases only (before peers): median of the runs (target: peers
#      within 1.5x of no shared tier, plus 100 ms); each pull starts once the uploads to the
#      bucket of the one before have landed (with peers they run once the replica is idle).
#
#   bash benches/peers.sh [--release] [RUNS]
#
# It is the ignored test `bench_peers` of tests/cases/peers.rs; debug build by default (the
# hash is optimized in every profile), --release for the release profile. Figures are noise
# on a loaded machine: say so when you quote them.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
profile=()
if [[ "${1:-}" == "--release" ]]; then
    profile=(--release)
    shift
fi
export PEERS_BENCH_RUNS="${1:-3}"
cargo test "${profile[@]}" --test tests bench_peers -- --ignored --nocapture --test-threads=1 2>&1 \
    | grep -vE '^(running|test |$)|test result'
