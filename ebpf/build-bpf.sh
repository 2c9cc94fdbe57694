#!/usr/bin/env bash
# Rebuilds the eBPF object from bpf/shoal.bpf.c, deterministically: same clang, same bytes.
#
#   ebpf/build-bpf.sh [OUT]     (default: ebpf/bpf/shoal.bpf.o, the committed object)
#
# Needs clang and llvm-strip (Debian: clang, llvm) and libbpf's headers (libbpf-dev) for
# bpf_helpers.h. The object keeps .BTF and .BTF.ext (aya needs the BTF map definitions; the
# line info makes verifier logs readable) and loses DWARF. Paths in BTF are relative: we compile
# from bpf/ with -fdebug-compilation-dir=., so the checkout's location does not leak in.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/bpf/shoal.bpf.o}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

CLANG="${CLANG:-clang}"
STRIP="${LLVM_STRIP:-llvm-strip}"

tmp="$(mktemp "${TMPDIR:-/tmp}/shoal.bpf.XXXXXX.o")"
trap 'rm -f "$tmp"' EXIT

cd "$here/bpf"
"$CLANG" -g -O2 -target bpf -Wall -Werror \
	-fdebug-compilation-dir=. -fno-ident \
	-I. -c shoal.bpf.c -o "$tmp"
"$STRIP" --strip-debug "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "built $out ($("$CLANG" --version | head -n1))"
