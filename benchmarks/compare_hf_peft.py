"""peftkit against HF PEFT, side by side in one run: training step, saved activations, peak memory, inference
(base / unmerged / merged), many adapters mixed per row in one batch, adapter load time and file size.

The model is built from a config (random weights, seeded, nothing downloaded): a Llama-style LlamaForCausalLM,
hidden 512, intermediate 1376, 8 layers, 8 heads, vocabulary 8000; adapters on all linear layers
(``target_modules="all-linear"``, lm_head left out); LoRA family r=16, lora_alpha=32; VeRA r=256; IA3 with
its default feed-forward split. Every measurement runs in a fresh subprocess with ``--threads`` torch threads,
and each peftkit job is immediately followed by the same job with HF PEFT (or the floor), round after round;
ratios are taken within a round and the table shows the median over rounds.

Jobs (``CASES`` lists the methods — a case is a name and a config builder per library; add rows there):

* ``train``  one training batch of 4 × 256 tokens, AdamW (torch's fused kernel, as transformers' Trainer and
  ``peftkit train`` run it; ``--optimizer adamw``: torch's default, on CPU a Python loop over the tensors). Time: peftkit, HF PEFT and the floor — the same
  frozen model with input gradients flowing and no adapter (the least a PEFT step can cost) — built in one
  process and stepped in turn, ``--steps`` turns after warm-up; ratios per turn, median (a busy machine slows
  all three alike). Memory, each row alone in a fresh process: autograd-saved activation bytes of one step
  (saved_tensors_hooks, counted once per storage and only if backward unpacks it, parameters and buffers
  excluded) and peak RSS growth over setup (the kernel's peak counter reset after setup); also for the floor
  and full fine-tuning.
* ``infer``  eval forward of the same batch, no grad: the base model, the unmerged adapter and the merged one
  (``merge_adapter()``: the wrappers stay), alternated inside one process.
* ``mixed``  eval forward, batch 32 × 128: 8 different adapters, row i using adapter i % 8 (``adapter_names=``),
  against one adapter for the whole batch, alternated inside one process. HF PEFT mixes only LoRA; its
  refusal for the others is recorded.
* ``io``     adapter file size (adapter_model.safetensors) and the median time of ``from_pretrained`` onto a
  fresh copy of the base model.

    python benchmarks/compare_hf_peft.py            # ~15 min on 2 idle cores (35 min on a busy shared machine)
    python benchmarks/compare_hf_peft.py --quick    # smoke run (~2 minutes): tiny model, 1 round
    python benchmarks/compare_hf_peft.py --jobs train --cases lora,lora_p05   # a subset
    python benchmarks/compare_hf_peft.py --jobs train --measure time --shape wide1024 --cases lora,lora_p05
    python benchmarks/compare_hf_peft.py --jobs train --measure saved --dtype bf16 --cases lora,lora_p05

``--shape`` picks a preset model (``SHAPES``: narrow256, narrow512 = the default, wide1024); ``--measure``
``time`` or ``memory`` runs one part of the train job. In the timing turns of a case other than LoRA,
peftkit's own LoRA steps too (``step ×pk LoRA``; ``--no-vs-lora`` drops it), and its saved bytes are
divided by peftkit LoRA's from the same run (``saved ×pk LoRA``, when ``lora`` is among the cases).

Writes benchmarks/results/compare_hf_peft.json (``--quick``: a temp file) and prints the ratio table that
benchmarks/RESULTS.md shows.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import copy
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

VOCAB = 8000
RANK, ALPHA, VERA_RANK = 16, 32, 256
N_MIXED = 8


# ---- the cases: one config per library ----------------------------------------------------------------------
def _lora(lib: Any, dropout: float = 0.0, **extra: Any) -> Any:
    return lib.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules="all-linear", **extra)


def _case(peftkit_cfg: Callable[[Any], Any], hf_cfg: Callable[[Any], Any] | None) -> dict[str, Any]:
    return {"peftkit": peftkit_cfg, "hf": hf_cfg}


# name -> config builder per library (called with the peftkit or peft module); add rows here
CASES: dict[str, dict[str, Any]] = {
    "lora": _case(lambda pk: _lora(pk), lambda hf: _lora(hf)),
    "lora_p05": _case(lambda pk: _lora(pk, 0.05), lambda hf: _lora(hf, 0.05)),
    "lora_p03": _case(lambda pk: _lora(pk, 0.3), lambda hf: _lora(hf, 0.3)),  # only when named (--cases)
    "lora_fa": _case(lambda pk: pk.LoraFAConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"),
                     lambda hf: _lora(hf)),  # HF: LoRA + its create_lorafa_optimizer
    "vera": _case(lambda pk: pk.VeraConfig(r=VERA_RANK, target_modules="all-linear"),
                  lambda hf: hf.VeraConfig(r=VERA_RANK, target_modules="all-linear")),
    "dora": _case(lambda pk: _lora(pk, use_dora=True), lambda hf: _lora(hf, use_dora=True)),
    "ia3": _case(lambda pk: pk.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"]),
                 lambda hf: hf.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
    # prompt methods (issue 6): training rows only (nothing to merge; 20 virtual tokens)
    "prompt_tuning": _case(lambda pk: pk.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
                           lambda hf: hf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
    "prefix_tuning": _case(lambda pk: pk.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
                           lambda hf: hf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)),
}
# Llama-style shapes (hidden, intermediate, layers) for --shape: narrow ones are where per-element overheads
# (dropout masks, elementwise passes) weigh most against the matmuls; the wide one has 4× the flops per token-layer
SHAPES: dict[str, tuple[int, int, int]] = {"narrow256": (256, 688, 8), "narrow512": (512, 1376, 8),
                                           "wide1024": (1024, 2752, 4)}
MIXABLE = ("lora", "vera", "dora", "ia3")  # mixed-batch rows
EVAL_CASES = ("lora", "vera", "dora", "ia3")  # inference / mixed / io rows (LoRA-FA is LoRA at inference)
JOBS = ("train", "infer", "mixed", "io")


NAMED_ONLY = ("lora_p03",)  # cases a run includes only when --cases names them (dropout's dense mask, p ≥ 1/8)


# ---- shared helpers (worker side) -----------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=max(args.seq, 128) + 64)  # room for virtual tokens
    model = LlamaForCausalLM(cfg).to(device(args))
    return model.to(torch.bfloat16) if args.dtype == "bf16" else model  # adapters stay fp32 in both libraries


def device(args: argparse.Namespace) -> torch.device:
    """``--device`` (cpu, or cuda: model, batch and adapters on the GPU, timings synchronised)."""
    return torch.device(getattr(args, "device", "cpu"))


def library(lib: str) -> Any:
    if lib == "peftkit":
        import peftkit

        return peftkit
    import peft

    return peft


def wrap(lib: str, case: str, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    mod = library(lib)
    return mod.get_peft_model(model, CASES[case][lib](mod), adapter_name=adapter_name)


def randomize(pm: nn.Module, seed: int, adapter_name: str = "default") -> None:
    """Non-zero adapter weights (a fresh LoRA / VeRA / IA3 adapter is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if f".{adapter_name}" in name and any(k in name for k in ("lora_", "vera_lambda", "ia3_l")):
                if "magnitude" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                elif "ia3_l" in name:
                    p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.02 * torch.randn(p.shape, generator=gen))



def timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    """Wall time of each of ``repeat`` calls; on CUDA, from and to an idle device (synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def saved_activation_bytes(step: Callable[[], Any], model: nn.Module) -> int:
    """Bytes autograd keeps for backward in one step: each storage once, only if backward unpacks it,
    the model's parameters and buffers excluded (the method of benchmarks/lora_variants.py)."""
    packed: list[tuple[int, int]] = []
    unpacked: set[int] = set()

    def pack(t: torch.Tensor) -> tuple[int, torch.Tensor]:
        s = t.untyped_storage()
        packed.append((s.data_ptr(), s.nbytes()))
        return len(packed) - 1, t

    def unpack(token: tuple[int, torch.Tensor]) -> torch.Tensor:
        unpacked.add(token[0])
        return token[1]

    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step()
    kept = {packed[i][0]: packed[i][1] for i in unpacked}
    return sum(n for ptr, n in kept.items() if ptr not in excluded)


def adamw(params: list[torch.Tensor], args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW as ``--optimizer`` says: ``fused`` (the default, also for the other benchmarks' harnesses that build
    rows here) torch's fused kernel, as transformers' Trainer (``adamw_torch_fused``, since torch 2.8) and
    ``peftkit train`` run it; ``adamw`` torch's default (on CPU a Python loop over the tensors, ~12 ops each:
    7.2 ms a step for LoRA's 112 tensors on narrow256 against fused's 1.4 ms, lora_floor.py --parts optimizer, which weighs on LoRA's rows only:
    the floor trains nothing). Sessions 5-15 of issue 20 timed ``adamw``."""
    return torch.optim.AdamW(params, lr=1e-4, fused=getattr(args, "optimizer", "fused") == "fused" or None)


# ---- the workers ----------------------------------------------------------------------------------------------
def train_setup(lib: str, case: str, args: argparse.Namespace) -> tuple[nn.Module, Callable[[], float]]:
    """A model of one row (lib: peftkit | hf | floor | full) and its training step on a fixed batch."""
    model = build_model(args)
    torch.manual_seed(args.seed + 1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq)).to(device(args))
    torch.manual_seed(args.seed + 2)
    if lib in ("floor", "full"):
        pm = model
        if lib == "floor":  # frozen, but gradients flow to every activation (as under an adapter)
            model.requires_grad_(False)
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, args) if params else None
    else:
        pm = wrap(lib, case, model)
        if case == "lora_fa":
            make = library(lib).create_lorafa_optimizer if lib == "peftkit" else \
                __import__("peft.optimizers", fromlist=["x"]).create_lorafa_optimizer
            optimizer = make(pm, r=RANK, lora_alpha=ALPHA, lr=1e-4)
        else:
            optimizer = adamw([p for p in pm.parameters() if p.requires_grad], args)
    pm.train()

    def step() -> float:
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return pm, step


def work_memory(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Saved activations and peak RSS growth of one row, alone in this fresh process."""
    pm, step = train_setup(lib, case, args)
    gc.collect()
    from peftkit.measure import current_rss, reset_peak_rss
    rss_setup = current_rss()
    peak_reset = reset_peak_rss()
    step()  # warm-up (optimizer state exists from here on)
    saved = saved_activation_bytes(step, pm)
    cuda = device(args).type == "cuda"
    if cuda:  # the GPU's own peak of one step, after warm-up (the allocator's max_memory_allocated)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"saved_bytes": saved, "peak_rss_growth_bytes": peak - rss_setup, "peak_reset": peak_reset}
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out


def work_saved(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Saved-activation bytes of every case's peftkit and HF rows and of the floor, one step each, in this one
    process (the bytes are deterministic: no fresh process needed; peak RSS is the ``memory`` part's)."""
    out: dict[str, Any] = {"memory:floor:-": {"saved_bytes": saved_activation_bytes(*reversed(train_setup(
        "floor", "-", args)))}}
    for name in args.cases.split(","):
        for row in ("peftkit", "hf"):
            pm, step = train_setup(row, name, args)
            out[f"memory:{row}:{name}"] = {"saved_bytes": saved_activation_bytes(step, pm)}
            del pm, step
            gc.collect()
    return out


def work_time(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """Step times of peftkit, HF PEFT and the floor on the same batch, in this one process, stepping in turn so
    that a busy machine slows all three alike; the ratios are per turn. The order rotates each turn (peftkit, HF,
    floor; then HF, floor, peftkit; ...) so that no row always follows the same one (a step runs slower after a
    row that evicted its weights from the cache). (lib is ignored: the three rows are always timed together.)"""
    rows = {name: train_setup(name, case, args)[1] for name in ("peftkit", "hf", "floor")}
    if case != "lora" and args.vs_lora:  # peftkit's own LoRA, stepped in the same turns
        rows["lora"] = train_setup("peftkit", "lora", args)[1]
    for step in rows.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {k: [] for k in rows}
    names = list(rows)
    for turn in range(args.steps):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            times[name] += timed(rows[name], 1)
    turns = list(zip(times["peftkit"], times["hf"], times["floor"], strict=True))
    out = {"step_s": {k: statistics.median(v) for k, v in times.items()}, "step_times_s": times,
           "pk_vs_hf": statistics.median(a / b for a, b, _ in turns),
           "pk_vs_floor": statistics.median(a / c for a, _, c in turns),
           "hf_vs_floor": statistics.median(b / c for _, b, c in turns)}
    if "lora" in times:
        out["pk_vs_lora"] = statistics.median(a / b for a, b in zip(times["peftkit"], times["lora"], strict=True))
    return out


def work_infer(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args).eval()
    base = copy.deepcopy(model)
    torch.manual_seed(args.seed + 1)
    ids = torch.randint(0, VOCAB, (args.batch, args.seq)).to(device(args))
    pm = wrap(lib, case, model).eval()
    randomize(pm, args.seed + 3)
    merged = copy.deepcopy(pm)
    merged.merge_adapter()
    runs = {"base": lambda: base(input_ids=ids), "unmerged": lambda: pm(input_ids=ids),
            "merged": lambda: merged(input_ids=ids)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.infer_repeat):
            for key, fn in runs.items():  # alternated, so drift hits all three alike
                times[key] += timed(fn, 1)
        check = (pm(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**{f"{k}_s": v for k, v in med.items()}, "unmerged_vs_base": med["unmerged"] / med["base"],
            "merged_vs_base": med["merged"] / med["base"], "max_abs_merged_minus_unmerged": check}


def work_mixed(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args).eval()
    names = [f"a{i}" for i in range(N_MIXED)]
    pm = wrap(lib, case, model, adapter_name=names[0])
    mod = library(lib)
    for name in names[1:]:
        pm.add_adapter(name, CASES[case][lib](mod))
    for i, name in enumerate(names):
        randomize(pm, args.seed + 10 + i, name)
    pm.set_adapter(names[0])
    pm.eval()
    torch.manual_seed(args.seed + 1)
    ids = torch.randint(0, VOCAB, (args.mixed_batch, args.mixed_seq)).to(device(args))
    rows = [names[i % N_MIXED] for i in range(args.mixed_batch)]
    out: dict[str, Any] = {}
    with torch.no_grad():
        try:
            mixed = pm(input_ids=ids, adapter_names=rows).logits
        except Exception as exc:  # HF PEFT mixes LoRA only
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        check = 0.0
        for i in (0, 1):  # rows 0 and 1 equal their adapter run alone
            pm.set_adapter(names[i])
            check = max(check, (pm(input_ids=ids[i:i + 1]).logits - mixed[i:i + 1]).abs().max().item())
        pm.set_adapter(names[0])
        runs = {"single": lambda: pm(input_ids=ids), "mixed": lambda: pm(input_ids=ids, adapter_names=rows)}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(args.infer_repeat):
            for key, fn in runs.items():
                times[key] += timed(fn, 1)
    if check > 1e-3:  # the rows do not follow their adapters: the library ignored adapter_names
        return {"error": f"wrong rows: rows 0/1 differ from their adapter run alone by {check:.2g}"}
    med = {k: statistics.median(v) for k, v in times.items()}
    out.update({"single_s": med["single"], "mixed_s": med["mixed"], "mixed_vs_single": med["mixed"] / med["single"],
                "max_abs_row_vs_alone": check})
    return out


def work_io(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    model = build_model(args).eval()
    fresh = copy.deepcopy(model)
    pm = wrap(lib, case, model)
    randomize(pm, args.seed + 3)
    mod = library(lib)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        size = (Path(tmp) / "adapter_model.safetensors").stat().st_size
        times = []
        for _ in range(args.io_repeat):
            target = copy.deepcopy(fresh)
            t0 = time.perf_counter()
            mod.PeftModel.from_pretrained(target, tmp)
            times.append(time.perf_counter() - t0)
    return {"file_bytes": size, "load_s": statistics.median(times), "load_times_s": times}


def work_eval(lib: str, case: str, args: argparse.Namespace) -> dict[str, Any]:
    """infer, mixed and io of one (library, case) in one process (timings are ratios within the process)."""
    out: dict[str, Any] = {}
    for job in args.jobs.split(","):
        if job not in ("infer", "mixed", "io") or (job == "mixed" and case not in MIXABLE):
            continue
        try:
            out[job] = WORKERS[job](lib, case, args)
        except Exception as exc:
            out[job] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        gc.collect()
    return out


WORKERS = {"memory": work_memory, "saved": work_saved, "time": work_time, "infer": work_infer, "mixed": work_mixed, "io": work_io,
           "eval": work_eval}


# ---- the parent ---------------------------------------------------------------------------------------------
def run_job(job: str, lib: str, case: str, args: argparse.Namespace, passthrough: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *passthrough, "--worker", f"{job}:{lib}:{case}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["?"]
        return {"error": lines[-1], "traceback": lines[-20:], "wall_s": wall}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(job, lib, case) in the order one round runs them: each peftkit job followed by its comparison."""
    jobs: list[tuple[str, str, str]] = []
    cases = args.cases.split(",")
    if "train" in args.jobs:
        timing, memory = "time" in args.measure, "memory" in args.measure
        jobs += [("memory", "floor", "-"), ("memory", "full", "-")] if memory and not args.no_floor else []
        for case in cases:
            jobs += [("time", "all", case)] if timing else []
            jobs += [("memory", "peftkit", case), ("memory", "hf", case)] if memory else []
        jobs += [("saved", "all", "-")] if "saved" in args.measure else []
    if any(j in args.jobs for j in ("infer", "mixed", "io")):
        for case in cases:
            if case in EVAL_CASES:
                jobs += [("eval", "peftkit", case), ("eval", "hf", case)]
    return jobs


def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rounds: list[dict[str, dict[str, Any]]], cases: list[str]) -> dict[str, Any]:
    """Per case: medians over rounds of each metric and of the within-round ratios."""
    def get(r: dict[str, dict[str, Any]], key: str, metric: str) -> float | None:
        row = r.get(key)
        return None if row is None or "error" in row else row.get(metric)

    def ratio_med(a_key: str, b_key: str, metric: str, b_metric: str | None = None) -> float | None:
        vals = []
        for r in rounds:
            a, b = get(r, a_key, metric), get(r, b_key, b_metric or metric)
            if a is not None and b:
                vals.append(a / b)
        return med(vals)

    out: dict[str, Any] = {"train": {}, "infer": {}, "mixed": {}, "io": {}}
    for case in cases:
        tk, pk, hf = f"time:all:{case}", f"memory:peftkit:{case}", f"memory:hf:{case}"
        if any(tk in r or pk in r for r in rounds):
            step = [r[tk]["step_s"] for r in rounds if tk in r and "error" not in r[tk]]
            out["train"][case] = {
                "peftkit_step_ms": 1000 * (med([t["peftkit"] for t in step]) or float("nan")),
                "hf_step_ms": 1000 * (med([t["hf"] for t in step]) or float("nan")),
                "floor_step_ms": 1000 * (med([t["floor"] for t in step]) or float("nan")),
                "step_vs_hf": med([get(r, tk, "pk_vs_hf") for r in rounds]),
                "step_vs_floor": med([get(r, tk, "pk_vs_floor") for r in rounds]),
                "hf_step_vs_floor": med([get(r, tk, "hf_vs_floor") for r in rounds]),
                "peftkit_saved_mib": (med([get(r, pk, "saved_bytes") for r in rounds]) or 0) / 2**20,
                "hf_saved_mib": (med([get(r, hf, "saved_bytes") for r in rounds]) or 0) / 2**20,
                "saved_vs_hf": ratio_med(pk, hf, "saved_bytes"),
                "peak_vs_hf": ratio_med(pk, hf, "peak_rss_growth_bytes"),
                "step_vs_lora": 1.0 if case == "lora" else med([get(r, tk, "pk_vs_lora") for r in rounds]),
                "saved_vs_lora": ratio_med(pk, "memory:peftkit:lora", "saved_bytes"),
                "peftkit_peak_mib": (med([get(r, pk, "peak_rss_growth_bytes") for r in rounds]) or 0) / 2**20,
                "hf_peak_mib": (med([get(r, hf, "peak_rss_growth_bytes") for r in rounds]) or 0) / 2**20,
            }
            if any(get(r, pk, "cuda_peak_bytes") for r in rounds):  # --device cuda: the GPU's own peaks
                out["train"][case].update(
                    peftkit_cuda_peak_mib=(med([get(r, pk, "cuda_peak_bytes") for r in rounds]) or 0) / 2**20,
                    hf_cuda_peak_mib=(med([get(r, hf, "cuda_peak_bytes") for r in rounds]) or 0) / 2**20,
                    cuda_peak_vs_hf=ratio_med(pk, hf, "cuda_peak_bytes"))
        for lib in ("peftkit", "hf"):
            key = f"infer:{lib}:{case}"
            if any(key in r for r in rounds):
                out["infer"].setdefault(case, {})[lib] = {
                    "unmerged_vs_base": med([get(r, key, "unmerged_vs_base") for r in rounds]),
                    "merged_vs_base": med([get(r, key, "merged_vs_base") for r in rounds]),
                    "base_ms": 1000 * (med([get(r, key, "base_s") for r in rounds]) or float("nan")),
                }
            key = f"mixed:{lib}:{case}"
            if any(key in r for r in rounds):
                errors = [r[key]["error"] for r in rounds if key in r and "error" in r[key]]
                out["mixed"].setdefault(case, {})[lib] = {
                    "mixed_vs_single": med([get(r, key, "mixed_vs_single") for r in rounds]),
                    "mixed_ms": 1000 * (med([get(r, key, "mixed_s") for r in rounds]) or float("nan")),
                    "single_ms": 1000 * (med([get(r, key, "single_s") for r in rounds]) or float("nan")),
                    "error": errors[0] if errors else None,
                }
            key = f"io:{lib}:{case}"
            if any(key in r for r in rounds):
                out["io"].setdefault(case, {})[lib] = {
                    "file_kib": (med([get(r, key, "file_bytes") for r in rounds]) or 0) / 1024,
                    "load_ms": 1000 * (med([get(r, key, "load_s") for r in rounds]) or float("nan")),
                }
        if case in out["mixed"] and "peftkit" in out["mixed"][case] and "hf" in out["mixed"][case]:
            out["mixed"][case]["peftkit_mixed_vs_hf_mixed"] = ratio_med(f"mixed:peftkit:{case}", f"mixed:hf:{case}",
                                                                        "mixed_s")
        if case in out["io"] and "peftkit" in out["io"][case]:
            out["io"][case]["load_vs_hf"] = ratio_med(f"io:peftkit:{case}", f"io:hf:{case}", "load_s")
    out["floor"] = {"saved_mib": (med([get(r, "memory:floor:-", "saved_bytes") for r in rounds]) or 0) / 2**20,
                    "peak_mib": (med([get(r, "memory:floor:-", "peak_rss_growth_bytes") for r in rounds]) or 0) / 2**20,
                    "full_ft_saved_mib": (med([get(r, "memory:full:-", "saved_bytes") for r in rounds]) or 0) / 2**20,
                    "full_ft_peak_mib": (med([get(r, "memory:full:-", "peak_rss_growth_bytes") for r in rounds])
                                         or 0) / 2**20}
    return out


def f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    lines = []
    fl = summary["floor"]
    if summary["train"]:
        if fl["saved_mib"]:  # absent with --no-floor
            lines += [f"floor (frozen model, input grads, no adapter): saved {fl['saved_mib']:.0f} MiB, peak RSS "
                      f"+{fl['peak_mib']:.0f} MiB; full fine-tuning: saved {fl['full_ft_saved_mib']:.0f} MiB, "
                      f"peak RSS +{fl['full_ft_peak_mib']:.0f} MiB", ""]
        lines += ["| training | peftkit ms | HF ms | floor ms | step ×HF | step ×floor (HF ×floor) | step ×pk LoRA | "
                  "saved MiB pk / HF | saved ×HF | saved ×pk LoRA | peak RSS MiB pk / HF | peak ×HF |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for case, t in summary["train"].items():
            lines.append(
                f"| {case} | {t['peftkit_step_ms']:.0f} | {t['hf_step_ms']:.0f} | {t['floor_step_ms']:.0f} | "
                f"{f(t['step_vs_hf'])} | "
                f"{f(t['step_vs_floor'])} ({f(t['hf_step_vs_floor'])}) | {f(t.get('step_vs_lora'))} | "
                f"{t['peftkit_saved_mib']:.0f} / {t['hf_saved_mib']:.0f} | {f(t['saved_vs_hf'])} | "
                f"{f(t.get('saved_vs_lora'))} | {t['peftkit_peak_mib']:.0f} / {t['hf_peak_mib']:.0f} "
                f"| {f(t['peak_vs_hf'])} |")
    if summary["infer"]:
        lines += ["", "| inference (eval, no grad) | peftkit unmerged ×base | merged ×base | "
                  "HF unmerged ×base | HF merged ×base |", "|---|---|---|---|---|"]
        for case, t in summary["infer"].items():
            pk, hf = t.get("peftkit", {}), t.get("hf", {})
            lines.append(f"| {case} | {f(pk.get('unmerged_vs_base'))} | {f(pk.get('merged_vs_base'))} | "
                         f"{f(hf.get('unmerged_vs_base'))} | {f(hf.get('merged_vs_base'))} |")
    if summary["mixed"]:
        lines += ["", f"| {N_MIXED} adapters mixed per row | peftkit mixed ×single | peftkit mixed ms | "
                  "HF mixed ×single | HF mixed ms | peftkit mixed ×HF mixed |", "|---|---|---|---|---|---|"]
        for case, t in summary["mixed"].items():
            pk, hf = t.get("peftkit", {}), t.get("hf", {})
            hf_cell = f"cannot: {hf['error'][:60]}" if hf.get("error") else f(hf.get("mixed_vs_single"))
            lines.append(f"| {case} | {f(pk.get('mixed_vs_single'))} | {f(pk.get('mixed_ms'), '.0f')} | {hf_cell} | "
                         f"{f(hf.get('mixed_ms'), '.0f') if not hf.get('error') else '-'} | "
                         f"{f(t.get('peftkit_mixed_vs_hf_mixed'))} |")
    if summary["io"]:
        lines += ["", "| adapter file | peftkit KiB | HF KiB | peftkit load ms | HF load ms | load ×HF |",
                  "|---|---|---|---|---|---|"]
        for case, t in summary["io"].items():
            pk, hf = t.get("peftkit", {}), t.get("hf", {})
            lines.append(f"| {case} | {f(pk.get('file_kib'), '.0f')} | {f(hf.get('file_kib'), '.0f')} | "
                         f"{f(pk.get('load_ms'), '.0f')} | {f(hf.get('load_ms'), '.0f')} | {f(t.get('load_vs_hf'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, from {', '.join(JOBS)}")
    parser.add_argument("--cases", default=",".join(c for c in CASES if c not in NAMED_ONLY),
                        help=f"comma-separated, from {', '.join(CASES)} (default all but {', '.join(NAMED_ONLY)})")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--mixed-batch", type=int, default=32)
    parser.add_argument("--mixed-seq", type=int, default=128)
    parser.add_argument("--eval-rounds", type=int, default=1,
                        help="rounds of the memory, infer, mixed and io jobs (memory is deterministic; the others "
                             "alternate their timings in-process)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--infer-repeat", type=int, default=3)
    parser.add_argument("--io-repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (1: steadier on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", choices=("adamw", "fused"), default="fused",
                        help="the training step's AdamW: fused (the default of transformers' Trainer and of peftkit "
                             "train) or torch's default (on CPU a loop of ~12 ops over each tensor)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="the base model's dtype (bf16: the adapters stay fp32, both libraries' default)")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor and full fine-tuning rows")
    parser.add_argument("--measure", default="time,memory",
                        help="train job parts: time (step turns), memory (saved bytes and peak RSS, fresh processes), "
                             "saved (saved bytes only, every row in one process)")
    parser.add_argument("--vs-lora", action=argparse.BooleanOptionalAction, default=True,
                        help="also step peftkit's own LoRA in each non-LoRA case's timing turns (step ×pk LoRA)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="a preset model shape (sets --hidden, --intermediate, --layers): " + "; ".join(
                            f"{k}: {v[0]}/{v[1]}/{v[2]}" for k, v in SHAPES.items()))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model and batches, one round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model, batch and adapters live (cuda: timings synchronised, the GPU's "
                             "peak memory recorded; never in CI)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shape:
        args.hidden, args.intermediate, args.layers = SHAPES[args.shape]
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.batch, args.seq = 64, 172, 2, 2, 32
        args.mixed_batch, args.mixed_seq, args.rounds, args.steps, args.infer_repeat, args.io_repeat = 16, 16, 1, 2, 2, 1
        if args.cases == ",".join(CASES):
            args.cases = "lora,lora_p05,dora"

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; run it where one is (or drop --device)")
    if args.worker:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        job, lib, case = args.worker.split(":")
        print(json.dumps(WORKERS[job](lib, case, args)))
        return

    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in (
        "hidden", "intermediate", "layers", "batch", "seq", "mixed_batch", "mixed_seq", "warmup", "steps",
        "infer_repeat", "io_repeat", "threads", "seed", "dtype", "jobs", "cases", "device", "optimizer")] + ([] if args.vs_lora else ["--no-vs-lora"])
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    jobs = plan(args)
    rounds: list[dict[str, dict[str, Any]]] = []
    t_start = time.perf_counter()
    for i in range(args.rounds):
        results: dict[str, dict[str, Any]] = {}
        for job, lib, case in jobs:
            if job in ("eval", "memory") and i >= args.eval_rounds:
                continue
            key = f"{job}:{lib}:{case}"
            results[key] = run_job(job, lib, case, args, passthrough)
            status = results[key].get("error", "ok")
            if job == "memory" and "error" not in results[key]:
                status = (f"saved {results[key]['saved_bytes'] / 2**20:.0f} MiB, peak "
                          f"+{results[key]['peak_rss_growth_bytes'] / 2**20:.0f} MiB")
            if job == "time" and "error" not in results[key]:
                r = results[key]
                status = (", ".join(f"{k} {1000 * v:.0f} ms" for k, v in r["step_s"].items())
                          + f"; peftkit ×HF {r['pk_vs_hf']:.2f}, ×floor {r['pk_vs_floor']:.2f}")
            if job == "saved" and "error" not in results[key]:
                parts = results.pop(key)
                wall = parts.pop("wall_s")
                results.update(parts)
                results[key] = {"wall_s": wall}
                status = ", ".join(f"{k.split(':', 1)[1]} {v['saved_bytes'] / 2**20:.0f} MiB" for k, v in results.items()
                                   if k.startswith("memory:"))
            if job == "eval" and "error" not in results[key]:
                for sub, value in results.pop(key).items():
                    if isinstance(value, dict):
                        results[f"{sub}:{lib}:{case}"] = {**value, "wall_s": 0.0}
                results[key] = {"wall_s": 0.0}
                status = ", ".join(f"{k.split(':')[0]} {v.get('error', 'ok')[:60]}" for k, v in results.items()
                                   if k.endswith(f":{lib}:{case}") and not k.startswith(("time", "memory", "eval")))
            print(f"round {i + 1}/{args.rounds} {key:24s} {results[key]['wall_s']:5.0f}s {status[:100]}", flush=True)
        rounds.append(results)
    total = time.perf_counter() - t_start
    summary = summarize(rounds, args.cases.split(","))
    text = table(summary)
    print(f"\nLlama-style LM hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {VOCAB}, "
          f"{args.dtype};"
          f" train batch {args.batch}×{args.seq}, mixed batch {args.mixed_batch}×{args.mixed_seq}; {args.threads} "
          f"thread(s); median of {args.rounds} round(s) (infer/mixed/io: {min(args.eval_rounds, args.rounds)})\n")
    print(text)
    print(f"\nwall time {total:.0f}s")
    out = args.out or (Path(tempfile.gettempdir()) / "compare_hf_peft_quick.json" if args.quick
                       else Path(__file__).resolve().parent / "results" / "compare_hf_peft.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"}
    out.write_text(json.dumps({"settings": settings, "summary": summary, "table": text, "rounds": rounds,
                               "wall_s": total, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
