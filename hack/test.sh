#!/usr/bin/env bash
# Runs every test: unit tests, and integration tests against a real kube-apiserver, etcd and
# kube-controller-manager (started by the test harness), the simulator and real HTTP receivers.
# Everything it needs is built or installed on first use and cached under
# ${XDG_CACHE_HOME:-~/.cache}/crownstone-webhooks.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"
cd "$here/.."

log "control plane binaries: $("$here/build-kube.sh")"
log "helm: $("$here/build-helm.sh")"
log "python for client tests: $("$here/python-env.sh")"
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
status=0
cargo test --locked --all-targets "$@" 2>&1 | tee "$out" || status=$?
# One closing line that adds up every test binary's result.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?/) p += $i; if ($(i+1) ~ /^failed;?/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$out"
exit "$status"
