#!/usr/bin/env bash
# Runs the whole system locally, no cluster needed: a real etcd, kube-apiserver and
# kube-controller-manager on 127.0.0.1, the CRDs, the Crownstone simulator, the operator with its
# REST API, a demo webhook receiver, and a demo WebhookUser with a token. Prints how to take it
# from there: register a listener over the REST API, publish an event, watch the signed delivery.
# Ctrl-C stops everything.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"
cd "$here/.."

state="${LOCAL_STATE_DIR:-$CACHE_ROOT/local}"
sim_port="${SIMULATOR_PORT:-8080}"
health_port="${HEALTH_PORT:-8081}"
api_port="${API_PORT:-8082}"
receiver_port="${RECEIVER_PORT:-9000}"
mkdir -p "$state/logs"
pids=()
cleanup() {
  trap - EXIT INT TERM
  log "stopping"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$here/control-plane.sh" stop "$state/plane" || true
}
trap cleanup EXIT INT TERM

bin_dir="$("$here/build-kube.sh")"
kubectl="$bin_dir/kubectl"
log "building crownstone-webhooks"
cargo build --locked --quiet
exe="$CARGO_TARGET_DIR/debug/crownstone-webhooks"

"$here/control-plane.sh" start "$state/plane" --controller-manager
export KUBECONFIG="$state/plane/kubeconfig"
"$kubectl" apply --server-side -f crds/ >/dev/null
"$kubectl" wait --for=condition=Established --timeout=60s \
  crd/listeners.webhooks.crownstone.rocks crd/webhookusers.webhooks.crownstone.rocks >/dev/null

"$exe" simulator --listen "127.0.0.1:$sim_port" >"$state/logs/simulator.log" 2>&1 &
pids+=($!)
# The admin key of the REST API's /users routes: new for every run, given in the environment so
# it shows in no process list.
admin_key="$(openssl rand -hex 24)"
CROWNSTONE_USER_ADMIN_KEY="$admin_key" "$exe" run --events-url "http://127.0.0.1:$sim_port" \
  --health-listen "127.0.0.1:$health_port" --api-listen "127.0.0.1:$api_port" --api-namespace demo \
  --allow-private-destinations >"$state/logs/operator.log" 2>&1 &
pids+=($!)

for url in "http://127.0.0.1:$health_port/readyz" "http://127.0.0.1:$api_port/readyz"; do
  for _ in $(seq 1 100); do
    curl -fsS "$url" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS "$url" >/dev/null || die "$url is not ready; see $state/logs/operator.log"
done

# The demo: a namespace, a WebhookUser, and a Crownstone token from the simulator in a Secret.
"$kubectl" create namespace demo --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
"$kubectl" apply -f hack/demo/webhookuser.yaml >/dev/null
token="$(curl -fsS -X POST "http://127.0.0.1:$sim_port/admin/tokens" -H 'Content-Type: application/json' \
  -d '{"userId":"demo-user","spheres":["demo-sphere"],"scopes":["all"],"ttlSeconds":86400}' |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')"
"$kubectl" -n demo create secret generic demo-token --from-literal=token="$token" \
  --dry-run=client -o yaml | "$kubectl" apply -f - >/dev/null
# The demo user's API key, from the credentials Secret the operator makes for it.
api_key=""
for _ in $(seq 1 100); do
  api_key="$("$kubectl" -n demo get secret demo-credentials -o jsonpath='{.data.apiKey}' 2>/dev/null | base64 -d || true)"
  [ -n "$api_key" ] && break
  sleep 0.2
done
[ -n "$api_key" ] || die "the operator did not create the demo user's credentials; see $state/logs/operator.log"
client_secret="$("$kubectl" -n demo get secret demo-credentials -o jsonpath='{.data.clientSecret}' | base64 -d)"
# The demo receiver verifies each delivery's signature with the user's client secret, as a
# client's own endpoint would, and prints what it accepts.
WEBHOOK_SECRET="$client_secret" "$exe" receive --listen "127.0.0.1:$receiver_port" \
  >"$state/logs/receiver.log" 2>&1 &
pids+=($!)
api="http://127.0.0.1:$api_port/api"

cat <<INFO

crownstone-webhooks runs locally.
  Kubernetes API    export KUBECONFIG=$KUBECONFIG   (kubectl: $kubectl)
  Simulator         http://127.0.0.1:$sim_port      (Crownstone event server stand-in)
  REST API          $api  (OpenAPI: $api/openapi.json; namespace demo)
  Metrics           http://127.0.0.1:$health_port/metrics (operator and REST API)
  Demo receiver     http://127.0.0.1:$receiver_port  (crownstone-webhooks receive: verifies and prints deliveries to $state/logs/receiver.log)
  Logs              $state/logs/

The WebhookUser 'demo' (namespace 'demo') has API key $api_key.
A Crownstone token of user 'demo-user' on sphere 'demo-sphere' is $token.
The admin key of the /users routes is $admin_key.

Register a listener through the REST API, as Crownstone's clients do, publish an event on the
simulator, and watch the signed delivery arrive:

  curl -s -X POST $api/listeners -H 'API_KEY: $api_key' -H 'Content-Type: application/json' \\
    -d '{"token":"$token","userId":"demo-user","eventTypes":["command","presence"],"url":"http://127.0.0.1:$receiver_port/crownstone"}'
  curl -s $api/listeners -H 'API_KEY: $api_key'
  curl -s -X POST http://127.0.0.1:$sim_port/admin/events -H 'Content-Type: application/json' \\
    -d '{"type":"command","subType":"multiSwitch","sphere":{"id":"demo-sphere","name":"Home","uid":1},"switchData":[{"id":"stone-1","name":"Lamp","macAddress":"AA:BB:CC:DD:EE:01","uid":1,"type":"TURN_ON"}],"sequenceTime":{"timestamp":1700000000000,"counter":1}}'
  tail $state/logs/receiver.log                     # "verified msg_… to /crownstone: {…}": the
                                                    # signature checked with the user's clientSecret
  export KUBECONFIG=$KUBECONFIG; alias kubectl=$kubectl
  kubectl -n demo get listeners                     # the Listener the REST API created

The same with kubectl instead of the REST API: kubectl apply -f hack/demo/listener.yaml (it
reads the token from Secret demo-token). Users through the admin routes:

  curl -s $api/users -H 'admin_key: $admin_key'

Press Ctrl-C to stop.
INFO
wait
