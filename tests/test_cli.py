"""The peftkit command: one-line errors, eval, merge, inspect (peftkit's and HF PEFT's folders)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny_run
import torch
import yaml
from typer.testing import CliRunner

from peftkit import BottleneckConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.cli import app

cli = CliRunner()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    tiny_run.model_folder(root, "llama")
    tiny_run.model_folder(root, "bert")
    tiny_run.lm_data(root / "lm.jsonl", n=48)
    return root


def run_yaml(root: Path, out: Path, **method) -> Path:
    cfg = {"model": {"name": str(root / "tiny-llama"), "max_length": 32},
           "method": {"name": "lora", "r": 4, **method}, "data": {"train": str(root / "lm.jsonl")},
           "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "output_dir": str(out)}}
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_of_every_command_shows_an_example():
    for command in ("train", "eval", "merge", "inspect", "demo"):
        res = cli.invoke(app, [command, "--help"])
        assert res.exit_code == 0
        assert "Example" in res.output and f"peftkit {command}" in res.output


def test_errors_are_one_clear_line_without_a_traceback(root, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"name": str(root / "tiny-llama"), "colour": 1},
                                   "training": {"lr": "fast"}}))
    res = cli.invoke(app, ["train", str(bad)])
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and "2 problem(s)" in res.output
    assert "model.colour: unknown key" in res.output and "training.lr: expected float or null" in res.output
    assert "Traceback" not in res.output
    res = cli.invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "is not a folder" in res.output and "Traceback" not in res.output
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    res = cli.invoke(app, ["inspect", str(corrupt)])
    assert res.exit_code == 2 and "corrupt" in res.output


def test_train_then_eval_reports_the_same_metrics(root, tmp_path):
    cfg = run_yaml(root, tmp_path / "run")
    res = cli.invoke(app, ["train", str(cfg), "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    res = cli.invoke(app, ["eval", str(cfg), "--adapter", str(tmp_path / "run" / "adapter")])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.output.strip().splitlines()[-1])
    assert metrics["loss"] == pytest.approx(summary["metrics"]["loss"], abs=1e-6)


def test_merge_writes_a_model_equal_to_the_adapted_one(root, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    res = cli.invoke(app, ["merge", str(root / "tiny-llama"), str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 9, 12, 7]])
    expected = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(root / "tiny-llama").eval()
    assert not torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-3)  # the adapter matters


def test_merge_refuses_a_method_that_cannot_merge_and_writes_nothing(root, tmp_path):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                           BottleneckConfig(placement="houlsby", task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    res = cli.invoke(app, ["merge", str(root / "tiny-llama"), str(tmp_path / "adapter"), str(tmp_path / "merged")])
    assert res.exit_code == 2
    assert "merge" in res.output.lower() and "Traceback" not in res.output
    assert not (tmp_path / "merged").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_inspect_reads_peftkit_and_hf_peft_folders(root, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    ours = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                                 peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(tmp_path / "theirs")
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8), 2 layers, r=4
    expected = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    for name in ("ours", "theirs"):
        res = cli.invoke(app, ["inspect", str(tmp_path / name), "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.output)["adapters"][0]
        assert info["peft_type"] == "LORA" and info["parameters"] == expected
        assert info["n_modules"] == 4
        assert info["modules"]["model.layers.0.self_attn.v_proj"]["lora_B.weight"] == [16, 4]
    res = cli.invoke(app, ["inspect", str(tmp_path / "theirs")])
    assert res.exit_code == 0 and "LORA" in res.output and "model.layers.1.self_attn.q_proj" in res.output


def test_inspect_a_run_folder(root, tmp_path):
    cfg = run_yaml(root, tmp_path / "run")
    assert cli.invoke(app, ["train", str(cfg), "--quiet"]).exit_code == 0
    res = cli.invoke(app, ["inspect", str(tmp_path / "run"), "--json"])
    info = json.loads(res.output)
    assert info["run"]["method"] == "lora"
    assert info["adapters"][0]["parameters"] == info["run"]["trainable"]
    loaded = PeftModel.from_pretrained(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(root / "tiny-llama"), tmp_path / "run" / "adapter")
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference
