"""The demos on their real models and data (packages), with reduced step counts: slow, but CI runs them."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_classify_demo_trains_saves_and_reloads_identically(tmp_path, capsys):
    from peftkit.demo import run_demo

    out = run_demo("classify", "lora", steps=2, out=str(tmp_path),
                   overrides=["data.max_train=40", "data.max_eval=40", "training.batch_size=8"])
    header = capsys.readouterr().out.splitlines()[0]  # counted from the split, not a hard-coded 445
    assert header == "peftkit demo: all-MiniLM-L6-v2 on BBC News topics (5 classes; 40 training / 40 held-out articles)"
    result = out["result"]
    assert 0.0 <= out["baseline"]["metrics"]["accuracy"] <= 1.0
    assert out["reload_accuracy"] == result["metrics"]["accuracy"]
    assert result["steps"] == 2 and result["trainable"] < 0.02 * result["total"]
    run = tmp_path / "lora"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "plot.png").is_file()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [1, 2]


def test_demo_header_counts_the_whole_held_out_split():
    """The full BBC split the demo reads (800 training articles, 20% held out): 444 held out, not 445."""
    from peftkit.demo import _apply, classify_config, data_line
    from peftkit.train.data import build_dataset
    from peftkit.train.modeling import load_tokenizer

    spec = _apply(classify_config("head", "unused"), [])
    data = build_dataset(spec, load_tokenizer(spec), "classification")
    assert data_line(data) == "5 classes; 800 training / 444 held-out articles"


def test_chat_demo_generates_before_and_after(tmp_path):
    from peftkit.demo import run_demo

    out = run_demo("chat", "lora", steps=2, out=str(tmp_path),
                   overrides=["data.max_train=16", "data.max_eval=4", "training.batch_size=4"])
    assert len(out["before"]) == len(out["after"]) == 4
    assert all(isinstance(t, str) for t in out["after"])
    assert out["result"]["metrics"]["loss"] < out["loss_before"]["loss"]  # chatterbot's answer style is learnt fast
    import gguf

    reader = gguf.GGUFReader(out["gguf"])  # the trained adapter, ready for llama.cpp
    assert reader.fields["adapter.type"].contents() == "lora"
    assert sum(t.name.endswith(".lora_a") for t in reader.tensors) > 0
