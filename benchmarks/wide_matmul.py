"""Half-precision bases on a CPU without bf16/fp16 units: peftkit's widened base matmuls against the dtype's own.

On an x86 CPU without AVX512-BF16 / AMX (bf16) or AMX-FP16 (fp16), peftkit's fused LoRA and DoRA functions multiply
the base weight as fp32 products rounded back (``lora_kernels.wide_matmul_dtype``). This script shows why and what
it changes, in one process, one torch thread:

* ``matmul``: the three ways to form one base product in bf16 / fp16 (g W with W contiguous, as backward does;
  x Wᵀ, as forward does; the fp32 product of the same values, cast and rounded back), median of ``--reps``;
* ``layer``: one LoRA target (r 16, fp32 adapters, 256 tokens, forward + backward) on a bf16 base, dense and NF4,
  widened and not, alternating for ``--rounds`` rounds; the median time of each, and how far the two differ (the
  order of the fp32 sums: the last bit of a few outputs, which the fp32 gradient of A then carries everywhere).

    PYTHONPATH=src python benchmarks/wide_matmul.py [--rounds 8]    # writes benchmarks/results/wide_matmul.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rows(tokens: int, d_in: int, d_out: int, reps: int) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.randn(tokens, d_out, dtype=dtype)
        w = torch.randn(d_out, d_in, dtype=dtype)
        x = torch.randn(tokens, d_in, dtype=dtype)
        cases = {"g W (W contiguous)": lambda g=g, w=w: g @ w, "x W^T": lambda x=x, w=w: x @ w.T,
                 "fp32 product, cast and rounded back": lambda g=g, w=w, dt=dtype: (g.float() @ w.float()).to(dt)}
        for name, fn in cases.items():
            rows.append({"dtype": str(dtype).split(".")[-1], "case": name, "ms": 1e3 * timed(fn, reps)})
    return rows


def layer_rows(tokens: int, d_in: int, d_out: int, rounds: int) -> list[dict]:
    import peftkit
    from peftkit.methods import lora_kernels

    rows = []
    for base in ("dense", "nf4"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(d_in, d_out, bias=False), nn.Linear(d_out, 8, bias=False))
        if base == "nf4":
            peftkit.quantize_base(model, "nf4", skip=["1"], compute_dtype=torch.bfloat16)
        else:
            model.to(torch.bfloat16)
        pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=16, lora_alpha=32, target_modules=["0"],
                                                              init_lora_weights=False))
        x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)

        def run(wide: bool, pm=pm, x=x) -> tuple[torch.Tensor, ...]:
            with lora_kernels.use_wide_matmul(wide):
                x.grad = None
                pm.zero_grad(set_to_none=True)
                out = pm(x)
                out.float().square().sum().backward()
            A = pm.base_model.model[0].lora_A["default"].weight
            return out.detach(), x.grad, A.grad

        pairs = list(zip(run(True), run(False), strict=True))  # output, x's gradient, A's gradient
        differing = [int((a != b).sum()) / a.numel() for a, b in pairs]
        rel = [float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in pairs]
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(rounds):
            for wide in ((True, False) if i % 2 else (False, True)):
                t0 = time.perf_counter()
                run(wide)
                times[wide].append(time.perf_counter() - t0)
        rows.append({"base": base, "widened_ms": 1e3 * statistics.median(times[True]),
                     "bf16_ms": 1e3 * statistics.median(times[False]), "elements_differing": dict(zip(("output", "x_grad", "A_grad"), differing, strict=True)),
                     "max_diff_over_max": dict(zip(("output", "x_grad", "A_grad"), rel, strict=True)),
                     "widened_here": lora_kernels.wide_matmul_dtype(torch.bfloat16, torch.device("cpu")) is not None})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "wide_matmul.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    matmuls = matmul_rows(args.tokens, args.d_in, args.d_out, args.reps)
    layers = layer_rows(args.tokens, args.d_in, args.d_out, args.rounds)
    print(f"one base product, {args.tokens} tokens, {args.d_in} x {args.d_out}, one thread "
          f"(cpu capability {torch.backends.cpu.get_cpu_capability()})")
    for r in matmuls:
        print(f"  {r['dtype']:9s} {r['case']:38s} {r['ms']:8.1f} ms")
    print("one LoRA target (r 16, fp32 adapters) on a bf16 base, forward + backward")
    for r in layers:
        print(f"  {r['base']:6s} widened {r['widened_ms']:7.1f} ms   bf16 {r['bf16_ms']:7.1f} ms   "
              f"x {r['bf16_ms'] / r['widened_ms']:.1f}   differing: output "
              f"{100 * r['elements_differing']['output']:.3f} % of elements, max |diff| / max |value| output "
              f"{r['max_diff_over_max']['output']:.1e}, x grad {r['max_diff_over_max']['x_grad']:.1e}, A grad "
              f"{r['max_diff_over_max']['A_grad']:.1e}   "
              f"(widened by default here: {r['widened_here']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "matmul": matmuls,
                                    "layer": layers, "torch": torch.__version__,
                                    "cpu": torch.backends.cpu.get_cpu_capability()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
