"""Exact training state and checkpoints.

``training_state(model)`` is everything a run changes in the model: every trainable tensor by name, and
Delta-LoRA's step counters and starting snapshots (its W update is implicit, see methods/delta_lora.py).
Restoring it with ``load_training_state`` onto a freshly built model gives back the same model, bit for bit.
It serves ``peftkit train`` checkpoints and the transformers Trainer integration alike.

A checkpoint is a folder ``checkpoint-<step>`` holding ``trainer_state.pt`` (training state, optimizer,
scheduler, RNG states of every process, step) and, for adapter methods, the adapter in HF PEFT's layout
(``adapter/``), so any checkpoint is also a usable adapter. It is written in a temporary folder and
renamed into place, so a run killed at any moment leaves only complete checkpoints.

A run with ``training.distributed.strategy: fsdp`` writes ``trainer_state.pt`` without the model and the
optimizer, which go into ``sharded/`` through torch.distributed.checkpoint: every process writes its own
shards into the same temporary folder (the main process made it and told the others its name), and the main
process renames it into place once all are written. Such a checkpoint holds no ``adapter/``: the adapter is
gathered from the shards once, at the end of the run.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch
import torch.nn as nn

from ..errors import PeftError

STATE_FILE = "trainer_state.pt"
SHARDS = "sharded"  # torch.distributed.checkpoint's folder in an fsdp run's checkpoint
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def training_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    from ..methods.delta_lora import delta_lora_layers

    for path, layer, name, variant in delta_lora_layers(model):
        key = f"delta_lora:{path}:{name}"
        state[key + ":step"] = torch.tensor(variant.step)
        snap = getattr(layer, "delta_lora_start", {})
        if name in snap:
            state[key + ":A"] = snap[name].A.detach().clone()
            state[key + ":B"] = snap[name].B.detach().clone()
    return state


def load_training_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    given = {k[len("param:"):] for k in state if k.startswith("param:")}
    if wanted != given:
        missing, extra = sorted(wanted - given)[:3], sorted(given - wanted)[:3]
        raise PeftError(
            f"checkpoint does not fit this run's model (missing {missing}, unexpected {extra}); "
            "resume with the same config the run started with"
        )
    with torch.no_grad():
        for name in wanted:
            value = state[f"param:{name}"]
            if value.shape != params[name].shape:
                raise PeftError(f"checkpoint tensor {name} has shape {tuple(value.shape)}, the model "
                                f"{tuple(params[name].shape)}; resume with the same config")
            params[name].copy_(value)
    from ..methods.delta_lora import delta_lora_layers

    for path, layer, name, variant in delta_lora_layers(model):
        key = f"delta_lora:{path}:{name}"
        if key + ":step" in state:
            variant.step = int(state[key + ":step"])
        if key + ":A" in state:
            variant.snapshot(layer, name)
            with torch.no_grad():
                layer.delta_lora_start[name].A.copy_(state[key + ":A"])
                layer.delta_lora_start[name].B.copy_(state[key + ":B"])


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoints(folder: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in os.listdir(folder):
        m = _CKPT.match(entry)
        if m and os.path.isfile(os.path.join(folder, entry, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(folder, entry)))
    return sorted(found)


def write_checkpoint(folder: str, step: int, payload: dict[str, Any], adapter_writer: Any = None, keep_last: int = 2) -> str:
    """Write ``checkpoint-<step>`` atomically (temporary folder, then rename); keep the last ``keep_last``."""
    from ..io import atomic_folder

    final = os.path.join(folder, f"checkpoint-{step}")
    with atomic_folder(final, replace=True) as tmp:
        _write_state(tmp, payload)
        if adapter_writer is not None:
            adapter_writer(os.path.join(tmp, "adapter"))
    _prune(folder, keep_last)
    return final


def _write_state(tmp: str, payload: dict[str, Any]) -> None:
    with open(os.path.join(tmp, STATE_FILE), "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_sharded_checkpoint(folder: str, step: int, payload: dict[str, Any], save_shards: Any, keep_last: int,
                             world: int, rank: int) -> str:
    """Every process calls it: ``checkpoint-<step>`` with ``save_shards(<tmp>/sharded)`` run on all of them
    (a collective: each writes its shards) and ``trainer_state.pt`` written last by the main process, which
    then swaps the complete folder into place; keep the last ``keep_last``."""
    import contextlib

    import torch.distributed as dist

    from ..io import atomic_folder

    final = os.path.join(folder, f"checkpoint-{step}")
    with contextlib.ExitStack() as stack:
        names: list[Any] = [stack.enter_context(atomic_folder(final, replace=True)) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(names, src=0)
        tmp = names[0]
        save_shards(os.path.join(tmp, SHARDS))  # returns once every process's files and the metadata are written
        if rank == 0:
            _write_state(tmp, payload)
    if world > 1:
        dist.barrier()  # nobody trains on (or reads) before the checkpoint is in place
    if rank == 0:
        _prune(folder, keep_last)
    return final


def _prune(folder: str, keep_last: int) -> None:
    for _, old in checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for entry in os.listdir(folder):  # leftovers of a run killed mid-write
        if entry.startswith(".tmp-checkpoint-"):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def read_checkpoint(path: str) -> dict[str, Any]:
    try:
        return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PeftError(f"checkpoint {path!r} cannot be read ({type(exc).__name__}); delete it to resume "
                        "from the one before") from None
