#!/usr/bin/env bash
# The end-to-end benchmark (docs/BENCHMARKS.md): a private etcd and kube-apiserver, the
# simulator, the operator (release build) and webhook receivers, each a process of its own on
# 127.0.0.1; first the machine's ceiling for bare POSTs, then every scenario; one table at the
# end and the figures as JSON under target/bench/.
#
#   hack/bench.sh [--quick] [--only ceiling,a,b,c,d,e,f,g,h,i,burst,handover,handover-nokey,
#                 handover-cold,scale-out] [--json PATH] [--scale F]
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
# 10,000 event streams need as many sockets in the operator and in the simulator, and the
# handover scenarios' three replicas three times as many in the simulator, and scale-out up to
# 2.7 per token (an owner's, a standby's, and a joining replica's share): raise the limit where
# allowed (root), else take the hard limit. scale-out runs fewer tokens where that limit is too
# low, and says so.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The handover scenarios hold three replicas' streams to one loopback address at once (30,000 at
# full size), more than the default ephemeral port range (about 28,000) has: widen it where
# allowed, else say why those scenarios may fail to connect.
ports=/proc/sys/net/ipv4/ip_local_port_range
if [ -r "$ports" ]; then
  read -r low high < "$ports"
  if [ $((high - low)) -lt 40000 ]; then
    sysctl -q -w net.ipv4.ip_local_port_range="1024 65000" 2>/dev/null \
      || log "ephemeral ports $low-$high: too few for the full-size handover scenarios (run as root to widen)"
  fi
fi
exec cargo bench --locked --bench end_to_end -- "$@"
