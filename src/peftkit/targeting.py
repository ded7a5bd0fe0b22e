"""Which modules a config hits: exact names, suffixes, a regex, or "all-linear".

The rules are HF PEFT's, so that a config means the same module set in both libraries:

* ``target_modules`` a list: a module matches if its full name is in the list or ends with
  ``"." + entry``; then ``layers_to_transform`` / ``layers_pattern`` keep only the listed layer indices;
* ``target_modules`` a string: a regex that must match the full module name (``re.fullmatch``);
* ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head (and, for SEQ_CLS
  models without output embeddings, the classification head);
* ``exclude_modules`` (list or regex) and ``modules_to_save`` always win over targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch.nn as nn

from . import patterns
from .errors import TargetModulesError

ALL_LINEAR = "all-linear"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (weight stored as (in, out)), detected without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def layer_index(key: str, layers_pattern: str | Sequence[str] | None) -> int | None:
    if not layers_pattern:
        # the first numbered segment after at least two name parts, e.g. "model.layers.3.self_attn.q_proj"
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        wanted = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in wanted:
            match = patterns.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key, "layers_pattern", shown=pattern)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def model_type(model: nn.Module) -> str | None:
    """transformers' ``config.model_type`` (None for a plain nn.Module): the key of the small per-family
    tables of default targets."""
    return getattr(getattr(model, "config", None), "model_type", None)


def _in_list_or_suffix(key: str, names: Iterable[str]) -> bool:
    return any(key == n or key.endswith("." + n) for n in names)


def is_excluded(config, key: str) -> bool:
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if patterns.fullmatch(exclude, key, "exclude_modules"):
                return True
        elif _in_list_or_suffix(key, exclude):
            return True
    modules_to_save = getattr(config, "modules_to_save", None) or []
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save)


def matches_target(config, key: str) -> bool:
    """Does module ``key`` (its full dotted name) match ``config.target_modules``?"""
    if is_excluded(config, key):
        return False
    targets = config.target_modules
    if targets is None:
        return False
    if isinstance(targets, str):
        return patterns.fullmatch(targets, key, "target_modules") is not None
    if key in targets:
        return True
    if not any(key.endswith("." + t) for t in targets):
        return False
    indices = getattr(config, "layers_to_transform", None)
    if indices is None or (isinstance(indices, list) and not indices):
        return True
    index = layer_index(key, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == indices if isinstance(indices, int) else index in indices


def output_head_names(model: nn.Module, task_type: str | None) -> set[str]:
    """Modules "all-linear" must leave alone: the LM head, or a SEQ_CLS classifier."""
    out: set[str] = set()
    head = None
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            head = get_out()
        except (NotImplementedError, AttributeError):
            head = None
    if head is None and task_type == "SEQ_CLS":
        for name in ("score", "classifier"):
            head = getattr(model, name, None)
            if head is not None:
                break
    if head is not None:
        out.update(name for name, m in model.named_modules() if m is head)
    return out


def candidate_modules(model: nn.Module, skip_prefixes: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Named modules a user can target: everything except the internals of adapter layers (and of a
    model-level method's adapters: a P-tuning encoder's Linear layers are not the model's)."""
    from .methods.base import AdapterLayer, ModelAdapters, ModulesToSaveWrapper

    out: list[tuple[str, nn.Module]] = []
    inner: list[str] = list(skip_prefixes)
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inner):
            continue
        if isinstance(module, ModelAdapters):
            inner.append(name)
            continue
        out.append((name, module))
        if isinstance(module, AdapterLayer | ModulesToSaveWrapper):
            inner.append(name)
    return out


def describe_candidates(model: nn.Module) -> str:
    """'query, key, value, dense' — distinct last name parts of adaptable modules, for error messages."""
    from .methods.base import AdapterLayer

    seen: dict[str, None] = {}
    for name, module in candidate_modules(model):
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        if is_linear_like(base):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    names = list(seen)
    return ", ".join(names[:30]) + (", ..." if len(names) > 30 else "") if names else "(none)"


def find_targets(model: nn.Module, config) -> list[str]:
    """Full names of the modules ``config`` targets in ``model``; raises if there are none."""
    from .methods.base import AdapterLayer

    targets = config.target_modules
    if targets is None:
        raise TargetModulesError(
            f"{config.PEFT_TYPE} config has target_modules=None and this model has no default; "
            f"set target_modules to some of: {describe_candidates(model)}"
        )
    modules = candidate_modules(model)
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model, config.task_type)
        names = [
            n for n, m in modules
            if n not in heads
            and not is_excluded(config, n)
            and is_linear_like(m.get_base_layer() if isinstance(m, AdapterLayer) else m)
        ]
    else:
        names = [n for n, _ in modules if matches_target(config, n)]
    if not names:
        raise TargetModulesError(
            f"no module matched target_modules={targets!r}"
            + (f" (with layers_to_transform={config.layers_to_transform!r})"
               if getattr(config, "layers_to_transform", None) is not None else "")
            + f"; linear modules in this model end with: {describe_candidates(model)}"
        )
    return names
