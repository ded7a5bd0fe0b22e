"""``peftkit plan``: exact parameter counts from a meta-device model, memory components against a hand
calculation, the plan against measured peak torch memory, the public 7B / 70B configs, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftkit import plan as P
from peftkit.cli import app
from peftkit.errors import PeftError

TINY_LLAMA = {"model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "architectures": ["LlamaForCausalLM"]}
TINY_BERT = {"model_type": "bert", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 2, "architectures": ["BertModel"]}
# public configs (values from the models' config.json on the Hub), planned without any download
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}
LLAMA3_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
              "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}


def counts(values: dict, method: str, dtype: str = "fp32") -> P.Counts:
    config = P.load_config(values)
    return P.count_parameters(config, P.architecture_of(config), method, dtype, num_labels=5)


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("24G", 24 * 2**30),
                                            ("512MiB", 512 * 2**20), (" 1.5 TiB ", int(1.5 * 2**40))])
def test_memory_strings_and_their_units(text, expected):
    assert P.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80", "eighty GiB", "80XB", "", "-4GiB"])
def test_memory_without_a_known_unit_is_one_clear_error(text):
    with pytest.raises(PeftError, match=r"give a number and a unit: 80GiB \(2\^30 bytes\), 80GB"):
        P.parse_memory(text)


@pytest.mark.parametrize("values", [TINY_LLAMA, TINY_BERT], ids=["llama", "bert"])
@pytest.mark.parametrize("method, dtype", [("lora", "fp32"), ("dora", "fp32"), ("full", "fp32"), ("qlora", "fp32"),
                                           ("lora", "bf16"), ("qlora", "bf16")])
def test_counts_on_the_meta_device_equal_the_real_model(values, method, dtype):
    from peftkit.quantize import model_weight_bytes

    c = counts(values, method, dtype)
    real = P.build_model(P.load_config(values), method, dtype=dtype)
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    total = sum(p.numel() for p in {id(p): p for p in real.parameters()}.values())
    assert (c.trainable, c.total) == (trainable, total)
    assert c.weight_bytes == model_weight_bytes(real)  # NF4 packing, fp32 adapters on a bf16 base: exact


def test_public_configs_have_their_published_parameter_counts():
    c7 = counts(LLAMA2_7B, "lora", "bf16")
    assert c7.total - c7.trainable == 6_738_415_616  # Llama-2-7B
    # LoRA r=8 on all 7 linears of 32 blocks: r·(in+out) each
    assert c7.trainable == 32 * 8 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    c70 = counts(LLAMA3_70B, "full", "bf16")
    assert c70.total == c70.trainable == 70_553_706_496  # Llama-3-70B
    q70 = counts(LLAMA3_70B, "qlora", "bf16")
    # every linear of the blocks is NF4 (not the LM head): 80 blocks of q, k, v, o, gate, up, down
    assert q70.quantized == 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)


def test_components_of_a_tiny_llama_by_hand():
    config = P.load_config(TINY_LLAMA)
    arch = P.architecture_of(config)
    c = P.count_parameters(config, arch, "lora", "fp32")
    # LoRA r=8 on q (32→32), k, v (32→16), o (32→32), gate, up (32→64), down (64→32), 2 blocks
    assert c.trainable == 2 * 8 * ((32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64))
    b, s = 2, 16
    p = P.plan_memory(arch, c, P.Setting("lora", "ddp", False), gpus=1, batch=b, seq=s, capacity=2**30,
                      dtype="fp32")
    # per token and block, fp32: RMSNorms 2·(4h+4), SDPA q,k,v,out 4·(2·32+2·16) + lse 4·H,
    # MLP 3·4·I, linear inputs once per group 4·(h+h+I), A·x 4·r·7
    layer = 2 * (4 * 32 + 4) + 4 * (2 * 32 + 2 * 16) + 4 * 4 + 3 * 4 * 64 + 4 * (32 + 32 + 64) + 4 * 8 * 7
    head = (4 * 32 + 4) + 4 * 128 + 4 * 128 + 2 * 4 * 128  # final norm, logits, log-softmax, CE backward
    assert sum(p.activation_terms.values()) == layer == 2168
    t = c.trainable
    activations = b * s * (2 * layer + head)
    # the start of backward: every activation, no gradient yet (the head does not train); it beats the step
    # (all gradients, foreach AdamW's sqrt(v) copy, the held logits)
    assert p.phases["optimizer step"] == {"weights": c.weight_bytes, "gradients": 4 * t, "optimizer": 8 * t,
                                          "optimizer step": 4 * t, "logits (held)": b * s * 4 * 128}
    assert p.parts == {"weights": c.weight_bytes, "gradients": 0, "optimizer": 8 * t, "activations": activations,
                       "overhead": P.OVERHEAD_BYTES}
    assert c.weights_on(1) == c.weight_bytes
    assert p.phase == "backward" and p.resident == {"weights": c.weight_bytes, "gradients": 4 * t, "optimizer": 8 * t}
    ckpt = P.plan_memory(arch, c, P.Setting("lora", "ddp", True), gpus=1, batch=b, seq=s, capacity=2**30,
                         dtype="fp32")
    # layer inputs, then the larger of the loss head's peak and one recomputed layer with the logits held
    assert ckpt.parts["activations"] == b * s * (2 * 4 * 32 + max(head, layer + 4 * 128)) == b * s * (256 + 2680)
    fsdp = P.plan_memory(arch, c, P.Setting("lora", "fsdp", False), gpus=4, batch=b, seq=s, capacity=2**30,
                         dtype="fp32")
    # every dim 0 here splits evenly in 4; the rotary inv_freq buffers (2 × 4 fp32) stay whole on each device
    assert fsdp.resident == {"weights": (c.weight_bytes - 32) // 4 + 32, "gradients": t, "optimizer": 2 * t}
    assert fsdp.parts["gathered"] == c.root_weight_bytes + 2 * c.block_weight_bytes + 4 * c.block_trainable
    assert c.root_weight_bytes == 4 * (128 * 32 * 2 + 32)  # embeddings, LM head (untied), final norm
    assert c.block_trainable == c.trainable // 2
    ddp = P.plan_memory(arch, c, P.Setting("lora", "ddp", False), gpus=4, batch=b, seq=s, capacity=2**30,
                        dtype="fp32")
    assert ddp.parts["weights"] == c.weight_bytes and ddp.parts["comm buffers"] == 4 * t
    full = P.count_parameters(config, arch, "full", "bf16")
    assert full.head_trainable_elements == 128 * 32
    mixed = P.plan_memory(arch, full, P.Setting("full", "ddp", False), gpus=1, batch=b, seq=s,
                          capacity=2**30, dtype="bf16")
    assert mixed.parts["optimizer"] == (8 + 4) * full.trainable  # AdamW's two moments + the fp32 master copy
    # bf16 weights, and the rotary embedding's fp32 inv_freq and original_inv_freq buffers (head_dim 8: 4 each)
    assert mixed.parts["weights"] == 2 * full.total + 2 * 4 * 4
    # a full fine-tune peaks in AdamW's step: every fp32 gradient and one more fp32 array of the same size
    assert mixed.phase == "optimizer step"
    assert mixed.parts["gradients"] == mixed.parts["optimizer step"] == 4 * full.trainable


def test_dora_and_qlora_terms_follow_what_their_autograd_functions_save():
    config = P.load_config(TINY_LLAMA)
    arch = P.architecture_of(config)
    lora = P.plan_memory(arch, P.count_parameters(config, arch, "lora", "fp32"), P.Setting("lora", "ddp", False),
                         gpus=1, batch=2, seq=16, capacity=2**30, dtype="fp32")
    layer = sum(lora.activation_terms.values())
    # fused DoRA (fp32) saves LoRA's x and A·x plus its own output y; SDPA keeps v, the MLP keeps gate and up,
    # so only q (H·d = 32), k before RoPE (KV·d = 16), o and down (h = 32 each) cost a·d_out more
    dora = P.plan_memory(arch, P.count_parameters(config, arch, "dora", "fp32"), P.Setting("dora", "ddp", False),
                         gpus=1, batch=2, seq=16, capacity=2**30, dtype="fp32")
    assert dora.activation_terms["DoRA outputs (not kept downstream)"] == 4 * (32 + 16 + 32 + 32)
    assert sum(dora.activation_terms.values()) == layer + 448
    # BERT: SDPA's fused kernels keep q, k, v as given and GELU its input, so attention.output.dense and output.dense
    # (h = 32 each) cost more; the math path (a mask, attention dropout on CPU) saves head-split copies of q, k, v
    bert = P.load_config(TINY_BERT)
    bert_arch = P.architecture_of(bert)
    bert_dora = P.count_parameters(bert, bert_arch, "dora", "fp32", num_labels=5)
    for attention, outputs in (("fused", 2 * 32), ("math", 5 * 32)):
        terms = P.plan_memory(bert_arch, bert_dora, P.Setting("dora", "ddp", False), gpus=1, batch=2, seq=16,
                              capacity=2**30, dtype="fp32", attention=attention).activation_terms
        assert terms["DoRA outputs (not kept downstream)"] == 4 * outputs, attention
    # bf16 activations with fp32 adapters fuse too: the same terms, x and y in bf16, A·x in fp32
    dora16 = P.plan_memory(arch, P.count_parameters(config, arch, "dora", "bf16"), P.Setting("dora", "ddp", False),
                           gpus=1, batch=2, seq=16, capacity=2**30, dtype="bf16")
    assert dora16.activation_terms["DoRA outputs (not kept downstream)"] == 2 * (32 + 16 + 32 + 32)
    lora16 = P.plan_memory(arch, P.count_parameters(config, arch, "lora", "bf16"), P.Setting("lora", "ddp", False),
                           gpus=1, batch=2, seq=16, capacity=2**30, dtype="bf16")
    assert {k: v for k, v in dora16.activation_terms.items() if not k.startswith("DoRA")} == lora16.activation_terms
    # qlora saves what LoRA saves; the dequantised NF4 weight (gate/up/down: 64 × 32) lives inside one matmul, so
    # the activations are the larger of the head's peak and the held logits plus 2 × its elements
    c = P.count_parameters(config, arch, "qlora", "fp32")
    assert c.largest_quantized == 64 * 32
    head = (4 * 32 + 4) + 4 * 128 + 4 * 128 + 2 * 4 * 128
    for b, s in ((2, 16), (1, 1)):
        q = P.plan_memory(arch, c, P.Setting("qlora", "ddp", False), gpus=1, batch=b, seq=s, capacity=2**30,
                          dtype="fp32")
        assert q.activation_terms == lora.activation_terms
        assert q.phases["backward"]["activations"] == b * s * 2 * layer + max(b * s * head, b * s * 4 * 128 + 2 * 64 * 32 * 4)
    assert q.phases["backward"]["activations"] == 2 * layer + 4 * 128 + 16384  # one token: the dequantised weight dominates


def test_fsdp_splits_each_dim_0_in_chunks_as_torch_chunk_does():
    embedding = P.Stored(rows=1001, split_bytes=1001 * 256 * 4, trainable_elements=1001 * 256)
    assert embedding.bytes_on(1) == 1001 * 256 * 4
    assert embedding.bytes_on(2) == 501 * 256 * 4 and embedding.trainable_on(2) == 501 * 256  # the first chunk
    assert embedding.bytes_on(3) == 334 * 256 * 4
    nf4 = P.Stored(4, *P.nf4_split_whole(4 * 4096, 4, 64, 16))  # codes, scales, factors split; mean + table whole
    assert nf4.bytes_on(2) == (8192 + 256 + 16 * 4) // 2 + 4 + 64 and nf4.trainable_on(2) == 0
    assert P.Stored(0, 0, 32).bytes_on(8) == 32  # a buffer is not sharded


@pytest.mark.parametrize("method", ["lora", "full", "dora", "qlora"])
def test_plan_is_within_10_percent_of_measured_peak_memory_and_peaks_in_the_same_phase(method):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=1000)
    arch = P.architecture_of(config)
    c = P.count_parameters(config, arch, method, "fp32")
    planned = P.plan_memory(arch, c, P.Setting(method, "ddp", False), gpus=1, batch=2, seq=64,
                            capacity=2**40, dtype="fp32", precision="pure")
    measured = P.measure_step(config, method, batch=2, seq=64, dtype="fp32")
    assert measured["trainable"] == c.trainable and measured["foreach"]
    assert 0.9 <= planned.torch_bytes / measured["peak_bytes"] <= 1.1
    phases = measured["phases"]  # the LoRA family peaks as backward starts, a full fine-tune in AdamW's foreach step
    assert (phases["backward"] >= phases["optimizer step"]) == (planned.phase == "backward") == (method != "full")


def test_the_cheapest_setting_that_fits_is_found_in_order_of_cost():
    report = P.plan(LLAMA2_7B, "lora", gpus=1, gpu_memory="24GiB", batch=1, seq=2048)
    assert not report.asked.fits
    assert str(report.cheapest.setting) == "lora+ddp+checkpointing" and report.cheapest.fits
    eight = P.plan(LLAMA3_70B, "full", gpus=8, gpu_memory="80GiB", batch=1, seq=2048, strategy="fsdp",
                   checkpointing=True)
    assert not eight.asked.fits and eight.cheapest is None  # 70B × 18 bytes / 8 > 80 GiB
    assert [str(t.setting) for t in eight.tried] == ["full+ddp", "full+fsdp", "full+ddp+checkpointing",
                                                      "full+fsdp+checkpointing"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plan") / "tiny-llama"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(TINY_LLAMA))
    return root


def test_cli_prints_the_table_the_verdict_and_the_cheapest_setting(folder):
    result = CliRunner().invoke(app, ["plan", str(folder), "--method", "lora", "--gpu-memory", "512MiB",
                                      "--batch", "2", "--seq", "16", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    expected = P.plan(str(folder), "lora", gpu_memory="512MiB", batch=2, seq=16, dtype="fp32").asked
    lines = result.output.splitlines()
    assert f"{'weights':<16}{expected.parts['weights'] / 2**30:>10.2f}" in lines
    assert f"{'total':<16}{expected.total / 2**30:>10.2f}" in lines
    assert any(line.startswith("at the start of backward, the step's peak") for line in lines)
    # 1 GiB of fixed overhead alone exceeds 512 MiB: nothing fits
    assert "does not fit (needs 1.0 GiB, has 0.5 GiB per device)" in result.output
    assert "nothing tried fits (lora+ddp, lora+ddp+checkpointing, qlora+ddp, qlora+ddp+checkpointing)" in result.output
    ok = CliRunner().invoke(app, ["plan", str(folder), "--gpu-memory", "2GiB", "--json"])
    data = json.loads(ok.output)
    assert data["verdict"].startswith("fits") and data["cheapest"]["setting"] == "lora+ddp"


@pytest.mark.parametrize("args, message", [
    (["--method", "lorax"], "error: unknown method 'lorax'; known: full, head, lora"),
    (["--gpu-memory", "80"], "error: memory '80' is not understood; give a number and a unit"),
    (["--strategy", "zero3"], "error: strategy 'zero3' is not one of ddp, fsdp"),
    (["--method", "vera"], "error: peftkit plan models the activations of full, lora"),
    (["--gpus", "0"], "error: --gpus must be a positive integer, got 0"),
    (["--dtype", "fp8"], "error: dtype 'fp8' is not one of fp32"),
])
def test_cli_errors_are_one_line(folder, args, message):
    result = CliRunner().invoke(app, ["plan", str(folder), *args])
    assert result.exit_code == 2
    assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1


def test_a_model_not_in_the_offline_cache_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["plan", "nobody-here/no-such-model"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: model 'nobody-here/no-such-model' was not found in the Hugging Face "
                                     "cache (offline); fetch its config once with: hf download "
                                     "nobody-here/no-such-model config.json")


def test_a_folder_without_a_config_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["plan", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {str(tmp_path)!r} has no config.json; give a transformers model "
                                     "folder, a Hub id or minilm / smollm2")


def test_a_family_the_activation_model_does_not_cover_is_refused():
    with pytest.raises(PeftError, match=r"peftkit plan models Llama-style .* not model_type 'gpt2'; measure it"):
        P.architecture_of(P.load_config({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2}))


def test_apply_method_takes_the_method_and_the_base_model_id_explicitly():
    """No duck-typed run spec: plan's config-only model passes no base model, a run passes its id."""
    from conftest import tiny_llama

    from peftkit.train.modeling import apply_method
    from peftkit.train.spec import MethodSpec

    recorded = apply_method(tiny_llama(), MethodSpec(name="lora"), "causal_lm", base_model="org/tiny-llama")
    assert recorded.peft_config["default"].base_model_name_or_path == "org/tiny-llama"
    unnamed = apply_method(tiny_llama(), MethodSpec(name="lora", options={"r": 2}), "causal_lm")
    assert unnamed.peft_config["default"].base_model_name_or_path is None
    assert unnamed.peft_config["default"].r == 2


FSDP_LLAMA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 4, "vocab_size": 1001}
"""The smallest Llama shape whose NF4 weights split in 2 (rows and scaler blocks); an odd vocabulary, so the
embeddings and LM head split unevenly (501 and 500 rows)."""


@pytest.mark.slow
def test_fsdp_and_ddp_plan_per_process_bytes_equal_what_a_real_two_process_run_holds(tmp_path):
    """2 gloo processes shard each model with peftkit.distributed.shard (or wrap it in DDP), take AdamW steps and
    count what each holds (DTensor.to_local() of parameters, gradients and AdamW's moments; buffers whole; DDP's
    gradient buckets): the plan's per-device numbers for 2 devices are the first process's exactly."""
    import os
    import subprocess
    import sys

    here = Path(__file__).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here)])}
    cases = ["fsdp:lora", "fsdp:qlora", "fsdp:full", "ddp:lora", "ddp:full"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29661",
           str(here / "plan_fsdp_worker.py"), str(tmp_path / "report.json"), ",".join(cases),
           json.dumps(FSDP_LLAMA), "1", "16"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    config = P.load_config({"model_type": "llama", **FSDP_LLAMA})
    arch = P.architecture_of(config)
    for case in cases:
        strategy, method = case.split(":")
        c = P.count_parameters(config, arch, method, "fp32")
        planned = P.plan_memory(arch, c, P.Setting(method, strategy, False), gpus=2, batch=1, seq=16,
                                capacity=2**40, dtype="fp32", precision="pure")
        first, second = report[case]
        held = [{"weights": r["parameters_local"] + r["buffers"], "gradients": r["gradients_local"],
                 "optimizer": r["optimizer_moments_local"]} for r in (first, second)]
        assert held[0] == planned.resident, case
        if strategy == "ddp":  # every process holds everything, and the reducer's buckets: a copy of the gradients
            assert held[1] == held[0] and planned.resident["weights"] == c.weight_bytes
            assert first["comm_buffers"] == second["comm_buffers"] == planned.parts["comm buffers"]
            # and the peak counts the buckets once (the step's ops return views of them: counted twice until
            # session 8, full fine-tuning read 0.86 of its plan here)
            assert 0.97 < planned.torch_bytes / first["peak_bytes"] < 1.03, (case, planned.torch_bytes, first)
            continue
        assert first["trainable_local"] == c.trainable_on(2) and first["trainable_local"] > 0
        # the second process holds the smaller chunk of the odd-sized embeddings (and, for full, their gradients
        # and moments): 1 row of 256 per unevenly split tensor, fp32
        untied = 2 if method == "full" else 0
        assert held[0]["weights"] - held[1]["weights"] == 2 * 256 * 4
        assert held[0]["gradients"] - held[1]["gradients"] == untied * 256 * 4
        assert held[0]["optimizer"] - held[1]["optimizer"] == 2 * untied * 256 * 4
        assert planned.resident["weights"] < 0.55 * c.weight_bytes  # about half of the whole model


def test_memory_tracker_follows_storage_resizes_and_records_each_phase():
    """FSDP2 frees and re-allocates its all-gather buffers with UntypedStorage.resize_, which no dispatch mode
    sees: the tracker re-weighs them, and records the peak of each phase of a step."""
    import torch

    from peftkit.measure import TorchMemoryTracker

    kept = torch.zeros(256)  # 1 KiB, there before the tracker
    with TorchMemoryTracker([kept]) as tracker:
        a = torch.ones(1024)  # 4 KiB
        tracker.phase("one")
        a.untyped_storage().resize_(0)  # freed in place
        b = torch.ones(512)  # 2 KiB
        assert tracker.current == 1024 + 2048
        tracker.phase("two")
        a.untyped_storage().resize_(8192)  # allocated again, larger
        tracker.phase("three")
    assert "resize_" not in torch.UntypedStorage.__dict__  # put back
    assert tracker.start == 1024
    assert tracker.phases == {"one": 1024 + 4096, "two": 1024 + 4096, "three": 1024 + 2048 + 8192}
    assert tracker.peak == 1024 + 2048 + 8192
    del a, b
