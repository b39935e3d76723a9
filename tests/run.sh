#!/usr/bin/env bash
# The test command: installs what the integration tests drive when it is missing (the CNCF
# registry, skopeo, containerd, promtool (prometheus) for the alert rules, chromium for the
# status page: Debian packages; Garage, the S3-compatible store of the
# shared-tier tests: from crates.io) and runs `cargo test`.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
{ command -v containerd >/dev/null && command -v ctr >/dev/null; } || need+=(containerd)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium)
if ((${#need[@]})); then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
fi

# Garage is not packaged by Debian: `cargo install` builds it (about 16 minutes on 2 cores),
# once; later runs reuse the binary in ~/.cargo/bin.
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v garage >/dev/null; then
  echo "installing garage (cargo install garage --locked; about 16 minutes on 2 cores)"
  cargo install garage --locked
fi

exec cargo test "$@"
