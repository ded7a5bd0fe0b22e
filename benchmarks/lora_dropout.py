"""Where LoRA's dropout costs time on a narrow Llama-style model, and what the fused path's changes bought.

Three parts, one process, ``--threads`` torch threads:

* ``steps``: the floor (the frozen model with input gradients and no adapter), LoRA at dropout 0 and 0.05 with
  the LoRA kernels of ``--baseline`` (a git revision: its ``methods/lora_kernels.py``, and ``lora_joint.py`` where
  it has one, are loaded beside the current ones and swapped in for that row's steps) and with the current ones. The rows step in
  turn, the order rotating each turn, ``--turns`` turns after one warm-up each; ratios to the floor
  are taken per turn, medians reported (a busy machine slows neighbouring steps alike).
* ``profile``: self CPU time by ATen op over one step at 0.05 and one at 0 (torch.profiler), so the ops the
  dropout adds — the random draw, the mask compare, the masked multiplies — show with their share of the step.
* ``ops``: the mask's operations alone on the model's input shapes (tokens × hidden, tokens × intermediate),
  median of repeats, in ms and ns per element.
* ``layers``: each sibling group of a block alone (q/k/v, o, gate/up, down; forward + backward) as frozen Linears
  and as peftkit's LoRA layers at p 0 and 0.05 (and through ``--baseline``'s kernels), round-robin: what LoRA
  adds to the matmuls it rides on, and the step ratio that implies.

    PYTHONPATH=src python benchmarks/lora_dropout.py                    # hidden 512, 8 layers, batch 8 × 256
    PYTHONPATH=src python benchmarks/lora_dropout.py --parts ops,profile --layers 2
    PYTHONPATH=src python benchmarks/lora_dropout.py --parts layers,steps --baseline HEAD~1 --repeat 30 --turns 6

Writes benchmarks/results/lora_dropout.json (``--out``) and prints the tables benchmarks/RESULTS.md shows.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare_hf_peft as bench  # noqa: I001  (the shared model, cases and step of the side-by-side benchmark)

from peftkit.methods import lora as lora_module
from peftkit.methods import lora_joint, lora_kernels


def baseline_kernels(revision: str) -> types.ModuleType:
    """``methods/lora_kernels.py`` as it was at ``revision``, loaded as a sibling module of the current one."""
    source = subprocess.run(["git", "show", f"{revision}:src/peftkit/methods/lora_kernels.py"], cwd=HERE.parent,
                            capture_output=True, text=True, check=True).stdout
    name = "peftkit.methods._lora_kernels_baseline"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "peftkit.methods"
    exec(compile(source, f"{revision}:lora_kernels.py", "exec"), module.__dict__)  # noqa: S102
    return module


def baseline_joint(revision: str, kernels: types.ModuleType) -> types.ModuleType | None:
    """``methods/lora_joint.py`` as it was at ``revision``, importing ``kernels`` (that revision's lora_kernels)
    instead of the current ones; None where the revision has no lora_joint.py (before session 10)."""
    found = subprocess.run(["git", "show", f"{revision}:src/peftkit/methods/lora_joint.py"], cwd=HERE.parent,
                           capture_output=True, text=True)
    if found.returncode != 0:
        return None
    sys.modules[kernels.__name__] = kernels
    source = found.stdout.replace("from .lora_kernels import", f"from {kernels.__name__} import")
    name = "peftkit.methods._lora_joint_baseline"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__package__ = "peftkit.methods"
    exec(compile(source, f"{revision}:lora_joint.py", "exec"), module.__dict__)  # noqa: S102
    return module


def with_forward(step: Callable[[], float], forward: Callable[..., Any],
                 joined: Callable[..., Any] | None = None) -> Callable[[], float]:
    """``step`` with LoraLinear's fused forward swapped for ``forward`` (and its sibling groups' for ``joined``)
    while it runs (backward follows the graph)."""
    def run() -> float:
        before, joined_before = lora_module.lora_linear_forward, lora_module.joined_forward
        lora_module.lora_linear_forward = forward
        lora_module.joined_forward = joined or joined_before
        try:
            return step()
        finally:
            lora_module.lora_linear_forward, lora_module.joined_forward = before, joined_before
    return run


def baseline_step(args: argparse.Namespace, case: str, kernels: types.ModuleType,
                  joint: types.ModuleType | None) -> Callable[[], float]:
    """A LoRA step of ``case`` through ``--baseline``'s kernels: its lora_joint where it has one, else each target
    in its own node (as it ran then)."""
    step = bench.train_setup("peftkit", case, args)[1]
    if joint is None:
        return separate(with_forward(step, kernels.lora_linear_forward))
    return with_forward(step, kernels.lora_linear_forward, joint.joined_forward)


def separate(step: Callable[[], Any]) -> Callable[[], Any]:
    """``step`` with sibling targets computed each in its own node (``lora_joint.use_joint(False)``)."""
    def run() -> Any:
        with lora_joint.use_joint(False):
            return step()
    return run


def part_steps(args: argparse.Namespace) -> dict[str, Any]:
    rows: dict[str, Callable[[], float]] = {
        "floor": bench.train_setup("floor", "-", args)[1],
        "lora_p0": bench.train_setup("peftkit", "lora", args)[1],
    }
    if args.baseline:  # ``--baseline ""``: no row of earlier kernels
        kernels = baseline_kernels(args.baseline)
        joint = baseline_joint(args.baseline, kernels)
        rows[f"lora_p0_{args.baseline}"] = baseline_step(args, "lora", kernels, joint)
        rows[f"{args.dropped}_{args.baseline}"] = baseline_step(args, args.dropped, kernels, joint)
    rows[args.dropped] = bench.train_setup("peftkit", args.dropped, args)[1]
    if args.separate:  # sibling targets each in its own node, as before lora_joint
        rows["lora_p0_separate"] = separate(bench.train_setup("peftkit", "lora", args)[1])
        rows[f"{args.dropped}_separate"] = separate(bench.train_setup("peftkit", args.dropped, args)[1])
    if args.rows:  # a subset, e.g. the two p 0.05 rows for a long A/B of kernels
        rows = {k: v for k, v in rows.items() if k in args.rows.split(",")}
    times = round_robin(rows, args.turns, rotate=True, progress=True)
    # ratios to the floor and to LoRA p 0 where they ran, else to the first row (an A/B of two kernels)
    refs = [r for r in ("floor", "lora_p0") if r in times] or [next(iter(times))]
    return {"step_s": {k: statistics.median(v) for k, v in times.items()}, "step_times_s": times,
            **{f"vs_{r}": median_ratios(times, r) for r in refs}}


def round_robin(rows: dict[str, Callable[[], Any]], turns: int, rotate: bool, progress: bool = False) -> dict[str, list[float]]:
    """Each row's wall times over ``turns`` turns after one warm-up each, the rows stepping in turn (a busy machine
    slows neighbours alike); with ``rotate`` the order rotates each turn, so that no row always runs after the
    same neighbour or in the same place."""
    for step in rows.values():
        step()
    times: dict[str, list[float]] = {k: [] for k in rows}
    names = list(rows)
    for turn in range(turns):
        shift = turn % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - t0)
        if progress:
            print(f"turn {turn + 1}/{turns}: " + ", ".join(f"{k} {1000 * v[-1]:.0f} ms" for k, v in times.items()),
                  flush=True)
    return times


def median_ratios(times: dict[str, list[float]], to: str) -> dict[str, float]:
    """Per row, the median over turns of its time ÷ row ``to``'s in the same turn."""
    return {k: statistics.median(a / b for a, b in zip(v, times[to], strict=True)) for k, v in times.items()}


def part_profile(args: argparse.Namespace) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for case in ("lora_p05", "lora"):
        step = bench.train_setup("peftkit", case, args)[1]
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
        ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
        total = sum(ops.values())
        top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:args.top])
        out[case] = {"wall_s": wall, "self_total_s": total, "top_self_s": top, "all_self_s": ops}
    return out


def part_ops(args: argparse.Namespace) -> dict[str, Any]:
    """The mask's operations on (tokens, width) fp32 inputs, for the model's two input widths."""
    tokens = args.batch * args.seq
    return {f"{tokens}x{width}": mask_ops(torch.Size((tokens, width)), args.repeat)
            for width in (args.hidden, args.intermediate)}


def mask_ops(shape: torch.Size, repeat: int, p: float = 0.05, seed: int = 1234) -> dict[str, dict[str, float]]:
    """Before (bool mask; x ⊙ keep / (1 − p) in two passes; per target a bool multiply and an add) and now (1/(1 − p)
    in the scalar; a 0/1 float mask in backward; per target the term masked in place, g W accumulated into it by
    the matmul; sessions 5-7 added the term into g W with an addcmul_), each op's median time."""
    scale = 1.0 / lora_kernels.keep_probability(p)
    x, lora, base = (torch.randn(shape) for _ in range(3))
    keep = lora_kernels.dropout_keep(shape, p, seed, x.device)
    keep_f, drop = keep.to(x.dtype), ~keep
    words = (shape.numel() + 3) // 4
    lanes = torch.randint(-(2**63), 2**63 - 1, (words,)).view(torch.int16)[:shape.numel()].view(shape)
    threshold, keep_out = -(2**15) + round(p * 2**16), torch.empty(shape)
    ops: dict[str, Callable[[], Any]] = {
        "randint (16-bit lanes, 4 per draw)": lambda: torch.randint(
            -(2**63), 2**63 - 1, (words,), generator=torch.Generator().manual_seed(seed)),
        "dropout_keep (randint + compare)": lambda: lora_kernels.dropout_keep(shape, p, seed, x.device),
        "compare alone (16-bit lanes to a bool mask)": lambda: lanes >= threshold,
        "compare straight into a 0/1 float mask (ge, out=)": lambda: torch.ge(lanes, threshold, out=keep_out),
        "bool mask to 0/1 float": lambda: keep.to(x.dtype),
        "x ⊙ keep (bool mask)": lambda: x.mul(keep),
        "x ⊙ keep (0/1 float mask)": lambda: x.mul(keep_f),
        "x ⊙ keep (where)": lambda: torch.where(keep, x, 0.0),
        "x ⊙ keep (masked_fill of the drop mask)": lambda: x.masked_fill(drop, 0.0),
        "x ⊙ keep / (1 − p) (before: two passes)": lambda: x.mul(keep).mul_(scale),
        "per target before: base += (lora ⊙ keep) / (1 − p)": lambda: base.add_(lora.mul_(keep), alpha=scale),
        "per target, sessions 5-7: base.addcmul_(lora, keep) (float mask)": lambda: base.addcmul_(lora, keep_f),
        "per target now: lora.mul_(keep) (the g W matmul then accumulates into it)": lambda: lora.mul_(keep_f),
        "per target, bool: base += lora ⊙ keep (no 1/(1 − p))": lambda: base.add_(lora.mul_(keep)),
        "one plain elementwise pass: x.mul(2.0)": lambda: x.mul(2.0),
    }
    row = {}
    for name, fn in ops.items():
        try:
            fn()
        except RuntimeError as exc:  # an op this torch does not offer (e.g. a dtype combination)
            row[name] = {"error": str(exc).splitlines()[0][:120]}
            continue
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        row[name] = {"ms": 1000 * med, "ns_per_element": 1e9 * med / shape.numel()}
    return row


def part_layers(args: argparse.Namespace) -> dict[str, Any]:
    """Each sibling group of a block alone (q/k/v on one input, o, gate/up on one input, down), forward + backward
    with input gradients, on the model's shapes: frozen Linears (the floor), peftkit's LoRA layers at p 0 and at
    p 0.05, stepped round-robin ``--repeat`` rounds, medians of the per-round ratios. What LoRA and its dropout
    add to the very matmuls they ride on, without the rest of the model; summed over the groups (× layers) and
    divided by the floor's measured step (median of ``--turns``), the step ratios those layers imply."""
    import torch.nn as nn

    from peftkit import LoraConfig
    from peftkit.methods.lora import LoraLinear

    tokens, h, inter = args.batch * args.seq, args.hidden, args.intermediate
    baseline = baseline_kernels(args.baseline) if args.baseline else None
    groups = {"q/k/v": (h, [h, h, h]), "o": (h, [h]), "gate/up": (h, [inter, inter]), "down": (inter, [h])}
    torch.manual_seed(args.seed)

    def build(d_in: int, outs: list[int], p: float | None) -> Callable[[], None]:
        layers = []
        for d_out in outs:
            linear = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
            if p is None:
                layers.append(linear)
                continue
            layer = LoraLinear(linear)
            layer.update_layer("default", LoraConfig(r=bench.RANK, lora_alpha=bench.ALPHA, lora_dropout=p,
                                                     init_lora_weights=False), "m")
            layer.set_adapter(["default"])
            layers.append(layer.train())
        if p is not None and len(outs) > 1:  # siblings under their model names, grouped as get_peft_model groups them
            block = nn.Module()
            for child, layer in zip(("q_proj", "k_proj", "v_proj") if len(outs) == 3 else ("gate_proj", "up_proj"),
                                    layers, strict=True):
                block.add_module(child, layer)
            lora_joint.link_siblings(block)
        x = torch.randn(tokens, d_in, requires_grad=True)
        grads = [torch.randn(tokens, d_out) for d_out in outs]

        def step() -> None:
            torch.autograd.backward([layer(x) for layer in layers], grads)
            x.grad = None
            for layer in layers:
                for param in layer.parameters():
                    param.grad = None
        return step

    out: dict[str, Any] = {}
    for name, (d_in, outs) in groups.items():
        rows = {"floor": build(d_in, outs, None), "lora_p0": build(d_in, outs, 0.0), "lora_p05": build(d_in, outs, 0.05)}
        if len(outs) > 1 and args.separate:  # the same layers, each target in its own node (lora_joint off)
            rows["lora_p0_separate"] = separate(build(d_in, outs, 0.0))
            rows["lora_p05_separate"] = separate(build(d_in, outs, 0.05))
        if baseline is not None:  # the same layers through ``--baseline``'s kernels
            # (each target in its own node here, whether or not that revision had lora_joint; steps use it)
            rows[f"lora_p0_{args.baseline}"] = separate(with_forward(build(d_in, outs, 0.0), baseline.lora_linear_forward))
            rows[f"lora_p05_{args.baseline}"] = separate(with_forward(build(d_in, outs, 0.05), baseline.lora_linear_forward))
        times = round_robin(rows, args.repeat, rotate=False)
        out[name] = {"ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
                     "vs_floor": median_ratios(times, "floor")}
    floor_step = bench.train_setup("floor", "-", args)[1]
    floor_step()
    steps = bench.timed(floor_step, args.turns)
    floor_ms = 1000 * statistics.median(steps)
    extra = {row: args.layers * sum(g["ms"]["floor"] * (_ratio(g, row) - 1) for g in out.values())
             for row in next(iter(out.values()))["vs_floor"] if row != "floor"}
    linears = args.layers * sum(g["ms"]["floor"] for g in out.values())
    return {"groups": out, "floor_step_ms": floor_ms, "floor_step_times_ms": [1000 * t for t in steps],
            "block_linears_ms": linears, "extra_ms": extra,
            "implied_vs_floor": {row: 1 + v / floor_ms for row, v in extra.items()}}


def _ratio(group: dict[str, Any], row: str) -> float:
    """A group's ratio to the floor for ``row``; a single target has no ``_separate`` row (it is the same)."""
    ratios = group["vs_floor"]
    return ratios[row] if row in ratios else ratios[row.removesuffix("_separate")]


PARTS = {"ops": part_ops, "profile": part_profile, "steps": part_steps, "layers": part_layers}


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"Llama-style hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
             f"{bench.VOCAB}, {args.dtype}; batch {args.batch}×{args.seq}; LoRA r {bench.RANK} all-linear; {args.threads} "
             "thread(s)"]
    if "ops" in results:
        for shape, row in results["ops"].items():
            lines += ["", f"| mask op on {shape} fp32 | ms | ns / element |", "|---|---|---|"]
            lines += [f"| {k} | {v['ms']:.2f} | {v['ns_per_element']:.2f} |" if "ms" in v else
                      f"| {k} | {v['error']} | - |" for k, v in row.items()]
    if "profile" in results:
        p05, p0 = results["profile"]["lora_p05"], results["profile"]["lora"]
        lines += ["", "| op (self CPU, one step under the profiler) | p 0.05 ms | share | p 0 ms |", "|---|---|---|---|"]
        for op, sec in p05["top_self_s"].items():
            lines.append(f"| {op} | {1000 * sec:.0f} | {100 * sec / p05['self_total_s']:.1f} % | "
                         f"{1000 * p0['all_self_s'].get(op, 0.0):.0f} |")
        lines.append(f"| total | {1000 * p05['self_total_s']:.0f} | 100 % | {1000 * p0['self_total_s']:.0f} |")
    if "layers" in results:
        a = results["layers"]
        rows = list(a["implied_vs_floor"])
        lines += ["", f"| sibling group alone, forward + backward ({args.repeat} rounds, round-robin) | floor ms | "
                  + " | ".join(f"{r} × floor" for r in rows) + " |", "|---" * (2 + len(rows)) + "|"]
        lines += [f"| {k} | {g['ms']['floor']:.1f} | " + " | ".join(f"{_ratio(g, r):.3f}" for r in rows) + " |"
                  for k, g in a["groups"].items()]
        lines += [f"| the block linears of {args.layers} layers; the floor's measured step | {a['block_linears_ms']:.0f}; "
                  f"{a['floor_step_ms']:.0f} |" + " - |" * len(rows),
                  f"| implied step (floor step + the groups' extra × {args.layers}) | - | "
                  + " | ".join(f"{a['implied_vs_floor'][r]:.3f}" for r in rows) + " |"]
    if "steps" in results:
        s = results["steps"]
        cols = [c for c in s if c.startswith("vs_")]
        names = {"vs_floor": "× floor", "vs_lora_p0": "× LoRA p 0"}
        lines += ["", f"| row ({args.turns} turns, order rotating) | step ms (median) | "
                  + " | ".join(names.get(c, f"× {c[3:]}") for c in cols) + " |", "|---" * (2 + len(cols)) + "|"]
        lines += [f"| {k} | {1000 * v:.0f} | " + " | ".join(f"{s[c][k]:.3f}" for c in cols) + " |"
                  for k, v in s["step_s"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="ops,profile,steps")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--dropped", default="lora_p05", choices=("lora_p05", "lora_p03"),
                        help="steps: compare_hf_peft's case of the rows with dropout (lora_p03: p 0.3, a dense mask)")
    parser.add_argument("--rows", default="", help="steps: only these rows (comma-separated; default all)")
    parser.add_argument("--repeat", type=int, default=20, help="repeats of each mask op (ops)")
    parser.add_argument("--top", type=int, default=14, help="ops shown in the profile table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the base model's dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--separate", action="store_true",
                        help="layers, steps: also rows with sibling targets in separate nodes (lora_joint off)")
    parser.add_argument("--baseline", default="169930e",
                        help="git revision whose lora_kernels.py is the 'before' row (default: before issue 20's "
                             "dropout work)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lora_dropout.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for part in args.parts.split(","):
        results[part] = PARTS[part](args)
    text = report(results, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"settings": settings, "results": results, "table": text,
                                    "wall_s": time.perf_counter() - t0, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
