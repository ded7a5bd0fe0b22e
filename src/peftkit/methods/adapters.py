"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", and
Pfeiffer et al. 2020, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning".

An adapter wraps a sub-layer's output projection (a Linear or GPT-2 Conv1D with d outputs): with h its
output, x the sub-layer's residual input and LN the layer norm the model applies after the residual sum
(post-LN models: BERT; none in pre-LN decoders), the sub-layer's output becomes, as in AdapterHub:

    houlsby  (original_ln_before=False, AdapterHub's DoubleSeqBnConfig):  LN(x + h + A(h))
    pfeiffer (original_ln_before=True,  AdapterHub's SeqBnConfig):        LN(x + h + A(LN(h + x)))
    A(v) = s · (W_up f(W_down dropout(v) + b_down) + b_up)

(in a pre-LN decoder LN is the identity: x + h + A(x + h) for pfeiffer). Pfeiffer et al. read the adapter's
input after the sub-layer's own residual and layer norm, and add it back to h before that norm runs again
(the same norm module, twice); Houlsby et al. read h itself. W_down is (m, d), b_down (m,), W_up (d, m),
b_up (d,): 2·d·m + d + m trainable parameters per target, m = bottleneck_size or max(1, d // reduction_factor).
f ∈ {relu, gelu, swish, tanh}: relu for pfeiffer, swish for houlsby by default (AdapterHub's). Placement:
"houlsby" wraps the attention output and the feed-forward output projections (and trains the layer norms,
as the paper does); "pfeiffer" — the default, AdapterHub's too — only the feed-forward output: half the
parameters, on par in Pfeiffer et al.'s experiments. ``target_modules`` overrides it.

``init_weights`` (AdapterHub's names): "bert" (the default, AdapterHub's: both weights N(0, 0.02), biases
zero), "houlsby" (both weights truncated N(0, 0.01²) in ±0.02, near identity), "mam_adapter" (W_down
nn.Linear's Kaiming-uniform, the rest zero: a fresh adapter is exactly the base). Files written before these
fields existed load as they were made: original_ln_before=False, init "mam_adapter" (FILE_DEFAULTS).

``original_ln_before`` needs x (and LN) at the wrapped projection: a forward pre-hook on the module that
receives x (BERT: the sub-layer's output block, whose second argument is x and which owns LN; decoders:
the pre-norm, whose input is x) hands it over; the table RESIDUAL_SOURCES says where it is per model
family. Unlike AdapterHub, the adapter sits before the model's dropout on h (equal in eval mode).

Default targets come from a small table of module-name patterns by ``model.config.model_type``; the
filled config lists the full module names, so ``adapter_config.json`` records exactly what was wrapped.
Trained layer norms are a per-adapter copy (modules_to_save), saved with the adapter and switched with it.
Several active adapters run in sequence, in ``set_adapter`` order (AdapterHub's Stack, e.g. a language
adapter then a task adapter: each reads the previous one's output); with ``adapter_names`` each row uses one
adapter (gathered batched matmuls). Non-linear, so never merged. Adapter weights are fp32 on a bf16/fp16
base (``autocast_adapter_dtype``). AdapterHub's own files are read and written by ``peftkit.adapterhub``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs.adapters import INIT_WEIGHTS, PLACEMENT_DEFAULTS, PLACEMENTS, BottleneckConfig  # noqa: F401  (re-exported)
from ..errors import PeftError, TargetModulesError
from ..targeting import candidate_modules, describe_candidates, is_conv1d, is_linear_like, layer_index
from ..targeting import model_type as family
from .base import (
    AdapterLayer,
    MethodSpec,
    ModulesToSaveWrapper,
    adapter_layers,
    logical_path,
    register_method,
)

# one function per name the config accepts (configs/adapters.py: NON_LINEARITY_NAMES)
NON_LINEARITIES = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}

# model_type -> (attention output, feed-forward output): regexes for the end of a module's name
_DECODER = (r"self_attn\.o_proj", r"mlp\.down_proj")
_BERT = (r"attention\.output\.dense", r"layer\.\d+\.output\.dense")  # FFN output: layer.N.output.dense
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"), _DECODER),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    "gpt2": (r"attn\.c_proj", r"mlp\.c_proj"),
    "distilbert": (r"attention\.out_lin", r"ffn\.lin2"),
    # T5: encoder and decoder self-attention; cross-attention (EncDecAttention.o) is left out, as AdapterHub
    **dict.fromkeys(("t5", "mt5"), (r"SelfAttention\.o", r"DenseReluDense\.wo")),
}

# Where a target's residual input x is, for original_ln_before: (target regex, the module that receives x,
# the position of x among that module's arguments, its keyword names, the layer norm LN after the residual
# sum or None). Post-LN (BERT, DistilBERT): x goes into the output block (or the sub-layer), which owns LN;
# pre-LN decoders and T5: x is the input of the sub-layer's pre-norm, and no norm follows the sum.
_X = ("hidden_states", "input", "query", "input_tensor")
_BERT_SOURCES = ((r"(.*)\.dense", r"\1", 1, ("input_tensor",), r"\1.LayerNorm"),)
_DECODER_SOURCES = ((r"(.*)\.self_attn\.o_proj", r"\1.input_layernorm", 0, _X, None),
                    (r"(.*)\.mlp\.down_proj", r"\1.post_attention_layernorm", 0, _X, None))
RESIDUAL_SOURCES: dict[str, tuple[tuple[str, str, int, tuple[str, ...], str | None], ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT_SOURCES),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), _DECODER_SOURCES),
    "gpt2": ((r"(.*)\.attn\.c_proj", r"\1.ln_1", 0, _X, None), (r"(.*)\.mlp\.c_proj", r"\1.ln_2", 0, _X, None)),
    "distilbert": ((r"(.*)\.attention\.out_lin", r"\1.attention", 0, _X, r"\1.sa_layer_norm"),
                   (r"(.*)\.ffn\.lin2", r"\1.ffn", 0, _X, r"\1.output_layer_norm")),
    **dict.fromkeys(("t5", "mt5"), ((r"(.*)\.(?:SelfAttention\.o|DenseReluDense\.wo)", r"\1.layer_norm", 0, _X, None),)),
}


# ---- the maths, as pure functions ------------------------------------------------------------------
def bottleneck_size(d: int, reduction_factor: float, size: int | None = None) -> int:
    """m = size, or d // reduction_factor (at least 1)."""
    return size if size is not None else max(1, int(d // reduction_factor))


def bottleneck_delta(h: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor, w_up: torch.Tensor,
                     b_up: torch.Tensor, non_linearity: str, scaling: float) -> torch.Tensor:
    """s · (W_up f(W_down h + b_down) + b_up), for h of shape (..., d)."""
    return scaling * F.linear(NON_LINEARITIES[non_linearity](F.linear(h, w_down, b_down)), w_up, b_up)


def adapter_input(h: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module | None) -> torch.Tensor:
    """What the adapter reads: h itself (houlsby), or the residual sum h + x, through the sub-layer's own
    layer norm where the model has one after the sum (pfeiffer, AdapterHub's original_ln_before)."""
    if residual is None:
        return h
    total = h + residual
    return norm(total) if norm is not None else total


def init_bottleneck(down: nn.Linear, up: nn.Linear, init_weights: str) -> None:
    """AdapterHub's three initialisations (see the module doc); biases always start at zero."""
    with torch.no_grad():
        if init_weights == "bert":
            down.weight.normal_(0.0, 0.02)
            up.weight.normal_(0.0, 0.02)
        elif init_weights == "houlsby":
            for w in (down.weight, up.weight):
                nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        else:  # mam_adapter: down keeps nn.Linear's Kaiming-uniform(a=sqrt(5)), up starts at zero
            up.weight.zero_()
        for b in (down.bias, up.bias):
            b.zero_()


# ---- the config: BottleneckConfig lives in peftkit.configs.adapters (torch-free: reading a file needs no tensors)


def _in_layers(config: BottleneckConfig, name: str) -> bool:
    """layers_to_transform / layers_pattern, HF PEFT's rule (modules outside numbered layers are left out)."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    index = layer_index(name, config.layers_pattern)
    return index is not None and (index == wanted if isinstance(wanted, int) else index in wanted)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


@dataclass(frozen=True)
class ResidualSource:
    """Where one target's residual input x and layer norm are (names of modules in the model)."""

    module: str
    position: int
    keywords: tuple[str, ...]
    norm: str | None


def residual_source(model_type: str | None, target: str) -> ResidualSource | None:
    """The target's ResidualSource from RESIDUAL_SOURCES, or None where peftkit does not know it."""
    for pattern, module, position, keywords, norm in RESIDUAL_SOURCES.get(model_type or "", ()):
        if re.fullmatch(pattern, target):
            return ResidualSource(re.sub(pattern, module, target), position, keywords,
                                  re.sub(pattern, norm, target) if norm else None)
    return None


def _check_residual_sources(model: nn.Module, config: BottleneckConfig) -> None:
    """original_ln_before needs each target's residual input: every target must have a known source."""
    from ..targeting import find_targets

    model_type = family(model)
    for name in find_targets(model, config):
        found = residual_source(model_type, logical_path(name))
        modules = dict(model.named_modules())
        if found is None or found.module not in modules or (found.norm and found.norm not in modules):
            raise TargetModulesError(
                f"original_ln_before=True needs the residual input of target {name!r}, and peftkit knows where it "
                f"is only for the standard placements in {', '.join(sorted(RESIDUAL_SOURCES))} models; "
                "set original_ln_before=False (the adapter then reads the projection's output)"
            )


def prepare_bottleneck_config(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """Fill target_modules from the placement table and add the layer norms to modules_to_save."""
    modules = candidate_modules(model)
    changes: dict[str, Any] = {}
    if config.target_modules is None:
        model_type = family(model)
        if model_type not in DEFAULT_TARGETS:
            raise TargetModulesError(
                f"bottleneck adapters have no default placement for model_type {model_type!r} (known: "
                f"{', '.join(sorted(DEFAULT_TARGETS))}); set target_modules to the attention / feed-forward "
                f"output projections, among: {describe_candidates(model)}"
            )
        attention, ffn = DEFAULT_TARGETS[model_type]
        wanted = ffn if config.placement == "pfeiffer" else f"{attention}|{ffn}"
        pattern = re.compile(rf"(?:.*\.)?(?:{wanted})")
        names = [
            n for n, m in modules
            if pattern.fullmatch(n) and _in_layers(config, n)
            and is_linear_like(m.get_base_layer() if isinstance(m, AdapterLayer) else m)
        ]
        if not names:
            raise TargetModulesError(
                f"no {config.placement} placement found in this {model_type} model (layers_to_transform="
                f"{config.layers_to_transform!r}); set target_modules, among: {describe_candidates(model)}"
            )
        changes["target_modules"] = names
    norms = config.placement == "houlsby" if config.train_layer_norms is None else config.train_layer_norms
    changes["train_layer_norms"] = norms
    if norms:
        found = [n for n, m in modules if _in_layers(config, n)
                 and _is_norm(m.original_module if isinstance(m, ModulesToSaveWrapper) else m)]
        changes["modules_to_save"] = list(dict.fromkeys([*(config.modules_to_save or []), *found]))
    config = config.copy(**changes)
    if config.original_ln_before:
        _check_residual_sources(model, config)
    return config


def connect_residuals(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> None:
    """After injection: give each layer whose adapter reads the residual sum its source (a pre-hook)."""
    if not config.original_ln_before:
        return
    model_type = family(model)
    for path, layer in adapter_layers(model):
        if isinstance(layer, BottleneckLayer) and adapter_name in layer.scaling and layer.tap is None:
            found = residual_source(model_type, logical_path(path))
            norm_owner, _, norm_attr = (found.norm or "").rpartition(".")
            layer.connect(model.get_submodule(found.module), ResidualTap(found.position, found.keywords),
                          (model.get_submodule(norm_owner), norm_attr) if found.norm else None)


class ResidualTap:
    """A forward pre-hook that keeps the residual input x of one sub-layer (an argument of the module that
    receives it, by position or keyword) for its adapter layer, which takes it."""

    def __init__(self, position: int, keywords: tuple[str, ...]) -> None:
        self.position, self.keywords = position, keywords
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if len(args) > self.position:
            self.value = args[self.position]
        else:
            self.value = next((kwargs[k] for k in self.keywords if k in kwargs), None)


# ---- the layer -------------------------------------------------------------------------------------
class BottleneckLayer(AdapterLayer):
    """Bottleneck adapters on the output of an ``nn.Linear`` or GPT-2 ``Conv1D`` (d = its output features)."""

    ADAPTER_ATTRS = ("adapter_down", "adapter_up")
    MERGEABLE = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        w = self.get_base_layer().weight
        self.features = w.shape[1] if is_conv1d(self.get_base_layer()) else w.shape[0]
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.non_linearity: dict[str, str] = {}
        self.reads_residual: dict[str, bool] = {}  # per adapter: original_ln_before
        self.tap: ResidualTap | None = None
        # the tapped module and (owner, name) of LN: in lists, so that they are not submodules of this layer
        self._source: list[nn.Module] = []
        self._norm_at: list[tuple[nn.Module, str]] = []

    def connect(self, source: nn.Module, tap: ResidualTap, norm_at: tuple[nn.Module, str] | None) -> None:
        """Tap ``source`` for this layer's residual input x; LN is ``getattr(*norm_at)`` (None: no LN)."""
        self.tap, self._source, self._norm_at = tap, [source], [norm_at] if norm_at else []
        source.register_forward_pre_hook(tap, with_kwargs=True)

    def release(self) -> None:
        """Remove the tap's hook (found by identity, so a deep copy's hook stays with the copy)."""
        for source in self._source:
            for hook_id, hook in list(source._forward_pre_hooks.items()):
                if hook is self.tap:
                    del source._forward_pre_hooks[hook_id]
                    source._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        self.tap, self._source, self._norm_at = None, [], []

    def _residual_and_norm(self) -> tuple[torch.Tensor, nn.Module | None]:
        """This call's x (taken, so it is not kept) and LN (looked up now: it may be a trained copy)."""
        x = self.tap.value if self.tap is not None else None
        if x is None:
            raise PeftError(
                "a bottleneck adapter with original_ln_before=True ran without its residual input; run the whole "
                "model (not the adapted projection alone) or use original_ln_before=False"
            )
        self.tap.value = None
        return x, (getattr(*self._norm_at[0]) if self._norm_at else None)

    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        d = self.features
        m = bottleneck_size(d, config.reduction_factor, config.bottleneck_size)
        dtype = self.base_layer.weight.dtype
        if not dtype.is_floating_point or (config.autocast_adapter_dtype and dtype.itemsize < 4):
            dtype = torch.float32  # fp32 adapters on a bf16/fp16 base
        kw = {"device": self.base_layer.weight.device, "dtype": dtype}
        down, up = nn.Linear(d, m, **kw), nn.Linear(m, d, **kw)
        init_bottleneck(down, up, config.init_weights)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.scaling[adapter_name] = config.scaling
        self.non_linearity[adapter_name] = config.non_linearity
        self.reads_residual[adapter_name] = bool(config.original_ln_before)

    def _forget(self, adapter_name: str) -> None:
        self.scaling.pop(adapter_name, None)
        self.non_linearity.pop(adapter_name, None)
        self.reads_residual.pop(adapter_name, None)
        if not any(self.reads_residual.values()):
            self.release()
        if adapter_name in self.adapter_dropout:
            del self.adapter_dropout[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return h
        names = self.row_adapters.names if self.row_adapters is not None else self.active_adapters
        residual, norm = (self._residual_and_norm() if any(self.reads_residual.get(n) for n in names)
                          else (None, None))
        if self.row_adapters is not None:
            return h + self._per_row(h, residual, norm).to(h.dtype)
        for name in self.active_adapters:  # in sequence (Stack): each adapter reads the previous one's output
            down, up = self.adapter_down[name], self.adapter_up[name]
            v = adapter_input(h, residual if self.reads_residual[name] else None, norm)
            z = self.adapter_dropout[name](v.to(down.weight.dtype))
            delta = bottleneck_delta(z, down.weight, down.bias, up.weight, up.bias,
                                     self.non_linearity[name], self.scaling[name])
            h = h + delta.to(h.dtype)
        return h

    def _per_row(self, h: torch.Tensor, x: torch.Tensor | None, norm: nn.Module | None) -> torch.Tensor:
        """Each row through its own adapter: the adapters' weights stacked (zero-padded to the largest m; the
        last slot, all zeros, serves base rows), gathered per row, two batched matmuls. f(0) = 0 for every
        non-linearity, so the padding is exact. Rows whose adapter reads the residual sum read it (x given)."""
        rows = self.row_adapters
        index = rows.for_batch(h.shape[0], h.device)
        held = [n for n in rows.names if n in self.scaling]
        if self.training and any(not isinstance(self.adapter_dropout[n], nn.Identity) for n in held):
            raise PeftError("adapters mixed per row run without dropout: call model.eval() first")
        some = self.adapter_down[next(iter(self.scaling))].weight  # a layer always holds an adapter
        d, k = self.features, len(rows.names) + 1
        m_max = max((self.adapter_down[n].out_features for n in held), default=1)
        w_down, b_down = some.new_zeros(k, m_max, d), some.new_zeros(k, m_max)
        w_up, b_up = some.new_zeros(k, d, m_max), some.new_zeros(k, d)
        acts = sorted({self.non_linearity[n] for n in held}) or ["relu"]
        act_of = torch.zeros(k, dtype=torch.long)
        reads = torch.zeros(k, dtype=torch.bool)
        for i, name in enumerate(rows.names):
            if name in self.scaling:
                down, up, s = self.adapter_down[name], self.adapter_up[name], self.scaling[name]
                m = down.out_features
                w_down[i, :m], b_down[i, :m] = down.weight, down.bias
                w_up[i, :, :m], b_up[i] = up.weight * s, up.bias * s
                act_of[i] = acts.index(self.non_linearity[name])
                reads[i] = self.reads_residual[name]
        pick = torch.where(index < 0, k - 1, index)
        v = h if x is None else torch.where(reads.to(h.device)[pick].view(-1, *[1] * (h.dim() - 1)),
                                            adapter_input(h, x, norm), h)
        hb = v.reshape(h.shape[0], -1, d).to(some.dtype)
        z = torch.baddbmm(b_down[pick].unsqueeze(1), hb, w_down[pick].transpose(1, 2))
        a = NON_LINEARITIES[acts[0]](z)
        row_act = act_of.to(h.device)[pick][:, None, None]
        for j, act in enumerate(acts[1:], start=1):  # at most one pass per distinct non-linearity
            a = torch.where(row_act == j, NON_LINEARITIES[act](z), a)
        out = torch.baddbmm(b_up[pick].unsqueeze(1), a, w_up[pick].transpose(1, 2))
        return out.reshape(h.shape)

    def extra_repr(self) -> str:
        sizes = {n: self.adapter_down[n].out_features for n in self.adapter_down}
        return f"features={self.features}, bottleneck={sizes}, active={self.active_adapters}"


def bottleneck_layer_for(module: nn.Module) -> type[BottleneckLayer] | None:
    return BottleneckLayer if is_linear_like(module) else None


BOTTLENECK = register_method(MethodSpec(
    config_cls=BottleneckConfig, layer_base=BottleneckLayer, layer_for=bottleneck_layer_for,
    supported="Linear, transformers Conv1D", prepare_config=prepare_bottleneck_config,
    after_inject=connect_residuals,
))
