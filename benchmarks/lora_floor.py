"""How close LoRA's training step can come to the floor on this machine, and the kernel choices that measured it.

The floor is the same frozen model with input gradients and no adapter. LoRA adds, per target of width
d_in → d_out and rank r, six products per token: x̄ Aᵀ and h Bᵀ (forward), gᵀ h, g B, g_hᵀ x̄ and g_h A
(backward), 3·r·(d_in + d_out) multiply-adds against the frozen target's 2·d_in·d_out (x Wᵀ, g W). Parts:

* ``flops``: those counts over the whole step of a Llama-style shape (block linears, lm_head and causal attention
  in the floor): the ratio no implementation can go below, whatever it fuses.
* ``matmuls``: the step measured (the floor's, median of ``--steps``) and each product timed alone on its own
  shape, in its faster orientation, next to the frozen target's two: LoRA's products add what no reordering or
  fusion of the surrounding passes can remove with BLAS products (each is a skinny matmul, bound by reading its
  tokens × width operand, not by its multiply-adds). 1 + their sum over the model ÷ the floor step is the step
  ratio with every other LoRA cost (dropout, Python, the optimizer) at zero.
* ``bound``: the floor step, the floor step followed by LoRA's products as peftkit runs them (siblings joined,
  every output preallocated: ``joint_products``), the same with dropout 0.05's passes (the gaps' draw, x̄'s copy,
  the drops' writes both ways), and peftkit's whole LoRA step at dropout 0 and 0.05, in rotating turns: how far
  the step is from "floor + LoRA's matmuls (and dropout's passes), everything else free", measured in the same
  turns rather than counted (not in the default parts: ``--parts bound``).
* ``optimizer``: one AdamW step over LoRA's trainable tensors, torch's default (on CPU a Python loop), foreach
  and fused implementations (not in the default parts: ``--parts optimizer``).
* ``orient``: B's gradient as gᵀ h against (hᵀ g)ᵀ, per d_out (``lora_kernels.outer_grad`` picks by d_out).
* ``order``: the forward's term-first order (``lora_kernels.lora_term_plus_base``: b + s·h Bᵀ written first, x Wᵀ
  accumulated into it by the matmul) against base-first (x Wᵀ + b, then ``addmm_`` of the term), per target shape.
* ``mask``: a sibling group's dropout work per element of its input, forward and backward: the drops' gaps
  (``lora_kernels.drop_gaps``; x̄ a copy with those elements zeroed; the gradient term zeroed there in place), the
  dense mask (``lora_kernels.dense_keep``, used from p = 1/8: 16-bit lanes, kept as bits packed in torch) and
  session 12's dense mask (16-bit lanes, kept as bits packed by numpy), at each p of ``--mask-p`` (default 0.05,
  0.1).

Pairs run alternately, ``--rounds`` rounds, medians of per-round ratios (a busy machine slows both sides alike).

    PYTHONPATH=src python benchmarks/lora_floor.py --shape narrow256            # batch 4 × 256, 1 thread
    PYTHONPATH=src python benchmarks/lora_floor.py --shape narrow512 --parts flops,matmuls
    PYTHONPATH=src python benchmarks/lora_floor.py --shape narrow256 --parts bound --turns 30
    PYTHONPATH=src python benchmarks/lora_floor.py --shape narrow256 --parts optimizer

Writes benchmarks/results/lora_floor_<shape>.json (``--out``) and prints the tables RESULTS.md shows.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import compare_hf_peft as bench  # noqa: I001  (the shared model, shapes and floor step)
from lora_dropout import median_ratios, round_robin  # the turn-taking timer and its per-turn ratios

from peftkit.methods import lora_kernels

RANK = bench.RANK


def targets(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    """A Llama block's LoRA targets (all-linear): name -> (d_in, d_out); k/v as wide as q (8 kv heads of 8)."""
    return {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
            "gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}


def flops(args: argparse.Namespace) -> dict[str, Any]:
    """Multiply-adds per token of the floor step and of what LoRA adds (forward + backward, input gradients)."""
    h, layers, seq = args.hidden, args.layers, args.seq
    linears = sum(i * o for i, o in targets(h, args.intermediate).values())
    attention = 2 * h * (seq + 1) / 2  # q kᵀ and p v over the causal half of the keys, on average
    forward = layers * (linears + attention) + h * bench.VOCAB  # lm_head
    backward = layers * (linears + 2 * attention) + h * bench.VOCAB  # input gradients only; attention's are 2×
    lora = layers * sum(3 * RANK * (i + o) for i, o in targets(h, args.intermediate).values())
    floor = forward + backward
    return {"floor_macs_per_token": floor, "lora_macs_per_token": lora, "step_ratio_floor": 1 + lora / floor,
            "linears_share_of_floor": 2 * layers * linears / floor}


def alternate(fns: dict[str, Callable[[], Any]], rounds: int, inner: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``rounds`` rounds of ``inner`` calls each, the fns in turn within a round
    (lora_dropout.round_robin over ``inner`` calls at a time)."""
    def repeated(fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(inner):
                fn()
        return run

    times = round_robin({k: repeated(fn) for k, fn in fns.items()}, rounds, rotate=False)
    return {k: [t / inner for t in v] for k, v in times.items()}


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return median_ratios(times, b)[a]


def lora_products(tokens: int, d_in: int, d_out: int) -> dict[str, Callable[[], Any]]:
    """The frozen target's two products and LoRA's six on random operands of the given shape, each in the
    orientation peftkit runs it."""
    x, g = torch.randn(tokens, d_in), torch.randn(tokens, d_out)
    W, A, B = torch.randn(d_out, d_in), torch.randn(RANK, d_in), torch.randn(d_out, RANK)
    h, gh = torch.randn(tokens, RANK), torch.randn(tokens, RANK)
    return {"x Wᵀ": lambda: x @ W.T, "g W": lambda: g @ W,
            "x̄ Aᵀ": lambda: x @ A.T, "h Bᵀ": lambda: h @ B.T, "(hᵀ g)ᵀ": lambda: (h.T @ g).T,
            "g B": lambda: g @ B, "g_hᵀ x̄": lambda: gh.T @ x, "g_h A": lambda: gh @ A}


def matmuls(args: argparse.Namespace, floor_ms: float) -> dict[str, Any]:
    tokens = args.batch * args.seq
    rows, lora_total, frozen_total = {}, 0.0, 0.0
    for name, (d_in, d_out) in targets(args.hidden, args.intermediate).items():
        times = alternate(lora_products(tokens, d_in, d_out), args.rounds, args.inner)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        frozen = med["x Wᵀ"] + med["g W"]
        lora = sum(v for k, v in med.items() if k not in ("x Wᵀ", "g W"))
        share = 3 * RANK * (d_in + d_out) / (2 * d_in * d_out)
        rows[name] = {"d_in": d_in, "d_out": d_out, "frozen_ms": frozen, "lora_ms": lora, "lora_vs_frozen": lora / frozen,
                      "flop_share": share, "products_ms": med}
        lora_total += lora
        frozen_total += frozen
    return {"targets": rows, "floor_step_ms": floor_ms, "frozen_linears_ms": args.layers * frozen_total,
            "lora_products_ms": args.layers * lora_total,
            "step_ratio_floor": 1 + args.layers * lora_total / floor_ms}


SIBLINGS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))  # lora_joint's groups in a Llama block


def joint_products(args: argparse.Namespace, p: float = 0.0) -> Callable[[], None]:
    """LoRA's products over the whole model as peftkit runs them (siblings reading one x share x̄ Aᵀ, g_Hᵀ x̄ and
    g_H A: lora_joint), on random operands with every output preallocated (``out=``): nothing allocated but what
    the ops make themselves, no Python between them but the loop, no optimizer. Its time added to the floor step's
    is what a LoRA step would cost if all of LoRA's other work were free. With ``p`` > 0 also dropout's passes as
    peftkit makes them: per group the mask's gaps drawn (``lora_kernels._gap_drops``), x copied into x̄ and the
    drops zeroed (forward), the drops' positions summed again from the kept gaps and zeroed in the input
    gradient's LoRA term (backward), and for o_proj (which keeps x, not x̄: a view) x̄ made again in backward."""
    tokens, r, shapes = args.batch * args.seq, RANK, targets(args.hidden, args.intermediate)
    calls: list[Callable[[], Any]] = []

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = torch.empty(a.shape[0], b.shape[1])
        calls.append(lambda: torch.mm(a, b, out=out))
        return out

    def dropped(x: torch.Tensor, xbar: torch.Tensor, gaps: list[torch.Tensor]) -> None:  # forward: draw, x̄
        def run() -> None:
            gaps[0] = lora_kernels._gap_drops(x.numel(), p, 1234, x.device)[0].to(torch.uint8)
            xbar.copy_(x).view(-1).index_fill_(0, lora_kernels.drop_positions(gaps[0]), 0)
        calls.append(run)

    def masked(term: torch.Tensor, gaps: list[torch.Tensor], x: torch.Tensor | None, xbar: torch.Tensor) -> None:
        def run() -> None:  # backward: the positions again, x̄ again where x was kept, the term's drops zeroed
            drops = lora_kernels.drop_positions(gaps[0])
            if x is not None:
                xbar.copy_(x).view(-1).index_fill_(0, drops, 0)
            term.view(-1).index_fill_(0, drops, 0)
        calls.append(run)

    for _ in range(args.layers):
        for group in SIBLINGS:
            d_in, n = shapes[group[0]][0], len(group)
            x, A = torch.randn(tokens, d_in), torch.randn(n * r, d_in)
            xbar, gaps = (torch.empty_like(x), [torch.empty(0, dtype=torch.uint8)]) if p > 0 else (x, [])
            if p > 0:
                dropped(x, xbar, gaps)
            mm(xbar, A.T)  # H = x̄ [A₁; …; Aₙ]ᵀ
            gH = torch.randn(tokens, n * r)
            for name in group:
                d_out = shapes[name][1]
                h, B, g = torch.randn(tokens, r), torch.randn(d_out, r), torch.randn(tokens, d_out)
                mm(h, B.T)  # the term s·h Bᵀ
                mm(g, B)  # g_h = s·g B
                if d_out <= lora_kernels.OUTER_TRANSPOSED_UP_TO:  # B's gradient, in outer_grad's orientation
                    mm(h.T, g)
                else:
                    mm(g.T, h)
            mm(gH.T, xbar)  # [g_A₁; …] = g_Hᵀ x̄
            term = mm(gH, A)  # g_H [A₁; …; Aₙ], the input gradient's LoRA term
            if p > 0:
                masked(term, gaps, x if group == ("o",) else None, xbar)

    def run() -> None:
        for call in calls:
            call()

    return run


def bound(args: argparse.Namespace) -> dict[str, Any]:
    """The floor step; the floor step followed by LoRA's products alone (``joint_products``), and with dropout
    0.05's passes too; peftkit's LoRA step at dropout 0 and 0.05: in turns (rotating order), ``--turns`` turns.
    Per-turn ratios to the floor, and of each peftkit row to its bound row."""
    products, with_dropout = joint_products(args), joint_products(args, 0.05)
    floor = bench.train_setup("floor", "-", args)[1]
    rows = {"floor": floor, "floor + LoRA's products": lambda: (floor(), products()),
            "peftkit p 0": bench.train_setup("peftkit", "lora", args)[1],
            "floor + products + dropout's passes": lambda: (floor(), with_dropout()),
            "peftkit p 0.05": bench.train_setup("peftkit", "lora_p05", args)[1]}
    times = round_robin(rows, args.turns, rotate=True)
    alone = alternate({"products": products, "with dropout": with_dropout}, args.turns, 1)

    def per_turn(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    vs_bound = {"p 0": per_turn("peftkit p 0", "floor + LoRA's products"),
                "p 0.05": per_turn("peftkit p 0.05", "floor + products + dropout's passes")}
    return {"step_ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
            "vs_floor": median_ratios(times, "floor"),
            "quartiles_vs_floor": {k: statistics.quantiles(per_turn(k, "floor"), n=4) for k in rows if k != "floor"},
            "vs_bound": {k: statistics.median(v) for k, v in vs_bound.items()},
            "quartiles_vs_bound": {k: statistics.quantiles(v, n=4) for k, v in vs_bound.items()},
            "alone_ms": {k: statistics.median(v) * 1e3 for k, v in alone.items()},
            "optimizer": getattr(args, "optimizer", "fused"), "times_s": times}


def optimizer(args: argparse.Namespace) -> dict[str, Any]:
    """One AdamW step over the trainable tensors of peftkit's LoRA on this shape (gradients set), torch's three
    implementations in turn, ``--rounds`` rounds: the default (on CPU a Python loop over the tensors), foreach, fused."""
    pm = bench.train_setup("peftkit", "lora", args)[0]
    params = [p for p in pm.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    kinds = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    steps = {k: torch.optim.AdamW(params, lr=1e-4, **kw).step for k, kw in kinds.items()}
    times = alternate(steps, args.rounds, args.inner)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"tensors": len(params), "elements": sum(p.numel() for p in params), "step_ms": ms,
            "vs_fused": median_ratios(times, "fused")}


def floor_step_ms(args: argparse.Namespace) -> float:
    _, step = bench.train_setup("floor", "-", args)
    return statistics.median(alternate({"floor": step}, args.steps, 1)["floor"]) * 1e3


def orient(args: argparse.Namespace) -> dict[str, Any]:
    tokens, out = args.batch * args.seq, {}
    for d_out in sorted({args.hidden, args.intermediate, 256, 512, 688, 1376}):
        g, h = torch.randn(tokens, d_out), torch.randn(tokens, RANK)
        out_ = torch.empty(d_out, RANK)  # both written scaled into a contiguous (d_out, r), as outer_grad does
        times = alternate({"gᵀ h": lambda g=g, h=h, o=out_: torch.mul(g.T @ h, 2.0, out=o),
                           "(hᵀ g)ᵀ": lambda g=g, h=h, o=out_: torch.mul((h.T @ g).T, 2.0, out=o)},
                          args.rounds, args.inner)
        out[str(d_out)] = {"transposed_vs_plain": ratio(times, "(hᵀ g)ᵀ", "gᵀ h"),
                           "plain_ms": statistics.median(times["gᵀ h"]) * 1e3}
    return out


def order(args: argparse.Namespace) -> dict[str, Any]:
    tokens, out = args.batch * args.seq, {}
    for name, (d_in, d_out) in targets(args.hidden, args.intermediate).items():
        if name in ("k", "v", "up"):
            continue  # same shapes as q, q, gate
        x, W, B, h = torch.randn(tokens, d_in), torch.randn(d_out, d_in), torch.randn(d_out, RANK), torch.randn(tokens, RANK)
        times = alternate({
            "base": lambda x=x, W=W: x @ W.T,
            "base first": lambda x=x, W=W, h=h, B=B: (x @ W.T).addmm_(h, B.T, alpha=2.0),
            "term first": lambda x=x, W=W, h=h, B=B: lora_kernels.lora_term_plus_base(h, B, 2.0, None, x, W.T),
        }, args.rounds, args.inner)
        out[name] = {"base_first_vs_base": ratio(times, "base first", "base"),
                     "term_first_vs_base": ratio(times, "term first", "base"),
                     "base_ms": statistics.median(times["base"]) * 1e3}
    return out


def _dense_mask_before(x: torch.Tensor, p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Session 12's mask, kept here to measure against: 16 random bits an element (four lanes of a 64-bit draw)
    compared into 0/1 bytes, packed 8 a byte by numpy for backward, copied into x's dtype as the keep mask."""
    import numpy as np

    generator = torch.Generator()
    generator.manual_seed(seed)
    n = x.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), generator=generator, dtype=torch.int64)
    lanes = words.view(torch.int16)[:n].view(x.shape)
    flags = torch.ge(lanes, -(2**15) + round(p * 2**16), out=torch.empty(x.shape, dtype=torch.uint8))
    bits = torch.from_numpy(np.packbits(flags.numpy().reshape(-1)))
    return torch.empty(x.shape, dtype=x.dtype).copy_(flags), bits


def _unpack_before(bits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    import numpy as np

    flags = torch.from_numpy(np.unpackbits(bits.numpy(), count=x.numel()))
    return torch.empty(x.shape, dtype=x.dtype).copy_(flags.view(x.shape))


def mask(args: argparse.Namespace) -> dict[str, Any]:
    """A target group's dropout work per element of its input, side by side: session 12's dense mask (kept as
    bits by numpy), the drops' gaps (x̄ a copy with them zeroed, the gradient term zeroed there in place) and the
    dense mask of session 14 (x̄ and the term multiplied by it, kept as bits), forward and backward, at each of
    ``--mask-p``; "now" is what ``lora_kernels.dense_mask_from`` picks at that p. Each side does what the fused
    path does for one group with one target: forward makes x̄ and what it keeps, backward makes x̄ again and masks
    the term g_h A."""
    tokens, out = args.batch * args.seq, {}
    seed = 1234
    cpu = torch.device("cpu")
    for p in (float(v) for v in args.mask_p.split(",")):
        for width in sorted({args.hidden, args.intermediate}):
            x, term = torch.randn(tokens, width), torch.randn(tokens, width)
            n = x.numel()
            _, bits = _dense_mask_before(x, p, seed)
            gaps = lora_kernels.kept_gaps(lora_kernels.drop_gaps(n, p, seed, x.device), n)

            def forward_before(x=x, p=p):
                keep, bits = _dense_mask_before(x, p, seed)
                return x.mul(keep), bits

            def backward_before(x=x, bits=bits, term=term):
                keep = _unpack_before(bits, x)
                return x.mul(keep), term.mul_(keep)

            def forward_gaps(x=x, p=p, n=n):
                drawn = lora_kernels.drop_gaps(n, p, seed, x.device)
                return lora_kernels.drop_(x.clone(), lora_kernels.drop_positions(drawn)), lora_kernels.kept_gaps(drawn, n)

            def backward_gaps(x=x, gaps=gaps, term=term, p=p, n=n):
                positions = lora_kernels.drop_positions(gaps if gaps is not None else
                                                        lora_kernels.drop_gaps(n, p, seed, x.device))
                return lora_kernels.drop_(x.clone(), positions), lora_kernels.drop_(term, positions)

            bits = lora_kernels.pack_bits(lora_kernels.dense_keep(n, p, seed, cpu))

            def forward_dense(x=x, p=p, n=n):  # as shared_dropout: x̄ made in the keep mask's buffer, bits kept
                flags = lora_kernels.dense_keep(n, p, seed, cpu)
                return lora_kernels._keep_as(flags, x.shape, x.dtype).mul_(x), lora_kernels.pack_bits(flags)

            def backward_dense(x=x, term=term, p=p, n=n, bits=bits):  # as _dropped_for_backward, then the term
                keep = lora_kernels._keep_as(lora_kernels.unpack_bits(bits, n), x.shape, x.dtype)
                return keep.mul(x), lora_kernels.drop_(term, keep)

            times = alternate({"forward before": forward_before, "forward gaps": forward_gaps,
                               "forward dense": forward_dense, "backward before": backward_before,
                               "backward gaps": backward_gaps, "backward dense": backward_dense,
                               "x copy alone": lambda x=x: x.clone()}, args.rounds, args.inner)
            now = "dense" if lora_kernels.dense_mask_from(p) else "gaps"
            times["forward now"], times["backward now"] = times[f"forward {now}"], times[f"backward {now}"]
            ns = {k: statistics.median(v) * 1e9 / n for k, v in times.items()}
            out[f"p{p}_{width}"] = {
                "p": p, "width": width, "now": now, "ns_per_element": ns,
                "forward_now_vs_before": ratio(times, "forward now", "forward before"),
                "backward_now_vs_before": ratio(times, "backward now", "backward before"),
                "dense_vs_gaps": {"forward": ratio(times, "forward dense", "forward gaps"),
                                  "backward": ratio(times, "backward dense", "backward gaps")},
                "kept_bytes_per_element": {"before": bits.numel() / n,
                                           "now": bits.numel() / n if now == "dense" else 0.0 if gaps is None
                                           else gaps.numel() * gaps.element_size() / n}}
    return out


def table(res: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"Llama-style hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
             f"{bench.VOCAB}; batch {args.batch}×{args.seq}; LoRA r {RANK} all-linear; fp32, {args.threads} thread(s)", ""]
    if "flops" in res:
        f = res["flops"]
        lines += ["| multiply-adds per token | floor step | LoRA adds | step ratio floor (flops) | block linears' share |",
                  "|---|---:|---:|---:|---:|",
                  f"| | {f['floor_macs_per_token'] / 1e6:.2f} M | {f['lora_macs_per_token'] / 1e6:.2f} M | "
                  f"**{f['step_ratio_floor']:.3f}** | {f['linears_share_of_floor']:.0%} |", ""]
    if "matmuls" in res:
        m = res["matmuls"]
        lines += ["| target | d_in → d_out | frozen x Wᵀ + g W ms | LoRA's six products ms | × frozen | flop share |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, r in m["targets"].items():
            lines.append(f"| {name} | {r['d_in']} → {r['d_out']} | {r['frozen_ms']:.2f} | {r['lora_ms']:.2f} | "
                         f"{r['lora_vs_frozen']:.3f} | {r['flop_share']:.3f} |")
        lines += ["", f"floor step {m['floor_step_ms']:.0f} ms; frozen block linears alone {m['frozen_linears_ms']:.0f} ms; "
                  f"LoRA's products alone {m['lora_products_ms']:.0f} ms → step ratio floor (products) "
                  f"**{m['step_ratio_floor']:.3f}**", ""]
    if "bound" in res:
        b = res["bound"]
        lines += [f"| row ({args.turns} turns, rotating; AdamW {b['optimizer']}) | step ms | × floor, median | quartiles |",
                  "|---|---:|---:|---|"]
        for k, ms in b["step_ms"].items():
            q = b["quartiles_vs_floor"].get(k)
            lines.append(f"| {k} | {ms:.0f} | **{b['vs_floor'][k]:.3f}** | "
                         + (f"{q[0]:.3f}–{q[2]:.3f}" if q else "-") + " |")
        lines += ["", "peftkit ÷ its bound row, per turn: " + "; ".join(
            f"{k} **{v:.3f}** ({b['quartiles_vs_bound'][k][0]:.3f}–{b['quartiles_vs_bound'][k][2]:.3f})"
            for k, v in b["vs_bound"].items()),
                  "LoRA's products alone: {products:.1f} ms; with dropout's passes: {with dropout:.1f} ms".format(
                      **b["alone_ms"]), ""]
    if "optimizer" in res:
        o = res["optimizer"]
        lines += [f"AdamW step over LoRA's {o['tensors']} tensors ({o['elements']:,} elements):", "",
                  "| AdamW | ms a step | × fused |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.2f} | {o['vs_fused'][k]:.1f} |" for k, v in o["step_ms"].items()]
        lines.append("")
    if "orient" in res:
        lines += ["| d_out | gᵀ h ms | (hᵀ g)ᵀ ÷ gᵀ h |", "|---:|---:|---:|"]
        lines += [f"| {d} | {r['plain_ms']:.3f} | {r['transposed_vs_plain']:.2f} |" for d, r in res["orient"].items()]
        lines.append("")
    if "order" in res:
        lines += ["| target shape | x Wᵀ ms | base first ÷ x Wᵀ | term first ÷ x Wᵀ |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {r['base_ms']:.2f} | {r['base_first_vs_base']:.3f} | {r['term_first_vs_base']:.3f} |"
                  for n, r in res["order"].items()]
        lines.append("")
    if "mask" in res:
        lines += ["| p | input width | forward ns/el: session 12 / gaps / dense | backward ns/el: session 12 / gaps / "
                  "dense | now | dense ÷ gaps (fwd, bwd) | now ÷ session 12 (fwd, bwd) | kept B/el session 12 → now |",
                  "|---:|---:|---|---|---|---|---|---|"]
        for r in res["mask"].values():
            ns, kept, dg = r["ns_per_element"], r["kept_bytes_per_element"], r["dense_vs_gaps"]
            lines.append(f"| {r['p']} | {r['width']} | {ns['forward before']:.2f} / {ns['forward gaps']:.2f} / "
                         f"{ns['forward dense']:.2f} | {ns['backward before']:.2f} / {ns['backward gaps']:.2f} / "
                         f"{ns['backward dense']:.2f} | {r['now']} | {dg['forward']:.2f}, {dg['backward']:.2f} | "
                         f"{r['forward_now_vs_before']:.2f}, {r['backward_now_vs_before']:.2f} | "
                         f"{kept['before']:.3f} → {kept['now']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="narrow256")
    parser.add_argument("--parts", default="flops,matmuls,orient,order,mask")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=5, help="calls per round of each timed op")
    parser.add_argument("--steps", type=int, default=7, help="floor steps timed (matmuls)")
    parser.add_argument("--turns", type=int, default=20, help="turns of the bound part's five rows")
    parser.add_argument("--optimizer", choices=("adamw", "fused"), default="fused",
                        help="the bound part's peftkit rows' AdamW (compare_hf_peft --optimizer)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-p", default="0.05,0.1", help="dropout probabilities of the mask part")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    args.hidden, args.intermediate, args.layers = bench.SHAPES[args.shape]
    args.dtype, args.device = "fp32", "cpu"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    parts = args.parts.split(",")
    res: dict[str, Any] = {}
    if "flops" in parts:
        res["flops"] = flops(args)
    if "matmuls" in parts:
        res["matmuls"] = matmuls(args, floor_step_ms(args))
    for part, fn in (("bound", bound), ("optimizer", optimizer), ("orient", orient), ("order", order), ("mask", mask)):
        if part in parts:
            res[part] = fn(args)
    text = table(res, args)
    print(text)
    out = Path(args.out or HERE / "results" / f"lora_floor_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": res, "table": text}, indent=2, ensure_ascii=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
