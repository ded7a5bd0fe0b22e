"""Interop with the real HF ``peft``: adapter folders written by one library load in the other with equal outputs.

Every adapter here is non-zero (``init_lora_weights=False`` and then every trainable tensor — LoRA A/B, the
SEQ_CLS head copy, trained biases — is perturbed), and each test first checks that the adapter changes the
output by a clear margin, so that equal outputs mean the tensors really travelled. Base weights are equal in
both libraries because every tiny model is built from a fixed seed (see conftest.py).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import peft
import pytest
import torch
import torch.nn as nn
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import peftkit
from peftkit.methods.base import AdapterLayer

ATOL = 1e-5  # fp32: outputs of the two libraries must agree to this
MARGIN = 1e-2  # an adapter must move the output by more than this, or the comparison proves nothing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---- cases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """A tiny model and one LoRA config (the same keyword arguments for both libraries)."""

    make_model: Callable[[], nn.Module]
    config: dict[str, Any]
    # a second adapter for the multi-adapter tests
    other_config: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    "llama_all_linear": Case(
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        {"r": 2, "lora_alpha": 4, "target_modules": ["k_proj", "o_proj", "up_proj"]},
    ),
    "gpt2_conv1d_and_wte": Case(
        tiny_gpt2,
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc", "wte"], "fan_in_fan_out": True},
    ),
    "bert_seq_cls": Case(
        tiny_bert_cls,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"},
        {"r": 2, "lora_alpha": 2, "target_modules": ["key", "dense"], "task_type": "SEQ_CLS"},
    ),
    "llama_rslora": Case(
        tiny_llama,
        {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True},
    ),
    "llama_rank_alpha_pattern": Case(
        tiny_llama,
        {
            "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"v_proj": 24, "layers.0.mlp.down_proj": 3},
        },
    ),
    "bert_bias_lora_only": Case(
        tiny_bert_cls,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "bias": "lora_only", "task_type": "SEQ_CLS"},
    ),
    "bert_bias_all": Case(
        tiny_bert_cls,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "bias": "all"},
    ),
    "gpt2_bias_lora_only": Case(
        tiny_gpt2,
        {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True, "bias": "lora_only"},
    ),
    "bert_seq_cls_bias_all": Case(
        tiny_bert_cls,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "bias": "all", "task_type": "SEQ_CLS"},
    ),
    # targeting "embed_tokens" makes HF save the embedding's base weight too (save_embedding_layers="auto")
    "llama_embed_tokens": Case(
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"], "rank_pattern": {"embed_tokens": 3}},
    ),
    "gpt2_all_linear": Case(
        tiny_gpt2, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "fan_in_fan_out": True},
    ),
    "bert_seq_cls_all_linear": Case(
        tiny_bert_cls, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "SEQ_CLS"},
    ),
    "bert_seq_cls_extra_modules_to_save": Case(
        tiny_bert_cls,
        {"r": 4, "lora_alpha": 8, "target_modules": ["query"], "modules_to_save": ["pooler"], "task_type": "SEQ_CLS"},
    ),
    "llama_layers_to_transform": Case(
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1],
         "layers_pattern": "layers"},
    ),
    "llama_regex_and_exclude": Case(
        tiny_llama,
        {"r": 4, "lora_alpha": 8, "target_modules": r".*\.self_attn\.(q|k|o)_proj", "exclude_modules": ["o_proj"],
         "lora_dropout": 0.1},
    ),
}
MULTI = [name for name, case in CASES.items() if case.other_config]
LIBS = {"peftkit": peftkit, "hf": peft}


def other_lib(lib: str) -> str:
    return "hf" if lib == "peftkit" else "peftkit"


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    ids = torch.randint(1, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # some padding: the mask must travel through both libraries the same way
    return {"input_ids": ids, "attention_mask": mask}


# ---- helpers --------------------------------------------------------------------------------------
def lora_config(lib: str, kwargs: dict[str, Any]) -> Any:
    return LIBS[lib].LoraConfig(**{"init_lora_weights": False, **kwargs})


@torch.no_grad()
def perturb_trainable(model: nn.Module, seed: int, scale: float = 0.1) -> int:
    """Add noise to every trainable tensor (the active adapter's LoRA tensors, head copies, trained biases)."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return len(params)


def create(lib: str, case: Case, *, with_other: bool = False) -> nn.Module:
    """A fresh adapted model in ``lib``: adapter "default" (and "other"), every trained tensor non-zero."""
    model = LIBS[lib].get_peft_model(case.make_model(), lora_config(lib, case.config))
    assert perturb_trainable(model, seed=1) > 0
    if with_other:
        model.add_adapter("other", lora_config(lib, case.other_config))
        model.set_adapter("other")
        assert perturb_trainable(model, seed=2) > 0
        model.set_adapter("default")
    return model.eval()


def load(lib: str, case: Case, folder: str, *, with_other: bool = False) -> nn.Module:
    model = LIBS[lib].PeftModel.from_pretrained(case.make_model(), folder)
    if with_other:
        model.load_adapter(os.path.join(folder, "other"), "other")
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def base_logits(case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return case.make_model().eval()(**inputs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.shape == b.shape, what
    diff = max_diff(a, b)
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3g} > {ATOL}"


def adapter_state(lib: str, model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    return dict(LIBS[lib].get_peft_model_state_dict(model, adapter_name=adapter_name))


def assert_arrived(saved: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str = "") -> None:
    """Each saved tensor is, bit for bit, the one the loading library holds under the same key."""
    missing = sorted(set(saved) - set(got))
    assert not missing, f"{what} keys in the file that the loaded model has no tensor for: {missing}"
    for key, tensor in saved.items():
        assert torch.equal(got[key], tensor), f"{what} {key} differs from the file"


def file_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in load_file(os.path.join(folder, "adapter_model.safetensors")).items()}


def ids(names: list[str]) -> list[Any]:
    return [pytest.param(name, id=name) for name in names]


# ---- 1 + 2: one adapter, both directions ------------------------------------------------------------
@pytest.mark.parametrize("src", ["peftkit", "hf"])
@pytest.mark.parametrize("case_name", ids(list(CASES)))
def test_single_adapter_round_trip(case_name: str, src: str, tmp_path, inputs) -> None:
    """Save with ``src``, load with the other library: same outputs, same adapter tensors."""
    case, dst = CASES[case_name], other_lib(src)
    source = create(src, case)
    expected = logits(source, inputs)
    assert max_diff(expected, base_logits(case, inputs)) > MARGIN, "the adapter does not change the output"
    source.save_pretrained(str(tmp_path))

    loaded = load(dst, case, str(tmp_path))
    assert_same(logits(loaded, inputs), expected, f"{src} -> {dst} outputs")

    # every tensor in the file (LoRA A/B, the head copy, trained biases) is what the loaded model holds
    assert_arrived(load_file(str(tmp_path / "adapter_model.safetensors")), adapter_state(dst, loaded))


def test_seq_cls_head_copy_is_restored_not_random(tmp_path, inputs) -> None:
    """The classifier copy trained with a SEQ_CLS adapter is what the other library runs, in both directions."""
    case = CASES["bert_seq_cls"]
    original_head = case.make_model().classifier.weight
    for src in ("peftkit", "hf"):
        dst, folder = other_lib(src), str(tmp_path / src)
        source = create(src, case)
        source.save_pretrained(folder)
        head = source.base_model.model.classifier.modules_to_save["default"].weight
        assert max_diff(head, original_head) > MARGIN, "the head copy was not perturbed"
        loaded = load(dst, case, folder)
        loaded_head = loaded.base_model.model.classifier.modules_to_save["default"].weight
        assert torch.equal(loaded_head, head), f"{src} -> {dst}: head copy not restored"
        # the head matters: with the LoRA tensors loaded but the original head, the output would differ
        with torch.no_grad():
            loaded_head.copy_(original_head)
            differs = max_diff(logits(loaded, inputs), logits(source, inputs))
            loaded_head.copy_(head)
        assert differs > MARGIN
        assert_same(logits(loaded, inputs), logits(source, inputs), f"{src} -> {dst} outputs")


# ---- 3: several adapters ----------------------------------------------------------------------------
@pytest.mark.parametrize("src", ["peftkit", "hf"])
@pytest.mark.parametrize("case_name", ids(MULTI))
def test_multiple_adapters_round_trip(case_name: str, src: str, tmp_path, inputs) -> None:
    """Adapter "default" at the root, "other" in other/: set_adapter switches to the same outputs in both."""
    case, dst = CASES[case_name], other_lib(src)
    source = create(src, case, with_other=True)
    source.save_pretrained(str(tmp_path))
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "other" / "adapter_model.safetensors")
    assert os.path.isfile(tmp_path / "other" / "adapter_config.json")

    loaded = load(dst, case, str(tmp_path), with_other=True)
    base = base_logits(case, inputs)
    outputs: dict[str, torch.Tensor] = {}
    for name in ("default", "other", "default"):
        source.set_adapter(name)
        loaded.set_adapter(name)
        expected = logits(source, inputs)
        assert max_diff(expected, base) > MARGIN, f"adapter {name!r} does not change the output"
        assert_same(logits(loaded, inputs), expected, f"{src} -> {dst}, adapter {name!r}")
        outputs[name] = expected
    assert max_diff(outputs["default"], outputs["other"]) > MARGIN, "switching adapters changes nothing"
    for name, folder in (("default", tmp_path), ("other", tmp_path / "other")):
        assert_arrived(load_file(str(folder / "adapter_model.safetensors")), adapter_state(dst, loaded, name), name)


# ---- 4: the same files -------------------------------------------------------------------------------
@pytest.mark.parametrize("case_name", ids(list(CASES)))
def test_saved_keys_and_shapes_are_identical(case_name: str, tmp_path) -> None:
    case = CASES[case_name]
    for lib in LIBS:
        create(lib, case).save_pretrained(str(tmp_path / lib))
    ours, theirs = file_shapes(str(tmp_path / "peftkit")), file_shapes(str(tmp_path / "hf"))
    assert sorted(ours) == sorted(theirs), (
        f"only peftkit: {sorted(set(ours) - set(theirs))}; only HF: {sorted(set(theirs) - set(ours))}"
    )
    assert ours == theirs


def _normal(value: Any) -> Any:
    """Compare lists of names as sets (HF stores target_modules as a set; order is meaningless)."""
    if isinstance(value, list | set | tuple):
        return sorted(value)
    return value


CONFIG_FIELDS = (
    "r", "lora_alpha", "target_modules", "bias", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
    "task_type", "modules_to_save", "init_lora_weights", "lora_dropout", "layers_to_transform",
)


@pytest.mark.parametrize("case_name", ids(list(CASES)))
def test_adapter_config_json_loads_in_both_libraries(case_name: str, tmp_path) -> None:
    case = CASES[case_name]
    for src in LIBS:
        folder = str(tmp_path / src)
        source = create(src, case)
        source.save_pretrained(folder)
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as fh:
            raw = json.load(fh)
        assert raw["peft_type"] == "LORA" and raw["inference_mode"] is True
        for dst in LIBS:
            loaded = LIBS[dst].LoraConfig.from_pretrained(folder)
            for name in CONFIG_FIELDS:
                want = getattr(source.peft_config["default"], name)
                got = getattr(loaded, name)
                if name == "target_modules" and src == "hf" and case.config["target_modules"] == "all-linear":
                    # HF writes "all-linear" out as the list of modules it matched
                    want = raw["target_modules"]
                assert _normal(got) == _normal(want), f"{src} file read by {dst}: {name}"


# ---- 5: merging --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case_name", ids(list(CASES)))
def test_merge_and_unload_of_hf_adapter_equals_hf(case_name: str, tmp_path, inputs) -> None:
    case = CASES[case_name]
    source = create("hf", case)
    source.save_pretrained(str(tmp_path))
    adapted = logits(source, inputs)
    assert max_diff(adapted, base_logits(case, inputs)) > MARGIN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = load("hf", case, str(tmp_path)).merge_and_unload()
        ours = load("peftkit", case, str(tmp_path)).merge_and_unload()
    assert type(ours) is type(theirs)
    assert not any(isinstance(m, AdapterLayer) for m in ours.modules())
    assert_same(logits(ours, inputs), logits(theirs, inputs), "merged outputs")
    if "wte" not in case.config["target_modules"]:
        # (GPT-2 ties lm_head to wte: merging into wte changes the head too, in both libraries alike)
        assert_same(logits(ours, inputs), adapted, "merged vs unmerged outputs")
    our_state, their_state = ours.state_dict(), theirs.state_dict()
    assert sorted(our_state) == sorted(their_state)
    for key, tensor in their_state.items():
        assert_same(our_state[key], tensor, f"merged weight {key}")
