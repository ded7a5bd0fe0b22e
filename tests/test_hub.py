"""Adapters from the Hugging Face Hub without a network: a real cache in huggingface_hub's own layout
(models--org--name/refs, snapshots/<commit>), read offline through huggingface_hub's resolution code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from peftkit import AdapterFileError, LoraConfig, PeftConfig, PeftModel, get_peft_model

pytest.importorskip("huggingface_hub")

COMMIT_1 = "1" * 40
COMMIT_2 = "2" * 40


def adapter(seed: int, r: int = 4):
    torch.manual_seed(seed)
    model = get_peft_model(tiny_llama(), LoraConfig(r=r, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_these_tests_never_reach_the_network() -> None:
    """Every Hub id below resolves offline from a cache these tests build from tiny configs (conftest and
    scripts/test.sh set HF_HUB_OFFLINE=1); a run without it would fail here rather than try to download."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


@pytest.fixture
def hub_cache(tmp_path) -> Path:
    """models--org--lora: main → commit 1 (adapter at the root, another in sub/), v2 → commit 2; plus a
    model repo whose weights must never be fetched. Returns the cache folder (HF_HUB_CACHE)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--lora"
    a, b, c = adapter(1), adapter(2), adapter(3, r=2)
    a.save_pretrained(repo / "snapshots" / COMMIT_1)
    b.save_pretrained(repo / "snapshots" / COMMIT_1 / "sub")
    c.save_pretrained(repo / "snapshots" / COMMIT_2)
    (repo / "snapshots" / COMMIT_1 / "pytorch_model.bin").write_bytes(b"never read")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_1)
    (repo / "refs" / "v2").write_text(COMMIT_2)
    return cache


def test_from_pretrained_hub_id_revision_and_subfolder(hub_cache, ids) -> None:
    for kwargs, seed, r in (({}, 1, 4), ({"revision": "v2"}, 3, 2), ({"revision": COMMIT_2}, 3, 2),
                            ({"subfolder": "sub"}, 2, 4)):
        model = PeftModel.from_pretrained(tiny_llama(), "org/lora", cache_dir=hub_cache, **kwargs)
        expected = adapter(seed, r)
        torch.testing.assert_close(logits(model, ids), logits(expected, ids), rtol=0, atol=0)
        config = PeftConfig.from_pretrained("org/lora", cache_dir=hub_cache, **kwargs)
        assert config.r == r
    model = PeftModel.from_pretrained(tiny_llama(), "org/lora", cache_dir=hub_cache)
    model.load_adapter("org/lora", "other", cache_dir=hub_cache, revision="v2")
    model.set_adapter("other")
    torch.testing.assert_close(logits(model, ids), logits(adapter(3, 2), ids), rtol=0, atol=0)


def test_offline_with_nothing_cached_is_one_line_naming_id_revision_and_fetch(hub_cache) -> None:
    with pytest.raises(AdapterFileError) as info:
        PeftModel.from_pretrained(tiny_llama(), "org/missing", cache_dir=hub_cache, revision="v3")
    message = str(info.value)
    assert "\n" not in message and "'org/missing'" in message and "revision v3" in message
    assert "hf download org/missing --revision v3" in message
    with pytest.raises(AdapterFileError, match="no revision|not in the Hugging Face cache"):
        PeftModel.from_pretrained(tiny_llama(), "org/lora", cache_dir=hub_cache, revision="v9")
    with pytest.raises(AdapterFileError, match="holds no adapter_config.json"):
        PeftModel.from_pretrained(tiny_llama(), "org/lora", cache_dir=hub_cache, subfolder="nothing")


def test_only_adapter_files_are_requested(monkeypatch, tmp_path) -> None:
    """What resolution asks huggingface_hub for: the adapter's files, never *.bin or a model's weights."""
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        adapter(1).save_pretrained(tmp_path / "snap" / "sub")
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    from peftkit.hub import resolve_adapter

    folder = resolve_adapter("org/lora", "sub", revision="abc", local_files_only=True)
    assert folder == str(tmp_path / "snap" / "sub") and seen["repo_id"] == "org/lora"
    assert seen["revision"] == "abc" and seen["local_files_only"] is True
    assert all(p.startswith("sub/") and not p.endswith(".bin") and "*" not in p for p in seen["allow_patterns"])
    assert "sub/adapter_model.safetensors" in seen["allow_patterns"]


def test_a_local_path_that_does_not_exist_is_not_sent_to_the_hub(tmp_path) -> None:
    with pytest.raises(AdapterFileError, match="does not exist"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "nowhere"))


def test_cli_inspect_reads_a_hub_id_offline(hub_cache, monkeypatch) -> None:
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "peftkit", "inspect", "org/lora", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert [(a["peft_type"], a["key_config"]["r"]) for a in info["adapters"]] == [("LORA", 4), ("LORA", 4)]  # root, sub
    out = subprocess.run([sys.executable, "-m", "peftkit", "inspect", "org/absent"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "hf download org/absent" in out.stderr and "Traceback" not in out.stderr


def test_push_to_hub_uploads_the_adapter_and_a_model_card(monkeypatch, tmp_path) -> None:
    """No hub can be reached here, so huggingface_hub's HfApi upload calls are captured: the test checks the
    folder that would be sent and its card."""
    import huggingface_hub

    sent: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            sent["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            sent.update(repo_id=repo_id, private=private)

        def upload_folder(self, repo_id, folder_path, commit_message):
            sent["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            sent["card"] = (Path(folder_path) / "README.md").read_text()
            sent["message"] = commit_message
            sent["config"] = json.loads((Path(folder_path) / "adapter_config.json").read_text())
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = adapter(1)
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    assert model.push_to_hub("me/my-lora", private=True, token="tok", commit_message="first") == "commit-info"
    assert sent["repo_id"] == "me/my-lora" and sent["private"] is True and sent["token"] == "tok"
    assert sent["message"] == "first"
    assert sent["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                             "second/adapter_config.json", "second/adapter_model.safetensors"]
    card = sent["card"]
    assert "library_name: peftkit" in card and "LoRA (Hu et al. 2021" in card
    trainable, total = model.get_nb_trainable_parameters()
    assert f"{trainable:,d} of {total:,d}" in card
    assert 'PeftModel.from_pretrained(base, "me/my-lora")' in card and "from peft import PeftModel" in card
    sent.clear()
    model.save_pretrained(tmp_path / "out", push_to_hub=True, repo_id="me/other")
    assert sent["repo_id"] == "me/other" and "README.md" in sent["files"]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_train_takes_a_hub_id_as_model_name(tmp_path) -> None:
    """model.name: org/tiny resolves through the same cache (transformers' own resolution, offline)."""
    import shutil
    import subprocess
    import sys

    import tiny_run
    import yaml

    source = tiny_run.model_folder(tmp_path / "src", "llama")
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(source, repo / "snapshots" / COMMIT_1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_1)
    tiny_run.lm_data(tmp_path / "lm.jsonl", n=16)
    config = {"model": {"name": "org/tiny", "max_length": 32}, "method": {"name": "lora", "r": 4},
              "data": {"train": str(tmp_path / "lm.jsonl")},
              "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "output_dir": str(tmp_path / "run")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "peftkit", "train", str(tmp_path / "run.yaml"), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    trained = PeftModel.from_pretrained(tiny_llama_from(source), tmp_path / "run" / "adapter")
    assert trained.peft_config["default"].r == 4
    config["model"]["name"] = "org/absent"
    (tmp_path / "run2.yaml").write_text(yaml.safe_dump({**config, "training": {**config["training"],
                                                                                "output_dir": str(tmp_path / "r2")}}))
    out = subprocess.run([sys.executable, "-m", "peftkit", "train", str(tmp_path / "run2.yaml"), "--quiet"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert "hf download org/absent" in out.stderr


def tiny_llama_from(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_cli_push_of_a_train_run_carries_its_metrics_in_the_card(monkeypatch, tmp_path) -> None:
    """peftkit train records the held-out metrics in the adapter's peftkit_run.json; `peftkit push` puts them in
    the card. The upload itself is captured (no hub can be reached)."""
    import huggingface_hub
    import tiny_run
    import yaml
    from typer.testing import CliRunner

    from peftkit.cli import app

    sent: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            sent.update(repo_id=repo_id, private=private)

        def upload_folder(self, repo_id, folder_path, commit_message):
            sent["card"] = (Path(folder_path) / "README.md").read_text()
            sent["files"] = sorted(p.name for p in Path(folder_path).iterdir())

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    folder = tiny_run.model_folder(tmp_path, "llama")
    tiny_run.lm_data(tmp_path / "lm.jsonl", n=16)
    config = {"model": {"name": str(folder), "max_length": 32}, "method": {"name": "lora", "r": 4},
              "data": {"train": str(tmp_path / "lm.jsonl")},
              "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "output_dir": str(tmp_path / "run")}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    cli = CliRunner()
    assert cli.invoke(app, ["train", str(tmp_path / "run.yaml"), "--quiet"]).exit_code == 0
    run = json.loads((tmp_path / "run" / "adapter" / "peftkit_run.json").read_text())
    assert "loss" in run["metrics"]
    res = cli.invoke(app, ["push", str(tmp_path / "run" / "adapter"), "me/run", "--private"])
    assert res.exit_code == 0, res.output
    assert sent["repo_id"] == "me/run" and sent["private"] is True
    assert f"| loss | {run['metrics']['loss']:.4f} |" in sent["card"] and str(folder) in sent["card"]
    assert sent["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "peftkit_run.json"]
