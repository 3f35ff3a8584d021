#!/usr/bin/env bash
# Builds helm from the Go module proxy, once, into the cache directory, and prints the path of
# the binary. Later runs find it and return at once.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

HELM_VERSION="${HELM_VERSION:-v4.3.1}"
helm_dir="$CACHE_ROOT/helm-$HELM_VERSION/bin"
if [ -x "$helm_dir/helm" ]; then echo "$helm_dir/helm"; exit 0; fi

command -v go >/dev/null || die "Go is needed to build helm"
mkdir -p "$helm_dir" "$GOMODCACHE" "$GOCACHE"
log "building helm $HELM_VERSION"
GOBIN="$helm_dir" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >&2
[ -x "$helm_dir/helm" ] || die "helm was not built"
echo "$helm_dir/helm"
