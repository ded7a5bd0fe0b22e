"""Hostile inputs to training, eval and merge (issue 15, "never silently wrong"): every case ends in the right
numbers or in one clear error line, never in a wrong model.

- an adapter folder copied out of its run folder still merges with its run's pooling and labels;
- a run whose loss, gradients or weights become NaN / infinite stops (every process), keeps its last good
  checkpoint and writes no adapter; eval and merge refuse non-finite adapters;
- a new run into a folder holding another run's outputs refuses (``--overwrite`` cleans only what a run
  writes); ``--resume`` refuses when a data file's content changed;
- YAML: empty files, non-mapping documents, duplicate keys, type errors and ``lr: .nan`` are reported in the
  first pass, before any model loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_run
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import peftkit
from peftkit.cli import app
from peftkit.errors import PeftError
from peftkit.train import Runner, SpecError, evaluate_adapter, load_spec, parse_spec

cli = CliRunner()
PY = sys.executable
# subprocesses import the peftkit this test process imported
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(peftkit.__file__).parents[1])}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile_training")
    tiny_run.model_folder(root, "bert")
    tiny_run.model_folder(root, "llama")
    tiny_run.classification_data(root / "cls.jsonl", n=64)
    tiny_run.lm_data(root / "lm.jsonl", n=32)
    return root


def cls_config(root: Path, out: Path, **training) -> dict:
    return {"model": {"name": str(root / "tiny-bert"), "max_length": 32, "pooling": "mean"},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "data": {"train": str(root / "cls.jsonl")},
            "training": {"max_steps": 4, "batch_size": 8, "lr": 1e-2, "output_dir": str(out), **training}}


def lm_config(root: Path, out: Path, data: Path | None = None, **training) -> dict:
    return {"model": {"name": str(root / "tiny-llama"), "max_length": 32},
            "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
            "data": {"train": str(data or root / "lm.jsonl")},
            "training": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "output_dir": str(out), **training}}


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_error_line(res) -> str:
    """The CLI's failure: exit status 2, one ``error:`` line, no traceback."""
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and "Traceback" not in res.output, res.output
    return res.output


# ---- 2. merge and eval of an adapter folder on its own -----------------------------------------------------


def _mean_pool_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModel

    from peftkit.train.modeling import MeanPoolingClassifier

    head = {k.removeprefix("linear."): v for k, v in load_file(folder / "2_Dense" / "model.safetensors").items()}
    model = MeanPoolingClassifier(AutoModel.from_pretrained(folder), head["weight"].shape[0])
    model.classifier.load_state_dict(head)
    return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_copied_adapter_folder_merges_with_its_runs_mean_pooling_and_labels(root, tmp_path):
    runner = Runner(parse_spec(cls_config(root, tmp_path / "run", save_every=2)), quiet=True)
    runner.train()
    alone = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(tmp_path / "run" / "adapter", alone)  # no run_config.yaml next to it any more
    res = cli.invoke(app, ["merge", str(root / "tiny-bert"), str(alone), str(tmp_path / "merged")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "merged" / "1_Pooling").is_dir(), "merged with CLS pooling: the run's pooling was lost"
    pooling = json.loads((tmp_path / "merged" / "1_Pooling" / "config.json").read_text())
    labels = json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"]
    assert pooling["pooling_mode_mean_tokens"] and labels == {"0": "neg", "1": "pos"}
    ids = torch.tensor([[2, 45, 50, 47, 3]])
    expected = runner.model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(_mean_pool_logits(tmp_path / "merged", ids), expected, atol=1e-5, rtol=1e-5)
    info = json.loads((alone / "peftkit_run.json").read_text())
    assert info["pooling"] == "mean" and info["labels"] == ["neg", "pos"] and info["task"] == "classification"
    ckpt_info = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "adapter" / "peftkit_run.json").read_text())
    final_only = {k: info.pop(k) for k in ("metrics", "steps")}  # the final adapter also records its results
    assert set(final_only["metrics"]) >= {"loss", "accuracy"} and final_only["steps"] == runner.total_steps
    assert ckpt_info == info  # a checkpoint's adapter is a complete adapter too (no run_config.yaml beside it)
    ckpt_adapter = tmp_path / "run" / "checkpoints" / "checkpoint-2" / "adapter"
    res = cli.invoke(app, ["merge", str(root / "tiny-bert"), str(ckpt_adapter), str(tmp_path / "merged-2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "merged-2" / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]


def test_old_run_folder_without_the_record_still_merges_from_its_run_config(root, tmp_path):
    runner = Runner(parse_spec(cls_config(root, tmp_path / "run")), quiet=True)
    runner.train()
    (tmp_path / "run" / "adapter" / "peftkit_run.json").unlink(missing_ok=True)  # as runs before peftkit_run.json wrote it
    res = cli.invoke(app, ["merge", str(root / "tiny-bert"), str(tmp_path / "run" / "adapter"), str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    ids = torch.tensor([[2, 46, 51, 3]])
    expected = runner.model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(_mean_pool_logits(tmp_path / "m", ids), expected, atol=1e-5, rtol=1e-5)
    shutil.copytree(tmp_path / "run" / "adapter", tmp_path / "bare")  # neither record: refuse, naming the fix
    out = one_error_line(cli.invoke(app, ["merge", str(root / "tiny-bert"), str(tmp_path / "bare"), str(tmp_path / "m2")]))
    assert "--pooling mean" in out and "peftkit_run.json" in out
    assert not (tmp_path / "m2").exists()
    res = cli.invoke(app, ["merge", str(root / "tiny-bert"), str(tmp_path / "bare"), str(tmp_path / "m3"),
                           "--pooling", "mean"])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(_mean_pool_logits(tmp_path / "m3", ids), expected, atol=1e-5, rtol=1e-5)
    out = one_error_line(cli.invoke(app, ["merge", str(root / "tiny-bert"), str(tmp_path / "run" / "adapter"),
                                          str(tmp_path / "m4"), "--pooling", "cls"]))
    assert "contradicts" in out


def test_eval_refuses_a_config_whose_pooling_differs_from_the_adapters_run(root, tmp_path):
    cfg = cls_config(root, tmp_path / "run")
    Runner(parse_spec(cfg), quiet=True).train()
    cfg["model"]["pooling"] = "cls"
    with pytest.raises(PeftError, match="pooling 'mean'.*set model.pooling: mean"):
        evaluate_adapter(parse_spec(cfg), str(tmp_path / "run" / "adapter"))


def test_the_run_record_leaves_hf_peft_loading_the_folder_unchanged(root, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    assert peft.__version__ == "0.21.2"
    runner = Runner(parse_spec(lm_config(root, tmp_path / "run")), quiet=True)
    runner.train()
    folder = tmp_path / "run" / "adapter"
    assert (folder / "peftkit_run.json").is_file()
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"), str(folder)).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(hf(input_ids=ids).logits, runner.model.eval()(input_ids=ids).logits,
                               atol=1e-5, rtol=1e-5)


# ---- 3. non-finite training, adapters and merges ------------------------------------------------------------


def test_a_diverging_run_stops_with_one_line_keeps_its_good_checkpoint_and_writes_no_adapter(root, tmp_path):
    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", lm_config(root, out, lr=1e9, max_steps=8, save_every=1, keep_last=8))
    text = one_error_line(cli.invoke(app, ["train", str(cfg), "--quiet"]))
    assert "training stopped at step" in text and "not finite" in text and "last good checkpoint" in text
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    from peftkit.train.state import checkpoints

    found = checkpoints(str(out / "checkpoints"))
    assert found, "the steps before the divergence are kept"
    for _, path in found:  # every kept checkpoint is finite
        for t in load_file(os.path.join(path, "adapter", "adapter_model.safetensors")).values():
            assert torch.isfinite(t).all()
    step = int(text.split("training stopped at step ")[1].split(":")[0])
    assert found[-1][0] == step - 1


def test_finite_gradients_that_adamw_turns_into_infinite_weights_stop_the_run(root, tmp_path):
    # float16 weights, full fine-tuning: step 1's loss and gradients are finite, AdamW's update overflows
    cfg = lm_config(root, tmp_path / "run", lr=1e6)
    cfg["model"]["dtype"], cfg["method"] = "float16", {"name": "full"}
    with pytest.raises(PeftError, match="step 1: after the optimizer step, the trained weights are not finite"):
        Runner(parse_spec(cfg), quiet=True).train()
    assert not (tmp_path / "run" / "model").exists()


def _nan_lora(root: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                           LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    weights = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")


def test_merge_and_eval_refuse_a_nan_adapter_and_write_nothing(root, tmp_path):
    _nan_lora(root, tmp_path / "nan")
    out = one_error_line(cli.invoke(app, ["merge", str(root / "tiny-llama"), str(tmp_path / "nan"), str(tmp_path / "m")]))
    assert "NaN or infinite" in out and "lora_B" in out
    assert not (tmp_path / "m").exists()
    cfg = write_yaml(tmp_path / "run.yaml", lm_config(root, tmp_path / "run"))
    out = one_error_line(cli.invoke(app, ["eval", str(cfg), "--adapter", str(tmp_path / "nan")]))
    assert "NaN or infinite" in out


def test_eval_refuses_a_nan_prompt_adapter_which_has_no_delta_weight(root, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit import PromptTuningConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                           PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "prompt")
    weights = load_file(tmp_path / "prompt" / "adapter_model.safetensors")
    weights = {k: torch.full_like(v, float("inf")) for k, v in weights.items()}
    save_file(weights, tmp_path / "prompt" / "adapter_model.safetensors")
    with pytest.raises(PeftError, match="NaN or infinite"):
        evaluate_adapter(parse_spec(lm_config(root, tmp_path / "run")), str(tmp_path / "prompt"))


def test_merge_refuses_finite_factors_whose_product_overflows(root, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                           LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "big")
    weights = {k: torch.full_like(v, 1e30) for k, v in load_file(tmp_path / "big" / "adapter_model.safetensors").items()}
    save_file(weights, tmp_path / "big" / "adapter_model.safetensors")
    out = one_error_line(cli.invoke(app, ["merge", str(root / "tiny-llama"), str(tmp_path / "big"), str(tmp_path / "m")]))
    assert "merging" in out and "q_proj" in out
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_processes_stop_together_on_a_nan_loss(root, tmp_path):
    cfg = write_yaml(tmp_path / "two.yaml", lm_config(root, tmp_path / "two", lr=1e9, batch_size=2, max_steps=8))
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                "-m", "peftkit", "train", "--quiet", str(cfg)]
    res = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=180)  # a hang fails here
    assert res.returncode != 0
    assert res.stderr.count("error: training stopped at step") == 2, res.stderr[-3000:]  # both ranks, same step
    assert not (tmp_path / "two" / "adapter").exists()


# ---- 4. output folders and resume ---------------------------------------------------------------------------


def test_a_new_run_into_another_runs_folder_refuses_and_overwrite_cleans_only_run_files(root, tmp_path):
    out = tmp_path / "run"
    Runner(parse_spec(lm_config(root, out, max_steps=6, save_every=2)), quiet=True).train()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PeftError, match="already holds a run's outputs.*--overwrite"):
        Runner(parse_spec(lm_config(root, out, max_steps=3, save_every=1)), quiet=True)
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-2", "checkpoint-4"]  # untouched
    Runner(parse_spec(lm_config(root, out, max_steps=3, save_every=1)), quiet=True, overwrite=True).train()
    assert sorted(os.listdir(out / "checkpoints")) == ["checkpoint-1", "checkpoint-2"]  # the new run's own
    assert (out / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 3  # no rows of the old 6-step run
    cfg = write_yaml(tmp_path / "run.yaml", lm_config(root, out))
    assert "already holds" in one_error_line(cli.invoke(app, ["train", str(cfg), "--quiet"]))
    assert "give one of them" in one_error_line(cli.invoke(app, ["train", str(cfg), "--resume", "--overwrite"]))
    shutil.rmtree(out / "checkpoints")  # nothing to resume, yet a finished run's outputs: not silently replaced
    assert "no checkpoint to continue" in one_error_line(cli.invoke(app, ["train", str(cfg), "--resume"]))


def test_resume_refuses_when_a_data_files_content_changed(root, tmp_path):
    data = tmp_path / "lm.jsonl"
    shutil.copy(root / "lm.jsonl", data)
    out = tmp_path / "run"
    Runner(parse_spec(lm_config(root, out, data=data, max_steps=4, save_every=2)), quiet=True).train()
    with open(data, "a") as fh:
        fh.write(json.dumps({"text": "w1 w2 w3 w4"}) + "\n")
    with pytest.raises(PeftError, match=r"changed the content of data.train \(.*lm.jsonl\)"):
        Runner(parse_spec(lm_config(root, out, data=data, max_steps=4, save_every=2)), quiet=True, resume=True).train()


# ---- YAML -----------------------------------------------------------------------------------------------------


def test_empty_and_non_mapping_yaml_files_are_refused(tmp_path):
    for text, what in (("", "empty"), ("# only a comment\n", "empty"), ("[]\n", "got list"), ("- 1\n", "got list"),
                       ("just words\n", "got str")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(SpecError, match=what):
            load_spec(path)
        assert what in one_error_line(cli.invoke(app, ["train", str(path)]))


def test_a_duplicate_key_at_any_depth_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1.0e-3\nmethod: lora\ntraining:\n  max_steps: 3\n")
    with pytest.raises(SpecError, match="duplicate key 'training' \\(first at line 1, again at line 4\\)"):
        load_spec(path)
    path.write_text("model:\n  name: minilm\n  max_length: 32\n  max_length: 64\n")
    out = one_error_line(cli.invoke(app, ["train", str(path)]))
    assert "duplicate key 'max_length' (first at line 3, again at line 4)" in out
    path.write_text("base: &b {lr: 1.0e-3, seed: 1}\ntraining:\n  <<: *b\n  seed: 2\n")  # a merge key may override
    with pytest.raises(SpecError, match="base: unknown section"):
        load_spec(path)


def test_type_errors_and_nan_rates_are_reported_together_before_any_model_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: /nowhere/model}\nmethod: {name: lora, r: four, lora_alpha: much}\n"
                    "training: {lr: .nan, head_lr: .inf, batch_size: big, max_grad_norm: -1.0}\n")
    with pytest.raises(SpecError) as err:
        load_spec(path)
    joined = "\n".join(err.value.problems)
    for where in ("model.name", "method.r: expected int, got 'four'", "method.lora_alpha: expected float",
                  "training.lr: must be a finite number, got nan", "training.head_lr: must be a finite number",
                  "training.batch_size: expected int", "training.max_grad_norm: must be positive"):
        assert where in joined
    assert len(err.value.problems) == 7
    out = one_error_line(cli.invoke(app, ["train", str(path)]))
    assert "7 problem(s)" in out
    for lr in ("-1e-3", ".inf", "-.inf"):
        with pytest.raises(SpecError, match="training.lr: must be"):
            load_spec(path, [f"training.lr={lr}", "method.r=4", "method.lora_alpha=8", "training.head_lr=null",
                             "training.batch_size=4", "training.max_grad_norm=1.0", "model.name=minilm"])
