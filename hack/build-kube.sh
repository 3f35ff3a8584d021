#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kubectl and etcd from the Go module proxy, once,
# into the cache directory, and prints that directory. Later runs find the binaries and return at once.
#
# `go install` cannot build these commands: k8s.io/kubernetes points its staging modules at
# ./staging with `replace` lines, which only count in a main module. So each build happens in a
# throw-away wrapper module that requires the release and replaces every staging module by its
# published version.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/lib.sh
. "$here/lib.sh"

want=(kube-apiserver kube-controller-manager kubectl etcd)
have_all() { for b in "${want[@]}"; do [ -x "$BIN_DIR/$b" ] || return 1; done; }
if have_all; then echo "$BIN_DIR"; exit 0; fi

command -v go >/dev/null || die "Go is needed to build the control plane binaries"
mkdir -p "$BIN_DIR" "$GOMODCACHE" "$GOCACHE"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

build_kubernetes() {
  local mod="$work/kubernetes" minor_patch
  minor_patch="${KUBERNETES_VERSION#v1.}" # 37.2
  mkdir -p "$mod"
  log "fetching k8s.io/kubernetes@$KUBERNETES_VERSION"
  local gomod
  gomod="$(cd "$mod" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
  [ -f "$gomod" ] || die "could not download the go.mod of k8s.io/kubernetes@$KUBERNETES_VERSION"

  {
    echo "module crownstone-webhooks.local/kube-build"
    echo
    grep -E '^go [0-9]' "$gomod" | head -n 1
    grep -E '^godebug ' "$gomod" || true
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    # Every staging module the release points at ./staging, replaced by its published version.
    grep -E '^[[:space:]]*k8s\.io/[^[:space:]]+ => \./staging/src/' "$gomod" |
      awk -v v="v0.$minor_patch" '{ printf "replace %s => %s %s\n", $1, $1, v }'
  } >"$mod/go.mod"
  log "wrapper module replaces $(grep -c '^replace' "$mod/go.mod") staging modules"

  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || go mod tidy)
  local ldflags="-s -w"
  ldflags+=" -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=${minor_patch%%.*}"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitMinor=${minor_patch%%.*}"
  for cmd in kube-apiserver kube-controller-manager kubectl; do
    log "building $cmd $KUBERNETES_VERSION"
    (cd "$mod" && go build -trimpath -ldflags "$ldflags" -o "$BIN_DIR/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$BIN_DIR/$cmd.tmp" "$BIN_DIR/$cmd"
  done
}

build_etcd() {
  local mod="$work/etcd"
  mkdir -p "$mod"
  log "building etcd $ETCD_VERSION"
  {
    echo "module crownstone-webhooks.local/etcd-build"
    echo
    echo "go 1.25"
    echo
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
    # etcd's own go.mod points its sibling modules at ../; use their published versions.
    for m in api client/pkg client/v3 pkg; do
      local path="go.etcd.io/etcd/$m"
      [[ "$path" == */v3 ]] || path="$path/v3"
      echo "replace $path => $path $ETCD_VERSION"
    done
  } >"$mod/go.mod"
  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$mod" && go mod tidy >/dev/null)
  (cd "$mod" && go build -trimpath -ldflags "-s -w" -o "$BIN_DIR/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN_DIR/etcd.tmp" "$BIN_DIR/etcd"
}

[ -x "$BIN_DIR/etcd" ] || build_etcd
for b in kube-apiserver kube-controller-manager kubectl; do
  [ -x "$BIN_DIR/$b" ] || { build_kubernetes; break; }
done
have_all || die "build finished without all of: ${want[*]}"
log "control plane binaries ready in $BIN_DIR"
echo "$BIN_DIR"
