"""Bytes autograd keeps for backward (the measure of benchmarks/compare_hf_peft.py), for tests of saved-memory
bounds: each storage counted once, only if backward unpacks it, the model's parameters and buffers excluded.
Deterministic, unlike timings."""

from __future__ import annotations

import torch
import torch.nn as nn


def saved_bytes(model: nn.Module, ids: torch.Tensor, integers: bool | None = None) -> int:
    """Saved-activation bytes of one causal-LM training step of ``model`` on ``ids`` (gradients are cleared); only
    those of integer tensors (``integers=True``: e.g. dropout masks' gaps) or of the others (False)."""
    packed: list[tuple[int, int, bool]] = []
    unpacked: set[int] = set()

    def pack(t: torch.Tensor) -> tuple[int, torch.Tensor]:
        storage = t.untyped_storage()
        packed.append((storage.data_ptr(), storage.nbytes(), not (t.is_floating_point() or t.is_complex())))
        return len(packed) - 1, t

    def unpack(token: tuple[int, torch.Tensor]) -> torch.Tensor:
        unpacked.add(token[0])
        return token[1]

    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    kept = {packed[i][0]: packed[i][1] for i in unpacked if integers is None or packed[i][2] == integers}
    return sum(n for ptr, n in kept.items() if ptr not in excluded)
