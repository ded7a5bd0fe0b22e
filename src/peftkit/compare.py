"""``peftkit compare``: which method for my model, data and machine? Measured, not estimated.

Every method runs the same data, the same number of optimizer steps over the same examples in the same
order, the same seed, each at its paper's learning rate (``peftkit.train.methods``; ``--lr m=v`` or
``--sweep`` to change that), one after another, each in a fresh subprocess: a crash or an out-of-memory
kill becomes an explicit error row and the other methods still run. Results are written atomically
after every method, and ``--resume`` skips the methods already done.

Per method: trainable parameters (count, % of the model), step time and throughput, peak process memory
during training (VmHWM reset before the first step), torch-level training memory (weights, gradients,
optimizer state and the bytes autograd saves for backward in one step; what a GPU would have to hold),
the saved bytes alone, adapter size against the full model's, the task metric on the held-out split, train/eval loss
curves, and **forgetting**: the model's quality on its original domain before and after the fine-tune,
with the adapter active — for an encoder, question→answer retrieval accuracy with its sentence
embeddings (chatterbot-corpus pairs); for a causal LM, perplexity on general text (BBC News articles).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

from .errors import PeftError
from .io import atomic_write_bytes

RESULTS = "compare.json"
PROBE_PAIRS = 200


# ---- one method, in a worker process ---------------------------------------------------------------


def _saved_bytes(runner: Any) -> int:
    """Bytes autograd keeps for backward in one training micro-batch (distinct storages, counted when
    backward unpacks them). The RNG state is restored and gradients cleared: training is unaffected."""
    import torch

    rng = torch.get_rng_state()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    batches, denom = runner._micro_batches(0)
    runner.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss, _, _ = runner._loss_sum("train", batches[0])
        (loss / denom).backward()
    runner.optimizer.zero_grad(set_to_none=True)
    torch.set_rng_state(rng)
    return sum(seen.values())


def _probe(runner: Any, adapter_on: bool) -> dict[str, Any]:
    """The model's quality on its original domain (see the module docstring)."""
    import contextlib

    import torch

    model = runner.model
    off = model.disable_adapter() if (not adapter_on and hasattr(model, "disable_adapter")) else contextlib.nullcontext()
    n = runner.probe_n
    was = model.training
    model.eval()
    try:
        with off, torch.no_grad():
            if runner.task == "classification":
                from .embedded import load_chatterbot_pairs
                from .train.data import Example, collate
                from .train.modeling import classifier_module

                seen: dict[str, str] = {}
                for q, a in load_chatterbot_pairs():
                    seen.setdefault(q, a)
                pairs = list(seen.items())[:n]
                captured: list[torch.Tensor] = []
                hook = classifier_module(_unwrapped(model)).register_forward_hook(
                    lambda m, args, out: captured.append(args[0].detach()))
                try:
                    def embed(texts: list[str]) -> torch.Tensor:
                        out = []
                        for i in range(0, len(texts), 32):
                            ex = [Example(runner.tokenizer(t, truncation=True, max_length=64)["input_ids"], label=0)
                                  for t in texts[i: i + 32]]
                            b = collate(ex, runner.tokenizer.pad_token_id)
                            captured.clear()
                            model(input_ids=b["input_ids"].to(runner.device),
                                  attention_mask=b["attention_mask"].to(runner.device))
                            out.append(captured[-1].float())
                        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

                    q, a = embed([p[0] for p in pairs]), embed([p[1] for p in pairs])
                finally:
                    hook.remove()
                hits = (q @ a.T).argmax(-1) == torch.arange(len(pairs), device=q.device)
                return {"probe": f"chatterbot question->answer retrieval@1 ({len(pairs)} pairs)",
                        "value": float(hits.float().mean()), "higher_is_better": True}
            from .embedded import load_bbc_split
            from .train.data import Example, collate

            split = load_bbc_split(seed=1, test_frac=0.2)
            texts = split.test_texts[:n]
            total, count = 0.0, 0
            for i in range(0, len(texts), 8):
                ex = [Example(ids, lm_labels=list(ids)) for ids in
                      (runner.tokenizer(t, truncation=True, max_length=runner.spec.model.max_length)["input_ids"]
                       for t in texts[i: i + 8])]
                b = collate(ex, runner.tokenizer.pad_token_id)
                logits = model(input_ids=b["input_ids"].to(runner.device),
                               attention_mask=b["attention_mask"].to(runner.device)).logits
                labels = b["labels"].to(runner.device)
                logits = logits[:, -labels.shape[1]:]
                total += float(torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                    ignore_index=-100, reduction="sum"))
                count += int((labels[:, 1:] != -100).sum())
            return {"probe": f"perplexity on general text (BBC News, {len(texts)} articles)",
                    "value": math.exp(total / max(count, 1)), "higher_is_better": False}
    finally:
        model.train(was)


def _unwrapped(model: Any) -> Any:
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if base is not None else model


def run_worker(task_file: str) -> None:
    """Train one method as ``task_file`` describes and write its row to ``task["result"]``."""
    import torch

    from .train.loop import Runner
    from .train.methods import method_entry
    from .train.spec import parse_spec

    with open(task_file, encoding="utf-8") as fh:
        task = json.load(fh)
    torch.set_num_threads(task.get("threads") or torch.get_num_threads())
    spec = parse_spec(task["config"], task.get("base_dir", "."), "compare")
    entry = method_entry(spec.method.name)
    row: dict[str, Any] = {"method": entry.name, "lr": spec.training.lr, "lr_source": task.get("lr_source", "")}
    runner = Runner(spec, quiet=True, overwrite=True)  # compare owns runs/<method>: a rerun starts it clean
    runner.probe_n = task.get("probe_n", PROBE_PAIRS)
    before = _probe(runner, adapter_on=False)
    saved = _saved_bytes(runner)
    from .measure import current_rss, peak_rss, reset_peak_rss

    rss0 = current_rss()
    reset = reset_peak_rss()  # without it (not Linux), the peak also covers loading the model
    result = runner.train()
    peak = peak_rss()
    after = _probe(runner, adapter_on=True)
    base_bytes = runner.base_bytes
    from .quantize import model_weight_bytes

    weights = model_weight_bytes(runner.model)  # base + adapters (quantised weights by their packed bytes)
    grads = sum(p.numel() * p.element_size() for p in runner.model.parameters() if p.requires_grad)
    optim = sum(t.numel() * t.element_size() for st in runner.optimizer.state.values() for t in st.values()
                if torch.is_tensor(t))
    row.update(
        status="ok", task=result.task, steps=result.steps, trainable=result.trainable, total=result.total,
        trainable_pct=100.0 * result.trainable / result.total, step_s=result.step_s,
        tokens_per_s=result.tokens_per_s, wall_s=result.wall_s,
        peak_rss_mib=peak / 2**20, peak_is_training_only=reset, train_rss_growth_mib=max(0, peak - rss0) / 2**20,
        saved_activation_mib=saved / 2**20, adapter_bytes=result.adapter_bytes, full_model_bytes=base_bytes,
        torch_train_mib=(weights + grads + optim + saved) / 2**20,
        torch_train_parts_mib={"weights": weights / 2**20, "gradients": grads / 2**20,
                               "optimizer_state": optim / 2**20, "saved_activations": saved / 2**20},
        size_vs_full=result.adapter_bytes / base_bytes if base_bytes else None,
        metric=runner.metric_name, metrics=result.metrics, history=result.history,
        forgetting={"probe": before["probe"], "before": before["value"], "after": after["value"],
                    "change": after["value"] - before["value"], "higher_is_better": before["higher_is_better"]},
        description=entry.description,
    )
    if torch.cuda.is_available():
        row["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    atomic_write_bytes(task["result"], (json.dumps(row) + "\n").encode())


# ---- the runner ---------------------------------------------------------------------------------------


def default_config(task: str) -> dict[str, Any]:
    from .demo import chat_config, classify_config

    if task == "classify":
        cfg = classify_config("lora", "runs/compare")
        cfg["training"].update(eval_every=25, log_every=2)
        return cfg
    if task == "chat":
        cfg = chat_config("lora", "runs/compare-chat")
        cfg["training"].update(max_steps=40, eval_every=20, log_every=2)
        return cfg
    raise PeftError(f"unknown compare task {task!r}; use classify or chat (or give a CONFIG.yaml)")


def _apply_quick(cfg: dict[str, Any]) -> None:
    cfg["data"].update(max_train=48, max_eval=32)
    t = cfg["training"]
    t.update(max_steps=4, eval_every=2, log_every=1, batch_size=min(8, t.get("batch_size", 8)))
    t.pop("epochs", None)


def method_config(base: dict[str, Any], method: str, lr: float | None, options: dict[str, Any]) -> dict[str, Any]:
    from .demo import _LORA_FAMILY
    from .train.methods import method_entry

    cfg = copy.deepcopy(base)
    given = dict(cfg.get("method") or {})
    keep = {}
    if method in _LORA_FAMILY and given.get("name") in _LORA_FAMILY:
        keep = {k: v for k, v in given.items() if k in ("r", "lora_alpha", "target_modules")}
        keep = {k: v for k, v in keep.items() if k in method_entry(method).option_names()}
    cfg["method"] = {"name": method, **keep, **options}
    cfg["training"] = dict(cfg.get("training") or {})
    cfg["training"]["lr"] = lr
    return cfg


def _worker_row(cfg: dict[str, Any], base_dir: str, work: str, name: str, probe_n: int, threads: int | None,
                lr_source: str, timeout: float | None) -> dict[str, Any]:
    os.makedirs(work, exist_ok=True)
    task_file = os.path.join(work, f"{name}.task.json")
    result_file = os.path.join(work, f"{name}.result.json")
    if os.path.exists(result_file):
        os.unlink(result_file)
    atomic_write_bytes(task_file, json.dumps({"config": cfg, "base_dir": base_dir, "result": result_file,
                                              "probe_n": probe_n, "threads": threads,
                                              "lr_source": lr_source}).encode())
    t0 = time.perf_counter()
    try:  # offline: a Hub model was fetched once by the parent (fetch_hub_model); every worker reads the cache
        proc = subprocess.run([sys.executable, "-m", "peftkit.compare", "--worker", task_file],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode == 0 and os.path.exists(result_file):
        with open(result_file, encoding="utf-8") as fh:
            return json.loads(fh.read())
    if proc.returncode < 0:
        why = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if proc.returncode == -9 else "")
    else:
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit status {proc.returncode}"
    return {"status": "error", "error": why[-500:], "wall_s": time.perf_counter() - t0}


def fetch_hub_model(spec: Any) -> str | None:
    """A Hub id as ``model.name``: its files fetched into huggingface_hub's cache here, once, before any worker
    starts (``HF_HUB_OFFLINE=1`` set by the user: the cache alone, and a model missing from it is one error line
    naming the id and the command that fetches it). The workers run with ``HF_HUB_OFFLINE=1`` and load the model
    by its id from that cache, so N methods never mean N downloads, nor N identical failures. Returns the
    snapshot folder, or None for a local folder or an embedded model."""
    from .hub import fetch_model, is_hub_id

    name = spec.model.name
    if os.path.isdir(spec.resolve(name)) or not is_hub_id(name):
        return None  # a local folder (transformers never reaches the network for one) or minilm / smollm2
    return fetch_model(name, gguf_file=spec.model.gguf_file)


def report_folder(spec: Any, default_config_used: bool) -> str:
    """Where the report goes without --out: a default config's output_dir is the report folder itself
    (runs/compare, runs/compare-chat); a user's config names a run folder, and the report goes in its
    ``compare/`` sub-folder, next to nothing a single run writes."""
    folder = spec.resolve(spec.training.output_dir)
    return folder if default_config_used else os.path.join(folder, "compare")


def console_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, error lines) for the terminal: six short columns, so each method is one line at 80
    columns; every column is in compare.md / compare.html. A failed method's error is a line below the table."""
    head = ["method", "% params", "step ms", "RSS MiB", "", "forgetting"]
    rows, errors = [], []
    metric = ""
    for r in report["rows"]:
        if r.get("status") != "ok":
            rows.append([r["method"], "-", "-", "-", "-", "-"])
            errors.append(f"{r['method']}: error: {r.get('error', '?')}")
            continue
        metric = metric or r["metric"]
        f = r["forgetting"]
        rows.append([r["method"], _fmt(r["trainable_pct"], ".3f"), _fmt(r["step_s"] * 1000, ",.0f"),
                     _fmt(r["peak_rss_mib"], ",.0f"), _fmt(r["metrics"].get(r["metric"])),
                     f"{_fmt(f['before'], '.3f')}→{_fmt(f['after'], '.3f')}"])
    head[4] = f"eval {metric}" if metric else "eval"
    return head, rows, errors


def run_compare(config: str | None = None, methods: list[str] | None = None, task: str = "classify",
                out: str | None = None, quick: bool = False, sweep: bool = False, resume: bool = False,
                lrs: dict[str, float] | None = None, options: dict[str, dict[str, Any]] | None = None,
                overrides: list[str] | None = None, threads: int | None = None,
                timeout: float | None = None, echo: Any = print) -> dict[str, Any]:
    """Run the comparison and write ``compare.json``, ``compare.md``, ``compare.html`` and plots in ``out``."""
    import yaml

    from .train.methods import METHODS
    from .train.spec import apply_overrides, parse_spec

    if config is not None:
        if not os.path.isfile(config):
            raise PeftError(f"config file not found: {config!r}")
        with open(config, encoding="utf-8") as fh:
            base = yaml.safe_load(fh) or {}
        base_dir = os.path.dirname(os.path.abspath(config))
    else:
        base, base_dir = default_config(task), "."
    base = apply_overrides(base, list(overrides or []))
    if quick:
        _apply_quick(base)
    spec = parse_spec(base, base_dir, config or f"default {task} config")  # every problem, before any work
    fetch_hub_model(spec)  # a Hub id: fetched (or found in the cache) once, here; the workers stay offline
    from .train.modeling import model_task

    model_kind = model_task(spec)
    fitting = [m for m, e in METHODS.items() if model_kind in e.tasks]
    chosen = methods or fitting
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise PeftError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    out = out or report_folder(spec, config is None)
    os.makedirs(out, exist_ok=True)
    results_path = os.path.join(out, RESULTS)
    rows: dict[str, dict[str, Any]] = {}
    if resume and os.path.exists(results_path):
        with open(results_path, encoding="utf-8") as fh:
            rows = {r["method"]: r for r in json.load(fh).get("rows", [])}
    meta = {"config": config or f"default ({task})", "model": spec.model.name, "task": model_kind,
            "data": spec.data.train, "quick": quick, "sweep": sweep, "methods": chosen,
            "steps": spec.training.max_steps, "seed": spec.training.seed, "overrides": list(overrides or []),
            "options": {m: dict(o) for m, o in (options or {}).items()}, "lrs": dict(lrs or {})}
    probe_n = 32 if quick else PROBE_PAIRS
    for method in chosen:
        if method in rows and rows[method].get("status") == "ok":
            echo(f"{method}: done earlier, skipped")
            continue
        lr0, source = _rate(method, task if config is None else None, lrs or {})
        candidates = [lr0 * f for f in (0.3, 1.0, 3.0)] if sweep else [lr0]
        tried = []
        best: dict[str, Any] | None = None
        for i, lr in enumerate(candidates):
            cfg = method_config(base, method, lr, (options or {}).get(method, {}))
            cfg["training"]["output_dir"] = os.path.join(out, "runs", f"{method}-{i}" if sweep else method)
            echo(f"{method}: training at lr {lr:.2e} ...")
            row = _worker_row(cfg, base_dir, os.path.join(out, "work"), f"{method}-{i}", probe_n, threads,
                              source, timeout)
            row.update(method=method, lr=lr)
            tried.append({"lr": lr, "status": row["status"], "metrics": row.get("metrics")})
            if row["status"] == "ok" and (best is None or _better(row, best)):
                best = row
            elif best is None and row["status"] != "ok":
                best = row
        assert best is not None
        best["lr_tried"] = tried
        rows[method] = best
        echo(f"{method}: {best['status']}" + (f" ({best.get('error')})" if best["status"] != "ok" else
                                              f", eval {best['metric']} {best['metrics'].get(best['metric'], float('nan')):.4f}"))
        report = {"meta": meta, "rows": [rows[m] for m in chosen if m in rows]}
        atomic_write_bytes(results_path, (json.dumps(report, indent=1) + "\n").encode())
        write_report(report, out)
    report = {"meta": meta, "rows": [rows[m] for m in chosen if m in rows]}
    write_report(report, out)
    return {**report, "out": out}


def _rate(method: str, default_task: str | None, lrs: dict[str, float]) -> tuple[float, str]:
    """(learning rate, where it comes from): ``--lr`` first; the default runs' short-run rates (see
    peftkit.demo); otherwise the method's paper rate (peftkit.train.methods)."""
    from .demo import CHAT_LR, DEMO_LR
    from .train.methods import METHODS

    if method in lrs:
        return float(lrs[method]), "--lr"
    if default_task is not None:
        table = DEMO_LR if default_task == "classify" else CHAT_LR
        if method in table:
            return table[method], "short-run rate of the default task (peftkit.demo)"
    return METHODS[method].lr, METHODS[method].source


def _better(row: dict[str, Any], best: dict[str, Any]) -> bool:
    m = row["metric"]
    a, b = row["metrics"].get(m, float("nan")), best["metrics"].get(m, float("nan"))
    return a > b if m == "accuracy" else a < b


# ---- the report -------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _metric_text(row: dict[str, Any]) -> str:
    m, metrics = row["metric"], row["metrics"]
    text = f"{m} {_fmt(metrics.get(m))}"
    return text + (f", macro-F1 {_fmt(metrics['f1'])}" if "f1" in metrics else "")


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "lr", "trainable", "% of model", "step ms", "tokens/s", "peak RSS MiB", "torch MiB",
            "saved act. MiB", "adapter KiB", "vs full model", "eval metric", "eval loss",
            "forgetting (before → after)", "status"]
    body = []
    for r in report["rows"]:
        if r.get("status") != "ok":
            body.append([r["method"], _fmt(r.get("lr"), ".1e")] + ["-"] * (len(head) - 3)
                        + [f"error: {r.get('error', '?')}"])
            continue
        f = r["forgetting"]
        body.append([
            r["method"], _fmt(r["lr"], ".1e"), f"{r['trainable']:,}", _fmt(r["trainable_pct"], ".3f"),
            _fmt(r["step_s"] * 1000, ".0f"), _fmt(r["tokens_per_s"], ",.0f"), _fmt(r["peak_rss_mib"], ",.0f"),
            _fmt(r.get("torch_train_mib"), ",.0f"), _fmt(r["saved_activation_mib"], ",.1f"), _fmt(r["adapter_bytes"] / 1024, ",.1f"),
            _fmt(r["size_vs_full"], ".4f"), _metric_text(r), _fmt(r["metrics"].get("loss")),
            f"{_fmt(f['before'])} → {_fmt(f['after'])}", "ok",
        ])
    return head, body


def loss_figure(ok: list[dict[str, Any]]) -> Any:
    """Train and eval loss per optimizer step, one line per method (whole-number step ticks)."""
    import matplotlib.pyplot as plt

    from .train.report import integer_steps

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    palette = plt.get_cmap("tab20")
    for i, r in enumerate(ok):  # 20 distinct colours, then dashed: no two methods share a look
        look = {"color": palette((2 * i) % 20 + (i // 10) % 2), "linestyle": "-" if i < 20 else "--"}
        tr = [(h["step"], h["loss"]) for h in r["history"] if h["split"] == "train"]
        ev = [(h["step"], h["loss"]) for h in r["history"] if h["split"] == "eval"]
        if tr:
            a1.plot(*zip(*tr, strict=True), label=r["method"], **look)
        if ev:
            a2.plot(*zip(*ev, strict=True), marker="o", label=r["method"], **look)
    for ax, title in ((a1, "train loss (mean since the previous row)"), (a2, "eval loss")):
        ax.set_xlabel("optimizer step")
        integer_steps(ax)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a2.legend(fontsize=8, ncol=2)
    return fig


def time_memory_figure(ok: list[dict[str, Any]]) -> Any:
    """Step time, training memory (two bars per method) and autograd-saved activations. The memory panel's
    legend sits below its axes, where it cannot hide a bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4.5 + 0.15 * len(ok)))
    names = [r["method"] for r in ok]
    a1.barh(names, [r["step_s"] * 1000 for r in ok])
    a1.set_title("step time (ms)")
    ys = np.arange(len(names))
    a2.barh(ys - 0.2, [r["peak_rss_mib"] for r in ok], height=0.4, label="peak process RSS")
    a2.barh(ys + 0.2, [r.get("torch_train_mib") or 0 for r in ok], height=0.4,
            label="torch level (weights, grads, optimizer, saved)")
    a2.set_yticks(ys, names)
    a2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    a2.set_title("training memory (MiB)")
    a3.barh(names, [r["saved_activation_mib"] for r in ok])
    a3.set_title("autograd-saved activations (MiB)")
    for ax in (a1, a2, a3):
        ax.grid(alpha=0.3, axis="x")
    return fig


def _plots(report: dict[str, Any]) -> dict[str, bytes]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    ok = [r for r in report["rows"] if r.get("status") == "ok"]
    if not ok:
        return {}
    pngs: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        pngs[name] = buf.getvalue()

    save(loss_figure(ok), "loss_curves.png")

    metric = ok[0]["metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in ok:
        ax.scatter(r["trainable"], r["metrics"].get(metric), s=30)
        ax.annotate(r["method"], (r["trainable"], r["metrics"].get(metric)), fontsize=8, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"eval {metric}")
    ax.grid(alpha=0.3)
    save(fig, "metric_vs_params.png")
    save(time_memory_figure(ok), "time_memory.png")
    return pngs


def _changes_text(meta: dict[str, Any]) -> str:
    """What the command changed from the config: a table made with --set/--option/--lr says so."""
    parts = [f"--set {o}" for o in meta.get("overrides", [])]
    parts += [f"--option {m}.{k}={v}" for m, opts in meta.get("options", {}).items() for k, v in opts.items()]
    parts += [f"--lr {m}={v:g}" for m, v in meta.get("lrs", {}).items()]
    return f" with {' '.join(parts)}" if parts else ""


def write_report(report: dict[str, Any], out: str) -> None:
    head, body = table_rows(report)
    meta = report["meta"]
    md = [f"# peftkit compare: {meta['model']} ({meta['task']}) on {meta['data']}", "",
          f"Config: {meta['config']}{_changes_text(meta)}. Same examples in the same order, same seed and the same number of "
          f"optimizer steps for every method{' (quick mode)' if meta['quick'] else ''}. "
          "Forgetting: the model's quality on its original domain with the adapter active, before → after "
          "(" + (report["rows"][0].get("forgetting", {}).get("probe", "") if report["rows"] else "") + "). "
          "Adapter KiB: the folder as deployed (a P-tuning or projected-prefix encoder, kept beside it to resume "
          "training, is not counted; inference and HF PEFT read the virtual tokens it made).", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    pngs = _plots(report)
    for name, data in pngs.items():
        atomic_write_bytes(os.path.join(out, name), data)
        md += ["", f"![{name}]({name})"]
    atomic_write_bytes(os.path.join(out, "compare.md"), ("\n".join(md) + "\n").encode())
    import html

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    imgs = "".join(f'<h3>{html.escape(n)}</h3><img src="data:image/png;base64,{base64.b64encode(d).decode()}">'
                   for n, d in pngs.items())
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>peftkit compare</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>"
            f"<h1>peftkit compare: {html.escape(str(meta['model']))} on {html.escape(str(meta['data']))}</h1>"
            f"<p>{html.escape(md[2])}</p><table><tr>{cells}</tr>{trs}</table>{imgs}</body></html>")
    atomic_write_bytes(os.path.join(out, "compare.html"), page.encode())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            run_worker(sys.argv[2])
        except Exception as exc:  # noqa: BLE001 - the parent records it as the method's error row
            sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
            raise SystemExit(1) from None
    else:
        sys.stderr.write("usage: peftkit compare ... (this module's own entry point is the worker)\n")
        raise SystemExit(2)
