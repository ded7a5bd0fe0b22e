"""Export: any LoRA-family adapter as a plain LoRA file (HF PEFT layout) that every LoRA engine can load.

Serving engines (vLLM, TGI, LoRAX, llama.cpp) understand plain LoRA, ΔW = s·B A, and nothing else. This
module converts between files; it adds no method:

* **LoRA, rsLoRA, LoRA-FA, Delta-LoRA** are plain LoRA files already (LoRA-FA's frozen A and Delta-LoRA's
  rank-2r net change are saved that way): exported as they are, and the report says so.
* **VeRA** is exactly low rank: ΔW = Λ_b B Λ_d A (Kopiczko et al., eq. 1), so B′ = Λ_b B Λ_d and A′ = A
  (this layer's slices of the shared projections) with scaling 1 give the same outputs.
* **DoRA** (W′ = m·(W + sBA)/‖W + sBA‖, Liu et al., eq. 5) and **(IA)³** (W′ = l ⊙ W, Liu et al. 2022) change
  W by a matrix that is full rank in general. Only when a rank k is asked for, each layer's exact ΔW = W′ − W
  is replaced by its truncated SVD U_k Σ_k V_kᵀ, the best rank-k approximation in Frobenius norm
  (Eckart–Young): B′ = U_k Σ_k^½, A′ = Σ_k^½ V_kᵀ. The report gives the relative error of ΔW and of the
  model's outputs on a few inputs. (IA)³ also scales the bias of the layers it scales at the output; a LoRA
  file has no place for that, and the output error includes it.
* **Bottleneck adapters, prompt methods, BitFit** are not weight deltas of the adapted layers (new modules,
  virtual tokens, biases): refused, pointing to ``peftkit merge``.

The exported file writes ``lora_alpha = r`` (scaling 1) with ΔW folded into B′, lists the adapted modules by
full name in ``target_modules``, and keeps the adapter's ``modules_to_save`` heads.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .config import CONFIG_NAME, PeftConfig
from .errors import AdapterFileError, PeftError
from .io import PEFT_PREFIX, file_tensors, write_adapter_folder
from .methods.base import AdapterLayer, adapter_layers, logical_path, method_for, modules_to_save_wrappers
from .methods.lora import LoraConfig, LoraLayer, LoraLinear
from .quantize import base_weight
from .targeting import is_conv1d

# peft_types whose files are plain LoRA already (LoRA-FA and Delta-LoRA write peft_type LORA)
PLAIN_LORA_TYPES = ("LORA", "LORA_FA", "DELTA_LORA")
# methods that are not a weight delta of the adapted layers, and why
NOT_WEIGHT_DELTAS = {
    "BOTTLENECK": "bottleneck adapters add new modules (down-projection, nonlinearity, up-projection), not a change of W",
    "PROMPT_TUNING": "prompt tuning adds virtual tokens to the input, not a change of any weight",
    "P_TUNING": "P-tuning adds virtual tokens to the input, not a change of any weight",
    "PREFIX_TUNING": "prefix tuning adds key/value prefixes to attention, not a change of any weight",
    "BEFT": "BitFit trains biases, which a LoRA file cannot hold",
    "BITFIT": "BitFit trains biases, which a LoRA file cannot hold",
}


@dataclass
class ExportReport:
    """What ``to_lora`` wrote. Errors are relative Frobenius norms (0.0 where the export is exact)."""

    kind: str                       # "plain" (already LoRA), "exact" (VeRA), "svd" (DoRA, IA3 at rank k)
    method: str                     # the source adapter's peft_type (DoRA: "LORA+DORA")
    rank: int
    layers: int
    delta_rel_error: float = 0.0    # ‖ΔW − B′A′‖ / ‖ΔW‖ over all layers together
    max_layer_delta_rel_error: float = 0.0
    output_rel_error: float | None = None   # ‖y_export − y_adapter‖ / ‖y_adapter − y_base‖ on probe inputs
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = {"plain": "already a plain LoRA file: copied unchanged",
                "exact": f"exact rank-{self.rank} LoRA (ΔW is low rank)",
                "svd": f"rank-{self.rank} truncated SVD of each layer's exact ΔW"}[self.kind]
        lines = [f"{self.method} → LoRA, {self.layers} layers: {what}"]
        if self.kind == "svd":
            lines.append(f"ΔW relative error {self.delta_rel_error:.3e} overall, {self.max_layer_delta_rel_error:.3e} "
                         "worst layer (the Eckart–Young optimum at this rank)")
        if self.output_rel_error is not None:
            lines.append(f"outputs on probe inputs: relative error {self.output_rel_error:.3e} "
                         "(of the adapter's change to the outputs)")
        return "\n".join([*lines, *self.notes])


# ---- the maths, as pure functions ------------------------------------------------------------------
def svd_lora_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A′ (k, d_in), B′ (d_out, k), ‖ΔW − B′A′‖_F) for ΔW (d_out, d_in): the best rank-k approximation
    (Eckart–Young), B′ = U_k Σ_k^½ and A′ = Σ_k^½ V_kᵀ. Ranks beyond min(d_out, d_in) are padded with zeros
    (the factorisation is then exact).

    Why not a full SVD: only U_k is needed, the top-k eigenvectors of the Gram matrix M Mᵀ of the narrower
    side (m × m, m = min(d_out, d_in); M = ΔW or ΔWᵀ). One float64 symmetric eigensolve of it costs a fraction
    of a float64 SVD of M (measured in benchmarks/export.py). Then U_kᵀM = Σ_k V_kᵀ, so B′A′ = U_k U_kᵀ M is
    the projection onto that subspace, whatever the singular values' rounding; each pair gets the norm σ_i of
    its row of U_kᵀM, split as √σ_i into both factors. The Gram matrix squares the condition number, which
    blurs only directions with σ_i ≲ 1e-8·σ_1: they carry ≤ 1e-8 of ‖ΔW‖, far below the float32 factors
    written. The returned error is the residual of these factors, computed in float64."""
    M = delta.detach().double()
    transposed = M.shape[0] > M.shape[1]
    if transposed:
        M = M.T
    k = min(rank, M.shape[0])
    _, vectors = torch.linalg.eigh(M @ M.T)  # eigenvalues ascending
    U = vectors[:, -k:].flip(1)
    P = U.T @ M                               # (k, n): rows σ_i v_iᵀ
    root = P.norm(dim=1).sqrt()
    B = U * root
    A = P / root.clamp_min(torch.finfo(torch.float64).tiny)[:, None]  # a zero row (σ_i = 0) stays zero
    error = float((M - B @ A).norm())
    if transposed:
        A, B = B.T, A.T
    if k < rank:
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A.float(), B.float(), error


def vera_lora_factors(A: torch.Tensor, B: torch.Tensor, d: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's ΔW = Λ_b B Λ_d A as a plain LoRA: A′ = A, B′ = Λ_b B Λ_d (scaling 1)."""
    return A.float(), b.float()[:, None] * B.float() * d.float()[None, :]


def _out_major(delta: torch.Tensor, layer: AdapterLayer) -> torch.Tensor:
    """A delta in the base weight's layout as (d_out, d_in) (GPT-2's Conv1D stores (d_in, d_out))."""
    return delta.T if is_conv1d(layer.get_base_layer()) else delta


@torch.no_grad()
def exact_delta(layer: AdapterLayer, adapter_name: str) -> torch.Tensor:
    """ΔW = W′ − W (d_out, d_in) that this adapter alone makes to the layer's weight, from the paper's formula."""
    from .methods.dora import dora_merged_weight, dora_weight_norm
    from .methods.ia3 import IA3Layer

    if isinstance(layer, IA3Layer):
        return _out_major(layer.delta_weight(adapter_name), layer)
    if isinstance(layer, LoraLinear) and adapter_name in getattr(layer, "lora_magnitude_vector", {}):
        weight = base_weight(layer)  # dense fp32, also for a quantised base
        delta = layer.delta_weight(adapter_name)
        norm = dora_weight_norm(weight, delta, layer.fan_in_fan_out)
        magnitude = layer.lora_magnitude_vector[adapter_name].detach().float()
        merged = dora_merged_weight(weight, delta, magnitude, norm, layer.fan_in_fan_out)
        return _out_major(merged - weight, layer)
    if isinstance(layer, LoraLayer):  # LoRA, LoRA-FA, Delta-LoRA (whose W moved by (1+λ)P_t − λP_K): the variant's merge
        weight = base_weight(layer)
        return _out_major(layer.variant[adapter_name].merged_weight(layer, adapter_name, weight) - weight, layer)
    return _out_major(layer.delta_weight(adapter_name), layer)


# ---- export ----------------------------------------------------------------------------------------
def _source_kind(config: PeftConfig) -> str:
    peft_type = config.PEFT_TYPE
    if peft_type in NOT_WEIGHT_DELTAS:
        raise PeftError(f"cannot export a {peft_type} adapter as LoRA: {NOT_WEIGHT_DELTAS[peft_type]}; "
                        "use `peftkit merge` to fold it into the base model instead")
    if isinstance(config, LoraConfig) and getattr(config, "use_dora", False):
        return "dora"
    if peft_type in PLAIN_LORA_TYPES:
        return "plain"
    if peft_type == "VERA":
        return "vera"
    if peft_type == "IA3":
        return "ia3"
    raise PeftError(f"cannot export a {peft_type} adapter as LoRA: peftkit knows no LoRA form of it; "
                    "use `peftkit merge` instead")


def to_lora(model_or_folder: nn.Module | str | os.PathLike, out: str | os.PathLike, rank: int | None = None, *,
            adapter_name: str = "default", base_model: nn.Module | None = None,
            probe_inputs: dict[str, torch.Tensor] | None = None) -> ExportReport:
    """Write adapter ``adapter_name`` of a PeftModel (or an adapter folder) to ``out`` as a plain LoRA folder.

    ``rank`` is needed for DoRA and (IA)³ (truncated SVD; refused without it) and ignored otherwise. A folder
    that is plain LoRA already needs no base model; VeRA, DoRA and (IA)³ folders need ``base_model`` (the
    model the adapter was trained on). ``probe_inputs`` (keyword arguments of the model's forward) measure
    the output error; by default a few random token sequences when the model has a vocabulary."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise PeftError(f"rank must be a positive integer, got {rank!r}; e.g. --rank 16")
    from .model import PeftModel

    if not isinstance(model_or_folder, nn.Module):
        folder = os.fspath(model_or_folder)
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise AdapterFileError(f"{folder!r} has no {CONFIG_NAME}; give an adapter folder or a PeftModel")
        config = PeftConfig.from_pretrained(folder)
        kind = _source_kind(config)
        if kind == "plain":
            return _copy_plain(folder, out, config)
        if kind in ("dora", "ia3") and rank is None:
            _refuse_without_rank(config, kind)
        if base_model is None:
            raise PeftError(f"exporting a {config.PEFT_TYPE} adapter needs its base model (its ΔW depends on the "
                            "base weights or shapes): pass base_model=, or --base on the command line")
        model = PeftModel.from_pretrained(base_model, folder, adapter_name=adapter_name)
        try:
            return to_lora(model, out, rank, adapter_name=adapter_name, probe_inputs=probe_inputs)
        finally:
            model.unload()
    model = model_or_folder
    if not isinstance(model, PeftModel):
        raise PeftError(f"to_lora needs a PeftModel or an adapter folder, got {type(model).__name__}")
    model._check_name(adapter_name)
    config = model.peft_config[adapter_name]
    kind = _source_kind(config)
    if kind in ("dora", "ia3") and rank is None:
        _refuse_without_rank(config, kind)
    root = model.base_model.model
    layers = [(path, layer) for path, layer in adapter_layers(root) if adapter_name in layer.adapter_names]
    if any(layer.merged for _, layer in layers):
        raise PeftError(f"adapter {adapter_name!r} is merged into the base weights; call unmerge_adapter() first")
    if kind == "plain":
        spec = method_for(config)
        file_config = config.copy(inference_mode=True)
        tensors = file_tensors(root, adapter_name, file_config, PEFT_PREFIX, save_embedding_layers=False)
        if spec.to_file is not None:
            file_config, tensors = spec.to_file(root, adapter_name, file_config, tensors, PEFT_PREFIX)
        _check_finite(tensors, "adapter")
        write_adapter_folder(out, file_config, tensors)
        return ExportReport("plain", config.PEFT_TYPE, int(getattr(file_config, "r", 0)), len(layers))
    return _export_factors(model, adapter_name, config, kind, layers, out, rank, probe_inputs)


def _check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write NaN/inf: an exported file must never be silently broken."""
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:
        raise PeftError(f"{what}: {bad!r} holds NaN/inf values; the adapter is broken (check its training), "
                        "nothing was written")


def _refuse_without_rank(config: PeftConfig, kind: str) -> None:
    what = "DoRA's W′ = m·(W + sBA)/‖W + sBA‖" if kind == "dora" else "(IA)³'s W′ = l ⊙ W"
    raise PeftError(f"{what} is not a low-rank change of W, so no LoRA file reproduces it exactly; ask for a "
                    "rank-k approximation (truncated SVD of each ΔW, its error printed) with rank=k / --rank k")


def _copy_plain(folder: str, out: str | os.PathLike, config: PeftConfig) -> ExportReport:
    from .io import read_adapter_weights

    tensors = read_adapter_weights(folder)
    _check_finite(tensors, folder)
    write_adapter_folder(out, config.copy(inference_mode=True), tensors)
    ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith("lora_A.weight")}
    layers = sum(k.endswith("lora_A.weight") for k in tensors)
    return ExportReport("plain", config.PEFT_TYPE, max(ranks, default=0), layers,
                        notes=["(LoRA-FA and Delta-LoRA write plain LoRA files too)"])


def _export_factors(model, adapter_name: str, config: PeftConfig, kind: str, layers: list[tuple[str, AdapterLayer]],
                    out: str | os.PathLike, rank: int | None, probe_inputs: dict[str, torch.Tensor] | None) -> ExportReport:
    from .methods.vera import VeraLinear

    root = model.base_model.model
    for path, layer in layers:
        base = layer.get_base_layer()
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            raise PeftError(f"{path} is a {type(base).__name__}; LoRA export handles Linear and GPT-2 Conv1D targets only")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    total_sq, error_sq, worst = 0.0, 0.0, 0.0
    for path, layer in layers:
        if kind == "vera":
            assert isinstance(layer, VeraLinear)
            A, B = layer.sliced_projections(adapter_name)
            factors[path] = vera_lora_factors(A, B, layer.vera_lambda_d[adapter_name].detach(),
                                              layer.vera_lambda_b[adapter_name].detach())
            continue
        delta = exact_delta(layer, adapter_name)
        A, B, err = svd_lora_factors(delta, rank)
        norm = float(delta.double().norm())
        total_sq, error_sq = total_sq + norm**2, error_sq + err**2
        worst = max(worst, err / norm if norm > 0 else 0.0)
        factors[path] = (A, B)
    r = rank if kind != "vera" else int(config.r)
    fan_in_fan_out = any(is_conv1d(layer.get_base_layer()) for _, layer in layers)
    lora_config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(logical_path(p) for p, _ in layers), lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out, bias="none", task_type=config.task_type, inference_mode=True,
        modules_to_save=[p for p, w in modules_to_save_wrappers(root) if adapter_name in w.modules_to_save] or None,
        base_model_name_or_path=config.base_model_name_or_path,
    )
    tensors: dict[str, torch.Tensor] = {}
    for path, (A, B) in factors.items():
        key = f"{PEFT_PREFIX}{logical_path(path)}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A.contiguous(), B.contiguous()
    for path, wrapper in modules_to_save_wrappers(root):
        if adapter_name in wrapper.modules_to_save:
            for name, p in wrapper.modules_to_save[adapter_name].named_parameters():
                tensors[f"{PEFT_PREFIX}{path}.{name}"] = p.detach()
    notes = []
    if kind == "ia3" and any(getattr(layer.get_base_layer(), "bias", None) is not None and not layer.is_feedforward
                             for _, layer in layers):
        notes.append("note: (IA)³ also scales these layers' biases, which a LoRA file cannot hold (in the output error)")
    report = ExportReport(
        "exact" if kind == "vera" else "svd", "LORA+DORA" if kind == "dora" else config.PEFT_TYPE, r, len(layers),
        math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0, worst, notes=notes,
    )
    # write to a temporary folder first, measure the output error by loading it back, then move it into place
    from .io import atomic_folder

    with atomic_folder(out, replace=False) as tmp:
        _check_finite(tensors, "exported adapter")
        write_adapter_folder(tmp, lora_config, tensors)
        report.output_rel_error = _output_error(model, adapter_name, tmp, probe_inputs)
    return report


@torch.no_grad()
def _output_error(model, adapter_name: str, folder: str, probe_inputs: dict[str, torch.Tensor] | None) -> float | None:
    """‖y_export − y_adapter‖ / ‖y_adapter − y_base‖ on probe inputs, the exported file loaded beside the adapter."""
    if probe_inputs is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            return None
        generator = torch.Generator().manual_seed(0)
        probe_inputs = {"input_ids": torch.randint(0, int(vocab), (4, 32), generator=generator)}
    device = next(model.parameters()).device
    probe_inputs = {k: v.to(device) for k, v in probe_inputs.items()}
    check = "_export_check"
    while check in model.peft_config:
        check += "_"
    active, training = model.active_adapters, model.training
    model.eval()
    try:
        model.set_adapter(adapter_name)
        y_adapter = _logits(model(**probe_inputs))
        with model.disable_adapter():
            y_base = _logits(model(**probe_inputs))
        model.load_adapter(folder, check)
        model.set_adapter(check)
        y_export = _logits(model(**probe_inputs))
    finally:
        if check in model.peft_config:
            model.delete_adapter(check)
        model.set_adapter(active)
        model.train(training)
    effect = float((y_adapter - y_base).double().norm())
    error = float((y_export - y_adapter).double().norm())
    return error / effect if effect > 0 else error


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output.float()
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if value is not None:
            return value.float()
    return output[0].float()


# ---- llama.cpp: LoRA adapter GGUF ------------------------------------------------------------------
# transformers module names (Llama and Qwen2) → llama.cpp tensor names (llama.cpp's tensor_mapping / LLM_TN)
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# model_type → llama.cpp architecture (convert_hf_to_gguf.py: MistralForCausalLM is converted by LlamaModel,
# Qwen2ForCausalLM by Qwen2Model as the "qwen2" architecture). Each is checked in the real llama.cpp
# (tests/test_export.py: tiny random models of each type, and SmolLM2).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# The "llama" architecture stores q and k with their rows permuted (LlamaModel.permute, for llama.cpp's
# pairwise rope); "qwen2" keeps transformers' order (its rope is the NeoX, rotate-half kind), so LoRA's B
# is permuted for "llama" only.
GGUF_PERMUTED = frozenset({"llama"})


def gguf_architecture(model_type: str | None) -> str:
    """llama.cpp's architecture name for a transformers ``model_type``, or a one-line refusal naming the supported ones."""
    arch = GGUF_ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise PeftError(f"GGUF export supports model types {', '.join(sorted(GGUF_ARCHITECTURES))} (checked in "
                        f"llama.cpp), not {model_type!r}; export --to lora and convert with llama.cpp's "
                        "convert_lora_to_gguf.py")
    return arch


def llama_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to q/k weights of the "llama" architecture: within
    each head, rows (first half, second half) are interleaved (HF's rotate-half → llama.cpp's pairwise rope)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensor_name(module_path: str, tie_word_embeddings: bool) -> str:
    """llama.cpp's name of the weight of ``module_path`` (e.g. ``model.layers.3.mlp.up_proj`` → ``blk.3.ffn_up.weight``)."""
    if module_path == "lm_head" and not tie_word_embeddings:
        return "output.weight"
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)\.(.+)", module_path)
    if match is None or match.group(2) not in GGUF_LAYER_NAMES:
        raise PeftError(f"{module_path!r} has no llama.cpp LoRA tensor (adaptable there: "
                        f"{', '.join(GGUF_LAYER_NAMES)}, and an untied lm_head); export without it")
    return f"blk.{match.group(1)}.{GGUF_LAYER_NAMES[match.group(2)]}.weight"


def to_gguf(model_or_folder: nn.Module | str | os.PathLike, out: str | os.PathLike, rank: int | None = None, *,
            adapter_name: str = "default", base_model: nn.Module | None = None) -> ExportReport:
    """Write a llama.cpp LoRA adapter GGUF (``llama-cli --lora``, llama-cpp-python's ``lora_path``) from any
    adapter ``to_lora`` can export, for llama.cpp's "llama" (SmolLM2, Llama, Mistral) and "qwen2" architectures.

    The file holds, per adapted weight, ``<llama.cpp tensor>.lora_a`` (r, d_in) and ``.lora_b`` (d_out, r) in
    F32, with ``general.type = adapter``, ``adapter.type = lora``, ``general.architecture`` the base model's,
    and ``adapter.lora.alpha`` = the largest rank, each layer's LoRA scaling s folded into its B as s·r/alpha
    (llama.cpp scales each pair by alpha/r, r its own rank), so rank_pattern, alpha_pattern and rsLoRA carry over.
    ``base_model`` (or the PeftModel's own base) gives the architecture and head counts."""
    import tempfile

    from .io import read_adapter_weights
    from .methods.lora import lora_scaling, pattern_value

    source = model_or_folder.base_model.model if hasattr(model_or_folder, "peft_config") else base_model
    hf_config = getattr(source, "config", None)
    if hf_config is None:
        raise PeftError("GGUF export needs the base model (its architecture and head counts): pass base_model=, "
                        "or --base on the command line")
    arch = gguf_architecture(getattr(hf_config, "model_type", None))
    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-export-") as tmp:
        report = to_lora(model_or_folder, os.path.join(tmp, "lora"), rank, adapter_name=adapter_name,
                         base_model=base_model)
        config = PeftConfig.from_pretrained(os.path.join(tmp, "lora"))
        tensors = read_adapter_weights(os.path.join(tmp, "lora"))
        heads = sorted({k for k in tensors if ".lora_A." not in k and ".lora_B." not in k})
        if heads:
            raise PeftError(f"the adapter trains whole modules too ({heads[0]}, ...); a llama.cpp LoRA file holds "
                            "low-rank pairs only: merge the adapter (peftkit merge) instead")
        if getattr(config, "bias", "none") != "none" or getattr(config, "use_dora", False):
            raise PeftError("a llama.cpp LoRA file holds plain LoRA pairs only (no biases, no DoRA magnitudes); "
                            "export with --rank k for DoRA, or merge the adapter")
        tie = bool(getattr(hf_config, "tie_word_embeddings", False))
        n_head = int(hf_config.num_attention_heads)
        n_kv = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ranks = {int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_A.weight")}
        alpha = float(max(ranks, default=1))
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            path = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            A, B = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
            if A.dim() != 2:
                raise PeftError(f"{path}: only Linear LoRA pairs go into a llama.cpp adapter")
            scaling = lora_scaling(pattern_value(config.alpha_pattern, path, config.lora_alpha),
                                   pattern_value(config.rank_pattern, path, config.r), config.use_rslora)
            # llama.cpp multiplies B A x by alpha / r (r = this pair's rank): fold s · r / alpha into B
            B = B * (scaling * A.shape[0] / alpha)
            if arch in GGUF_PERMUTED and path.endswith("self_attn.q_proj"):
                B = llama_permute(B, n_head)
            elif arch in GGUF_PERMUTED and path.endswith("self_attn.k_proj"):
                B = llama_permute(B, n_kv)
            pairs[gguf_tensor_name(path, tie)] = (A, B)
        if not pairs:
            raise PeftError("the adapter has no LoRA pairs to export")
        import gguf

        tmp_file = os.path.join(tmp, "adapter.gguf")
        writer = gguf.GGUFWriter(tmp_file, arch)
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for name, (A, B) in pairs.items():
            writer.add_tensor(f"{name}.lora_a", A.contiguous().numpy())
            writer.add_tensor(f"{name}.lora_b", B.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_file, out)
    report.notes.append(f"llama.cpp LoRA GGUF ({arch}): {len(pairs)} LoRA pairs, F32")
    return report


# ---- llama.cpp: the whole merged model as GGUF ------------------------------------------------------
GGUF_MODEL_NAMES = {  # llama.cpp tensor name → transformers parameter (Llama and Qwen2)
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    **{v: k for k, v in GGUF_LAYER_NAMES.items()},
}
GGUF_OUT_TYPES = ("f16", "q8_0")


def _hf_name(gguf_name: str) -> str:
    if gguf_name in GGUF_MODEL_NAMES:
        return GGUF_MODEL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match is None or match.group(2) not in GGUF_BLOCK_NAMES:
        raise PeftError(f"the base GGUF holds tensor {gguf_name!r}, which peftkit cannot map to the model; "
                        "merge with `peftkit merge` and convert with llama.cpp's convert_hf_to_gguf.py")
    return f"model.layers.{match.group(1)}.{GGUF_BLOCK_NAMES[match.group(2)]}.{match.group(3)}"


@torch.no_grad()
def merged_weights(model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The base model's parameters (transformers names) with adapter ``adapter_name`` merged, computed without
    changing the model: W + ΔW per adapted layer (ΔW from each method's formula, see ``exact_delta``) and the
    trained copies of ``modules_to_save`` modules."""
    from .model import PeftModel

    if not isinstance(model, PeftModel):
        raise PeftError(f"merged export needs a PeftModel, got {type(model).__name__}")
    model._check_name(adapter_name)
    _source_kind(model.peft_config[adapter_name])  # refuses methods that are not weight deltas
    root = model.base_model.model
    out: dict[str, torch.Tensor] = {}
    layers = dict(adapter_layers(root))
    if any(layer.merged for layer in layers.values()):
        raise PeftError("an adapter is merged into the base weights; call unmerge_adapter() first")
    # base weights under the user's names: inside an adapter layer only its base_layer's, inside a
    # modules_to_save wrapper only the original module's (the trained copy is put in below)
    own = [f"{path}." for path in layers] + [f"{path}." for path, _ in modules_to_save_wrappers(root)]
    for name, p in root.named_parameters():
        inside = [prefix for prefix in own if name.startswith(prefix)]
        if all(name[len(prefix):].startswith(("base_layer.", "original_module.")) for prefix in inside):
            out[logical_path(name).replace(".original_module.", ".")] = p.detach().float()
    for path, layer in layers.items():
        if adapter_name in layer.adapter_names:
            delta = exact_delta(layer, adapter_name)
            key = f"{logical_path(path)}.weight"
            out[key] = out[key] + (delta.T if is_conv1d(layer.get_base_layer()) else delta)
    for path, wrapper in modules_to_save_wrappers(root):
        if adapter_name in wrapper.modules_to_save:
            for name, p in wrapper.modules_to_save[adapter_name].named_parameters():
                out[f"{path}.{name}"] = p.detach().float()
    return out


def merged_to_gguf(model, out: str | os.PathLike, base_gguf: str | os.PathLike, out_type: str = "f16", *,
                   adapter_name: str = "default") -> int:
    """Write the base model with the adapter merged as a whole llama.cpp GGUF model (``f16`` or ``q8_0``),
    taking every metadata key (architecture, hyper-parameters, tokenizer, chat template) from ``base_gguf``,
    the GGUF the base model was loaded from, and the tensor list and order from it too. Norms stay F32.
    Returns the number of tensors written. The model is not changed."""
    import gguf
    import numpy as np

    if out_type not in GGUF_OUT_TYPES:
        raise PeftError(f"out_type {out_type!r} is not one of {', '.join(GGUF_OUT_TYPES)}")
    reader = gguf.GGUFReader(os.fspath(base_gguf))
    arch = reader.fields["general.architecture"].contents()
    if arch not in set(GGUF_ARCHITECTURES.values()):
        raise PeftError(f"merged GGUF export supports llama.cpp's {', '.join(sorted(set(GGUF_ARCHITECTURES.values())))} "
                        f"architectures, not {arch!r}; merge with `peftkit merge` and convert with convert_hf_to_gguf.py")
    hf_config = model.base_model.model.config
    model_arch = gguf_architecture(getattr(hf_config, "model_type", None))
    if model_arch != arch:
        raise PeftError(f"the base GGUF is llama.cpp architecture {arch!r} but the model is {hf_config.model_type!r} "
                        f"({model_arch!r}); give the GGUF this model was loaded from")
    weights = merged_weights(model, adapter_name)
    _check_finite(weights, "merged model")
    n_head = int(hf_config.num_attention_heads)
    n_kv = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
    qtype = gguf.GGMLQuantizationType.F16 if out_type == "f16" else gguf.GGMLQuantizationType.Q8_0
    out = os.fspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        for field_name, f in reader.fields.items():
            if field_name.startswith("GGUF.") or field_name in ("general.architecture", "general.file_type",
                                                                "general.quantization_version"):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field_name, f.contents(), vtype, sub)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if out_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tensor in reader.tensors:
            hf = _hf_name(tensor.name)
            if hf == "lm_head.weight" and hf not in weights:
                hf = "model.embed_tokens.weight"
            if hf not in weights:
                raise PeftError(f"the model has no {hf!r} for the base GGUF's {tensor.name!r}; is this its base?")
            w = weights[hf]
            if arch in GGUF_PERMUTED and tensor.name.endswith(("attn_q.weight", "attn_q.bias")):
                w = llama_permute(w, n_head)
            elif arch in GGUF_PERMUTED and tensor.name.endswith(("attn_k.weight", "attn_k.bias")):
                w = llama_permute(w, n_kv)
            expected = tuple(int(d) for d in reversed(list(tensor.shape)))
            if tuple(w.shape) != expected[-w.dim():] or w.numel() != int(np.prod(expected)):
                raise PeftError(f"{hf} has shape {tuple(w.shape)} but the base GGUF's {tensor.name} is {expected}; "
                                "give the GGUF this model was loaded from")
            data = w.numpy().astype(np.float32)
            if w.dim() == 1:
                writer.add_tensor(tensor.name, data)
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(tensor.name, data.astype(np.float16))
            else:
                writer.add_tensor(tensor.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(reader.tensors)
