"""What a run leaves behind, and the checks that keep it honest.

- ``peftkit_run.json`` inside every adapter folder a run writes (the final one and each checkpoint's):
  what a merge or an eval needs beyond HF PEFT's two files (the task, the classification pooling, the
  label names, the base model, the data files' sha256). HF PEFT reads only ``adapter_config.json`` and
  the weights, so the folder still loads there; the file travels when the folder is copied on its own.
- The output folder guard: a new run into a folder that holds another run's outputs would mix the two
  (``keep_last`` prunes by step number, so the old run's higher-numbered checkpoints would win, and
  ``--resume`` would continue them). It is refused unless ``--overwrite``, which removes only the names a
  run writes.
- Finiteness: a NaN / infinite tensor is never written as an adapter nor read as one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

import torch

from ..errors import PeftError

RUN_INFO = "peftkit_run.json"
RUN_INFO_VERSION = 1

# Everything a run writes into training.output_dir (run folders, not the user's other files).
RUN_FILES = ("run_config.yaml", "metrics.jsonl", "summary.json", "plot.png", "head.safetensors")
RUN_FOLDERS = {"checkpoints": None, "adapter": "adapter_config.json", "model": "config.json"}
"""Folder -> the file that shows peftkit wrote it (None: ``checkpoints`` is cleaned entry by entry)."""


class NonFiniteError(PeftError):
    """Training produced, or a file holds, NaN or infinite values."""


class OutputFolderError(PeftError):
    """The output folder holds another run's outputs."""


# ---- peftkit_run.json -------------------------------------------------------------------------------


def run_info_bytes(info: dict[str, Any]) -> bytes:
    return (json.dumps({"peftkit_run": RUN_INFO_VERSION, **info}, indent=2) + "\n").encode()


def read_run_info(adapter: str) -> dict[str, Any] | None:
    """The ``peftkit_run.json`` of an adapter folder; None when absent (HF PEFT's folders, older runs)."""
    path = os.path.join(adapter, RUN_INFO)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            info = json.load(fh)
    except (OSError, ValueError) as exc:
        raise PeftError(f"{path!r} cannot be read ({type(exc).__name__}); copy the adapter folder again, whole") from None
    if not isinstance(info, dict) or not isinstance(info.get("peftkit_run"), int):
        raise PeftError(f"{path!r} is not a peftkit run record; remove it or copy the adapter folder again")
    return info


def run_config_next_to(adapter: str) -> dict[str, Any] | None:
    """The ``run_config.yaml`` one level above ``adapter`` (how runs before ``peftkit_run.json`` kept it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(adapter)), "run_config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as exc:
        raise PeftError(f"{path!r} cannot be read ({type(exc).__name__}); fix or remove it") from None
    return data if isinstance(data, dict) else None


def adapter_pooling(adapter: str) -> tuple[str | None, str]:
    """(pooling, where it was read) of a classification adapter: its ``peftkit_run.json``, else the
    ``run_config.yaml`` of the run folder it sits in; (None, "") when neither says."""
    info = read_run_info(adapter)
    if info is not None and info.get("pooling") in ("cls", "mean"):
        return info["pooling"], os.path.join(adapter, RUN_INFO)
    config = run_config_next_to(adapter)
    model = config.get("model") if config else None
    if isinstance(model, dict):
        pooling = model.get("pooling", "cls")
        if pooling in ("cls", "mean"):
            return pooling, os.path.join(os.path.dirname(os.path.abspath(adapter)), "run_config.yaml")
    return None, ""


# ---- finiteness -------------------------------------------------------------------------------------


def nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    bad = []
    for name, t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def check_adapter_finite(adapter: str) -> None:
    """Refuse an adapter folder (or head ``.safetensors`` file) whose tensors hold NaN / infinity: every
    tensor of every safetensors file, so methods without a ``delta_weight`` (prompts, adapters) count too."""
    from safetensors.torch import load_file

    files = [adapter] if os.path.isfile(adapter) else sorted(
        os.path.join(adapter, f) for f in os.listdir(adapter) if f.endswith(".safetensors"))
    for path in files:
        try:
            tensors = load_file(path)
        except Exception:  # noqa: BLE001 - a corrupt file is reported by the loader with its own fix
            continue
        bad = nonfinite(tensors.items())
        if bad:
            raise NonFiniteError(
                f"{path!r} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:3])}); the run "
                "that wrote it diverged: retrain with a lower training.lr, or use an earlier checkpoint's adapter")


# ---- the output folder ------------------------------------------------------------------------------


def previous_outputs(out: str) -> list[str]:
    """The names in ``out`` that a run writes and that are already there."""
    if not os.path.isdir(out):
        return []
    found = [name for name in RUN_FILES if os.path.isfile(os.path.join(out, name))]
    for name, marker in RUN_FOLDERS.items():
        path = os.path.join(out, name)
        if not os.path.isdir(path):
            continue
        if marker is None:
            if _checkpoint_entries(path):
                found.append(name)
        elif os.path.isfile(os.path.join(path, marker)):
            found.append(name)
    return found


def _checkpoint_entries(folder: str) -> list[str]:
    from .state import _CKPT

    return [e for e in os.listdir(folder) if _CKPT.match(e) or e.startswith(".tmp-checkpoint-")]


def remove_previous_outputs(out: str) -> list[str]:
    """``--overwrite``: delete what a previous run wrote into ``out`` (and nothing else). Returns the names."""
    found = previous_outputs(out)
    for name in found:
        path = os.path.join(out, name)
        if name == "checkpoints":
            for entry in _checkpoint_entries(path):
                shutil.rmtree(os.path.join(path, entry))
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return found


def refuse_foreign_outputs(out: str, resume: bool = False) -> None:
    found = previous_outputs(out)
    if found and resume:
        raise OutputFolderError(
            f"--resume: training.output_dir {out!r} holds a run's outputs ({', '.join(found)}) but no checkpoint to "
            "continue (set training.save_every to write them); choose another output_dir, or run without --resume "
            "and with --overwrite to delete them and start clean")
    if found:
        raise OutputFolderError(
            f"training.output_dir {out!r} already holds a run's outputs ({', '.join(found)}); continue that run "
            "with --resume, choose another output_dir, or pass --overwrite to delete them and start clean")
