"""Adapter files: HF PEFT's key names, safetensors only, strict checks on load, atomic writes.

Key layout (HF PEFT's, adapter name left out):

    base_model.model.<module path>.lora_A.weight            a layer method's tensors (suffix from the layer)
    base_model.model.<module path>.<param>                   a modules_to_save copy (e.g. classifier.weight)
    base_model.model.<param path ending in bias>             trained biases (bias="all" / "lora_only")

The ``base_model.model.`` prefix is present when the state belongs to a PeftModel and absent for a
plain model given adapters by ``inject_adapter_in_model``, as in HF PEFT.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig
from .errors import AdapterFileError
from .methods.base import adapter_layers, modules_to_save_wrappers

PEFT_PREFIX = "base_model.model."


# ---- atomic writes ---------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_adapter_folder(folder: str | os.PathLike, config: PeftConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``folder``.

    Both files are written to a temporary folder first. A new folder is then renamed into place in one
    step; into an existing folder (which may hold the user's other files) each file is renamed in turn,
    weights before config, so every file present is always complete."""
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(folder)}-")
    try:
        clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(clean, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(config.to_json_string())
        if not os.path.exists(folder):
            os.replace(tmp, folder)
            return
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- reading ---------------------------------------------------------------------------------------
def read_adapter_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never a pickle) with one clear error for every failure."""
    folder = os.fspath(folder)
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(folder, "adapter_model.bin")):
            raise AdapterFileError(
                f"{folder!r} holds only adapter_model.bin (a pickle); peftkit reads safetensors only. Convert it "
                "once with: safetensors.torch.save_file(torch.load(bin, weights_only=True), 'adapter_model.safetensors')"
            )
        raise AdapterFileError(f"no {WEIGHTS_NAME} in {folder!r}; is this an adapter folder?")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(
            f"{path!r} is truncated or corrupt ({exc}); save the adapter again or copy it whole"
        ) from None


# ---- model state <-> file keys ---------------------------------------------------------------------
def adapter_tensors(
    model: nn.Module, adapter_name: str, config: PeftConfig, prefix: str = PEFT_PREFIX
) -> dict[str, torch.Tensor]:
    """The live tensors (parameters, not copies) that make up ``adapter_name``, under HF PEFT's keys."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(model):
        for suffix, tensor in layer.adapter_state_dict(adapter_name).items():
            out[f"{prefix}{path}.{suffix}"] = tensor
    for path, wrapper in modules_to_save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{prefix}{path}.{name}"] = p
    for name, p in trained_biases(model, adapter_name, getattr(config, "bias", "none")):
        out[f"{prefix}{name}"] = p
    return out


def trained_biases(model: nn.Module, adapter_name: str, bias: str) -> list[tuple[str, nn.Parameter]]:
    """Biases that bias="all" / "lora_only" trains with this adapter (names as in model.named_parameters)."""
    if bias == "none":
        return []
    if bias == "lora_only":
        return [
            (f"{path}.base_layer.bias", layer.base_layer.bias)
            for path, layer in adapter_layers(model)
            if adapter_name in layer.adapter_names and getattr(layer.base_layer, "bias", None) is not None
        ]
    skip = tuple(f"{path}." for path, _ in modules_to_save_wrappers(model))
    return [
        (name, p) for name, p in model.named_parameters()
        if name.endswith("bias") and not name.startswith(skip)
    ]


def check_against_model(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], where: str) -> None:
    """Every key present in both with equal shapes, else one message naming the first problem."""
    for key, tensor in given.items():
        if key not in expected:
            hint = next(iter(expected), "(none)")
            raise AdapterFileError(
                f"{where}: key {key!r} has no place in this model (it expects keys like {hint!r}); "
                "the adapter was made for another model or another target_modules"
            )
        if tuple(expected[key].shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{where}: {key!r} has shape {tuple(tensor.shape)} in the file but {tuple(expected[key].shape)} "
                "in this model; the adapter was made for another model size or rank"
            )
    missing = [k for k in expected if k not in given]
    if missing:
        raise AdapterFileError(
            f"{where}: the file lacks {len(missing)} tensor(s) this config needs, first {missing[0]!r}; "
            "the file is incomplete or its adapter_config.json does not match it"
        )


@torch.no_grad()
def copy_into(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    for key, target in expected.items():
        target.copy_(given[key].to(dtype=target.dtype, device=target.device))
