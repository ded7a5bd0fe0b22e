"""``peftkit inspect`` without torch: the configs come from ``peftkit.configs`` (no tensor library), the tensors'
names, dtypes and shapes from the safetensors header (``peftkit.tensorfile``), and every number equals what the
torch path reports (the model's trainable parameters; safetensors' own reader for shapes and dtypes)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from conftest import HEAVY_MODULES as HEAVY
from conftest import peftkit_probe as _cli
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file

import peftkit
from peftkit import (
    AdapterFileError,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PeftConfigError,
    PrefixTuningConfig,
    VeraConfig,
    get_peft_model,
)
from peftkit.config import _REGISTRY, PeftConfig
from peftkit.inspection import _module_of
from peftkit.tensorfile import read_header

METHODS = {  # sub-folder -> (config, peft_type)
    "lora": (lambda: LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "LORA"),
    "dora": (lambda: LoraConfig(r=2, target_modules=["o_proj"], use_dora=True), "LORA"),
    "vera": (lambda: VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), "VERA"),
    "prefix": (lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "PREFIX_TUNING"),
    "ia3": (lambda: IA3Config(), "IA3"),  # llama's defaults: k_proj, v_proj, down_proj (feedforward)
    "houlsby": (lambda: BottleneckConfig(placement="houlsby"), "BOTTLENECK"),  # + the trained layer norms
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One folder holding an adapter of each method (sub-folders), and what the torch path says of each."""
    root = tmp_path_factory.mktemp("inspect")
    expected = {}
    for name, (make, _) in METHODS.items():
        model = get_peft_model(tiny_llama(), make())
        model.save_pretrained(root / name)
        expected[name] = model.get_nb_trainable_parameters()[0]
    return root, expected


def _torch_view(folder) -> tuple[dict, list[str], int]:
    """What safetensors' own reader (the torch path, as `peftkit inspect` read files before) gives: per-module
    shapes, dtypes and the frozen VeRA projections' size."""
    modules: dict[str, dict[str, list[int]]] = {}
    dtypes, frozen = set(), 0
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
            tensor = fh.get_tensor(key)
            dtypes.add(fh.get_slice(key).get_dtype())
            module, name = _module_of(key)
            modules.setdefault(module, {})[name] = list(tensor.shape)
            if key.endswith(("vera_A", "vera_B")):
                frozen += tensor.numel()
    return modules, sorted(dtypes), frozen


def test_inspect_loads_no_torch_and_reports_the_torch_paths_numbers(saved) -> None:
    root, trainable = saved
    out, probe = _cli("inspect", str(root), "--json")
    assert probe == {"heavy": [], "code": 0}, out
    adapters = {a["name"]: a for a in json.loads(out)["adapters"]}
    assert sorted(adapters) == sorted(METHODS)
    for name, (_, peft_type) in METHODS.items():
        a = adapters[name]
        modules, dtypes, frozen = _torch_view(root / name)
        assert a["peft_type"] == peft_type, name
        assert a["parameters"] == trainable[name] > 0, (name, a["parameters"], trainable[name])
        assert a["modules"] == modules and a["n_modules"] == len(modules), name
        assert a["dtypes"] == dtypes == ["F32"] and a["frozen_stored"] == frozen, name
    assert adapters["vera"]["frozen_stored"] == 8 * 32 + 32 * 8  # A (r, d_in) and B (d_out, r), shared
    assert adapters["lora"]["parameters"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert adapters["prefix"]["parameters"] == 4 * 2 * 2 * 16  # n × layers·2·(kv heads·head dim)
    # the tables a terminal gets: the same counts, still without torch
    out, probe = _cli("inspect", str(root))
    assert probe == {"heavy": [], "code": 0}, out
    for name in METHODS:
        assert f"{trainable[name]:,}" in out, name


def test_configs_load_and_check_without_torch() -> None:
    """Every public config class, the registry of peft_types and the checks of a file's config, in a process
    that never imports torch; the error text is the same one the torch-loaded process gives."""
    code = f"""
import json, sys
import peftkit
from peftkit.config import PeftConfig, known_peft_types
names = [n for n in peftkit.__all__ if n.endswith("Config") or n in ("TaskType", "PromptTuningInit")]
classes = {{n: getattr(peftkit, n).__module__ for n in names}}
config = PeftConfig.from_dict({{"peft_type": "VERA", "r": 4, "target_modules": ["q_proj"]}})
try:
    PeftConfig.from_dict({{"peft_type": "LORA", "lora_alpha": "16"}})
except peftkit.PeftConfigError as exc:
    error = str(exc)
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"types": known_peft_types(), "r": config.r, "error": error, "heavy": heavy, "classes": classes}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["heavy"] == []
    from peftkit.methods.base import METHODS as LAYER_METHODS

    assert got["types"] == sorted(LAYER_METHODS) and got["r"] == 4
    with pytest.raises(PeftConfigError) as here:
        PeftConfig.from_dict({"peft_type": "LORA", "lora_alpha": "16"})
    assert got["error"] == str(here.value) and "lora_alpha must be" in got["error"]
    assert all(module.startswith("peftkit.config") for module in got["classes"].values()), got["classes"]


def test_the_layers_use_the_same_config_classes() -> None:
    """peftkit.methods.<x> re-exports its config: one class per method, whichever path imports it."""
    from peftkit.configs.adapters import NON_LINEARITY_NAMES
    from peftkit.methods import adapters, bitfit, delta_lora, ia3, lora, lora_fa, prompts, vera
    from peftkit.methods.base import METHODS as LAYER_METHODS

    assert {t: spec.config_cls for t, spec in LAYER_METHODS.items()} == _REGISTRY
    pairs = [(lora.LoraConfig, peftkit.LoraConfig), (lora_fa.LoraFAConfig, peftkit.LoraFAConfig),
             (delta_lora.DeltaLoraConfig, peftkit.DeltaLoraConfig), (vera.VeraConfig, peftkit.VeraConfig),
             (ia3.IA3Config, peftkit.IA3Config), (adapters.BottleneckConfig, peftkit.BottleneckConfig),
             (bitfit.BitFitConfig, peftkit.BitFitConfig), (bitfit.BeftConfig, peftkit.BeftConfig),
             (prompts.PrefixTuningConfig, peftkit.PrefixTuningConfig),
             (prompts.PromptTuningInit, peftkit.PromptTuningInit)]
    for a, b in pairs:
        assert a is b, a
    assert sorted(NON_LINEARITY_NAMES) == sorted(adapters.NON_LINEARITIES)  # every accepted name has a function


# ---- the header reader against safetensors itself ---------------------------------------------------------------
def _raw(header: dict | bytes, data: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_header_reader_agrees_with_safetensors_on_valid_files(tmp_path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16), "c": torch.zeros(0, 5),
               "d": torch.tensor(7, dtype=torch.int64), "e": torch.zeros(5, dtype=torch.bool),
               "f": torch.zeros(1, 3, dtype=torch.float16)}, str(path), metadata={"format": "pt"})
    with safe_open(str(path), "pt") as fh:
        theirs = {k: (fh.get_slice(k).get_dtype(), list(fh.get_slice(k).get_shape())) for k in fh.keys()}  # noqa: SIM118
    ours = read_header(path)
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == theirs
    assert list(ours) == sorted(theirs)
    assert ours["a"].numel == 12 and ours["c"].numel == 0 and ours["d"].numel == 1 and ours["d"].shape == []


def _corrupt_files() -> dict[str, bytes]:
    good = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    data = b"\x00" * 8
    return {
        "empty": b"",
        "short length": b"\x05\x00\x00",
        "header longer than the file": struct.pack("<Q", 1000) + b"{}",
        "header over safetensors' limit": struct.pack("<Q", 200_000_000) + b"{}",
        "not JSON": _raw(b"{not json", data),
        "not an object": _raw(b"[1, 2]", data),
        "not UTF-8": _raw(b'{"\xff": 1}', data),
        "bytes after the tensors": _raw(good, data + b"\x00"),
        "truncated data": _raw(good, data[:4]),
        "a gap between tensors": _raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, data),
        "size not dtype x shape": _raw({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data),
        "unknown dtype": _raw({"x": {"dtype": "F17", "shape": [2], "data_offsets": [0, 8]}}, data),
        "negative shape": _raw({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, data),
        "no offsets": _raw({"x": {"dtype": "F32", "shape": [2]}}, data),
    }


@pytest.mark.parametrize("case", list(_corrupt_files()))
def test_header_reader_refuses_what_safetensors_refuses(tmp_path, case) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_corrupt_files()[case])
    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error types vary by case
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                fh.get_tensor(key)
    with pytest.raises(AdapterFileError, match=r"is not a valid safetensors file \(.+\); the file is corrupt"):
        read_header(path)


def test_inspect_names_a_corrupt_weights_file_in_one_line(saved, tmp_path) -> None:
    import shutil

    root, _ = saved
    folder = tmp_path / "lora"
    shutil.copytree(root / "lora", folder)
    raw = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(raw[:-4])  # a copy cut short
    proc = subprocess.run([sys.executable, "-m", "peftkit", "inspect", str(folder)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "adapter_model.safetensors is not a valid safetensors file" in proc.stderr
    assert "the file is corrupt" in proc.stderr and "Traceback" not in proc.stderr
