#!/usr/bin/env bash
# CI check: the committed ebpf/bpf/shoal.bpf.o is what build-bpf.sh makes from the sources.
#
# Without clang it prints "skipped: no clang" and succeeds (the committed object is then what
# gets embedded). The committed object was built with the clang named in bpf/CLANG_VERSION; a
# different clang emits different (equally valid) bytes, so that case is reported as skipped too,
# naming both versions, rather than failing on a toolchain difference.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CLANG="${CLANG:-clang}"

if ! command -v "$CLANG" >/dev/null 2>&1 || ! command -v "${LLVM_STRIP:-llvm-strip}" >/dev/null 2>&1; then
	echo "ebpf object freshness: skipped: no clang"
	exit 0
fi
have="$("$CLANG" --version | head -n1)"
want="$(cat "$here/bpf/CLANG_VERSION")"
if [ "$have" != "$want" ]; then
	echo "ebpf object freshness: skipped: clang is '$have', the object was built with '$want'"
	exit 0
fi

tmp="$(mktemp "${TMPDIR:-/tmp}/shoal-fresh.XXXXXX.o")"
trap 'rm -f "$tmp"' EXIT
"$here/build-bpf.sh" "$tmp" >/dev/null
if cmp "$tmp" "$here/bpf/shoal.bpf.o"; then
	echo "ebpf object freshness: ok (ebpf/bpf/shoal.bpf.o matches its sources)"
else
	echo "ebpf object freshness: FAILED: ebpf/bpf/shoal.bpf.o is stale; run ebpf/build-bpf.sh and commit it" >&2
	exit 1
fi
