"""Sharded training (training.distributed.strategy: fsdp, peftkit.distributed.shard): FSDP2 on 2 gloo processes.

The torchrun launches cost most of the time (two interpreters importing transformers on a busy machine), so
each launch checks many things: one runs every method through ``shard`` in a plain loop, the others run
``peftkit train`` (uninterrupted, killed after a checkpoint, resumed)."""

from __future__ import annotations

import json
import os
import shutil
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

import peftkit
from peftkit import distributed as pd
from peftkit.errors import PeftError
from peftkit.train import Runner, SpecError, load_spec, parse_spec

PY = sys.executable
HERE = Path(__file__).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
METHODS = ["lora", "qlora", "dora", "rslora", "lora_fa", "vera", "ia3", "houlsby", "bitfit", "prompt", "p_tuning",
           "prefix"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    tiny_run.model_folder(root, "llama")
    tiny_run.lm_data(root / "lm.jsonl", n=64)
    return root


def lm_config(root: Path, out: Path, **training) -> dict:
    return {"model": {"name": str(root / "tiny-llama"), "max_length": 32},
            "method": {"name": "lora", "r": 4, "lora_dropout": 0.0},
            "data": {"train": str(root / "lm.jsonl")},
            "training": {"max_steps": 6, "batch_size": 2, "lr": 1e-2, "output_dir": str(out), "log_every": 1,
                         "distributed": {"strategy": "fsdp"}, **training}}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:  # Adam divides by sqrt(v): float-order differences of ~1e-7 in the gradients grow to ~1e-6
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4)


# ---- the config and the refusals (no processes) ---------------------------------------------------------


def test_distributed_section_problems_are_reported_together(root, tmp_path):
    cfg = lm_config(root, tmp_path)
    cfg["training"]["distributed"] = {"strategy": "zero3", "shards": 4}
    with pytest.raises(SpecError) as err:
        parse_spec(cfg)
    assert "training.distributed.shards: unknown key" in str(err.value)
    assert "training.distributed.strategy: 'zero3' is not one of ddp, fsdp" in str(err.value)
    cfg["training"]["distributed"] = {"strategy": "ddp", "activation_checkpointing": True, "mixed_precision": "bf16"}
    with pytest.raises(SpecError) as err:
        parse_spec(cfg)
    assert len(err.value.problems) == 2 and all("applies to strategy fsdp" in p for p in err.value.problems)
    cfg["training"]["distributed"] = {"strategy": "fsdp", "mixed_precision": "fp8", "activation_checkpointing": True}
    cfg["model"]["gradient_checkpointing"] = True
    cfg["method"] = {"name": "delta_lora", "r": 4}
    cfg["quantization"] = {"method": "int8"}
    with pytest.raises(SpecError) as err:
        parse_spec(cfg)
    text = str(err.value)
    for part in ("mixed_precision: 'fp8' is not one of bf16", "cannot train method 'delta_lora'",
                 "cannot shard an int8 base"):
        assert part in text
    cfg = lm_config(root, tmp_path, distributed={"strategy": "fsdp", "activation_checkpointing": True})
    assert parse_spec(cfg).training.distributed.activation_checkpointing is True
    cfg["method"] = {"name": "prefix", "num_virtual_tokens": 4}
    with pytest.raises(SpecError, match="prefix tuning keeps its prefixes in the key/value cache"):
        parse_spec(cfg)
    assert parse_spec(lm_config(root, tmp_path, distributed=None)).training.distributed.strategy == "ddp"


def test_example_config_parses():
    spec = load_spec(HERE.parent / "examples" / "configs" / "smollm2_qlora_fsdp.yaml")
    assert spec.training.distributed.strategy == "fsdp" and spec.quantization == {"method": "nf4"}


def test_options_one_process_cannot_serve_are_refused_before_anything_is_written(root, tmp_path):
    cfg = lm_config(root, tmp_path / "mp", distributed={"strategy": "fsdp", "mixed_precision": "bf16"})
    with pytest.raises(PeftError, match="mixed_precision and cpu_offload act while FSDP gathers shards"):
        Runner(parse_spec(cfg), quiet=True)
    cfg = lm_config(root, tmp_path / "off", distributed={"strategy": "fsdp", "cpu_offload": True})
    with pytest.raises(PeftError, match="this run is on the CPU already"):
        Runner(parse_spec(cfg), quiet=True)
    assert not (tmp_path / "mp").exists() and not (tmp_path / "off").exists()


def test_activation_checkpointing_in_the_run_replays_dropout_exactly(root, tmp_path):
    """Checkpointed blocks recompute their forward in backward: the KV cache must not grow twice (it did with a
    checkpoint around the whole block call) and dropout's masks must repeat, so the result is bit-equal."""
    trained = []
    for ac in (False, True):
        cfg = lm_config(root, tmp_path / str(ac), max_steps=2, batch_size=4,
                        distributed={"strategy": "fsdp", "activation_checkpointing": ac})
        cfg["method"]["lora_dropout"] = 0.2
        runner = Runner(parse_spec(cfg), quiet=True)
        runner.train()
        trained.append({n: p.detach() for n, p in runner.model.named_parameters() if p.requires_grad})
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])


def test_resume_refuses_a_checkpoint_of_the_other_strategy(root, tmp_path):
    ddp = lm_config(root, tmp_path / "r", max_steps=4, save_every=2, distributed={"strategy": "ddp"})
    Runner(parse_spec(ddp), quiet=True).train()
    fsdp = lm_config(root, tmp_path / "r", max_steps=4, save_every=2)
    with pytest.raises(PeftError, match=r"the run changed training.distributed.strategy \(ddp → fsdp\)"):
        Runner(parse_spec(fsdp), quiet=True, resume=True).train()


def test_shard_refuses_what_fsdp_cannot_shard_and_leaves_the_model_unchanged():
    from conftest import tiny_llama

    with pytest.raises(PeftError, match="needs torch.distributed's process group"):
        pd.shard(peftkit.get_peft_model(tiny_llama(), peftkit.LoraConfig(r=4, target_modules=["q_proj"])))
    delta = peftkit.get_peft_model(tiny_llama(), peftkit.DeltaLoraConfig(r=4, target_modules=["q_proj"]))
    assert "Delta-LoRA keeps its step-K snapshot" in pd.unshardable(delta)
    base = tiny_llama()
    peftkit.quantize_base(base, "nf4", block_size=32, scaler_block_size=32)  # q_proj: 32 blocks = 1 scaler block
    qlora = peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=["q_proj"]))
    why = pd.unshardable(qlora, world=2)
    assert "does not split evenly across 2 processes" in why and "q_proj" in why
    base = tiny_llama()
    peftkit.quantize_base(base, "nf4", block_size=16, scaler_block_size=16)
    assert pd.unshardable(peftkit.get_peft_model(base, peftkit.LoraConfig(r=4, target_modules=["q_proj"])), 2) is None
    with pytest.raises(PeftError, match="this run is on the CPU already"):
        pd.check_options(None, True, "sum", torch.device("cpu"))
    assert not pd.is_sharded(qlora)


# ---- shard() in a user's loop: every method, two processes against one -------------------------------------


@pytest.mark.slow
def test_every_method_sharded_reaches_the_one_process_adapter_and_each_process_holds_half_the_base(tmp_path):
    cases = [*METHODS, "lora_dropout", "lora_dropout_ac", "lora_bf16"]
    cmd = [*TORCHRUN, "--master_port", "29641", str(HERE / "fsdp_worker.py"), str(tmp_path), ",".join(cases)]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in METHODS:  # fp32: the sharded run's file equals the one-process run's
        alone = load_file(tmp_path / name / "alone" / "adapter_model.safetensors")
        sharded = load_file(tmp_path / name / "sharded" / "adapter_model.safetensors")
        _close(alone, sharded)
        assert max(t.abs().max() for t in alone.values()) > 1e-2, name  # trained: the comparison means something
    lora = load_file(tmp_path / "lora" / "sharded" / "adapter_model.safetensors")
    # activation checkpointing replays dropout's RNG: bit-equal to the same sharded run without it
    plain = load_file(tmp_path / "lora_dropout" / "sharded" / "adapter_model.safetensors")
    ac = load_file(tmp_path / "lora_dropout_ac" / "sharded" / "adapter_model.safetensors")
    assert all(torch.equal(plain[k], ac[k]) for k in plain)
    assert any(not torch.allclose(plain[k], lora[k], atol=1e-3) for k in plain)  # dropout did act
    # bf16 compute, fp32 reduction and weights: near the fp32 run, not equal to it
    bf16 = load_file(tmp_path / "lora_bf16" / "sharded" / "adapter_model.safetensors")
    worst = max(float((bf16[k] - lora[k]).abs().max()) for k in lora)
    assert 1e-5 < worst < 0.05, worst
    # every process holds about half the base (its shards; QLoRA's packed 4-bit data too)
    report = json.loads((tmp_path / "bytes.json").read_text())
    for name, per_rank in report.items():
        for whole, mine in per_rank:
            assert whole / 2 <= mine <= 0.52 * whole, (name, whole, mine)
    assert report["qlora"][0][0] < 0.5 * report["lora"][0][0]  # the NF4 base is the packed one


# ---- peftkit train with strategy fsdp: equal to one process, killed and resumed, resharded ------------------


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = (Path("/proc") / entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    """Until no process of ``pids`` is left (killed workers are reaped by init, not by the test)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":
                alive.append(pid)
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {pids} still alive after SIGKILL")


@pytest.mark.slow
def test_fsdp_run_matches_one_process_and_resumes_exactly_after_a_kill_also_on_one_process(root, tmp_path):
    steps, every = 16, 2
    base = lm_config(root, tmp_path, max_steps=steps, save_every=every, keep_last=3, log_every=2)
    # one process, the same global batch (4): the reference the sharded run must reach
    alone = Runner(parse_spec({**base, "training": {**base["training"], "batch_size": 4,
                                                     "output_dir": str(tmp_path / "alone")}}), quiet=True)
    alone.train()
    for name in ("ref", "killed"):
        cfg = {**base, "training": {**base["training"], "output_dir": str(tmp_path / name)}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    train = ["-m", "peftkit", "train", "--quiet"]
    res = subprocess.run([*TORCHRUN, "--master_port", "29642", *train, str(tmp_path / "ref.yaml")], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = _adapter(tmp_path / "ref")
    _close(_adapter(tmp_path / "alone"), ref)
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["processes"] == 2
    whole, mine = summary["base_param_bytes"], summary["base_param_bytes_per_process"]
    assert whole / 2 <= mine <= 0.52 * whole
    last = tmp_path / "ref" / "checkpoints" / f"checkpoint-{steps - every}"
    assert sorted(os.listdir(last)) == ["sharded", "trainer_state.pt"]  # no gathered adapter per checkpoint
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(last / "sharded"))

    # killed (SIGKILL to torchrun and its two workers) right after a checkpoint, then resumed on 2 processes
    proc = subprocess.Popen([*TORCHRUN, "--master_port", "29643", *train, str(tmp_path / "killed.yaml")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts / "checkpoint-4" / "trainer_state.pt").is_file():
        time.sleep(0.02)
    workers = _children(proc.pid)  # torchrun starts each worker in a session of its own: killpg misses them
    assert len(workers) == 2
    for pid in [proc.pid, *workers]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    _wait_gone(workers)
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"
    kept = tmp_path / "kept"
    shutil.copytree(ckpts, kept / "checkpoints", symlinks=True)
    res = subprocess.run([*TORCHRUN, "--master_port", "29644", *train, str(tmp_path / "killed.yaml"), "--resume"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = _adapter(tmp_path / "killed")
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # bit-exact on the same number of processes
    rows = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(2, steps + 1, 2))

    # the same checkpoint on one process (resharded): the global batch must stay 4
    one = {**base, "training": {**base["training"], "output_dir": str(kept)}}
    wrong = Runner(parse_spec(one), quiet=True, resume=True)
    with pytest.raises(PeftError, match=r"the global batch \(batch_size × grad_accum × processes: 4 → 2"):
        wrong.train()
    one["training"]["grad_accum"] = 2
    resumed = Runner(parse_spec(one), quiet=True, resume=True)
    assert resumed._resume_from[0] >= 4
    resumed.train()
    _close(ref, _adapter(kept))
