#!/usr/bin/env bash
# The real loaders on fp8forge's output: transformers' FineGrainedFP8Config and compressed-tensors'
# own decompression, on a checkpoint of each architecture made by transformers (tools/loader_check.py).
#
#   tools/loader_check.sh [FP8FORGE_BIN]      # default target/debug/fp8forge (built by cargo test)
#
# The Python environment (tools/loader_requirements.txt) lives in
# ${XDG_CACHE_HOME:-~/.cache}/fp8forge/loader-venv (FP8FORGE_LOADER_VENV overrides) and is installed
# there on first use or when the requirements change; a failed install is an error, never a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/fp8forge}
VENV=${FP8FORGE_LOADER_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fp8forge/loader-venv}
REQ=tools/loader_requirements.txt
STAMP="$VENV/fp8forge-requirements.txt"
fail() { echo "loader_check.sh: $*" >&2; exit 1; }

[ -x "$BIN" ] || fail "no fp8forge binary at $BIN (build it: cargo build -p fp8forge-cli)"
command -v python3 >/dev/null || fail "python3 not found: the loader check needs it to install torch and transformers"

if ! cmp -s "$REQ" "$STAMP" 2>/dev/null; then
    echo "loader_check.sh: installing $REQ into $VENV (a few minutes, about 5 GB)" >&2
    start=$SECONDS
    rm -rf "$VENV"
    python3 -m venv "$VENV" || fail "python3 -m venv $VENV failed"
    "$VENV/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check -r "$REQ" >&2 \
        || fail "pip install -r $REQ into $VENV failed (PyPI unreachable?): the loader check cannot run"
    "$VENV/bin/python" -c "import torch, transformers, compressed_tensors, safetensors, accelerate" \
        || fail "the installed environment in $VENV does not import"
    cp "$REQ" "$STAMP"
    echo "loader_check.sh: installed in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)" >&2
fi

exec "$VENV/bin/python" tools/loader_check.py --fp8forge "$BIN"
