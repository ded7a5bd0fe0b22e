"""AdapterHub's (the ``adapters`` package's) bottleneck adapter folders, read and written.

An AdapterHub folder, as ``model.save_adapter(folder, name, use_safetensors=True)`` writes it (1.3.0)::

    adapter_config.json     {"config": {<BnConfig fields>}, "model_type", "hidden_size", "model_class",
                             "model_name", "name", "version": "adapters.1.3.0"}   (no "peft_type")
    adapter.safetensors     <container>.adapters.<name>.adapter_down.0.weight|bias, .adapter_up.weight|bias

(``pytorch_adapter.bin``, a pickle, instead of ``adapter.safetensors`` without ``use_safetensors``: peftkit
never unpickles, it says how to convert). ``<container>`` is where AdapterHub hangs its adapters: the BERT
output blocks themselves (``...attention.output``, ``...layer.N.output``), or ``attention_adapters`` /
``output_adapters`` on a decoder layer. LOCATIONS maps each to the projection peftkit wraps.

AdapterHub's composition is peftkit's (see methods/adapters.py): ``original_ln_before`` carries over, and
the options peftkit lacks (ln_before/after, gating, parallel, PHM, invertible adapters, learned scaling,
residual_before_ln=False, original_ln_after=False) are refused by name, never ignored.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import CONFIG_NAME, PeftConfig
from .errors import AdapterFileError
from .io import PEFT_PREFIX, atomic_write_bytes, read_adapter_weights
from .methods.adapters import BottleneckConfig, BottleneckLayer
from .methods.base import adapter_layers, logical_path
from .targeting import model_type as family

SAFE_WEIGHTS_NAME = "adapter.safetensors"
PICKLE_WEIGHTS_NAME = "pytorch_adapter.bin"
HEAD_CONFIG_NAME = "head_config.json"  # save_adapter(..., with_head=True), the default, on a model with a head
SAFE_HEAD_WEIGHTS_NAME = "model_head.safetensors"
VERSION = "adapters.1.3.0"  # the release whose files these are (and whose loader reads ours)

_BERT = ((r"(.*\.attention\.output)", r"\1.dense", "mh_adapter"),
         (r"(.*\.layer\.\d+\.output)", r"\1.dense", "output_adapter"))
_LLAMA = ((r"(.*)\.attention_adapters", r"\1.self_attn.o_proj", "mh_adapter"),
          (r"(.*)\.output_adapters", r"\1.mlp.down_proj", "output_adapter"))
# model_type -> (AdapterHub container regex, the projection peftkit wraps, AdapterHub's location key)
LOCATIONS: dict[str, tuple[tuple[str, str, str], ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra"), _BERT),
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"), _LLAMA),
    "gpt2": ((r"(.*)\.attention_adapters", r"\1.attn.c_proj", "mh_adapter"),
             (r"(.*)\.output_adapters", r"\1.mlp.c_proj", "output_adapter")),
}
_KEY = re.compile(r"(?P<container>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>adapter_down\.0|adapter_up)\.(?P<kind>weight|bias)")
_ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu", "tanh": "tanh"}

# AdapterHub's BnConfig with the values peftkit implements (1.3.0's field set, written in full on save);
# a file must hold these values for the keys listed in _MUST_EQUAL.
_BN_DEFAULTS: dict[str, Any] = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False,
    "phm_rank": 1, "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}
_MUST_EQUAL = ("adapter_residual_before_ln", "cross_adapter", "inv_adapter", "is_parallel", "ln_after",
               "ln_before", "original_ln_after", "phm_layer", "residual_before_ln", "use_gating")


# ---- recognising ----------------------------------------------------------------------------------
def is_adapterhub_config(data: Any) -> bool:
    """AdapterHub's schema: the adapter's options under "config", no "peft_type"."""
    return isinstance(data, dict) and "peft_type" not in data and isinstance(data.get("config"), dict)


def is_adapterhub_folder(folder: str | os.PathLike) -> bool:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):  # also a FIFO, which open() would wait on forever: the HF PEFT reader refuses it
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            return is_adapterhub_config(json.load(fh))
    except (OSError, ValueError):
        return False  # the HF PEFT reader reports a missing or corrupt config


# ---- reading ---------------------------------------------------------------------------------------
def read_adapterhub(folder: str | os.PathLike, model: nn.Module) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """An AdapterHub folder as peftkit's config and tensors (HF PEFT keys) for ``model``; nothing changes."""
    folder = os.fspath(folder)
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as fh:
        data = json.load(fh)
    options = data["config"]
    _check_options(options, folder)
    _check_head(folder, model)
    weights = _read_weights(folder)
    targets: dict[str, dict[str, torch.Tensor]] = {}
    names = {n for n, _ in model.named_modules()}
    for key, tensor in weights.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterFileError(
                f"{folder!r}: key {key!r} is not a bottleneck adapter's (…adapters.<name>.adapter_down.0 / "
                "adapter_up); peftkit reads AdapterHub's bottleneck adapters only"
            )
        target = _target_for(model, names, match["container"], folder)
        suffix = "adapter_down" if match["param"] == "adapter_down.0" else "adapter_up"
        targets.setdefault(target, {})[f"{suffix}.{match['kind']}"] = tensor
    if not targets:
        raise AdapterFileError(f"{folder!r}: {SAFE_WEIGHTS_NAME} holds no adapter weights")
    config = BottleneckConfig(
        placement="houlsby" if options.get("mh_adapter") else "pfeiffer",
        target_modules=sorted(targets), train_layer_norms=False,
        reduction_factor=options.get("reduction_factor", 16), non_linearity=_ACTIVATIONS[options["non_linearity"].lower()],
        original_ln_before=bool(options.get("original_ln_before")), scaling=float(options.get("scaling", 1.0)),
        dropout=float(options.get("dropout") or 0.0),
        init_weights=options.get("init_weights") if options.get("init_weights") in ("bert", "houlsby", "mam_adapter") else "bert",
    )
    tensors = {f"{PEFT_PREFIX}{t}.{suffix}": v for t, held in targets.items() for suffix, v in held.items()}
    return config, tensors


def _check_options(options: dict[str, Any], folder: str) -> None:
    """Refuse, by name, every AdapterHub option whose value changes the maths in a way peftkit lacks."""
    if options.get("architecture") not in (None, "bottleneck"):
        raise AdapterFileError(
            f"{folder!r} is an AdapterHub {options['architecture']!r} adapter; peftkit reads AdapterHub's "
            "bottleneck adapters only (its LoRA / prefix files are not HF PEFT's either)"
        )
    refused = [f"{k}={options[k]!r}" for k in _MUST_EQUAL if k in options and options[k] != _BN_DEFAULTS[k]]
    if not isinstance(options.get("scaling", 1.0), int | float) or isinstance(options.get("scaling"), bool):
        refused.append(f"scaling={options['scaling']!r}")
    if float(options.get("stochastic_depth") or 0.0) != 0.0:
        refused.append(f"stochastic_depth={options['stochastic_depth']!r}")
    if str(options.get("non_linearity", "")).lower() not in _ACTIVATIONS:
        refused.append(f"non_linearity={options.get('non_linearity')!r}")
    if not isinstance(options.get("reduction_factor", 16), int | float):
        refused.append(f"reduction_factor={options['reduction_factor']!r} (per-layer sizes)")
    if refused:
        raise AdapterFileError(
            f"{folder!r}: this AdapterHub adapter uses options peftkit does not implement: {', '.join(refused)}; "
            "load it with the adapters package instead"
        )


def _check_head(folder: str, model: nn.Module) -> None:
    """AdapterHub saves a head with the adapter: a model class's own output layer ("config": null, e.g. a
    LlamaForCausalLM's lm_head) is accepted when it equals ``model``'s; any other head is refused by name."""
    path = os.path.join(folder, HEAD_CONFIG_NAME)
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        static = json.load(fh).get("config") is None
    weights = os.path.join(folder, SAFE_HEAD_WEIGHTS_NAME)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied heads too (GPT-2 lm_head)
    if static and os.path.exists(weights):
        try:
            held = load_file(weights)
        except (SafetensorError, OSError, ValueError, RuntimeError):
            held = {"": None}
        if all(k in params and v is not None and v.shape == params[k].shape
               and torch.equal(v.to(params[k].dtype), params[k].detach().cpu()) for k, v in held.items()):
            return  # the model's own head, unchanged: nothing to load
    raise AdapterFileError(
        f"{folder!r} also holds an AdapterHub prediction head ({HEAD_CONFIG_NAME}) that is not this model's own "
        f"unchanged output layer, and peftkit does not read AdapterHub heads; to load the adapter alone (on your "
        f"model's head), copy the folder without {HEAD_CONFIG_NAME} and {SAFE_HEAD_WEIGHTS_NAME} / pytorch_model_head.bin"
    )


def _read_weights(folder: str) -> dict[str, torch.Tensor]:
    path = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(folder, PICKLE_WEIGHTS_NAME)):
            raise AdapterFileError(
                f"{folder!r} holds only {PICKLE_WEIGHTS_NAME} (a pickle); peftkit reads safetensors only. Save it "
                "again with model.save_adapter(folder, name, use_safetensors=True), or convert it once with "
                f"safetensors.torch.save_file(torch.load(bin, weights_only=True), '{SAFE_WEIGHTS_NAME}')"
            )
        raise AdapterFileError(f"no {SAFE_WEIGHTS_NAME} in {folder!r}; is this an AdapterHub adapter folder?")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{path!r} is truncated or corrupt ({exc}); save the adapter again") from None


def _target_for(model: nn.Module, names: set[str], container: str, folder: str) -> str:
    """The module peftkit wraps for AdapterHub's ``container`` (trying with and without the base prefix)."""
    model_type = family(model)
    for pattern, target, _ in LOCATIONS.get(model_type or "", ()):
        if re.fullmatch(pattern, container):
            path = re.sub(pattern, target, container)
            prefix = getattr(model, "base_model_prefix", "") + "."
            for candidate in (path, prefix + path, path.removeprefix(prefix)):
                if candidate in names:
                    return candidate
    raise AdapterFileError(
        f"{folder!r}: AdapterHub adapter location {container!r} has no place in this {model_type} model (peftkit "
        f"maps AdapterHub's locations for {', '.join(sorted(LOCATIONS))}); was it made for another model?"
    )


# ---- writing ---------------------------------------------------------------------------------------
def save_adapterhub(peft_model: nn.Module, save_directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``adapter_name`` (a bottleneck adapter) as an AdapterHub folder that ``adapters`` 1.3.0 loads with
    ``model.load_adapter(folder, use_safetensors=True)``. Refuses what AdapterHub's format cannot hold (trained
    layer norms or heads, targets off AdapterHub's locations, a bottleneck size no reduction factor gives)."""
    config = peft_model.peft_config.get(adapter_name) if hasattr(peft_model, "peft_config") else None
    if not isinstance(config, BottleneckConfig):
        raise AdapterFileError(
            f"adapter {adapter_name!r} is not a bottleneck adapter; AdapterHub's layout holds bottleneck adapters only"
        )
    if config.modules_to_save:
        raise AdapterFileError(
            f"adapter {adapter_name!r} trains whole modules ({', '.join(config.modules_to_save)}), which "
            "AdapterHub's bottleneck files cannot hold; use train_layer_norms=False and no modules_to_save, or "
            "save_pretrained (peftkit's / HF PEFT's layout)"
        )
    model = peft_model.base_model.model
    model_type = family(model)
    hidden = getattr(model.config, "hidden_size", None)
    tensors: dict[str, torch.Tensor] = {}
    locations: dict[str, set[int]] = {}
    sizes: set[int] = set()
    for path, layer in adapter_layers(model):
        if not isinstance(layer, BottleneckLayer) or adapter_name not in layer.scaling:
            continue
        container, location = _container_for(model_type, logical_path(path))
        index = int(re.findall(r"\.(\d+)\.", f".{path}.")[-1])
        locations.setdefault(location, set()).add(index)
        down, up = layer.adapter_down[adapter_name], layer.adapter_up[adapter_name]
        sizes.add(down.out_features)
        base = f"{container}.adapters.{adapter_name}"
        tensors.update({f"{base}.adapter_down.0.weight": down.weight, f"{base}.adapter_down.0.bias": down.bias,
                        f"{base}.adapter_up.weight": up.weight, f"{base}.adapter_up.bias": up.bias})
    n_layers = getattr(model.config, "num_hidden_layers", None)
    leave_out = sorted(set(range(n_layers or 0)) - set().union(*locations.values())) if locations else []
    if len({frozenset(v) for v in locations.values()}) > 1 or len(sizes) != 1 or hidden is None:
        raise AdapterFileError(
            f"adapter {adapter_name!r} is not on the same layers at each location with one bottleneck size, which "
            "is all an AdapterHub config can say; save it with save_pretrained instead"
        )
    m = sizes.pop()
    reduction = config.reduction_factor if max(1, int(hidden // config.reduction_factor)) == m else hidden / m
    if max(1, int(hidden // reduction)) != m:
        raise AdapterFileError(f"no AdapterHub reduction factor gives bottleneck size {m} for hidden size {hidden}")
    options = {**_BN_DEFAULTS, "mh_adapter": "mh_adapter" in locations, "output_adapter": "output_adapter" in locations,
               "reduction_factor": reduction, "non_linearity": config.non_linearity,
               "original_ln_before": bool(config.original_ln_before), "scaling": float(config.scaling),
               "dropout": float(config.dropout), "init_weights": config.init_weights, "leave_out": leave_out}
    data = {"config": options, "hidden_size": hidden, "model_class": type(model).__name__, "model_name": "",
            "model_type": model_type, "name": adapter_name, "version": VERSION}
    # each file whole (written aside, then renamed), weights before config, as AdapterHub writes them
    weights = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(os.path.join(save_directory, SAFE_WEIGHTS_NAME), weights)
    atomic_write_bytes(os.path.join(save_directory, CONFIG_NAME), json.dumps(data, indent=2, sort_keys=True).encode())


def _container_for(model_type: str | None, target: str) -> tuple[str, str]:
    for container_pattern, target_pattern, location in LOCATIONS.get(model_type or "", ()):
        # invert "container -> target": the target pattern with the container's group in front
        suffix = target_pattern.removeprefix("\\1")
        if target.endswith(suffix):
            container = target[: -len(suffix)] + container_pattern.split(")", 1)[1].replace("\\", "")
            if re.fullmatch(container_pattern, container):
                return container, location
    raise AdapterFileError(
        f"target {target!r} is not one of AdapterHub's adapter locations for {model_type} models (the attention "
        "and feed-forward output projections); save it with save_pretrained instead"
    )


# ---- either layout ----------------------------------------------------------------------------------
def read_folder(
    folder: str, model: nn.Module, config: PeftConfig | None = None
) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder in HF PEFT's layout or AdapterHub's (recognised by its config's schema), as a config
    and tensors under HF PEFT's keys. ``config`` given: it is used and the folder must be HF PEFT's layout."""
    if config is None and is_adapterhub_folder(folder):
        return read_adapterhub(folder, model)
    config = config or PeftConfig.from_pretrained(folder)
    return config, read_adapter_weights(folder)  # fails on a corrupt file before the model is touched
