"""peftkit compare on a tiny model and tiny data: report files, complete and consistent rows, error rows, resume."""

from __future__ import annotations

import json
import os
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
