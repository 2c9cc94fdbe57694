#!/usr/bin/env bash
# Builds the Go tools the CI gates need into a cache directory, only when absent:
#   helm            (helm.sh/helm/v4)                       chart lint, template, package
#   etcd            (go.etcd.io/etcd/server/v3, >= 3.6)     the real API server's store
#   kube-apiserver  (k8s.io/kubernetes, as a Go dependency) the operator's real-API-server tier
# Usage: tools/build-go-tools.sh [DIR]   (DIR defaults to $SHOAL_TOOLS or /var/tmp/shoal-tools)
# Prints one line per tool with the time it took. Module and build caches are Go's own
# (GOMODCACHE, GOCACHE), so a second machine-local run only links.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-${SHOAL_TOOLS:-/var/tmp/shoal-tools}}"
mkdir -p "$dir/bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

HELM_VERSION=v4.3.2
ETCD_VERSION=v3.6.16
KUBE_VERSION=v1.37.2
KUBE_STAGING_VERSION=v0.37.2

stamp() { date +%s; }

if [ ! -x "$dir/bin/helm" ]; then
    t=$(stamp)
    GOBIN="$dir/bin" go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
    echo "built helm $HELM_VERSION in $(( $(stamp) - t )) s"
fi

if [ ! -x "$dir/bin/etcd" ] || [ ! -x "$dir/bin/kube-apiserver" ]; then
    # A throwaway module per build so the committed go.mod (tools/kube-assets) stays the pin.
    work="$dir/kube-assets"
    rm -rf "$work"; mkdir -p "$work"
    cp "$here/kube-assets/go.mod" "$work/go.mod"
    [ -f "$here/kube-assets/go.sum" ] && cp "$here/kube-assets/go.sum" "$work/go.sum"
    cd "$work"
    if [ ! -x "$dir/bin/etcd" ]; then
        t=$(stamp)
        go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        go build -trimpath -o "$dir/bin/etcd" go.etcd.io/etcd/server/v3
        echo "built etcd $ETCD_VERSION in $(( $(stamp) - t )) s"
    fi
    if [ ! -x "$dir/bin/kube-apiserver" ]; then
        t=$(stamp)
        gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
        # Every k8s.io/X => ./staging/... replace of kubernetes' own go.mod becomes X@v0.N.M.
        grep -oE '^\s*k8s.io/[a-z0-9.-]+ => ./staging/' "$gomod" | awk '{print $1}' | sort -u |
            while read -r m; do go mod edit -replace "$m=$m@$KUBE_STAGING_VERSION"; done
        go get "k8s.io/kubernetes@$KUBE_VERSION"
        go build -trimpath -o "$dir/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
        echo "built kube-apiserver $KUBE_VERSION in $(( $(stamp) - t )) s"
    fi
fi
"$dir/bin/helm" version --short
"$dir/bin/etcd" --version | head -1
"$dir/bin/kube-apiserver" --version
