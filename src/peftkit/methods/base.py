"""The interface every layer method shares, the method registry, and the modules_to_save wrapper.

Model-level methods (prompt tuning, P-tuning, prefix tuning) change what a model is given rather than
wrapping its modules; they derive from :class:`ModelAdapters`, which offers the same verbs as
:class:`AdapterLayer` (add, delete, set, disable, per-row adapters, parameters to train and save) at the
model level.

An :class:`AdapterLayer` wraps one frozen base module (``self.base_layer``, untouched) and holds any
number of named adapters. Its adapter parameters live in ``nn.ModuleDict`` / ``nn.ParameterDict``
attributes keyed by adapter name and listed in ``ADAPTER_ATTRS``; from that one list the shared code
derives saving, loading, counting, freezing and deleting, with HF PEFT's key suffixes
(``lora_A.weight``, ``lora_embedding_A``) — no method needs its own bookkeeping for those.
"""

from __future__ import annotations

import abc
import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import PeftConfig, register_config
from ..errors import PeftError, TargetModulesError
from ..quantize import dequantize_for_merge, restore_after_unmerge

BASE_ROW = "__base__"  # HF PEFT's name for "no adapter on this row"


@dataclass(frozen=True)
class RowGroups:
    """The rows of a batch grouped by adapter, for methods that run each adapter once over its rows (two
    batched matmuls over the stacked adapters, Punica's segmented matmul) instead of gathering one weight copy
    per row. Group g is adapter ``names[g]``; group k (when present) the rows on the base model. Each group has
    ``width`` slots (the largest group's size; smaller groups repeat one of their rows in the spare slots):
    slot j of group g reads row ``slot_rows[g * width + j]``, and row i's result is at slot ``row_slot[i]``."""

    count: int
    width: int
    slot_rows: torch.Tensor  # (count * width,) int64
    row_slot: torch.Tensor  # (batch,) int64

    @classmethod
    def from_picks(cls, picks: list[int], groups: int) -> RowGroups:
        members: list[list[int]] = [[] for _ in range(groups)]
        for row, group in enumerate(picks):
            members[group].append(row)
        count = groups if members[-1] else groups - 1  # no base-model group when every row has an adapter
        width = max(len(m) for m in members[:count])
        slot_rows, row_slot = [], [0] * len(picks)
        for g, rows in enumerate(members[:count]):
            for j in range(width):
                if j < len(rows):
                    row_slot[rows[j]] = g * width + j
                slot_rows.append(rows[min(j, len(rows) - 1)] if rows else 0)
        return cls(count, width, torch.tensor(slot_rows, dtype=torch.long), torch.tensor(row_slot, dtype=torch.long))

    def worth_it(self, batch: int, tokens: int) -> bool:
        """Whether grouping beats a per-row gather for rows of ``tokens`` tokens. Grouped: count·width·tokens rows
        of LoRA work and each adapter's weights read once; gathered: batch·tokens rows of work plus a copy of one
        adapter's weights per row (a copied element costs about 8 multiply-adds in memory traffic). Skewed groups
        (one big, many small) pad many slots, and long rows amortise the copies: then gathering wins."""
        return self.count * (self.width * tokens + 1) <= batch * (tokens + 8)


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each row of a batch uses: ``names[index[i]]`` for row i, or the base model where -1.

    Made once per ``forward`` / ``generate`` call (``PeftModel(adapter_names=...)``): everything derived from
    the names (``pick``, the groups) is computed here, on the host, and copied to a device once, so a generate
    step's layers neither recompute it nor wait on the device."""

    names: tuple[str, ...]
    index: torch.Tensor  # (batch,) int64
    pick: torch.Tensor  # (batch,) int64: index with -1 replaced by len(names), the stacked tables' base slot
    groups: RowGroups
    _on_device: dict = field(default_factory=dict, compare=False, repr=False)
    # per layer, what a method made of its adapters' weights for these rows (LoRA's stacked tables), kept for
    # the rest of this call: a generate call's steps run every layer again with weights that cannot change
    # between them (no optimizer runs inside generate), so each layer's tables are checked once per call
    _tables: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_names(cls, adapter_names: list[str]) -> RowAdapters:
        names = tuple(dict.fromkeys(n for n in adapter_names if n != BASE_ROW))
        position = {n: i for i, n in enumerate(names)}
        index = [position.get(n, -1) for n in adapter_names]
        picks = [len(names) if i < 0 else i for i in index]
        return cls(names, torch.tensor(index, dtype=torch.long), torch.tensor(picks, dtype=torch.long),
                   RowGroups.from_picks(picks, len(names) + 1))

    def check_batch(self, batch: int) -> None:
        if batch != self.index.numel():
            raise PeftError(
                f"adapter_names has {self.index.numel()} entries but the batch has {batch} rows; give one adapter "
                "name per row (with generate(num_beams>1) or num_return_sequences, repeat each name accordingly)"
            )

    def for_batch(self, batch: int, device: torch.device) -> torch.Tensor:
        self.check_batch(batch)
        return self.on(device)[0]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(index, pick, groups.slot_rows, groups.row_slot) on ``device``, copied there once per call."""
        cached = self._on_device.get(device)
        if cached is None:
            cached = tuple(t.to(device) for t in (self.index, self.pick, self.groups.slot_rows, self.groups.row_slot))
            self._on_device[device] = cached
        return cached


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus named adapters. Subclasses implement ``update_layer`` and ``forward``;
    mergeable ones implement ``delta_weight`` (and get ``merge``/``unmerge`` for free).

    ``row_adapters`` is set by ``PeftModel.forward(adapter_names=[...])`` for the duration of one call:
    then each row of the batch goes through its own adapter (several adapters in one batch)."""

    ADAPTER_ATTRS: ClassVar[tuple[str, ...]] = ()
    MERGEABLE: ClassVar[bool] = True  # False for non-linear methods (bottleneck adapters)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: RowAdapters | None = None

    def get_base_layer(self) -> nn.Module:
        """The original module, under however many adapter layers (a LoRA and a VeRA adapter can nest)."""
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight: models read ``proj.weight.dtype`` and the like (T5 does)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # ---- what subclasses provide ------------------------------------------------------------------
    @abc.abstractmethod
    def update_layer(self, adapter_name: str, config: PeftConfig, module_name: str) -> None:
        """Create adapter ``adapter_name``'s parameters for this module (``module_name`` for patterns)."""

    def adapters_off(self) -> bool:
        """Whether forward is the base module alone: adapters disabled (a merged layer unmerges first, so the
        base really is the base) or already merged into its weights. Call it before running the base."""
        if self.disable_adapters and self.merged:
            self.unmerge()
        return self.disable_adapters or self.merged

    def merge_blocker(self) -> str | None:
        """Why this layer's adapters cannot be merged into the base module, or None if they can."""
        return None if self.MERGEABLE else f"{type(self).__name__} adapters are non-linear"

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change this adapter makes to ``base_layer.weight`` (same shape and layout)."""
        raise PeftError(f"{type(self).__name__} cannot be merged into the base weights")

    # ---- names and parameters ---------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.ADAPTER_ATTRS:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's tensors, keyed by HF PEFT's suffix (``lora_A.weight``, ``lora_embedding_A``)."""
        out: dict[str, torch.Tensor] = {}
        for attr in self.ADAPTER_ATTRS:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Parameter | torch.Tensor):
                out[attr] = item
            else:
                for pname, p in item.named_parameters():
                    out[f"{attr}.{pname}"] = p
        return out

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        """The parameters that train with this adapter (PeftModel unfreezes them while it is active): all of
        ``adapter_state_dict`` except those of a module marked ``adapter_frozen = True`` (LoRA-FA's A), which
        are saved, loaded and merged like the rest but stay frozen. The mark lives on the adapter's own module,
        so it survives deepcopy and goes away with the adapter."""
        for key, p in self.adapter_state_dict(adapter_name).items():
            if not getattr(getattr(self, key.split(".")[0])[adapter_name], "adapter_frozen", False):
                yield p

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise PeftError(f"adapter {adapter_name!r} is merged; unmerge_adapter() before deleting it")
        for attr in self.ADAPTER_ATTRS:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self._forget(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def _forget(self, adapter_name: str) -> None:
        """Drop per-adapter non-parameter state (hyper-parameters held in plain dicts)."""

    def release(self) -> None:
        """Undo what ``MethodSpec.after_inject`` attached outside ``base_layer`` (hooks), before the layer
        leaves the model."""

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [a for a in adapter_names if a in self.adapter_names]

    # ---- merging ----------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = [a for a in (adapter_names or self.active_adapters) if a in self.adapter_names]
        if names:
            dequantize_for_merge(self)  # a quantised base weight becomes a dense copy while merged
        weight = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters:
                continue
            delta = self.delta_weight(name)
            if safe_merge:
                merged = weight.data.float() + delta
                if not torch.isfinite(merged).all():
                    raise PeftError(
                        f"merging adapter {name!r} into {type(self.base_layer).__name__} gives NaN/inf "
                        "weights; the adapter is broken (check its training) — nothing was changed"
                    )
                weight.data.copy_(merged.to(weight.dtype))
            else:
                weight.data += delta.to(weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.delta_weight(name).to(weight.dtype)
        restore_after_unmerge(self)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full per adapter (a task head): ``original_module`` stays frozen, each adapter
    gets its own trainable copy in ``modules_to_save[name]``; the active adapter's copy runs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.row_adapters: RowAdapters | None = None

    def add(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapter = next((a for a in adapter_names if a in self.modules_to_save), None)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    @property
    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        rows = self.row_adapters
        if rows is None or self.disable_adapters:
            return self.current(x, *args, **kwargs)
        # a head is a whole module per adapter: run each distinct head on its rows (few heads, cheap)
        index = rows.for_batch(x.shape[0], x.device)
        out = self.original_module(x, *args, **kwargs)
        for i, name in enumerate(rows.names):
            picked = (index == i).nonzero().squeeze(1)
            if picked.numel() and name in self.modules_to_save:
                out = out.index_copy(0, picked, self.modules_to_save[name](x[picked], *args, **kwargs))
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current, name)  # e.g. head.weight, head.out_features


class ModelAdapters(nn.ModuleDict):
    """A model-level method's adapters: one module per adapter name (``self[name]``), attached to the adapted
    model as its child ``ATTR`` (so every walk over the model finds it, as it finds adapter layers) and
    applied by one forward pre-hook on the module that takes the model's inputs (``hook_target``), which
    rewrites that call's keyword arguments (``rewrite``). Detaching removes both: the model is as before.

    The verbs match AdapterLayer's: ``active_adapters``, ``disable_adapters``, ``row_adapters`` (set by
    ``PeftModel.forward(adapter_names=...)`` for one call), ``set_adapter``, ``delete_adapter``,
    ``adapter_parameters`` and ``adapter_state_dict`` (the live tensors, keyed as the file keys them)."""

    ATTR: ClassVar[str] = "model_adapters"

    def __init__(self) -> None:
        super().__init__()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: RowAdapters | None = None
        self.merged = False  # never: model-level adapters have no weights to merge into

    # ---- attaching --------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module) -> ModelAdapters:
        """The instance on ``model``, created (and its hook registered) on first use."""
        existing = getattr(model, cls.ATTR, None)
        if isinstance(existing, cls):
            return existing
        if existing is not None:
            raise PeftError(f"the model already has an attribute {cls.ATTR!r}; peftkit needs that name for its adapters")
        store = cls()
        target = store.hook_target(model)
        model.add_module(cls.ATTR, store)
        target.register_forward_pre_hook(store._pre_hook, with_kwargs=True)
        return store

    def detach(self, model: nn.Module) -> None:
        """Remove this instance and its hook from ``model`` (found by identity, so copies stay independent)."""
        for module in model.modules():
            for hook_id, hook in list(module._forward_pre_hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del module._forward_pre_hooks[hook_id]
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
        if getattr(model, self.ATTR, None) is self:
            delattr(model, self.ATTR)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.disable_adapters or (not self.active_adapters and self.row_adapters is None):
            return None
        return self.rewrite(module, args, kwargs)

    # ---- what subclasses provide ------------------------------------------------------------------
    @abc.abstractmethod
    def hook_target(self, model: nn.Module) -> nn.Module:
        """The module (``model`` or one inside it) whose forward receives the inputs to rewrite."""

    @abc.abstractmethod
    def rewrite(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The hooked call's new (args, kwargs), or None to leave it as is."""

    @abc.abstractmethod
    def add_adapter(self, adapter_name: str, config: PeftConfig, model: nn.Module) -> None:
        """Create adapter ``adapter_name`` for ``model``."""

    @abc.abstractmethod
    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """This adapter's live tensors under the keys the adapter file uses."""

    def merge_blocker(self) -> str | None:
        return f"{type(self).__name__} adapters change the model's inputs, not its weights"

    # ---- the shared verbs -------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.keys())

    def adapter_parameters(self, adapter_name: str) -> Iterator[nn.Parameter]:
        yield from self[adapter_name].parameters()

    def set_adapter(self, adapter_names: list[str]) -> None:
        self.active_adapters = [a for a in adapter_names if a in self]

    def delete_adapter(self, adapter_name: str) -> None:
        del self[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}"


# ---- the method registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """How a peft_type adapts a module: ``layer_for(module)`` returns the AdapterLayer class that wraps
    this kind of module (or None if the method cannot adapt it). ``prepare_config(model, config)``, if
    given, returns a completed copy of the config for this model (default target_modules from a small
    table by model family, placements, ...) before any module is targeted."""

    config_cls: type[PeftConfig]
    layer_base: type[AdapterLayer] | None = None  # None for a model-level method (see model_level)
    layer_for: Callable[[nn.Module], type[AdapterLayer] | None] | None = None
    supported: str = ""  # for error messages: "Linear, Conv1D, Embedding, Conv2d"
    prepare_config: Callable[[nn.Module, PeftConfig], PeftConfig] | None = None
    # Tensors an adapter shares across layers (VeRA's projections), live, keyed relative to the tuner:
    # "vera_A" is written as "base_model.vera_A", as HF PEFT does.
    shared_tensors: Callable[[nn.Module, str, PeftConfig], dict[str, torch.Tensor]] | None = None
    # Converts an adapter's live state to what its file holds (Delta-LoRA writes an exact rank-2r LoRA):
    # (model, adapter_name, config, tensors under file keys, key prefix) -> (config to write, tensors)
    to_file: Callable[[nn.Module, str, PeftConfig, dict[str, torch.Tensor], str],
                      tuple[PeftConfig, dict[str, torch.Tensor]]] | None = None
    # The inverse, on load: (model, adapter_name, config, file tensors, folder or None) -> live tensors
    # (a P-tuning file holds the encoder's output; training resumes from the encoder in a second file)
    from_file: Callable[[nn.Module, str, PeftConfig, dict[str, torch.Tensor], str | None],
                        dict[str, torch.Tensor]] | None = None
    # More files in the adapter folder: (model, adapter_name, config) -> {file name: tensors}
    extra_files: Callable[[nn.Module, str, PeftConfig], dict[str, dict[str, torch.Tensor]]] | None = None
    # A model-level method (prompts): its ModelAdapters class, instead of layer_base / layer_for
    model_level: type[ModelAdapters] | None = None
    # After the layers are in place: (model, config, adapter_name) -> None, to connect layers to modules
    # outside their base (a bottleneck adapter's residual input); undone by AdapterLayer.release
    after_inject: Callable[[nn.Module, PeftConfig, str], None] | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    register_config(spec.config_cls)
    METHODS[spec.config_cls.PEFT_TYPE] = spec
    return spec


def method_for(config: PeftConfig) -> MethodSpec:
    try:
        return METHODS[config.PEFT_TYPE]
    except KeyError:
        raise PeftError(f"peft_type {config.PEFT_TYPE!r} has no layer method registered") from None


def inject_adapter(model: nn.Module, config: PeftConfig, adapter_name: str) -> list[str]:
    """Wrap every module ``config`` targets and add adapter ``adapter_name`` to it.

    All targets are checked before any module is replaced, so a bad target leaves the model untouched.
    Returns the names of the adapted modules."""
    from ..targeting import find_targets

    spec = method_for(config)
    if spec.model_level is not None:
        store = spec.model_level.attach(model)
        try:
            store.add_adapter(adapter_name, config, model)
        except BaseException:  # e.g. an init text the model cannot read: leave no empty store or hook behind
            if not len(store):
                store.detach(model)
            raise
        return [spec.model_level.ATTR]
    plan: list[tuple[str, nn.Module, type[AdapterLayer] | None]] = []
    for name in find_targets(model, config):
        module = model.get_submodule(name)
        chain = adapter_chain(module)
        same = next((layer for layer in chain if isinstance(layer, spec.layer_base)), None)
        if same is not None:  # this family already wraps the module: one more adapter in the same layer
            refusal = config.refuse_target(same.get_base_layer())
            if refusal:
                raise TargetModulesError(f"target {name!r}: {refusal}")
            if adapter_name in same.adapter_names:
                raise PeftError(f"module {name!r} already has an adapter named {adapter_name!r}")
            plan.append((name, same, None))
            continue
        base = chain[-1].get_base_layer() if chain else module
        layer_cls = spec.layer_for(base)
        if layer_cls is None:
            raise TargetModulesError(
                f"target {name!r} is a {type(base).__name__}, which {config.PEFT_TYPE} cannot adapt "
                f"(supported: {spec.supported}); narrow target_modules or add it to exclude_modules"
            )
        refusal = config.refuse_target(base)
        if refusal:
            raise TargetModulesError(f"target {name!r}: {refusal}")
        plan.append((name, module, layer_cls))  # another family's layer, if any, nests inside the new one
    for name, module, layer_cls in plan:
        if layer_cls is not None:
            module = layer_cls(module)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        module.update_layer(adapter_name, config, name)
    if spec.after_inject is not None:
        spec.after_inject(model, config, adapter_name)
    return [name for name, _, _ in plan]


def adapter_chain(module: nn.Module) -> list[AdapterLayer]:
    """The adapter layers wrapped around one module, outermost first."""
    chain: list[AdapterLayer] = []
    while isinstance(module, AdapterLayer):
        chain.append(module)
        module = module.base_layer
    return chain


def logical_path(path: str) -> str:
    """A module's name as the user's model knows it: nested adapter layers' ``base_layer`` hops removed
    (HF PEFT's file keys are written against this name)."""
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", path)


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer with its real path, outer layers before the ones nested in them."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def model_adapters(model: nn.Module) -> Iterator[tuple[str, ModelAdapters]]:
    """Every model-level method's adapters attached to ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, ModelAdapters):
            yield name, module


def modules_to_save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module
