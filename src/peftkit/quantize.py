"""A quantised frozen base for QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

    y = dequant(W_q) x + s · B A x          W_q frozen in 4 bits (NF4) or 8 bits; A, B trained (fp32)

:func:`quantize_base` swaps the weight of every ``nn.Linear`` (but the output head) for a torchao tensor
subclass. The module stays an ``nn.Linear``, so targeting, ``"all-linear"`` and every LoRA-family layer wrap it
as before: quantisation is a property of the base weight, not a new layer. ``F.linear`` on such a weight
dequantises it into the input's dtype, and its backward gives the input gradient only (the weight never
requires grad), on CPU and CUDA alike. Compute runs in the activations' dtype: fp32, or bf16 after
``quantize_base(..., compute_dtype=torch.bfloat16)``.

``"nf4"``, the paper's 4-bit NormalFloat (torchao's ``NF4Tensor``): each block of ``block_size`` consecutive
weights is divided by its absmax and rounded to the nearest of 16 levels (quantiles of N(0, 1), in [-1, 1]);
the absmax scales are quantised again to int8, in blocks of ``scaler_block_size`` after subtracting their mean
(double quantisation). Storage at the defaults: 0.5 + 1/64 + 4/16384 ≈ 0.516 byte per weight (0.129× fp32).
Error per weight: at most half the widest gap between levels (0.152 × the block's absmax) plus the scale's
rounding (its scaler block's largest |scale − mean| / 256).
peftkit makes torchao's NF4 clone exact (it re-quantised with the default block sizes), so that
``copy.deepcopy`` of a quantised model copies its packed weights bit for bit.
A weight whose size is not a multiple of ``block_size`` is skipped and reported. When the number of blocks
is not a multiple of ``scaler_block_size`` (SmolLM2's 576 × 576 attention projections have 5184 blocks), the
largest divisor of it below ``scaler_block_size`` is used for that weight and the report says so: finer
scale blocks, a little more storage, the same format (bitsandbytes pads the last scale block instead).

``"int8"``: weight-only, symmetric, one scale per output row (torchao's ``Int8Tensor``): 0.25× fp32.

Where code must read W itself (DoRA's weight norm, merging) it calls :func:`dense_weight` / :func:`base_weight`.
Merging into a quantised base swaps in a dense, dequantised copy of that module's weight (a warning says
so) and keeps the quantised original, which unmerging restores exactly; ``merge_and_unload(requantize=True)``
quantises the merged weights again with the original's settings.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .errors import PeftConfigError, PeftError
from .quiet import quiet_third_party
from .targeting import _in_list_or_suffix, is_conv1d, output_head_names

METHODS = ("nf4", "int8")
INSTALL_HINT = 'pip install "peftkit[quant]"'
MIN_SCALER_BLOCK = 16  # below this a weight's NF4 scales would barely be double-quantised: skip it instead
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
MERGE_STASH = "quantized_original"  # attribute of a base module whose quantised weight a merge replaced

_TORCHAO: tuple[Any, Any] | None = None


def _torchao() -> tuple[Any, Any]:
    """(torchao.quantization, torchao's nf4_tensor module), imported on first use."""
    global _TORCHAO
    if _TORCHAO is None:
        quiet_third_party()  # its import logs a line per C++ kernel built for other GPUs, and torch's Enum notices
        try:
            import torchao.quantization as tq
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
        except ImportError:
            raise PeftError(f"quantising a base model needs torchao: {INSTALL_HINT}") from None
        # torchao 0.18's NF4 clone (hence copy.deepcopy) re-quantises the dequantised weight with the default
        # block sizes: lossy, and an AssertionError for any other scaler block size. Copy the packed data.
        nf4_tensor.NF4_OPS_TABLE[torch.ops.aten.clone.default] = _exact_nf4_clone
        # torchao dequantises (every F.linear forward and backward, every .to(dtype)) through two int64 copies
        # of the codes and two 16-entry gathers: ~5x slower on CPU than one gather of both 4-bit halves at once
        nf4_tensor.NF4Tensor.get_original_weight = _fast_nf4_dequantize
        _TORCHAO = (tq, nf4_tensor)
    return _TORCHAO


def _exact_nf4_clone(func: Any, args: tuple, kwargs: dict | None = None) -> torch.Tensor:
    _, nf4 = _torchao()
    t = args[0]
    names, _ = t.__tensor_flatten__()
    return nf4.NF4Tensor(*nf4.construct_nf4_args(t, {n: getattr(t, n).clone() for n in names}))


def nf4_pair_table(levels: torch.Tensor) -> torch.Tensor:
    """(256,) table: byte c -> its two NF4 values (levels[c >> 4], levels[c & 15]) as one integer twice the
    levels' width, so that one gather decodes both halves of a packed byte (a view back gives the floats)."""
    codes = torch.arange(256, device=levels.device)
    pairs = torch.stack([levels[codes >> 4], levels[codes & 15]], 1).contiguous()  # (256, 2), high half first
    return pairs.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[2 * pairs.element_size()]).view(256)


def _fast_nf4_dequantize(self: Any) -> torch.Tensor:
    """torchao's ``NF4Tensor.get_original_weight``, bit for bit (the same level × block scale, one product per
    element, in the same dtype), by one gather of a byte -> value-pair table instead of two per-element gathers."""
    scalers = self.dequantize_scalers(self.quantized_scalers, self.quantization_factor, self.scaler_block_size)
    pairs = nf4_pair_table(self.nf4).index_select(0, self.quantized_data.reshape(-1).int())
    values = pairs.view(self.nf4.dtype).view(-1, self.block_size)  # (n_blocks, block_size), a fresh tensor
    return values.mul_(scalers.unsqueeze(-1)).reshape(self.shape)  # in place: no second weight-sized buffer


# ---- quantised tensors: what they are, their dense value, their size ----------------------------------
def quantization_of(tensor: torch.Tensor | None) -> str | None:
    """``"nf4"`` or ``"int8"`` for a weight quantised by :func:`quantize_base`, None for a plain tensor."""
    if tensor is None or sys.modules.get("torchao") is None:  # without torchao loaded nothing is quantised
        return None
    tq, nf4 = _torchao()
    if isinstance(tensor, nf4.NF4Tensor):
        return "nf4"
    if isinstance(tensor, tq.Int8Tensor):
        return "int8"
    return None


def dense_weight(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` as a plain tensor (dequantised if quantised; a no-op otherwise), in ``dtype`` if given."""
    if type(weight) in (torch.Tensor, nn.Parameter):  # plain: called per layer per step, so no isinstance probes
        return weight if dtype is None or weight.dtype == dtype else weight.to(dtype)  # (a no-op .to costs ~3 µs)
    kind = quantization_of(weight)
    if kind == "nf4":
        weight = weight.get_original_weight()
    elif kind == "int8":
        weight = weight.dequantize()
    return weight if dtype is None else weight.to(dtype)


def base_weight(layer: nn.Module, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """The dense weight of an adapter layer's base module (dequantised if quantised), fp32 by default."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return dense_weight(base.weight, dtype)


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor occupies: a quantised one counts its packed data, scales and lookup table."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter:
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_nbytes(t) for t in (getattr(tensor, n) for n in names) if t is not None)
    return tensor.numel() * tensor.element_size()


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (each counted once; tied weights once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_nbytes(t)
    return total


def quantize_tensor(weight: torch.Tensor, method: str = "nf4", block_size: int = 64,
                    scaler_block_size: int = 256) -> torch.Tensor:
    """One 2-D weight quantised (no checks: :func:`quantize_base` checks the shape first)."""
    tq, nf4 = _torchao()
    weight = weight.detach().contiguous()
    if method == "nf4":
        return nf4.to_nf4(weight, block_size, scaler_block_size)
    return tq.Int8Tensor.from_hp(weight, granularity=tq.PerRow())


def quantize_like(dense: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``dense`` quantised as ``like`` is (same method, block sizes and dtype)."""
    kind = quantization_of(like)
    if kind == "nf4":
        return quantize_tensor(dense.to(like.dtype), "nf4", like.block_size, like.scaler_block_size)
    if kind == "int8":
        return quantize_tensor(dense.to(like.dtype), "int8")
    raise PeftError(f"expected a quantised weight to copy the settings of, got a plain {type(like).__name__}")


# ---- quantize_base ---------------------------------------------------------------------------------
@dataclass
class QuantizationReport:
    """What :func:`quantize_base` did: which linear modules it quantised, which it left dense and why."""

    method: str
    settings: dict[str, Any]
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it stays dense
    adjusted: dict[str, str] = field(default_factory=dict)  # module name -> a setting changed to fit its shape
    bytes_before: int = 0  # the whole model's parameters and buffers, as given (before any cast) and after
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def __str__(self) -> str:
        lines = [
            f"quantize_base({self.method}, {', '.join(f'{k}={v}' for k, v in self.settings.items())}): "
            f"{len(self.quantized)} linear modules quantised, {len(self.skipped)} kept dense; weights "
            f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB ({self.ratio:.3f}x)"
        ]
        lines += [f"  kept dense: {name}: {why}" for name, why in self.skipped.items()]
        lines += [f"  adjusted: {name}: {what}" for name, what in self.adjusted.items()]
        return "\n".join(lines)


def _largest_divisor_up_to(n: int, limit: int) -> int:
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


def _nf4_fit(weight: torch.Tensor, block_size: int, scaler_block_size: int) -> tuple[int | None, str]:
    """(scaler block size to use, note) for one weight, or (None, why it cannot be quantised)."""
    if weight.numel() % block_size:
        return None, f"weight {tuple(weight.shape)} has {weight.numel()} elements, not a multiple of block_size={block_size}"
    n_blocks = weight.numel() // block_size
    if n_blocks % scaler_block_size == 0:
        return scaler_block_size, ""
    fit = _largest_divisor_up_to(n_blocks, scaler_block_size)
    if fit < MIN_SCALER_BLOCK:
        return None, (f"its {n_blocks} blocks of {block_size} split into scaler blocks of {fit} at most "
                      f"(fewer than {MIN_SCALER_BLOCK}); pick a block_size that divides it better")
    return fit, f"scaler_block_size {scaler_block_size} -> {fit} ({n_blocks} blocks of {block_size})"


def quantize_base(
    model: nn.Module, method: str = "nf4", *, block_size: int = 64, scaler_block_size: int = 256,
    skip: list[str] | None = None, compute_dtype: torch.dtype | str | None = None,
) -> QuantizationReport:
    """Quantise the frozen base model in place before adding adapters: ``quantize_base(model, "nf4")``, then
    ``get_peft_model(model, LoraConfig(...))``.

    Every ``nn.Linear`` weight is quantised except the output head (the LM head or a classifier, and any
    weight tied to another module's), the modules named in ``skip`` (full names or trailing parts, e.g.
    ``["mlp.down_proj"]``) and weights whose shape does not fit ``block_size``; embeddings, norms and biases
    stay as they are. ``compute_dtype`` casts the model first (``torch.bfloat16`` or ``"bf16"``: the dense
    parts and the activations in bf16; names as in a YAML run config are accepted). Returns a :class:`QuantizationReport` (also logged at INFO level); the model's
    weights never change afterwards, and ``model.to(device)`` keeps them quantised."""
    from .methods.base import AdapterLayer, ModulesToSaveWrapper

    if method not in METHODS:
        raise PeftConfigError(f"quantisation method {method!r} is not supported; use one of {', '.join(METHODS)}")
    for name, value in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or (name == "block_size" and value % 2):
            raise PeftConfigError(f"{name} must be a positive{' even' if name == 'block_size' else ''} integer, "
                                  f"got {value!r}; QLoRA uses block_size=64, scaler_block_size=256")
    if any(isinstance(m, AdapterLayer | ModulesToSaveWrapper) for m in model.modules()):
        raise PeftError("quantize_base must run on the plain base model, before adapters are added: "
                        "quantize_base(model) first, then get_peft_model(model, config)")
    if isinstance(compute_dtype, str):
        if compute_dtype not in DTYPES:
            raise PeftConfigError(f"compute_dtype {compute_dtype!r} is not known; use one of {', '.join(DTYPES)}")
        compute_dtype = DTYPES[compute_dtype]
    _torchao()  # fails here, with the install hint, if torchao is missing
    settings = {"block_size": block_size, "scaler_block_size": scaler_block_size} if method == "nf4" else {}
    report = QuantizationReport(method, settings, bytes_before=model_weight_bytes(model))  # as given
    if compute_dtype is not None:
        model.to(compute_dtype)
    for name, sbs in quantization_plan(model, method, block_size, scaler_block_size, skip, report).items():
        module = model.get_submodule(name)
        with torch.no_grad():
            module.weight = nn.Parameter(quantize_tensor(module.weight, method, block_size, sbs), requires_grad=False)
        report.quantized.append(name)
    if not report.quantized:
        raise PeftError(f"quantize_base found no nn.Linear weight to quantise; kept dense: {report.skipped or 'none'}")
    report.bytes_after = model_weight_bytes(model)
    logging.getLogger(__name__).info("%s", report)
    return report


def quantization_plan(model: nn.Module, method: str, block_size: int, scaler_block_size: int,
                      skip: list[str] | None, report: QuantizationReport) -> dict[str, int]:
    """Which linear modules :func:`quantize_base` quantises: name -> scaler block size (NF4; the given one for
    int8); the rest go to ``report.skipped`` with the reason, and changed scaler blocks to ``report.adjusted``.
    It reads shapes and dtypes only, so ``peftkit plan`` runs it on a model built on the meta device."""
    heads = output_head_names(model, "SEQ_CLS")
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    chosen: dict[str, int] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        weight = module.weight
        tied = [o for o in owners.get(id(weight), []) if o != f"{name}.weight"]
        why = ""
        if name in heads:
            why = "output head (stays dense, as in QLoRA)"
        elif is_conv1d(module):
            why = "transformers Conv1D (weight stored transposed): only nn.Linear weights are quantised"
        elif skip and _in_list_or_suffix(name, skip):
            why = "named in skip"
        elif tied:
            why = f"weight tied to {', '.join(tied)}"
        elif quantization_of(weight) is not None:
            why = f"already quantised ({quantization_of(weight)})"
        elif not weight.dtype.is_floating_point:
            why = f"weight dtype {weight.dtype} is not floating point"
        if why:
            report.skipped[name] = why
            continue
        sbs: int | None = scaler_block_size
        if method == "nf4":
            sbs, note = _nf4_fit(weight, block_size, scaler_block_size)
            if sbs is None:
                report.skipped[name] = note
                continue
            if note:
                report.adjusted[name] = note
        chosen[name] = sbs
    return chosen


def is_quantized_model(model: nn.Module) -> bool:
    return any(quantization_of(p) is not None for p in model.parameters())


# ---- merging into a quantised base -------------------------------------------------------------------
@dataclass
class _QuantizedOriginal:
    """Kept on a base module while adapters are merged into a dense copy of its quantised weight."""

    weight: nn.Parameter
    merged_layers: list[nn.Module]  # the adapter layers with adapters merged into the dense copy


def dequantize_for_merge(layer: nn.Module) -> None:
    """Before ``layer`` merges into its base module: if the base weight is quantised, swap in a dense copy
    (merging writes W) and keep the quantised original, which :func:`restore_after_unmerge` puts back."""
    base = layer.get_base_layer()
    stash = getattr(base, MERGE_STASH, None)
    if stash is None:
        kind = quantization_of(base.weight)
        if kind is None:
            return
        warnings.warn(
            f"merging adapters into a quantised ({kind}) base: the merged modules' weights are dequantised to "
            "dense ones (more memory); unmerging restores the quantised originals, and "
            "merge_and_unload(requantize=True) quantises the merged weights again", stacklevel=4,
        )
        stash = _QuantizedOriginal(base.weight, [])
        base.weight = nn.Parameter(dense_weight(base.weight), requires_grad=False)
        setattr(base, MERGE_STASH, stash)
    if all(m is not layer for m in stash.merged_layers):
        stash.merged_layers.append(layer)


def restore_after_unmerge(layer: nn.Module) -> None:
    """After ``layer`` unmerged: once no adapter layer has anything merged into the base module, put its
    quantised original weight back (exactly, not a re-quantised copy)."""
    base = layer.get_base_layer()
    stash = getattr(base, MERGE_STASH, None)
    if stash is None:
        return
    stash.merged_layers = [m for m in stash.merged_layers if m.merged]
    if not stash.merged_layers:
        base.weight = stash.weight
        delattr(base, MERGE_STASH)


def release_quantized_originals(model: nn.Module, requantize: bool) -> list[str]:
    """After ``merge_and_unload``: forget the quantised originals the merge replaced; with ``requantize``,
    quantise each merged weight again with its original's settings. Returns the modules concerned."""
    names = []
    for name, module in model.named_modules():
        stash = getattr(module, MERGE_STASH, None)
        if stash is None:
            continue
        if requantize:
            with torch.no_grad():
                module.weight = nn.Parameter(quantize_like(module.weight, stash.weight), requires_grad=False)
        delattr(module, MERGE_STASH)
        names.append(name)
    return names


# ---- HF PEFT's helper ------------------------------------------------------------------------------
def prepare_model_for_kbit_training(
    model: nn.Module, use_gradient_checkpointing: bool = True, gradient_checkpointing_kwargs: dict | None = None,
) -> nn.Module:
    """HF PEFT's helper, with its meaning, for a model quantised by :func:`quantize_base`: freeze every
    parameter; cast fp16/bf16 parameters that are not quantised to fp32 (norms, embeddings, head: stable
    training, as HF PEFT does for bitsandbytes models); and, if ``use_gradient_checkpointing``, turn on the
    model's gradient checkpointing (transformers' ``gradient_checkpointing_enable``) and, with reentrant
    checkpointing (its default unless ``{"use_reentrant": False}``), make the input embeddings' output
    require grad so that gradient reaches the checkpointed blocks. Returns ``model``."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and quantization_of(p) is None:
            p.data = p.data.to(torch.float32)  # in place: tied weights stay tied
    if use_gradient_checkpointing and is_quantized_model(model):
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise PeftError(f"{type(model).__name__} has no gradient_checkpointing_enable (a transformers model "
                            "method); pass use_gradient_checkpointing=False and checkpoint the blocks yourself")
        kwargs.setdefault("use_reentrant", True)  # HF PEFT's reading of "not given" (torch warns if left unset)
        if kwargs["use_reentrant"]:
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
        enable(gradient_checkpointing_kwargs=kwargs)
    return model
