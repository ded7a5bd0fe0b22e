"""peftkit compare on a tiny model and tiny data: report files, complete and consistent rows, error rows, resume."""

from __future__ import annotations

import json
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
    # resume: finished methods are skipped; the failed one runs again (and now succeeds)
    logs.clear()
    report = run_compare(str(config), ["full", "lora", "head", "ia3"], out=str(out), echo=logs.append, resume=True)
    assert sum("done earlier, skipped" in line for line in logs) == 3
    assert [r["status"] for r in report["rows"]] == ["ok"] * 4
    assert report["rows"][1]["lr"] == rows["lora"]["lr"]
