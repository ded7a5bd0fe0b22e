"""Adapter files: HF PEFT's key names, safetensors only, strict checks on load, atomic writes.

Key layout (HF PEFT's, adapter name left out):

    base_model.model.<module path>.lora_A.weight            a layer method's tensors (suffix from the layer)
    base_model.model.<module path>.<param>                   a modules_to_save copy (e.g. classifier.weight)
    base_model.model.<param path ending in bias>             trained biases (bias="all" / "lora_only")

The ``base_model.model.`` prefix is present when the state belongs to a PeftModel and absent for a
plain model given adapters by ``inject_adapter_in_model``, as in HF PEFT.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import patterns
from .config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig
from .errors import AdapterFileError
from .methods.base import (
    METHODS,
    AdapterLayer,
    adapter_layers,
    logical_path,
    model_adapters,
    modules_to_save_wrappers,
)

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


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, replace: bool = False) -> Iterator[str]:
    """Yield a temporary folder beside ``final``; on success rename it to ``final`` (replacing an existing
    one when ``replace``, else only an empty one), on any error delete it: readers never see half a folder."""
    final = os.path.abspath(os.fspath(final))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(final)}-")
    try:
        yield tmp
        if os.path.isdir(final):
            shutil.rmtree(final) if replace else os.rmdir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_adapter_folder(
    folder: str | os.PathLike, config: PeftConfig, tensors: dict[str, torch.Tensor],
    extra_files: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (and ``extra_files``: more safetensors
    files by name, e.g. a P-tuning encoder) into ``folder``.

    Both files are written to a temporary folder first. A new folder is then renamed into place in one
    step; into an existing folder (which may hold the user's other files) each file is renamed in turn,
    weights before config, so every file present is always complete."""
    folder = os.fspath(folder)
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(folder)}-")
    files = {**(extra_files or {}), WEIGHTS_NAME: tensors}  # the config comes last, after every weight file
    try:
        for file_name, file_tensors_ in files.items():
            clean: dict[str, torch.Tensor] = {}
            seen: set[int] = set()
            for key, value in file_tensors_.items():
                value = value.detach().to("cpu").contiguous()
                if value.untyped_storage().data_ptr() in seen:  # tied weights: safetensors refuses shared memory
                    value = value.clone()
                seen.add(value.untyped_storage().data_ptr())
                clean[key] = value
            save_file(clean, os.path.join(tmp, file_name), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as fh:
            fh.write(config.to_json_string())
        if not os.path.exists(folder):
            os.replace(tmp, folder)
            return
        for name in (*files, CONFIG_NAME):
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


def read_adapter_header(folder: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in ``adapter_model.safetensors``, from its header alone (no data read), so
    a config can be checked against its file before anything is allocated for it."""
    from safetensors import safe_open

    path = os.path.join(os.fspath(folder), WEIGHTS_NAME)
    if not os.path.exists(path):
        read_adapter_weights(folder)  # raises its message for a missing file
    try:
        with safe_open(path, "pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
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
            out[f"{prefix}{logical_path(path)}.{suffix}"] = tensor
    for path, wrapper in modules_to_save_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for name, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{prefix}{path}.{name}"] = p
    for _, store in model_adapters(model):  # model-level methods: keys as their files hold them
        if adapter_name in store:
            out.update(store.adapter_state_dict(adapter_name))
    spec = METHODS.get(config.PEFT_TYPE)
    if spec is not None and spec.shared_tensors is not None:
        tuner_prefix = prefix[: -len("model.")] if prefix.endswith("model.") else prefix
        for key, tensor in spec.shared_tensors(model, adapter_name, config).items():
            out[f"{tuner_prefix}{key}"] = tensor
    bias = getattr(config, "bias", "none")
    for name, p in trained_biases(model, adapter_name, bias):
        out[f"{prefix}{name}"] = p
    if bias == "all":
        # HF PEFT picks biases by key name, so it also writes the head wrapper's inner biases
        for path, wrapper in modules_to_save_wrappers(model):
            if adapter_name in wrapper.modules_to_save:
                for inner, module in (("original_module", wrapper.original_module),
                                      ("modules_to_save", wrapper.modules_to_save[adapter_name])):
                    if getattr(module, "bias", None) is not None:
                        out[f"{prefix}{path}.{inner}.bias"] = module.bias
    return out


def file_tensors(
    model: nn.Module, adapter_name: str, config: PeftConfig, prefix: str = PEFT_PREFIX,
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """What an adapter file holds: the adapter's tensors, plus the full embedding weights when HF PEFT's
    ``save_embedding_layers`` rule asks for them ("auto": when embed_tokens / lm_head are targeted)."""
    tensors = adapter_tensors(model, adapter_name, config, prefix)
    targeted = embedding_is_targeted(model, config)
    if save_embedding_layers is True or (save_embedding_layers == "auto" and targeted):
        tensors.update({
            prefix + k: v for k, v in embedding_tensors(model).items()
            if not targeted or k.endswith(".base_layer.weight")
        })
    return tensors


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def embedding_is_targeted(model: nn.Module, config: PeftConfig) -> bool:
    """HF PEFT's rule for saving the full embedding weights with an adapter ("auto")."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return False
        return any(
            patterns.fullmatch(targets, name, "target_modules") for name, _ in model.named_modules()
            if any(re.match(rf"(.*\.)?{e}$", name) for e in EMBEDDING_LAYER_NAMES)
        )
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The input/output embedding weights under HF PEFT's keys (``<path>.base_layer.weight`` when adapted).

    HF PEFT saves them with an adapter that targets ``embed_tokens``/``lm_head`` (or after a vocabulary
    resize); loading such a file replaces the base weights while the adapter is loaded, where its config
    declares them or the user opts in (see ``PeftModel.from_pretrained(load_embedding_layers=...)``)."""
    out: dict[str, torch.Tensor] = {}
    getters = [getattr(model, g, None) for g in ("get_input_embeddings", "get_output_embeddings")]
    for getter in getters:
        module = getter() if callable(getter) else None
        if module is None:
            continue
        path = next((n for n, m in model.named_modules() if m is module), None)
        if path is None:
            continue
        if isinstance(module, AdapterLayer):
            out[f"{logical_path(path)}.base_layer.weight"] = module.get_base_layer().weight
        elif getattr(module, "weight", None) is not None:
            out[f"{path}.weight"] = module.weight
    return out


def trained_biases(model: nn.Module, adapter_name: str, bias: str) -> list[tuple[str, nn.Parameter]]:
    """Biases that bias="all" / "lora_only" trains with this adapter (names as in model.named_parameters)."""
    if bias == "none":
        return []
    if bias.endswith("_only"):  # "lora_only", "vera_only": the adapted modules' biases (HF PEFT's rule)
        return [
            (f"{logical_path(path)}.base_layer.bias", layer.get_base_layer().bias)
            for path, layer in adapter_layers(model)
            if adapter_name in layer.adapter_names and getattr(layer.get_base_layer(), "bias", None) is not None
        ]
    skip = tuple(f"{path}." for path, _ in modules_to_save_wrappers(model))
    return [
        (re.sub(r"(\.base_layer)+\.", ".base_layer.", name), p) for name, p in model.named_parameters()
        if name.endswith("bias") and not name.startswith(skip)
    ]


def check_against_model(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], where: str,
    optional: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every expected key present with equal shapes, and no key without a place, else one message naming the
    first problem. ``optional`` keys may be absent. Returns the targets to copy the file's tensors into."""
    optional = optional or {}
    targets: dict[str, torch.Tensor] = {}
    for key, tensor in given.items():
        target = expected.get(key, optional.get(key))
        if target is None:
            hint = next(iter(expected), "(none)")
            raise AdapterFileError(
                f"{where}: key {key!r} has no place in this model (it expects keys like {hint!r}); "
                "the adapter was made for another model or another target_modules"
            )
        if tuple(target.shape) != tuple(tensor.shape):
            raise AdapterFileError(
                f"{where}: {key!r} has shape {tuple(tensor.shape)} in the file but {tuple(target.shape)} "
                "in this model; the adapter was made for another model size or rank"
            )
        check_tensor_values(key, tensor, target, where)
        targets[key] = target
    missing = [k for k in expected if k not in given]
    if missing:
        raise AdapterFileError(
            f"{where}: the file lacks {len(missing)} tensor(s) this config needs, first {missing[0]!r}; "
            "the file is incomplete or its adapter_config.json does not match it"
        )
    return targets


def check_tensor_values(key: str, tensor: torch.Tensor, target: torch.Tensor, where: str) -> None:
    """A file's tensor must be floating point where the model's is (casting int8 or bool weights to float
    loads nonsense that runs), and finite: a NaN/Inf adapter weight makes every output NaN (or, after a fused
    kernel, silently wrong), and merging it poisons the base. Both are refused: no real adapter holds them."""
    if not target.is_floating_point():
        return
    if not tensor.is_floating_point():
        raise AdapterFileError(
            f"{where}: {key!r} is {str(tensor.dtype).removeprefix('torch.')} in the file but this model holds "
            f"{str(target.dtype).removeprefix('torch.')} weights there; the file is corrupt or not an adapter: "
            "save it again from the trained model (a cast would load meaningless values)"
        )
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AdapterFileError(
            f"{where}: {key!r} holds {bad} NaN/Inf value(s); the adapter is broken (e.g. a diverged training run) "
            "and would make the outputs NaN: retrain it or load an earlier checkpoint"
        )


@torch.no_grad()
def copy_into(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    for key, target in expected.items():
        target.copy_(given[key].to(dtype=target.dtype, device=target.device))
