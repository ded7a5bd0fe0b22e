"""peftkit compare on a tiny model and tiny data: report files, complete and consistent rows, error rows, resume,
and a Hub id as the model (fetched once by the parent, read from the cache by every worker)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_run
import yaml

from peftkit.compare import run_compare

FIELDS = ("method", "status", "lr", "trainable", "total", "trainable_pct", "step_s", "tokens_per_s", "peak_rss_mib",
          "saved_activation_mib", "adapter_bytes", "full_model_bytes", "size_vs_full", "metric", "metrics",
          "history", "forgetting", "lr_tried", "torch_train_mib", "torch_train_parts_mib")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    tiny_run.model_folder(root, "bert")
    tiny_run.classification_data(root / "cls.jsonl", n=48)
    cfg = {"model": {"name": str(root / "tiny-bert"), "max_length": 32, "pooling": "mean"},
           "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
           "data": {"train": str(root / "cls.jsonl")},
           "training": {"max_steps": 3, "batch_size": 8, "eval_every": 3, "log_every": 1, "output_dir": str(root / "out")}}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_report_rows_errors_and_resume(config, tmp_path):
    out = tmp_path / "report"
    logs: list[str] = []
    report = run_compare(str(config), ["full", "lora", "head", "ia3"], out=str(out), echo=logs.append,
                         options={"ia3": {"target_modules": ["no_such_module"]}})
    for name in ("compare.json", "compare.md", "compare.html", "loss_curves.png", "metric_vs_params.png",
                 "time_memory.png"):
        assert (out / name).is_file(), name
    rows = {r["method"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert list(rows) == ["full", "lora", "head", "ia3"]
    assert rows["ia3"]["status"] == "error" and "no_such_module" in rows["ia3"]["error"]
    for name in ("full", "lora", "head"):
        row = rows[name]
        assert row["status"] == "ok"
        missing = [f for f in FIELDS if f not in row]
        assert not missing, (name, missing)
        assert row["trainable_pct"] == pytest.approx(100.0 * row["trainable"] / row["total"])
        assert 0.0 <= row["metrics"]["accuracy"] <= 1.0
        assert row["steps"] == 3 and [h["step"] for h in row["history"] if h["split"] == "train"] == [1, 2, 3]
        assert row["forgetting"]["before"] is not None and row["adapter_bytes"] > 0
    assert rows["full"]["trainable_pct"] == pytest.approx(100.0)
    for name in ("full", "lora", "head"):  # torch-level memory: its parts, and AdamW's two moments per trainable
        row, parts = rows[name], rows[name]["torch_train_parts_mib"]
        assert row["torch_train_mib"] == pytest.approx(sum(parts.values()))
        assert parts["gradients"] == pytest.approx(row["trainable"] * 4 / 2**20)
        # AdamW keeps two moments (+ a 'step' scalar) per parameter that got a gradient; under full fine-tuning
        # the BERT pooler, which mean pooling never reads, gets none
        if name == "full":
            assert 1.9 * parts["gradients"] < parts["optimizer_state"] <= 2.001 * parts["gradients"]
        else:
            assert parts["optimizer_state"] == pytest.approx(2 * parts["gradients"], abs=1e-4)  # 4 B a step
    assert rows["full"]["torch_train_mib"] > rows["lora"]["torch_train_mib"] > rows["head"]["torch_train_mib"]
    assert rows["head"]["forgetting"]["after"] == rows["head"]["forgetting"]["before"]  # the encoder is untouched
    assert rows["head"]["saved_activation_mib"] < rows["lora"]["saved_activation_mib"]
    assert rows["lora"]["trainable"] == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2
    md = (out / "compare.md").read_text()
    assert "| ia3 |" in md and "error:" in md and "| lora |" in md
    assert f"macro-F1 {rows['lora']['metrics']['f1']:.4f}" in md
    # the report says what the command changed from the config (a table made with --option says so)
    assert "with --option ia3.target_modules=['no_such_module']." in md
    # resume: finished methods are skipped; the failed one runs again (and now succeeds)
    logs.clear()
    report = run_compare(str(config), ["full", "lora", "head", "ia3"], out=str(out), echo=logs.append, resume=True)
    assert sum("done earlier, skipped" in line for line in logs) == 3
    assert [r["status"] for r in report["rows"]] == ["ok"] * 4
    assert report["rows"][1]["lr"] == rows["lora"]["lr"]


# ---- the report folder, the terminal table and the plots (no training: rows made up) --------------------------
def _row(method: str, steps: int = 6, **extra) -> dict:
    history = [{"step": s, "split": "train", "loss": 2.0 - 0.1 * s} for s in range(1, steps + 1)]
    history += [{"step": steps, "split": "eval", "loss": 1.5}]
    return {"method": method, "status": "ok", "lr": 1e-3, "trainable": 12_345, "total": 22_000_000,
            "trainable_pct": 0.056, "step_s": 0.123, "tokens_per_s": 2000.0, "peak_rss_mib": 1234.0,
            "torch_train_mib": 300.0, "saved_activation_mib": 45.6, "adapter_bytes": 50_000, "size_vs_full": 0.0021,
            "metric": "accuracy", "metrics": {"accuracy": 0.9123, "f1": 0.91, "loss": 0.33},
            "forgetting": {"before": 0.5123, "after": 0.5011, "probe": "retrieval@1"}, "history": history, **extra}


METHODS_SHOWN = ["full", "lora", "delta_lora", "loraplus", "p_tuning", "prefix"]


def test_default_report_folder_is_not_doubled(tmp_path, monkeypatch):
    from peftkit.compare import default_config, report_folder
    from peftkit.train.spec import parse_spec

    monkeypatch.chdir(tmp_path)
    spec = parse_spec(default_config("classify"))
    assert report_folder(spec, default_config_used=True) == "runs/compare"
    spec = parse_spec(default_config("chat"))
    assert report_folder(spec, default_config_used=True) == "runs/compare-chat"
    spec = parse_spec({"training": {"output_dir": "runs/mine"}})
    assert report_folder(spec, default_config_used=False) == os.path.join("runs", "mine", "compare")


def test_terminal_table_is_one_line_per_method_at_80_columns():
    import io

    from rich.console import Console

    from peftkit.cli import print_compare_table

    rows = [_row(m) for m in METHODS_SHOWN]
    rows.append({"method": "ia3", "status": "error", "lr": 1e-2, "error": "no module matched target_modules"})
    buf = io.StringIO()
    print_compare_table({"rows": rows}, Console(file=buf, width=80, color_system=None))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    for method in [*METHODS_SHOWN, "ia3"]:
        mine = [line for line in lines if line.strip().startswith(method + " ")]
        assert len(mine) == 1, (method, lines)
    assert "0.9123" in buf.getvalue() and "0.512→0.501" in buf.getvalue()
    assert "ia3: error: no module matched target_modules" in lines


def test_plots_integer_steps_and_a_legend_that_hides_no_bar():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from peftkit.compare import loss_figure, time_memory_figure

    ok = [_row(m, steps=3) for m in METHODS_SHOWN]
    fig = loss_figure(ok)
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    plt.close(fig)
    fig = time_memory_figure(ok)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    memory = fig.axes[1]
    legend = memory.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in memory.patches if isinstance(p, Rectangle)]
    assert len(bars) == 2 * len(ok)
    assert not [b for b in bars if b.overlaps(legend)]
    assert not legend.overlaps(memory.get_window_extent(renderer))  # below the panel, not over it
    plt.close(fig)


# ---- a Hub id as the model: fetched once by the parent, read offline by every worker ----------------------------
# No hub can be reached here: the cache is built in huggingface_hub's own layout (models--org--name/snapshots/
# <commit>, refs/main) in a temporary folder, and the one test of an online fetch captures the download call.
COMMIT = "3" * 40


def _hub_config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """(run.yaml naming the model ``name``, the cache folder), with tiny-bert cached as org/tiny-bert: a BERT built
    from a transformers config (tiny_run), copied into huggingface_hub's cache layout; nothing is downloaded."""
    import shutil

    source = tiny_run.model_folder(tmp_path / "src", "bert")
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-bert"
    shutil.copytree(source, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    tiny_run.classification_data(tmp_path / "cls.jsonl", n=48)
    cfg = {"model": {"name": name, "max_length": 32, "pooling": "mean"},
           "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
           "data": {"train": str(tmp_path / "cls.jsonl")},
           "training": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "log_every": 1,
                        "output_dir": str(tmp_path / "out")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "run.yaml", cache


def _compare_cli(config: Path, cache: Path, out: Path, methods: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "peftkit", "compare", str(config), "--methods", methods, "--quick",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)


def test_compare_runs_a_cached_hub_model_offline(tmp_path) -> None:
    config, cache = _hub_config(tmp_path, "org/tiny-bert")
    out = tmp_path / "report"
    proc = _compare_cli(config, cache, out, "lora")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["meta"]["model"] == "org/tiny-bert" and report["meta"]["task"] == "classification"
    (row,) = report["rows"]
    assert row["status"] == "ok", row.get("error")
    assert row["trainable"] == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2  # q, v LoRA on 2 layers + the 2-class head
    adapter = json.loads((out / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "org/tiny-bert"  # the id, as HF PEFT records it


def test_compare_of_an_uncached_hub_model_offline_fails_once_before_any_worker(tmp_path) -> None:
    config, cache = _hub_config(tmp_path, "org/absent")
    out = tmp_path / "report"
    proc = _compare_cli(config, cache, out, "lora,ia3,head")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'org/absent' "), proc.stderr
    assert "Hugging Face cache" in lines[0] and lines[0].endswith("fetch it once with: hf download org/absent")
    assert "training at lr" not in proc.stdout  # no method started: the old code ran 3 workers, 3 failures
    assert not (out / "work").exists() and not (out / "compare.json").exists()


def test_compare_fetches_an_uncached_hub_model_once_then_workers_run_offline(tmp_path, monkeypatch) -> None:
    """Online (no HF_HUB_OFFLINE): the parent calls huggingface_hub's snapshot_download once, for the model's
    config, tokenizer and safetensors files only; each worker starts with HF_HUB_OFFLINE=1. No hub can be
    reached, so the download is captured: it puts the files where huggingface_hub would. The workers are
    captured too (test_compare_runs_a_cached_hub_model_offline runs a real one on such a cache)."""
    import shutil

    import huggingface_hub

    from peftkit import compare
    from peftkit.hub import MODEL_FILES

    config, cache = _hub_config(tmp_path, "org/tiny-bert")
    snapshot = cache / "models--org--tiny-bert" / "snapshots" / COMMIT
    shutil.move(snapshot, tmp_path / "remote")  # on the Hub, not in the cache
    downloads, workers = [], []

    def snapshot_download(repo_id, **kwargs):
        downloads.append((repo_id, kwargs))
        shutil.copytree(tmp_path / "remote", snapshot)
        return str(snapshot)

    real_run = subprocess.run

    def run(argv, **kwargs):
        if "--worker" not in argv:  # subprocess is one module for the whole process: capture the workers only
            return real_run(argv, **kwargs)
        workers.append(kwargs["env"].get("HF_HUB_OFFLINE"))
        return subprocess.CompletedProcess(argv, 1, "", "worker captured by the test\n")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(compare.subprocess, "run", run)
    report = run_compare(str(config), ["lora", "ia3", "head"], out=str(tmp_path / "report"), quick=True,
                         echo=lambda line: None)
    assert [repo for repo, _ in downloads] == ["org/tiny-bert"]  # once, for three methods
    kwargs = downloads[0][1]
    assert kwargs["allow_patterns"] == list(MODEL_FILES) and "*.bin" not in kwargs["allow_patterns"]
    assert not kwargs.get("local_files_only")
    assert workers == ["1", "1", "1"]
    assert [r["error"] for r in report["rows"]] == ["worker captured by the test"] * 3
