"""Greedy generation with many adapters mixed per row, side by side with HF PEFT in one run; and
``torch.compile`` against eager for the fused LoRA training step and the per-row forward.

The model is built from a config (random weights, seeded, nothing downloaded): a Llama-style LlamaForCausalLM
with SmolLM2-135M's layer shape (hidden 576, intermediate 1536, 9 heads, 3 key/value heads) but 8 layers
(``--layers``) and a 16k vocabulary. Batch 16, prompts of 16 tokens, 64 new tokens, greedy, KV cache (``generate(do_sample=False,
min_new_tokens=max_new_tokens)``, so every row makes all 64). Rows, each one ``generate`` call:

* ``base``            the plain transformers model, no adapter wrapper
* ``lora_1``          peftkit, one LoRA adapter (r=16, all linear layers) for the whole batch
* ``lora_8_mixed``    peftkit, 8 LoRA adapters, row i using adapter i % 8 (``adapter_names=``)
* ``hf_lora_1`` / ``hf_lora_8_mixed``  the same with HF PEFT on the same weights (peftkit saves the adapters,
  HF PEFT's ``PeftModel.from_pretrained`` / ``load_adapter`` loads them); the greedy tokens of the mixed rows
  are compared with peftkit's
* ``dora_1`` / ``hf_dora_1``  one DoRA adapter (r=16, all linear layers), peftkit and HF PEFT (loaded from
  peftkit's file)
* ``prompt_1`` / ``prompt_8_mixed``   prompt tuning, 16 virtual tokens (HF PEFT has no per-row prompt adapters)
* ``prefix_1`` / ``prefix_8_mixed``   prefix tuning, 16 virtual tokens

Rows run in turn, round after round (``--rounds``); a ratio is taken within a round and the table shows the
median over rounds (a busy machine slows a whole round alike). Tokens/s counts new tokens (16 × 64) over the
wall time of the call, prefill included.

``--compile`` adds two compiled-vs-eager rows on the same model (inductor on CPU needs a C++ compiler):
a LoRA training step (forward + backward, fused path, 4 × 128 tokens) and an eval forward with 8 adapters per
row (``adapter_names=``, 16 × 128 tokens); each compiled once (``fullgraph`` inside every LoRA layer is checked
by tests/test_compile.py), then alternated with eager; outputs are compared.

    python benchmarks/generation.py                 # ~6 min on 1 busy core
    python benchmarks/generation.py --compile       # + compile rows (~5 more minutes, mostly compiling)
    python benchmarks/generation.py --compile-only --layers 2    # the compile rows alone, on a 2-layer model
    python benchmarks/generation.py --quick         # smoke run: tiny model, 1 round, temp file
    python benchmarks/generation.py --rows base,lora_1,lora_8_mixed,hf_lora_1 --baseline 366b971
                                                    # + those LoRA rows through an earlier revision's kernels

Writes benchmarks/results/generation.json (``--quick``: a temp file) and prints the table that
benchmarks/RESULTS.md shows.
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

warnings.filterwarnings("ignore")
RESULTS = Path(__file__).parent / "results"
ADAPTERS = 8


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.quick:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(vocab_size=16384, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512)
    cfg.pad_token_id = 0
    return LlamaForCausalLM(cfg).eval()


def lora_model(base: nn.Module, folder: Path) -> nn.Module:
    """peftkit with 8 seeded non-zero LoRA adapters (all linear layers, r=16), saved to ``folder``."""
    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "init_lora_weights": False}
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(**config), adapter_name="a0")
    for i in range(1, ADAPTERS):
        pm.add_adapter(f"a{i}", LoraConfig(**config))
    with torch.no_grad():  # small adapters: B A x stays a modest change to each output, as after training
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    pm.save_pretrained(folder)
    return pm.eval()


def dora_models(base: nn.Module, folder: Path) -> tuple[nn.Module, nn.Module]:
    """peftkit and HF PEFT with one seeded DoRA adapter (r=16, all linear layers), HF PEFT's loaded from peftkit's
    file."""
    from peft import PeftModel

    from peftkit import LoraConfig, get_peft_model

    torch.manual_seed(5)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(base), config, adapter_name="a0")
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    pm.save_pretrained(folder)
    return pm.eval(), PeftModel.from_pretrained(copy.deepcopy(base), str(folder / "a0"), adapter_name="a0").eval()


def hf_lora_model(base: nn.Module, folder: Path) -> nn.Module:
    """HF PEFT with the same 8 adapters, loaded from peftkit's files (one subfolder per named adapter, HF PEFT's
    layout)."""
    from peft import PeftModel

    hf = PeftModel.from_pretrained(copy.deepcopy(base), str(folder / "a0"), adapter_name="a0")
    for i in range(1, ADAPTERS):
        hf.load_adapter(str(folder / f"a{i}"), adapter_name=f"a{i}")
    return hf.eval()


def prompt_model(base: nn.Module, kind: str) -> nn.Module:
    """peftkit with 8 seeded prompt-tuning or prefix-tuning adapters of 16 virtual tokens."""
    from peftkit import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(2)
    make = (lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16)) if kind == "prompt" else (
        lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    pm = get_peft_model(copy.deepcopy(base), make(), adapter_name="a0")
    for i in range(1, ADAPTERS):
        pm.add_adapter(f"a{i}", make())
    with torch.no_grad():  # N(0, 1) prefixes swamp a random model's own keys; scale to its embeddings' size
        for p in pm.prompt_encoder.parameters():
            p.mul_(0.05)
    return pm.eval()


def generation_rows(args: argparse.Namespace) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Any]]:
    base = build_model(args)
    folder = Path(tempfile.mkdtemp(prefix="peftkit_gen_"))
    pk = lora_model(base, folder)
    hf = hf_lora_model(base, folder)
    prompt, prefix = prompt_model(base, "prompt"), prompt_model(base, "prefix")
    dora, hf_dora = dora_models(base, Path(tempfile.mkdtemp(prefix="peftkit_gen_dora_")))
    torch.manual_seed(3)
    ids = torch.randint(1, base.config.vocab_size, (args.batch, args.prompt_len))
    mask = torch.ones_like(ids)
    mixed = [f"a{i % ADAPTERS}" for i in range(args.batch)]
    greedy = {"attention_mask": mask, "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
              "do_sample": False, "pad_token_id": 0}

    def one(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            model.set_adapter("a0")
            return model.generate(input_ids=ids, **greedy)
        return run

    def many(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model.generate(input_ids=ids, adapter_names=mixed, **greedy)

    rows = {
        "base": lambda: base.generate(input_ids=ids, **greedy),
        "lora_1": one(pk), "lora_8_mixed": many(pk),
        **({f"lora_1_{args.baseline}": with_kernels(one(pk), args.baseline),
            f"lora_8_mixed_{args.baseline}": with_kernels(many(pk), args.baseline)} if args.baseline else {}),
        "hf_lora_1": one(hf), "hf_lora_8_mixed": many(hf),
        "dora_1": one(dora), "hf_dora_1": one(hf_dora),
        "prompt_1": one(prompt), "prompt_8_mixed": many(prompt),
        "prefix_1": one(prefix), "prefix_8_mixed": many(prefix),
    }
    with torch.no_grad():
        ours, theirs = rows["lora_8_mixed"](), rows["hf_lora_8_mixed"]()
        new = slice(args.prompt_len, None)
        same = (ours[:, new] == theirs[:, new]).float().mean().item()
        # each mixed row equals that row generated alone with its adapter (first 4 rows; the rest repeat them)
        alone = []
        for row in range(min(4, args.batch)):
            pk.set_adapter(mixed[row])
            single = {**greedy, "attention_mask": mask[row:row + 1]}
            alone.append(torch.equal(pk.generate(input_ids=ids[row:row + 1], **single)[0], ours[row]))
        dora_ours, dora_theirs, plain = rows["dora_1"](), rows["hf_dora_1"](), rows["base"]()
    checks = {"hf_peft_same_tokens": same, "rows_equal_alone": all(alone),
              "adapters_differ": not torch.equal(ours[0], ours[1]),
              "dora_hf_peft_same_tokens": (dora_ours[:, new] == dora_theirs[:, new]).float().mean().item(),
              "dora_differs_from_base": not torch.equal(dora_ours, plain)}
    return rows, checks


def with_kernels(run: Callable[[], torch.Tensor], revision: str) -> Callable[[], torch.Tensor]:
    """``run`` with LoraLinear's fused and per-row forwards taken from ``methods/lora_kernels.py`` as it was at the git
    ``revision`` (``--baseline``): the same model and adapters, the kernels of then, in the same process and turns."""
    sys.path.insert(0, str(Path(__file__).parent))
    from lora_dropout import baseline_kernels

    from peftkit.methods import lora as lora_module

    kernels = baseline_kernels(revision)

    def per_row_then(layer: nn.Module, x: torch.Tensor, result: torch.Tensor | None, rows: Any) -> torch.Tensor:
        # LoraLinear.forward now leaves the base layer to per_row_lora (result None); before session 14 it ran the
        # base layer and checked the adapters' mix itself, on every call
        if result is None:
            result = layer.base_layer(x)
        layer._check_row_mix(rows.names)
        return kernels.per_row_lora(layer, x, result, rows)

    def swapped() -> torch.Tensor:
        before = lora_module.lora_linear_forward, lora_module.per_row_lora
        lora_module.lora_linear_forward, lora_module.per_row_lora = kernels.lora_linear_forward, per_row_then
        try:
            return run()
        finally:
            lora_module.lora_linear_forward, lora_module.per_row_lora = before
    return swapped


def time_rows(rows: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each row once per round, in turn; one warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        for run in rows.values():
            run()
        for r in range(rounds):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
                  file=sys.stderr, flush=True)
    return times


RATIOS = [  # (name, numerator row, denominator row): tokens/s of the first over the second
    ("LoRA: 8 mixed / 1 adapter (peftkit)", "lora_8_mixed", "lora_1"),
    ("LoRA: 1 adapter / base", "lora_1", "base"),
    ("LoRA: 8 mixed, peftkit / HF PEFT", "lora_8_mixed", "hf_lora_8_mixed"),
    ("LoRA: 1 adapter, peftkit / HF PEFT", "lora_1", "hf_lora_1"),
    ("HF PEFT: 8 mixed / 1 adapter", "hf_lora_8_mixed", "hf_lora_1"),
    ("DoRA: 1 adapter / base", "dora_1", "base"),
    ("DoRA: 1 adapter, peftkit / HF PEFT", "dora_1", "hf_dora_1"),
    ("prompt tuning: 8 mixed / 1 adapter", "prompt_8_mixed", "prompt_1"),
    ("prefix tuning: 8 mixed / 1 adapter", "prefix_8_mixed", "prefix_1"),
]


def ratio_table(times: dict[str, list[float]], tokens: int, baseline: str | None = None) -> dict[str, Any]:
    rate = {n: [tokens / t for t in ts] for n, ts in times.items()}
    table = {"tokens_per_s": {n: statistics.median(r) for n, r in rate.items()}, "ratios": {}}
    ratios = RATIOS + ([(f"LoRA: 1 adapter, kernels now / {baseline}", "lora_1", f"lora_1_{baseline}"),
                        (f"LoRA: 8 mixed, kernels now / {baseline}", "lora_8_mixed", f"lora_8_mixed_{baseline}")]
                       if baseline else [])
    for label, top, bottom in ratios:
        if top in rate and bottom in rate:
            per_round = [a / b for a, b in zip(rate[top], rate[bottom], strict=True)]
            table["ratios"][label] = {"median": statistics.median(per_round), "min": min(per_round),
                                      "max": max(per_round)}
    return table


# ---- torch.compile against eager --------------------------------------------------------------------------
def compile_rows(args: argparse.Namespace) -> dict[str, Any]:
    from peftkit import LoraConfig, get_peft_model

    base = build_model(args)
    out: dict[str, Any] = {}
    torch.manual_seed(4)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    pm.train()
    ids = torch.randint(1, base.config.vocab_size, (4, 128))

    def step(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            pm.zero_grad(set_to_none=True)
            return loss.detach()
        return run

    eager_model = pm.base_model.model
    compiled_model = torch.compile(eager_model)
    out["train_step"] = compare_compiled(step(eager_model), step(compiled_model), args.rounds, grad=True)

    mixed_pm = lora_model(base, Path(tempfile.mkdtemp(prefix="peftkit_gen_c_")))
    names = [f"a{i % ADAPTERS}" for i in range(16)]
    ids16 = torch.randint(1, base.config.vocab_size, (16, 128))
    inner = mixed_pm.base_model.model
    compiled_inner = torch.compile(inner)

    def mixed(model: nn.Module) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with mixed_pm._per_row(names):
                return model(input_ids=ids16).logits
        return run

    out["mixed_forward"] = compare_compiled(mixed(inner), mixed(compiled_inner), args.rounds, grad=False)
    return out


def compare_compiled(eager: Callable[[], torch.Tensor], compiled: Callable[[], torch.Tensor], rounds: int,
                     grad: bool) -> dict[str, Any]:
    ctx = torch.enable_grad if grad else torch.no_grad
    with ctx():
        start = time.perf_counter()
        first = compiled()
        compile_s = time.perf_counter() - start
        reference = eager()
        eager_t, compiled_t = [], []
        for _ in range(rounds):
            for fn, bucket in ((eager, eager_t), (compiled, compiled_t)):
                start = time.perf_counter()
                fn()
                bucket.append(time.perf_counter() - start)
    per_round = [e / c for e, c in zip(eager_t, compiled_t, strict=True)]
    return {"eager_s": statistics.median(eager_t), "compiled_s": statistics.median(compiled_t),
            "speedup_median": statistics.median(per_round), "first_call_s": compile_s,
            "max_abs_diff": (first.float() - reference.float()).abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (--quick: 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the model (not --quick)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile rows")
    parser.add_argument("--compile-only", action="store_true", help="only the torch.compile rows")
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 round, result to a temp file")
    parser.add_argument("--rows", default=None, help="comma-separated subset of the rows, e.g. lora_1,lora_8_mixed")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--baseline", default=None, help="a git revision: adds lora_1 and lora_8_mixed rows through "
                        "that revision's lora_kernels.py (same model and adapters), e.g. --baseline 366b971")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens = 8
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"setup": {k: str(v) for k, v in vars(args).items()}}
    if not args.compile_only:
        rows, checks = generation_rows(args)
        if args.rows:
            rows = {name: rows[name] for name in args.rows.split(",")}
        times = time_rows(rows, args.rounds)
        result.update(checks=checks, times_s=times,
                      **ratio_table(times, args.batch * args.new_tokens, args.baseline))
    if args.compile or args.compile_only:
        result["compile"] = compile_rows(args)
    out = args.out or (Path(tempfile.gettempdir()) / "generation_quick.json" if args.quick
                       else RESULTS / "generation.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")


def print_table(result: dict[str, Any]) -> None:
    if "ratios" in result:
        print_generation(result)
    if "compile" in result:
        print("\n| torch.compile | eager s | compiled s | eager / compiled | first call s | max abs diff |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, c in result["compile"].items():
            print(f"| {name} | {c['eager_s']:.3f} | {c['compiled_s']:.3f} | {c['speedup_median']:.2f} | "
                  f"{c['first_call_s']:.0f} | {c['max_abs_diff']:.1e} |")


def print_generation(result: dict[str, Any]) -> None:
    print("| row | tokens/s (median) |\n|---|---:|")
    for name, value in result["tokens_per_s"].items():
        print(f"| {name} | {value:.1f} |")
    print("\n| ratio (tokens/s) | median | min–max over rounds |\n|---|---:|---:|")
    for label, r in result["ratios"].items():
        print(f"| {label} | {r['median']:.2f} | {r['min']:.2f}–{r['max']:.2f} |")
    print(f"\nchecks: {result['checks']}")


if __name__ == "__main__":
    main()
