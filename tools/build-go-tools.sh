#!/usr/bin/env bash
# Builds the Go tools the CI gates and the real-API-server tests need, from the Go module proxy,
# into $SHOAL_TOOLS/bin (default /var/tmp/shoal-tools/bin), each only when absent or when the
# binary there is not the pinned version:
#   helm            helm.sh/helm/v4              chart lint, template, package
#   etcd            go.etcd.io/etcd/server/v3    the real API server's store (>= 3.6)
#   kube-apiserver  k8s.io/kubernetes            the real API server (shoal-testkube)
#
# Usage: tools/build-go-tools.sh [--resolve] [helm|etcd|kube-apiserver ...]   (default: all three)
#   --resolve  regenerate tools/kube-assets/*/go.mod and go.sum from the pins below (after a
#              version bump; the script also does it by itself when a go.mod does not name the
#              pinned version). Commit the result; never commit binaries.
#
# etcd and kube-apiserver each build from their own committed module (tools/kube-assets/etcd,
# tools/kube-assets/kube-apiserver) with -mod=readonly, so the module graph is pinned by the
# committed go.mod/go.sum. They are separate modules because in one module kubernetes' own
# requirements raise etcd above its pin (MVS). kubernetes' go.mod replaces every k8s.io staging
# module with ./staging/...; the resolve step turns each of those into k8s.io/X@v0.<minor>.<patch>,
# generated from the tag's go.mod every time, never kept by hand.
#
# Go's module cache and build cache (GOMODCACHE, GOCACHE) are used as they are set, so later
# runs only link. Prints one line per tool with the time it took.
set -euo pipefail

HELM_VERSION=v4.3.2
ETCD_VERSION=v3.6.16
KUBE_VERSION=v1.37.2
# k8s.io/X staging modules are tagged v0.<minor>.<patch> for kubernetes v1.<minor>.<patch>.
KUBE_STAGING_VERSION="v0.${KUBE_VERSION#v1.}"
# The go line of the generated modules: the oldest Go they build with (k8s.io/kubernetes v1.37.2
# says go 1.26.0), not the resolving machine's own version, so any Go 1.26.x builds them. If a
# bump needs go1.27, export GOTOOLCHAIN=go1.27.3 wherever this script runs (tools/README.md).
GO_FLOOR=1.26.0

here="$(cd "$(dirname "$0")" && pwd)"
assets="$here/kube-assets"
tools="${SHOAL_TOOLS:-/var/tmp/shoal-tools}"
bin="$tools/bin"
resolve_all=0
selected=()
for arg in "$@"; do
    case "$arg" in
        --resolve) resolve_all=1 ;;
        helm | etcd | kube-apiserver) selected+=("$arg") ;;
        *) echo "usage: $0 [--resolve] [helm|etcd|kube-apiserver ...]   (into \$SHOAL_TOOLS/bin, now $tools/bin)" >&2
           exit 2 ;;
    esac
done
[ ${#selected[@]} -gt 0 ] || selected=(helm etcd kube-apiserver)
wanted() { [[ " ${selected[*]} " == *" $1 "* ]]; }
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

die() { echo "build-go-tools: $*" >&2; exit 1; }
command -v go >/dev/null || die "no go on PATH: the tools are built with Go (see tools/README.md)"

# Prints the version the binary reports, or nothing when it is absent or does not run (never
# fails: under errexit and pipefail a failing probe would end the script).
installed_version() {
    [ -x "$bin/$1" ] || return 0
    case "$1" in
        helm) "$bin/helm" version --template '{{.Version}}' 2>/dev/null ;;
        etcd) "$bin/etcd" --version 2>/dev/null | sed -n 's/^etcd Version: /v/p' ;;
        kube-apiserver) "$bin/kube-apiserver" --version 2>/dev/null | sed -n 's/^Kubernetes //p' ;;
    esac || true
}

# Regenerates one pinned module directory: go.mod + go.sum with a `tool` line for the package.
new_module() {
    local dir="$1" name="$2"
    echo "== resolving $name into tools/kube-assets/$name (commit its go.mod and go.sum)"
    mkdir -p "$dir"
    rm -f "$dir/go.mod" "$dir/go.sum"
    (cd "$dir" && go mod init "shoal.local/kubeassets/$name" 2>/dev/null && go mod edit -go="$GO_FLOOR")
}

resolve_etcd() {
    local dir="$assets/etcd"
    if [ "$resolve_all" = 0 ] && [ -s "$dir/go.sum" ] &&
        grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION\b" "$dir/go.mod" 2>/dev/null; then
        return
    fi
    new_module "$dir" etcd
    (cd "$dir" && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
}

resolve_kube_apiserver() {
    local dir="$assets/kube-apiserver" gomod staging m
    if [ "$resolve_all" = 0 ] && [ -s "$dir/go.sum" ] &&
        grep -q "k8s.io/kubernetes $KUBE_VERSION\b" "$dir/go.mod" 2>/dev/null; then
        return
    fi
    new_module "$dir" kube-apiserver
    cd "$dir"
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [ -f "$gomod" ] || die "could not download the go.mod of k8s.io/kubernetes@$KUBE_VERSION"
    # Both forms: inside a replace ( ... ) block and a one-line `replace X => ./staging/...`.
    staging=$(sed -E -n 's#^[[:space:]]*(replace[[:space:]]+)?(k8s\.io/[^[:space:]]+)[[:space:]]+=>[[:space:]]+\./staging/.*#\2#p' "$gomod" | sort -u)
    [ -n "$staging" ] || die "no ./staging replace lines in $gomod: the recipe needs updating"
    for m in $staging; do
        go mod edit -replace "$m=$m@$KUBE_STAGING_VERSION"
    done
    echo "   $(echo "$staging" | wc -l) staging replaces generated from k8s.io/kubernetes@$KUBE_VERSION's go.mod"
    # Never -u: it would pull a k8s.io/kube-openapi newer than kubernetes asks for.
    go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION"
    cd - >/dev/null
}

# The version stamps kubernetes' own build (hack/lib/version.sh) sets; without them /version
# reports v0.0.0-master.
kube_ldflags() {
    local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
    local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    local p f=""
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f="$f -X $p.gitVersion=$KUBE_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
        f="$f -X $p.gitTreeState=clean -X $p.buildDate=$date"
    done
    echo "-s -w$f"
}

# build NAME COMMAND...: runs the build into $bin/NAME.partial, then renames it, so an
# interrupted build never leaves a binary that looks installed.
build() {
    local name="$1" want="$2" t0 have; shift 2
    have=$(installed_version "$name")
    if [ "$have" = "$want" ]; then
        echo "$name $want present in $bin"
        return
    fi
    if [ -n "$have" ]; then echo "$name in $bin reports $have, pinned $want: rebuilding"; fi
    t0=$(date +%s)
    "$@"
    mv -f "$bin/$name.partial" "$bin/$name"
    have=$(installed_version "$name")
    [ "$have" = "$want" ] || die "built $name reports '$have', expected $want"
    echo "built $name $want in $(($(date +%s) - t0)) s"
}

build_helm() {
    # helm's Makefile: -trimpath, -s -w and the version stamp; go install keeps helm's own go.sum.
    GOBIN="$bin/.helm-install" go install -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
        "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
    mv -f "$bin/.helm-install/helm" "$bin/helm.partial"
    rmdir "$bin/.helm-install"
}

build_etcd() {
    (cd "$assets/etcd" && go build -mod=readonly -trimpath -ldflags "-s -w" \
        -o "$bin/etcd.partial" go.etcd.io/etcd/server/v3)
}

build_kube_apiserver() {
    (cd "$assets/kube-apiserver" && go build -mod=readonly -trimpath -ldflags "$(kube_ldflags)" \
        -o "$bin/kube-apiserver.partial" k8s.io/kubernetes/cmd/kube-apiserver)
}

if wanted helm; then build helm "$HELM_VERSION" build_helm; fi
if wanted etcd; then resolve_etcd; build etcd "$ETCD_VERSION" build_etcd; fi
if wanted kube-apiserver; then resolve_kube_apiserver; build kube-apiserver "$KUBE_VERSION" build_kube_apiserver; fi
