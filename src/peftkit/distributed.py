"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``): the frozen base and the
adapters split across processes, each holding about 1/N of every weight.

    import torch.distributed as dist, peftkit
    dist.init_process_group("nccl")              # torchrun --nproc_per_node N train.py
    model = peftkit.get_peft_model(base, peftkit.LoraConfig(...))
    peftkit.distributed.shard(model)             # then build the optimizer over model.parameters()
    ...                                          # train: each process its share of every global batch
    peftkit.distributed.save_pretrained(model, "out/adapter")   # every process; rank 0 writes the HF folder

:func:`shard` applies ``fully_shard`` to every transformer block (the classes transformers names in
``_no_split_modules``; for other models the entries of their largest ``nn.ModuleList``) and then to the
root, so one block's weights are gathered at a time. Frozen and trainable parameters live in the same
groups (FSDP2 reduces gradients only for the ones that have them); a QLoRA base (torchao's ``NF4Tensor``,
as :func:`peftkit.quantize_base` makes it) is sharded in its packed form: torchao implements FSDP2's
all-gather hooks, so only the 4-bit data travels and each process stores 1/N of it.

Gradient reduction: ``"mean"`` (FSDP's and DDP's default: the loss is a per-process mean) or ``"sum"``
(the loss is already divided by the global count, as ``peftkit train`` does); "sum" uses plain SUM
collectives (no NCCL pre-multiplied sum), so it runs on gloo too.

Checkpoints: :func:`save_sharded` / :func:`load_sharded` write and read the trainable state and the
optimizer through ``torch.distributed.checkpoint`` (each process its own shards; loading reshards, so a run
saved by N processes resumes on M, or on a single unsharded process). :func:`save_pretrained` (every
process calls it) gathers the adapter's tensors onto the main process for a moment and writes the usual
HF PEFT folder there.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import PeftConfigError, PeftError

MIXED_PRECISION = ("bf16",)
REDUCTIONS = ("mean", "sum")


# ---- what can be sharded -----------------------------------------------------------------------------
def unshardable(model: nn.Module, world: int = 2) -> str | None:
    """Why ``model`` cannot be sharded with FSDP2 across ``world`` processes (one line, with the fix), else
    None."""
    from .methods.delta_lora import delta_lora_layers
    from .quantize import quantization_of

    if any(True for _ in delta_lora_layers(model)):
        return ("Delta-LoRA keeps its step-K snapshot of A and B outside the module's parameters, where FSDP "
                "neither shards nor gathers it; train Delta-LoRA with strategy ddp")
    if any(quantization_of(p) == "int8" for p in model.parameters()):
        return ("torchao's Int8Tensor has no FSDP2 all-gather hooks, so an int8 base cannot be sharded; quantise "
                "with nf4 (QLoRA) or train with strategy ddp")
    for name, p in model.named_parameters():
        if quantization_of(p) == "nf4":
            rows, scaler_blocks = p.shape[0], p.quantization_factor.numel()
            if rows % world or scaler_blocks % world:
                return (f"the NF4 weight {name} ({rows} rows, {scaler_blocks} scaler blocks of "
                        f"{p.scaler_block_size * p.block_size} weights) does not split evenly across {world} "
                        "processes (torchao shards NF4 by whole rows and scaler blocks); quantise with a smaller "
                        "scaler_block_size, add it to quantize_base's skip, or use another number of processes")
    if is_sharded(model):
        return "the model is already sharded (shard() was called on it); call it once"
    return None


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _inner(model: nn.Module) -> nn.Module:
    """The user's model inside a PeftModel (or the model itself)."""
    from .model import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules to shard one by one: transformers' ``_no_split_modules`` classes (its decoder / encoder
    layers), outermost first; for a model without them, the entries of its largest ``nn.ModuleList``."""
    inner = _inner(model)
    names: set[str] = set()
    for m in inner.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for m in inner.modules():
        if id(m) in inside:
            continue
        if type(m).__name__ in names:
            blocks.append(m)
            inside.update(id(s) for s in m.modules())
    if blocks:
        return blocks
    lists = [m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return list(max(lists, key=len)) if lists else []


# ---- shard -------------------------------------------------------------------------------------------
def check_options(mixed_precision: str | None, cpu_offload: bool, gradient_reduction: str,
                  device: torch.device) -> None:
    """Refuse options that do not exist or cannot work on ``device`` (before the model is changed)."""
    if mixed_precision is not None and mixed_precision not in MIXED_PRECISION:
        raise PeftConfigError(f"mixed_precision {mixed_precision!r} is not supported; use one of "
                              f"{', '.join(MIXED_PRECISION)} (bf16 compute, fp32 gradient reduction) or None")
    if gradient_reduction not in REDUCTIONS:
        raise PeftConfigError(f"gradient_reduction {gradient_reduction!r} is not one of {', '.join(REDUCTIONS)}")
    if cpu_offload and device.type == "cpu":
        raise PeftConfigError("cpu_offload keeps the shards in CPU memory between uses on a GPU; this run is on "
                              "the CPU already, so drop cpu_offload")


def shard(model: nn.Module, *, activation_checkpointing: bool = False, mixed_precision: str | None = None,
          cpu_offload: bool = False, reshard_after_forward: bool = True,
          gradient_reduction: str = "mean") -> nn.Module:
    """Shard ``model`` (a PeftModel or any module) in place across the processes of the default group with
    FSDP2: each transformer block, then the root. Call it after the adapters are added (and after
    ``quantize_base`` for QLoRA) and before building the optimizer: the parameters become DTensors.

    ``activation_checkpointing``: recompute each block's activations in backward (torch's non-reentrant
    checkpoint, which replays the RNG: dropout masks stay the same). ``mixed_precision="bf16"``: blocks
    compute in bf16, gradients are reduced in fp32, the sharded weights and optimizer stay fp32.
    ``cpu_offload``: the shards (and their gradients) live in CPU memory, GPU only while used (GPU runs).
    ``gradient_reduction``: "mean" (the loss is a per-process mean, as with DDP) or "sum" (it is already
    normalised over the global batch). Returns ``model``."""
    if not _distributed():
        raise PeftError("shard() needs torch.distributed's process group: launch with torchrun and call "
                        "torch.distributed.init_process_group() first")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    check_options(mixed_precision, cpu_offload, gradient_reduction, device)
    why = unshardable(model, dist.get_world_size())
    if why:
        raise PeftError(f"cannot shard this model: {why}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    blocks = transformer_blocks(model)
    if activation_checkpointing:
        checkpoint_blocks(model, blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard_after_forward)
    if gradient_reduction == "sum":
        for m in fsdp_modules(model):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # SUM then ×1: no PREMUL_SUM, which gloo lacks
    return model


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module] | None = None) -> None:
    """Activation checkpointing per transformer block, non-reentrant (dropout's RNG is replayed).

    A transformers model uses its own (``gradient_checkpointing_enable``): it checkpoints each layer's
    ``forward`` inside FSDP2's hooks and turns the KV cache off for the replay, which would otherwise append
    the block's keys a second time. Other models get torch's composable checkpoint on each block. Neither
    renames modules, so state-dict keys and adapter files stay the same."""
    inner = _inner(model)
    if getattr(inner, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers 5.x's name
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            return
        if hasattr(inner, "gradient_checkpointing_enable"):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return
    from torch.distributed._composable import checkpoint

    for block in transformer_blocks(model) if blocks is None else blocks:
        checkpoint(block)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Put every FSDP group back in its sharded state (after an evaluation forward the root stays gathered)."""
    for m in fsdp_modules(model):
        m.reshard()


# ---- measuring -----------------------------------------------------------------------------------------
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (the tensor itself otherwise)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every process calls it); the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_parameter_bytes(model: nn.Module, trainable: bool | None = None) -> int:
    """Bytes of the parameters this process holds (its shards; a quantised weight counts its packed size).
    ``trainable``: False counts the frozen base only, True the trained tensors only, None both."""
    from .quantize import tensor_nbytes

    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable is not None and p.requires_grad != trainable):
            continue
        seen.add(id(p))
        total += tensor_nbytes(local_tensor(p))
    return total


# ---- saving the full adapter ----------------------------------------------------------------------------
@contextlib.contextmanager
def gathered(model: nn.Module, tensors: Iterable[torch.Tensor], main: bool) -> Iterator[None]:
    """Every process calls it with the same ``tensors``: each sharded one among them is gathered (one
    collective per tensor, in ``model.named_parameters()`` order), and inside the block the main process's
    modules hold the full values as plain parameters, in CPU memory (so ``save_pretrained`` reads them);
    the sharded parameters are put back on exit. The others only take part in the gathers."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    wanted = {id(t) for t in tensors}
    full: dict[int, torch.Tensor] = {}
    for _, p in model.named_parameters():
        if id(p) in wanted and isinstance(p, DTensor) and id(p) not in full:
            value = p.full_tensor()
            if main:
                full[id(p)] = value.detach().cpu()
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in full:
                    swapped.append((module, name, p))
                    module._parameters[name] = nn.Parameter(full[id(p)], requires_grad=p.requires_grad)
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory)`` for a sharded PeftModel: every process calls it (the adapter's
    tensors are gathered), the main process (rank 0) writes the usual HF PEFT folder."""
    main = not _distributed() or dist.get_rank() == 0
    with gathered(model, saved_tensors(model), main):
        if main:
            model.save_pretrained(save_directory, **kwargs)
    if _distributed():
        dist.barrier()


def saved_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What ``save_pretrained`` reads: every trainable tensor, and the frozen ones an adapter file holds
    (full embedding weights when embed_tokens / lm_head are targeted, VeRA's shared projections)."""
    from .io import PEFT_PREFIX, file_tensors
    from .model import PeftModel

    out = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, PeftModel):
        for name, config in model.peft_config.items():
            out += list(file_tensors(model.base_model.model, name, config, PEFT_PREFIX).values())
    return out


# ---- sharded checkpoints ------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" a single process when there is no process group: here that is the intent."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    reshard(model)
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optimizer": osd}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """Write the trainable tensors and the optimizer state into ``folder`` with torch.distributed.checkpoint:
    every process writes its own shards (a collective; a single process writes everything)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=folder, no_dist=not _distributed())


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str) -> None:
    """Read what :func:`save_sharded` wrote into ``model`` and ``optimizer``, resharding to this run's
    processes (any number, sharded or not)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(model, optimizer)  # an empty optimizer gets its state's shapes first (a zero-lr step)
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise PeftError(f"sharded checkpoint {folder!r} has no .metadata (incomplete); delete the checkpoint to "
                        "resume from the one before")
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=folder, no_dist=not _distributed())  # fails on any key the checkpoint lacks
    # strict=False: the frozen base is (deliberately) absent; every trainable key was just filled
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    optimizer.zero_grad(set_to_none=True)
