#!/usr/bin/env bash
# Build (idempotent) the AdapterHub reference environment .venv-adapterhub used by tests/test_adapterhub.py.
# `adapters` 1.3.0 pins transformers ~=4.57.6, which the main .venv (transformers 5.x) cannot hold, so the
# reference lives in its own venv; peftkit is installed into it too, since it must work with 4.57 as well.
# Run again at any time: an already built venv is left as it is (delete .venv-adapterhub to rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-adapterhub
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import adapters, peftkit, pytest" 2>/dev/null; then
    echo "$VENV already built"; exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0            # first: the CPU build, so nothing below pulls in another torch
"${PIP[@]}" adapters==1.3.0          # pulls transformers ~=4.57.6
"${PIP[@]}" --no-deps -e .           # peftkit itself; its core deps (torch, safetensors) are already there
"${PIP[@]}" pytest
"$VENV/bin/python" -c "import adapters, transformers, peftkit; print('adapters', adapters.__version__, 'transformers', transformers.__version__)"
