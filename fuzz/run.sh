#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS each, then print one summary line per
# target: runs, crashes, coverage, corpus size.
#
#   bash fuzz/run.sh [SECONDS] [TARGET...]        # default 60 s, all targets
#
# Environment:
#   FUZZ_JOBS=N          targets run N at a time (default 1; the machine has 2 cores)
#   FUZZ_SANITIZER=S     none (default) or address; the parsers are safe Rust, so `none`
#                        finds the same panics at about twice the speed
#   CARGO_TARGET_DIR     where the instrumented build goes (default fuzz/target)
#
# Only the stable toolchain is needed: cargo fuzz passes nightly-only flags to rustc, which
# RUSTC_BOOTSTRAP=1 allows. cargo-fuzz is installed from crates.io if missing.
#
# fuzz/corpus/<target>/ holds the committed seeds and is only read. What the fuzzer learns goes
# to fuzz/work/corpus/<target>/ (kept between runs, ignored by git); crashing inputs go to
# fuzz/artifacts/<target>/. Exit status: 0 when no target crashed, 1 otherwise.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

seconds="${1:-60}"
shift || true
case "$seconds" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
    ;;
esac

all_targets=(reference digest route range challenge token manifests image_ref manifest_json)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi

jobs="${FUZZ_JOBS:-1}"
sanitizer="${FUZZ_SANITIZER:-none}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/target}"
export RUSTC_BOOTSTRAP=1
triple="$(rustc -vV | sed -n 's/^host: //p')"
bindir="$CARGO_TARGET_DIR/$triple/release"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz from crates.io..." >&2
    cargo install cargo-fuzz --locked >&2 || exit 2
fi

echo "building fuzz targets (sanitizer: $sanitizer, target dir: $CARGO_TARGET_DIR)..." >&2
if ! nice -n 10 cargo fuzz build -s "$sanitizer" --target-dir "$CARGO_TARGET_DIR" >&2; then
    echo "build failed" >&2
    exit 2
fi

logdir="$here/work/logs"
mkdir -p "$logdir"

# run_one TARGET: fuzz it for $seconds and write its summary line to $logdir/TARGET.summary.
run_one() {
    local t="$1"
    local bin="$bindir/$t"
    local work="$here/work/corpus/$t" seeds="$here/corpus/$t" art="$here/artifacts/$t"
    local log="$logdir/$t.log"
    mkdir -p "$work" "$seeds" "$art"
    local before
    before="$(find "$art" -type f | wc -l)"
    local start=$SECONDS
    # -timeout: one input taking 10 s is a hang; -rss_limit_mb: a leak or a huge allocation.
    nice -n 10 "$bin" "$work" "$seeds" \
        -artifact_prefix="$art/" \
        -max_total_time="$seconds" \
        -timeout=10 \
        -rss_limit_mb=2048 \
        -print_final_stats=1 \
        >"$log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    local runs cov corpus after crashes new
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
    [ -n "$runs" ] || runs="$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')"
    cov="$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | awk '{print $2}')"
    corpus="$(find "$work" -type f | wc -l)"
    after="$(find "$art" -type f | wc -l)"
    crashes=$((after - before))
    new="$(grep -oE "Test unit written to [^ ]+" "$log" | awk '{print $NF}' | tr '\n' ' ')"
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes="?(exit $rc)"; fi
    printf '%-14s runs=%-10s crashes=%-3s cov=%-5s corpus=%-5s time=%ss%s\n' \
        "$t" "${runs:-?}" "$crashes" "${cov:-?}" "$corpus" "$took" \
        "${new:+  artifact: $new}" >"$logdir/$t.summary"
}

echo "fuzzing ${#targets[@]} target(s) for ${seconds}s each, $jobs at a time; logs in $logdir" >&2
running=0
for t in "${targets[@]}"; do
    if [ ! -x "$bindir/$t" ]; then
        echo "$t: no such target" >"$logdir/$t.summary"
        continue
    fi
    run_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n
        running=$((running - 1))
    fi
done
wait

status=0
echo "== fuzz summary (${seconds}s per target) =="
for t in "${targets[@]}"; do
    line="$(cat "$logdir/$t.summary")"
    echo "$line"
    case "$line" in *"crashes=0 "*) ;; *) status=1 ;; esac
done
exit "$status"
