#!/usr/bin/env bash
# Issue 20's GPU table, ready for a machine with a CUDA GPU (never in CI): peftkit against HF PEFT and the
# frozen floor on the GPU, training step times side by side (saved activations are the CPU table's: autograd
# keeps the same tensors on either device), two shapes, fp32 and bf16 bases.
#
#   OUT=dir bash scripts/gpu_checks.sh          # on that machine, in the repository root; ~5-8 min on one H200
#
# It uses the machine's own python3 (torch with CUDA, transformers). HF PEFT must be the pinned 0.21.2 and QLoRA
# needs torchao: where the machine has neither (nothing can be installed from the network there), carry their
# wheels (python3 -m pip download --no-deps --only-binary=:all: peft==0.21.2 torchao==0.18.0 -d .whl) and this
# script installs them into a temporary folder first. Writes $OUT/compare_cuda_<shape>_<dtype>.json (default
# benchmarks/results/gpu) and prints each table: the goals of issue 20 read off its "step ×floor" and
# "step ×pk LoRA" columns.
set -euo pipefail
PY=${PYTHON:-python3}  # the machine's python with CUDA torch
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peftkit_site .whl/*.whl
  export PYTHONPATH=/tmp/peftkit_site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need one')"
"$PY" -c "import peft, sys; sys.exit(0 if peft.__version__ == '0.21.2' else f'HF PEFT {peft.__version__}: carry the 0.21.2 wheel (see the header)')"
"$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| peft', peft.__version__)"
cases=lora,lora_p05,dora,vera,ia3
if "$PY" -c "import torchao" 2>/dev/null; then cases=$cases,qlora; else echo "torchao missing: no QLoRA row"; fi
for shape in narrow512 wide1024; do
  # batch 8 x 256 tokens; one process per case (peftkit, HF PEFT, the floor and peftkit's LoRA stepping in
  # turn): 20 timed turns after 3 warm-ups
  for dtype in fp32 bf16; do
    "$PY" benchmarks/compare_hf_peft.py --device cuda --jobs train --measure time --cases "$cases" \
      --shape "$shape" --dtype "$dtype" --batch 8 --rounds 1 --warmup 3 --steps 20 \
      --out "$OUT/compare_cuda_${shape}_${dtype}.json"
  done
done
