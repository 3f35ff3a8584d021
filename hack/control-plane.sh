#!/usr/bin/env bash
# Starts and stops a real Kubernetes control plane (etcd, kube-apiserver, optionally
# kube-controller-manager) on 127.0.0.1, from the binaries hack/build-kube.sh caches.
#
#   hack/control-plane.sh start DIR [--controller-manager] [--watch-pid PID [--temporary]]
#       Starts everything with state, certificates and logs under DIR, waits until the API server
#       is ready, and writes DIR/kubeconfig. With --watch-pid the plane stops itself when PID exits,
#       and with --temporary it then removes DIR too.
#   hack/control-plane.sh stop DIR
#       Stops what `start DIR` started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

usage() { sed -n '2,11p' "$0" >&2; exit 2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

stop_plane() {
  local dir="$1"
  [ -f "$dir/pids" ] || return 0
  # Stop in reverse start order: controller-manager, apiserver, etcd.
  local pids
  pids="$(tac "$dir/pids")"
  for pid in $pids; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    local alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$dir/pids"
}

generate_pki() {
  local pki="$1"
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=crownstone-webhooks-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$pki/apiserver.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

start_plane() {
  local dir="$1" with_kcm="$2" watch_pid="$3" temporary="$4"
  local bin
  bin="$("$here/build-kube.sh")"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  stop_plane "$dir"
  local pki="$dir/pki" logs="$dir/logs"
  mkdir -p "$logs"
  [ -f "$pki/sa.pub" ] || generate_pki "$pki"

  # A restart of the same DIR keeps its ports, admin token and etcd data, so clients that
  # were connected before find the same API server again.
  if [ ! -f "$pki/tokens.csv" ]; then
    local new_token
    new_token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    echo "$new_token,admin,admin,system:masters" >"$pki/tokens.csv"
    chmod 600 "$pki/tokens.csv"
  fi
  local token
  token="$(cut -d, -f1 "$pki/tokens.csv")"

  if [ ! -f "$dir/ports" ]; then
    printf 'etcd_port=%s\netcd_peer=%s\napi_port=%s\n' "$(free_port)" "$(free_port)" "$(free_port)" >"$dir/ports"
  fi
  local etcd_port etcd_peer api_port
  # shellcheck disable=SC1091
  . "$dir/ports"

  : >"$dir/pids"
  "$bin/etcd" --name test --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "test=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn \
    >"$logs/etcd.log" 2>&1 &
  echo $! >>"$dir/pids"

  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --endpoint-reconciler-type none \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc \
    --service-cluster-ip-range 10.0.0.0/24 \
    --disable-admission-plugins ServiceAccount \
    --profiling=false \
    >"$logs/kube-apiserver.log" 2>&1 &
  echo $! >>"$dir/pids"

  cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: local
  context:
    cluster: local
    user: admin
    namespace: default
current-context: local
KUBECONFIG
  chmod 600 "$dir/kubeconfig"

  local ready=0
  for _ in $(seq 1 600); do
    if curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
      "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
      ready=1; break
    fi
    if ! kill -0 "$(sed -n 2p "$dir/pids")" 2>/dev/null; then break; fi
    sleep 0.1
  done
  if [ "$ready" != 1 ]; then
    tail -n 30 "$logs/kube-apiserver.log" >&2 || true
    stop_plane "$dir"
    die "kube-apiserver did not become ready (logs in $logs)"
  fi

  if [ "$with_kcm" = 1 ]; then
    "$bin/kube-controller-manager" \
      --kubeconfig "$dir/kubeconfig" \
      --authentication-kubeconfig "$dir/kubeconfig" --authorization-kubeconfig "$dir/kubeconfig" \
      --secure-port 0 --leader-elect=false --use-service-account-credentials=false \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --controllers garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,root-ca-certificate-publisher-controller \
      >"$logs/kube-controller-manager.log" 2>&1 &
    echo $! >>"$dir/pids"
  fi

  if [ -n "$watch_pid" ]; then
    # Detached, with no inherited pipes, so the caller's output closes when the caller is done.
    setsid bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" stop "$3"; [ "$4" = 1 ] && rm -rf "$3"' _ \
      "$watch_pid" "$here/control-plane.sh" "$dir" "$temporary" </dev/null >/dev/null 2>&1 &
  fi
  printf 'KUBECONFIG=%s\nKUBECTL=%s\n' "$dir/kubeconfig" "$bin/kubectl" >"$dir/env"
  log "control plane ready: https://127.0.0.1:$api_port (kubeconfig $dir/kubeconfig)"
}

[ $# -ge 2 ] || usage
cmd="$1" dir="$2"; shift 2
with_kcm=0 watch_pid="" temporary=0
while [ $# -gt 0 ]; do
  case "$1" in
    --controller-manager) with_kcm=1 ;;
    --watch-pid) watch_pid="$2"; shift ;;
    --temporary) temporary=1 ;;
    *) usage ;;
  esac
  shift
done
case "$cmd" in
  start) start_plane "$dir" "$with_kcm" "$watch_pid" "$temporary" ;;
  stop) stop_plane "$dir" ;;
  *) usage ;;
esac
