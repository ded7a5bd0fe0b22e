"""The peftkit command: one-line errors, eval, merge, inspect (peftkit's and HF PEFT's folders)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
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


# ---- start-up: --help and inspect load neither torch nor transformers (benchmarks/cli_startup.py times them) ----
def _loaded(*argv: str) -> tuple[list[str], int]:
    """Which of torch, transformers and torchao ``peftkit ARGV`` imported, and its exit status."""
    from conftest import peftkit_probe

    _, probe = peftkit_probe(*argv)
    return [m for m in probe["heavy"] if m in ("torch", "transformers", "torchao")], probe["code"]


def test_help_and_inspect_load_no_heavy_library(tmp_path):
    """`peftkit --help` loads neither torch nor transformers, and neither does `peftkit inspect`: it reads the
    safetensors header as JSON and checks the config with peftkit.configs, which import no torch."""
    import subprocess
    import sys

    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    assert _loaded("--help") == ([], 0)
    assert _loaded("train", "--help") == ([], 0)
    loaded, code = _loaded("inspect", str(tmp_path / "lora"))
    assert (loaded, code) == ([], 0)  # the configs are torch-free (peftkit.configs), the header is read as JSON
    proc = subprocess.run([sys.executable, "-c", "import sys, peftkit; print(sorted(m for m in ('torch', "
                           "'transformers') if m in sys.modules)); print(peftkit.LoraConfig.__name__)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["[]", "LoraConfig"]  # import peftkit is free; the names load on first use


def test_public_names_load_lazily_and_completely():
    import peftkit

    for name in peftkit.__all__:
        assert getattr(peftkit, name) is not None, name
    assert set(peftkit.__all__) == set(peftkit._EXPORTS)
    assert "LoraConfig" in dir(peftkit)
    assert peftkit.optim.__name__ == "peftkit.optim"  # a submodule on first access, as before
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        peftkit.no_such_thing  # noqa: B018


def test_a_config_file_loads_before_any_method_module_is_imported(tmp_path):
    """With the methods loaded lazily, PeftConfig.from_dict must still find every peft_type."""
    import subprocess
    import sys

    code = ("from peftkit.config import PeftConfig\n"
            "print(type(PeftConfig.from_dict({'peft_type': 'VERA', 'r': 4, 'target_modules': ['q']})).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "VeraConfig", proc.stderr


# ---- usage lines and examples ---------------------------------------------------------------------------
def test_usage_lines_read_like_every_cli():
    res = cli.invoke(app, ["train", "--help"], terminal_width=100)
    assert res.exit_code == 0
    assert "train [OPTIONS] CONFIG" in res.output
    res = cli.invoke(app, ["merge", "--help"], terminal_width=100)
    assert "merge [OPTIONS] BASE ADAPTER OUT" in res.output
    res = cli.invoke(app, ["compare", "--help"], terminal_width=100)
    assert "compare [OPTIONS] [CONFIG]" in res.output
    for command in ("train", "eval", "merge", "export", "inspect", "demo", "compare", "push"):
        text = cli.invoke(app, [command, "--help"], terminal_width=100).output
        for noise in ("<str>", "<bool>", "<list", "<int>", "<float>", "{", "--no-"):
            assert noise not in text, (command, noise)
    text = cli.invoke(app, ["--help"], terminal_width=100).output
    assert "<bool>" not in text and "--help" in text


def test_help_examples_use_the_paths_the_demo_writes():
    import re

    paths = set()
    for command in ("eval", "inspect", "merge", "export", "push"):
        text = " ".join(cli.invoke(app, [command, "--help"], terminal_width=200).output.split())
        paths |= set(re.findall(r"runs/\S+/adapter", text))
    assert paths == {"runs/demo/lora/adapter", "runs/demo/chat-lora/adapter", "runs/demo/vera/adapter",
                     "runs/demo/chat-dora/adapter"}, paths


# ---- paths on the command line are relative to the current directory ------------------------------------
def test_set_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    from peftkit.train.spec import load_spec

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "data.jsonl").write_text("")
    (tmp_path / "here.jsonl").write_text("")
    cfg = tmp_path / "configs" / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "minilm"}, "data": {"train": "data.jsonl"},
                                   "training": {"output_dir": "runs/from-yaml"}}))
    monkeypatch.chdir(tmp_path)
    spec = load_spec(str(cfg))  # paths in the YAML: relative to its folder
    assert spec.resolve(spec.training.output_dir) == str(tmp_path / "configs" / "runs" / "from-yaml")
    assert spec.resolve(spec.data.train) == str(tmp_path / "configs" / "data.jsonl")
    spec = load_spec(str(cfg), ["training.output_dir=runs/cli", "data.train=here.jsonl"])
    assert spec.resolve(spec.training.output_dir) == str(tmp_path / "runs" / "cli")
    assert spec.resolve(spec.data.train) == str(tmp_path / "here.jsonl")
    spec = load_spec(str(cfg), ["data.train=bbc_news", "model.name=smollm2"])  # names, not paths
    assert (spec.data.train, spec.model.name) == ("bbc_news", "smollm2")
    spec = load_spec(str(cfg), ["model.name=my-org/my-model"])  # a Hub id that is no local folder
    assert spec.model.name == "my-org/my-model"


# ---- loss labels: the console line and metrics.jsonl say which loss they show -----------------------------
def test_progress_line_labels_both_losses():
    from peftkit.train.report import progress_line

    assert (progress_line(10, 50, 0.61, 1234.0, 12.0, 0.65, 5)
            == "step 10/50  step loss 0.6100  mean loss 0.6500 (last 5 steps)  1,234 tok/s  eta 12s")
    assert progress_line(1, 50, 0.61, 10.0, 3.0, 0.61, 1) == "step 1/50  step loss 0.6100  10 tok/s  eta 3s"


def test_train_rows_record_which_loss_they_hold(root, tmp_path):
    cfg = run_yaml(root, tmp_path / "run")
    res = cli.invoke(app, ["train", str(cfg), "--set", "training.log_every=2"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("step ")]
    assert lines[0].startswith("step 2/3  step loss ") and "mean loss " in lines[0] and "(last 2 steps)" in lines[0]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [(r["step"], r["loss_steps"]) for r in train] == [(2, 2), (3, 1)]
    assert train[1]["loss"] == train[1]["step_loss"]  # one step: the mean is that step's loss
    first = float(lines[0].split("step loss ")[1].split()[0])
    mean = float(lines[0].split("mean loss ")[1].split()[0])
    assert first == pytest.approx(train[0]["step_loss"], abs=1e-4)
    assert mean == pytest.approx(train[0]["loss"], abs=1e-4)


# ---- inspect: full module names at 80 columns --------------------------------------------------------------
def test_inspect_shows_whole_module_names_at_80_columns(tmp_path):
    import io

    from rich.console import Console

    from peftkit.inspection import describe, render

    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"])).save_pretrained(
        tmp_path / "lora")
    buf = io.StringIO()
    render(describe(str(tmp_path / "lora")), Console(file=buf, width=80, color_system=None))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for layer in (0, 1):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj"):
            assert f"model.layers.{layer}.{proj}" in text, (layer, proj)


# ---- --load-embedding-layers ----------------------------------------------------------------------------------
def _adapter_with_undeclared_head(root: Path, folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                           LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    head = torch.randn(model.base_model.model.lm_head.weight.shape)
    tensors["base_model.model.lm_head.weight"] = head  # as HF PEFT's save_embedding_layers writes a base weight
    save_file(tensors, folder / "adapter_model.safetensors")
    return head


def test_load_embedding_layers_flag_of_merge_and_eval(root, tmp_path):
    from safetensors.torch import load_file

    head = _adapter_with_undeclared_head(root, tmp_path / "adapter")
    res = cli.invoke(app, ["merge", str(root / "tiny-llama"), str(tmp_path / "adapter"), str(tmp_path / "m1")])
    assert res.exit_code == 2 and "--load-embedding-layers" in res.output and not (tmp_path / "m1").exists()
    res = cli.invoke(app, ["merge", str(root / "tiny-llama"), str(tmp_path / "adapter"), str(tmp_path / "m2"),
                           "--load-embedding-layers"])
    assert res.exit_code == 0, res.output
    assert torch.equal(load_file(tmp_path / "m2" / "model.safetensors")["lm_head.weight"], head)
    cfg = run_yaml(root, tmp_path / "run")
    res = cli.invoke(app, ["eval", str(cfg), "--adapter", str(tmp_path / "adapter")])
    assert res.exit_code == 2 and "--load-embedding-layers" in res.output
    res = cli.invoke(app, ["eval", str(cfg), "--adapter", str(tmp_path / "adapter"), "--load-embedding-layers"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["loss"] > 0


# ---- third-party noise: only the named messages are dropped ----------------------------------------------------
def test_quiet_drops_only_torchaos_notices():
    import enum
    import logging

    from peftkit.quiet import torchao_enum_notice, torchao_optional_kernel

    def record(name: str, msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    ours = enum.Enum("Mine", "A B")
    theirs = enum.Enum("KernelPreference", "A B", module="torchao.quantization.quantize_.common.kernel_preference")
    notice = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
              "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")
    assert torchao_enum_notice(record("torch.utils._pytree", notice, theirs))
    assert not torchao_enum_notice(record("torch.utils._pytree", notice, ours))  # the user's own Enum: shown
    assert not torchao_enum_notice(record("torch.utils._pytree", "some other warning %s", theirs))
    assert torchao_optional_kernel(record("torchao", "Failed to load /x/site-packages/torchao/_C_mxfp8.so: nope"))
    assert not torchao_optional_kernel(record("torchao", "Skipping import of cpp extensions due to incompatible "
                                                         "torch version"))


def test_commands_print_no_torchao_notices(root, tmp_path):
    """In a fresh process (the notices come once per process, when transformers imports torchao)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(root / "tiny-llama"),
                   LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(tmp_path / "a")
    proc = subprocess.run([sys.executable, "-m", "peftkit", "merge", str(root / "tiny-llama"), str(tmp_path / "a"),
                           str(tmp_path / "m")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    for noise in ("KernelPreference", "ScaleCalculationMode", "Failed to load", "Loading weights", "it/s]"):
        assert noise not in proc.stderr + proc.stdout, noise


def test_gguf_dequantisation_bar_is_off(capsys):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from peftkit.quiet import no_gguf_progress_bar

    no_gguf_progress_bar()
    no_gguf_progress_bar()  # idempotent: one wrapper, not a stack of them
    assert sum(1 for _ in gguf_utils.tqdm(range(50), desc="Converting and de-quantizing GGUF tensors...")) == 50
    assert capsys.readouterr().err == ""
    assert gguf_utils.tqdm.peftkit_quiet and not isinstance(gguf_utils.tqdm.func, functools.partial)


# ---- the command line may reach the Hub: push uploads, a Hub id downloads -------------------------------------
def test_the_cli_does_not_switch_the_hub_offline():
    """cli.py, merge.py and train/modeling.py used to set HF_HUB_OFFLINE=1 as a default on import, so `peftkit push`
    always failed with huggingface_hub's OfflineModeIsEnabled, a Hub id never downloaded, and `peftkit compare`
    could not fetch a Hub model for its workers; only the user's variable decides."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    code = ("import os, peftkit.cli, peftkit.merge, peftkit.compare, peftkit.train.modeling\n"
            "from peftkit.cli import app\n"
            "from typer.testing import CliRunner\n"
            "CliRunner().invoke(app, ['--help'])\n"
            "import huggingface_hub.constants as c\n"
            "print(os.environ.get('HF_HUB_OFFLINE'), c.HF_HUB_OFFLINE)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "False"]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout.split() == ["1", "True"]  # the user's choice stands
