#!/usr/bin/env bash
# The one-way dependency rules of DESIGN.md §3, checked with `cargo tree` (normal dependencies,
# the whole graph below each crate). Prints each rule and fails on the first broken one.
set -euo pipefail
cd "$(dirname "$0")/.."

# crate  forbidden dependency (exact package names)
rules=(
    "shoal-proto shoal-functions shoal-client shoal-runtime shoal-cli shoal-natsd shoal-ebpf shoal-operator tokio async-nats"
    "shoal-functions tokio async-nats shoal-client shoal-runtime actix"
    "shoal-client shoal-runtime actix memmap2"
    "shoal-operator shoal-runtime actix memmap2"
)
status=0
for rule in "${rules[@]}"; do
    read -r krate forbidden <<<"$rule"
    deps=$(cargo tree --locked -p "$krate" -e normal --prefix none --format '{p}' 2>/dev/null | awk '{print $1}' | sort -u)
    if [ -z "$deps" ]; then
        echo "check-deps: cargo tree -p $krate printed nothing" >&2
        exit 1
    fi
    for f in $forbidden; do
        if grep -qx "$f" <<<"$deps"; then
            echo "FORBIDDEN: $krate depends on $f:"
            cargo tree --locked -p "$krate" -e normal -i "$f" | head -20
            status=1
        fi
    done
    [ "$status" -eq 0 ] && echo "ok: $krate has none of: $forbidden"
done
exit "$status"
