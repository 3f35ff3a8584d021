#!/usr/bin/env bash
# The end-to-end benchmark (docs/BENCHMARKS.md): a private etcd and kube-apiserver, the
# simulator, the operator (release build) and webhook receivers, each a process of its own on
# 127.0.0.1; first the machine's ceiling for bare POSTs, then every scenario; one table at the
# end and the figures as JSON under target/bench/.
#
#   hack/bench.sh [--quick] [--only ceiling,a,b,c,d,e,f,g,h,i,burst,handover,handover-nokey,
#                 handover-cold] [--json PATH] [--scale F]
#                 [--phase S] [--exe PATH]
#
# --exe runs the scenarios against another build of the operator (a before/after comparison).
#
# --quick makes every size 10x smaller and phases 5 s (a few minutes); without it a run takes
# about half an hour. Run it on an otherwise quiet machine: other work competes for the cores.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"
cd "$here/.."

log "control plane binaries: $("$here/build-kube.sh")"
log "building crownstone-webhooks and the benchmark (release)"
cargo build --locked --release --bin crownstone-webhooks
cargo bench --locked --bench end_to_end --no-run
# 10,000 event streams need as many sockets in the operator and in the simulator.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec cargo bench --locked --bench end_to_end -- "$@"
