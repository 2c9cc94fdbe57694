#!/usr/bin/env bash
# The Python SDK's tests, as CI runs them: a venv (reused when present), the package with its test
# and torch extras, and pytest against a real nats-server (on PATH) and the `shoal` binary of this
# workspace (SHOAL_BIN, built here when unset). Run from anywhere: bash clients/python/ci.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SHOAL_PYENV:-/var/tmp/shoal-pyenv}"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating the venv $venv"
    python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
echo "== installing shoal-fl[test,torch] into $venv"
start=$(date +%s)
# torch from PyPI brings its CUDA libraries (about 5 GB installed; about a minute here the first
# time, seconds once the venv exists). Without it the numpy example and adapter still run, and
# the PyTorch tests are reported as skipped.
if ! "${pip[@]}" "$here[test,torch]"; then
    echo "!! installing torch failed: the PyTorch example and adapter tests will be skipped"
    "${pip[@]}" "$here[test]"
fi
echo "installed in $(( $(date +%s) - start )) s"

if [ -z "${SHOAL_BIN:-}" ]; then
    target="${CARGO_TARGET_DIR:-$repo/target}"
    (cd "$repo" && cargo build -q -p shoal-cli --locked)
    export SHOAL_BIN="$target/debug/shoal"
fi
echo "== pytest (SHOAL_BIN=$SHOAL_BIN, nats-server $(nats-server --version 2>/dev/null || echo missing))"
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
