"""peftkit train: the run config, the loop's maths, files, exact resume (a killed subprocess), multi-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny_run
import torch
import yaml
from safetensors.torch import load_file

from peftkit import PeftModel
from peftkit.train import Runner, RunSpec, SpecError, evaluate_adapter, load_spec, parse_spec

PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    tiny_run.model_folder(root, "bert")
    tiny_run.model_folder(root, "llama")
    tiny_run.classification_data(root / "cls.jsonl", n=160)
    tiny_run.lm_data(root / "lm.jsonl", n=64)
    return root


def cls_config(root: Path, out: Path, **training) -> dict:
    return {"model": {"name": str(root / "tiny-bert"), "max_length": 32, "pooling": "mean"},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "data": {"train": str(root / "cls.jsonl")},
            "training": {"max_steps": 8, "batch_size": 8, "lr": 1e-2, "output_dir": str(out), "log_every": 2,
                         **training}}


def lm_config(root: Path, out: Path, **training) -> dict:
    return {"model": {"name": str(root / "tiny-llama"), "max_length": 32},
            "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
            "data": {"train": str(root / "lm.jsonl")},
            "training": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "output_dir": str(out), "log_every": 1,
                         **training}}


# ---- the run config ----------------------------------------------------------------------------------


def test_every_config_problem_is_reported_together_with_its_path(root, tmp_path):
    cfg = cls_config(root, tmp_path)
    cfg["model"]["colour"] = "blue"
    cfg["method"]["rank"] = 8
    cfg["data"]["train"] = str(tmp_path / "missing.jsonl")
    cfg["training"]["batch_size"] = "big"
    cfg["training"]["schedule"] = "zigzag"
    cfg["extra"] = 1
    with pytest.raises(SpecError) as err:
        parse_spec(cfg)
    problems = err.value.problems
    assert len(problems) == 6
    joined = "\n".join(problems)
    for where in ("model.colour", "method.rank", "data.train: file not found", "training.batch_size: expected int",
                  "training.schedule", "extra: unknown section"):
        assert where in joined


def test_unknown_method_lists_the_known_ones(root, tmp_path):
    cfg = cls_config(root, tmp_path)
    cfg["method"] = {"name": "lorax"}
    with pytest.raises(SpecError, match="unknown method 'lorax'; known: full, head, lora"):
        parse_spec(cfg)


def test_yaml_file_and_set_overrides(root, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cls_config(root, tmp_path / "out")))
    spec = load_spec(path, ["training.lr=3e-4", "method.r=16", "method.target_modules=[query]", "training.seed=7"])
    assert isinstance(spec, RunSpec)
    assert spec.training.lr == pytest.approx(3e-4) and spec.training.seed == 7
    assert spec.method.options["r"] == 16 and spec.method.options["target_modules"] == ["query"]
    with pytest.raises(SpecError, match="expected SECTION.KEY=VALUE"):
        load_spec(path, ["lr"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_spec(bad)


# ---- the loop -------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_leaves_adapter_metrics_and_plot(root, tmp_path):
    out = tmp_path / "run"
    runner = Runner(parse_spec(cls_config(root, out, max_steps=40, eval_every=20, schedule="constant")), quiet=True)
    before = runner.evaluate()
    result = runner.train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.1
    assert result.metrics["loss"] < before["loss"] - 0.02
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # LoRA r=4 on query and value of 2 layers (32x32) + the classifier head (32x2 + 2)
    assert result.trainable == 2 * 2 * (4 * 32 + 32 * 4) + 32 * 2 + 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable"] == result.trainable and summary["steps"] == 40
    # the saved adapter scores exactly as the trained model did
    again = evaluate_adapter(parse_spec(cls_config(root, out)), str(out / "adapter"))
    assert again == pytest.approx(result.metrics, abs=1e-6)


@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
def test_prompt_methods_train_a_causal_lm(root, tmp_path, method):
    cfg = lm_config(root, tmp_path / method, max_steps=12, lr=5e-2, schedule="constant")
    cfg["method"] = {"name": method, "num_virtual_tokens": 4}
    runner = Runner(parse_spec(cfg), quiet=True)
    start = {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}
    before = runner.evaluate()
    result = runner.train()
    assert result.metrics["loss"] != before["loss"]  # (a random tiny LM barely responds to 4 virtual tokens)
    assert all(not torch.equal(p, start[n]) for n, p in runner.model.named_parameters() if p.requires_grad)
    folder = tmp_path / method / "adapter"
    assert (folder / "adapter_model.safetensors").is_file()
    # the size reported is the adapter as deployed: the encoder kept beside it for resuming is not counted
    deployed = {"adapter_model.safetensors", "adapter_config.json", "peftkit_run.json"}
    assert set(os.listdir(folder)) == deployed | ({"prompt_encoder.safetensors"} if method != "prompt" else set())
    assert result.adapter_bytes == sum((folder / f).stat().st_size for f in deployed)
    again = evaluate_adapter(parse_spec(cfg), str(tmp_path / method / "adapter"))
    assert again["loss"] == pytest.approx(result.metrics["loss"], abs=1e-5)


def test_quantization_key_trains_on_an_nf4_base(root, tmp_path):
    cfg = lm_config(root, tmp_path / "q", max_steps=3)
    cfg["quantization"] = {"method": "nf4", "block_size": 32, "scaler_block_size": 32}
    runner = Runner(parse_spec(cfg), quiet=True)
    q_proj = runner.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj.weight).__name__ == "NF4Tensor"
    packed = q_proj.weight.quantized_data.clone()
    runner.train()
    assert torch.equal(q_proj.weight.quantized_data, packed)  # the frozen 4-bit base never changes
    assert json.loads((tmp_path / "q" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_loss_is_normalised_over_the_global_batch(root, tmp_path):
    """batch 8 in one micro-batch == batch 2 with 4 accumulation steps (token-weighted causal LM loss)."""
    a = Runner(parse_spec(lm_config(root, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3)), quiet=True)
    b = Runner(parse_spec(lm_config(root, tmp_path / "b", batch_size=2, grad_accum=4, max_steps=3)), quiet=True)
    a.train()
    b.train()
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        if pa.requires_grad:
            assert na == nb
            torch.testing.assert_close(pa, pb, atol=2e-6, rtol=1e-5)


def test_the_optimizer_is_torchs_fused_adamw_where_torch_has_its_kernel(root, tmp_path):
    """The trainer's AdamW is fused (one kernel a tensor; on CPU the default is ~12 Python-dispatched ops a tensor),
    as transformers' Trainer defaults to; tensors torch has no fused kernel for keep the default AdamW."""
    from peftkit.train.loop import fused_adamw_supported

    runner = Runner(parse_spec(lm_config(root, tmp_path / "f", max_steps=2)), quiet=True)
    assert runner.optimizer.defaults["fused"] is True
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}
    runner.train()
    assert all(torch.isfinite(p).all() and not torch.equal(p, before[n])
               for n, p in runner.model.named_parameters() if p.requires_grad and "lora_B" in n)
    assert fused_adamw_supported([torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16)])
    assert not fused_adamw_supported([torch.zeros(2), torch.zeros(2, dtype=torch.int64)])
    assert not fused_adamw_supported([torch.zeros(2, device="meta")])
    assert not fused_adamw_supported([])


@pytest.mark.parametrize("method", ["head", "full", "ia3", "bitfit", "houlsby", "pfeiffer", "vera", "dora", "rslora",
                                    "lora_fa", "delta_lora", "loraplus", "qlora", "prompt", "p_tuning", "prefix"])
def test_every_method_trains_through_the_runner(root, tmp_path, method):
    cfg = cls_config(root, tmp_path / method, max_steps=3)
    cfg["method"] = {"name": method}
    if method in ("dora", "rslora", "lora_fa", "delta_lora", "loraplus", "qlora"):
        cfg["method"].update(r=4, target_modules=["query", "value"])
    if method == "vera":
        cfg["method"].update(r=8)
    if method in ("prompt", "p_tuning", "prefix"):
        cfg["method"].update(num_virtual_tokens=4)
    runner = Runner(parse_spec(cfg), quiet=True)
    before = {n: p.detach().clone() for n, p in runner.model.named_parameters() if p.requires_grad}
    result = runner.train()
    moved = [n for n, p in runner.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no trainable tensor changed"
    assert result.trainable == sum(t.numel() for t in before.values())
    if method == "full":
        assert result.trainable == result.total


def test_resume_in_process_is_bit_exact_with_dropout(root, tmp_path):
    def cfg(out):
        c = lm_config(root, out, max_steps=8, save_every=3, keep_last=5)
        c["method"]["lora_dropout"] = 0.1
        return parse_spec(c)

    full = Runner(cfg(tmp_path / "full"), quiet=True)
    full.train()
    # a run stopped right after its step-6 checkpoint: resume continues from it
    partial = Runner(cfg(tmp_path / "part"), quiet=True)
    write = partial._checkpoint

    def stop_after_six(step):
        write(step)
        if step == 6:
            raise KeyboardInterrupt

    partial._checkpoint = stop_after_six
    with pytest.raises(KeyboardInterrupt):
        partial.train()
    assert sorted(os.listdir(tmp_path / "part" / "checkpoints")) == ["checkpoint-3", "checkpoint-6"]
    resumed = Runner(cfg(tmp_path / "part"), quiet=True, resume=True)
    assert resumed._resume_from[0] == 6
    resumed.train()
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p, q), n


def _final_adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_resume_after_sigkill_matches_an_uninterrupted_run(root, tmp_path):
    cfg = lm_config(root, tmp_path / "x", max_steps=150, save_every=5, keep_last=2, log_every=5)
    cfg["method"]["lora_dropout"] = 0.1
    for name in ("ref", "killed"):
        cfg["training"]["output_dir"] = str(tmp_path / name)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [PY, "-m", "peftkit", "train", "--quiet"]
    subprocess.run([*cmd, str(tmp_path / "ref.yaml")], env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, str(tmp_path / "killed.yaml")], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name == "checkpoint-10" for p in ckpts.iterdir())):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"
    done = subprocess.run([*cmd, str(tmp_path / "killed.yaml"), "--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref, got = _final_adapter(tmp_path / "ref"), _final_adapter(tmp_path / "killed")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == list(range(5, 151, 5))  # no duplicated or missing rows after the resume


def test_resume_refuses_a_changed_config(root, tmp_path):
    Runner(parse_spec(lm_config(root, tmp_path / "r", max_steps=4, save_every=2)), quiet=True).train()
    changed = Runner(parse_spec(lm_config(root, tmp_path / "r", max_steps=4, lr=5e-3)), quiet=True, resume=True)
    with pytest.raises(Exception, match="the run changed training.lr"):
        changed.train()


@pytest.mark.skipif(not hasattr(torch.distributed, "is_available") or not torch.distributed.is_available(),
                    reason="torch.distributed unavailable")
def test_two_processes_reach_the_one_process_adapter(root, tmp_path):
    one = lm_config(root, tmp_path / "one", batch_size=4, max_steps=4)
    two = lm_config(root, tmp_path / "two", batch_size=2, max_steps=4)
    for name, cfg in (("one", one), ("two", two)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    subprocess.run([PY, "-m", "peftkit", "train", "--quiet", str(tmp_path / "one.yaml")], env=ENV, check=True,
                   capture_output=True)
    torchrun = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                "-m", "peftkit", "train", "--quiet", str(tmp_path / "two.yaml")]
    res = subprocess.run(torchrun, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _final_adapter(tmp_path / "one"), _final_adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:  # Adam divides by sqrt(v): float-order differences of ~1e-7 in the gradients grow to ~1e-6
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
        if "lora_B" in k:
            assert a[k].abs().max() > 1e-2  # trained away from B's zero start: the comparison means something
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["steps"] == 4


def test_adapter_from_a_run_loads_in_peftkit_with_equal_logits(root, tmp_path):
    out = tmp_path / "run"
    runner = Runner(parse_spec(lm_config(root, out, max_steps=3)), quiet=True)
    runner.train()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(root / "tiny-llama")
    loaded = PeftModel.from_pretrained(base, out / "adapter").eval()
    runner.model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, runner.model(input_ids=ids).logits)


# ---- data formats ----------------------------------------------------------------------------------------


def test_csv_text_and_instruction_data(root, tmp_path):
    from peftkit.train.data import build_dataset
    from peftkit.train.modeling import load_tokenizer

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\ngood movie,pos\nbad movie,neg\ngreat w1,pos\nawful w2,neg\nfine w3,pos\n")
    spec = parse_spec({"model": {"name": str(root / "tiny-bert")}, "data": {"train": str(csv_path), "eval_fraction": 0.4}})
    tok = load_tokenizer(spec)
    data = build_dataset(spec, tok, "classification")
    assert data.labels == ["neg", "pos"] and len(data.train) == 3 and len(data.eval) == 2
    assert {e.label for e in data.train + data.eval} == {0, 1}

    txt = tmp_path / "d.txt"
    txt.write_text("w1 w2 w3\n\nw4 w5 w6 w7\n\nw8 w9\n\nw10 w11 w12\n")
    spec = parse_spec({"model": {"name": str(root / "tiny-llama")}, "data": {"train": str(txt), "eval_fraction": 0.25}})
    data = build_dataset(spec, load_tokenizer(spec), "causal_lm")
    assert data.format == "text" and len(data.train) + len(data.eval) == 4
    assert all(e.lm_labels == e.input_ids for e in data.train)

    inst = tmp_path / "i.jsonl"
    inst.write_text("\n".join(json.dumps({"q": f"w{i} w{i + 1}", "a": f"w{i + 2} w{i + 3}"}) for i in range(6)))
    spec = parse_spec({"model": {"name": str(root / "tiny-llama")},
                       "data": {"train": str(inst), "format": "instruction", "prompt_field": "q", "response_field": "a",
                                "template": "the {prompt} is", "eval_fraction": 0.34}})
    tok = load_tokenizer(spec)
    data = build_dataset(spec, tok, "causal_lm")
    ex = data.train[0]
    n_prompt = len(tok("the w0 w1 is")["input_ids"])
    assert ex.lm_labels[:n_prompt] == [-100] * n_prompt  # no loss on the prompt
    assert ex.lm_labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.input_ids[-1] == tok.eos_token_id
    assert ex.loss_tokens() == len(ex.input_ids) - n_prompt


def test_bad_data_is_reported_with_the_fix(root, tmp_path):
    from peftkit.errors import PeftError
    from peftkit.train.data import build_dataset
    from peftkit.train.modeling import load_tokenizer

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good", "label": "pos"}\n{"text": "bad"\n')
    spec = parse_spec({"model": {"name": str(root / "tiny-bert")}, "data": {"train": str(bad)}})
    with pytest.raises(PeftError, match=r"bad.jsonl:2: not valid JSON"):
        build_dataset(spec, load_tokenizer(spec), "classification")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"sentence": "good", "label": "pos"}\n' * 4)
    spec = parse_spec({"model": {"name": str(root / "tiny-bert")}, "data": {"train": str(nofield)}})
    with pytest.raises(PeftError, match="has no field 'text' .* set data.text_field"):
        build_dataset(spec, load_tokenizer(spec), "classification")


def test_example_configs_parse(tmp_path):
    examples = Path(__file__).parents[1] / "examples" / "configs"
    for name in ("minilm_bbc_lora.yaml", "smollm2_chat_lora.yaml"):
        spec = load_spec(examples / name)
        assert spec.method.name == "lora"
    with pytest.raises(SpecError) as err:
        load_spec(examples / "local_jsonl.yaml")
    assert len(err.value.problems) == 3  # the placeholder model folder and the two data files
