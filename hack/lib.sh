# Shared settings for the hack/ scripts: pinned versions and where build output is cached.
# Sourced, not run.

KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.7.3}"

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/crownstone-webhooks"
# Built binaries, keyed by the versions they were built from.
BIN_DIR="$CACHE_ROOT/kubernetes-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}/bin"
# Go's module and build caches live beside them, so a fresh clone on a warm machine rebuilds nothing.
export GOMODCACHE="${GOMODCACHE_OVERRIDE:-$CACHE_ROOT/go/mod}"
export GOCACHE="${GOCACHE_OVERRIDE:-$CACHE_ROOT/go/build}"
export GOFLAGS="${GOFLAGS:--modcacherw}"
export GOTOOLCHAIN=local

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Cargo's build output, kept outside the checkout so a fresh clone on a warm machine reuses it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE_ROOT/target}"
