"""Adapter configs: the base class, JSON in/out, and the registry of methods by ``peft_type``.

Every method's config is a dataclass deriving from :class:`PeftConfig`. HF PEFT writes about 40 keys
into an ``adapter_config.json``; loading one here follows a strict rule:

* keys that do not change the maths (bookkeeping such as ``peft_version`` or ``revision``) are accepted;
* keys for features peftkit does not implement are accepted only at their "off" value (``None``,
  ``False``, ``{}``, ``[]``); any other value is refused *by name* — never silently ignored;
* an unknown ``peft_type`` is refused with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import AdapterFileError, PeftConfigError, PeftError
from .fsutil import atomic_write_bytes, folder_target_problem, not_regular
from .patterns import check_pattern

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class TaskType(enum.StrEnum):
    """HF PEFT's task types (the string values are what the JSON files hold)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Names of classification heads that SEQ_CLS adds to modules_to_save, as HF PEFT does.
SEQ_CLS_HEAD_NAMES = ("classifier", "score")

# Keys that never change the maths: accepted and dropped on load.
BOOKKEEPING_KEYS = frozenset(
    {"peft_version", "auto_mapping", "revision", "base_model_name_or_path", "megatron_core"}
)


def _is_off(value: Any) -> bool:
    """The "feature not used" value of an unimplemented option."""
    return value is None or value is False or (isinstance(value, dict | list | tuple | set) and not value)


# ---- field types, checked generically from the dataclass annotations ---------------------------------
# JSON gives strings, numbers, bools, lists, objects and null; a wrong one must not slip through (the string
# "false" is truthy, NaN compares False with everything). Every field of every method is checked against its
# annotation before the method's own checks run, so a new method's config gets this for free.


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    """'an integer', 'a list of strings', ... for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0]).split(' ', 1)[-1]}s" if args else "a list"
    if origin is dict or tp is dict:
        return "an object (dict)" if not args else f"an object mapping {_type_name(args[0]).split(' ', 1)[-1]}s " \
            f"to {_type_name(args[1]).split(' ', 1)[-1]}s"
    return {bool: "a bool (true/false)", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null (None)"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(fits, value as stored): whether ``value`` is of annotation ``tp``. An integral float fits an int field
    (16.0 -> 16), a tuple or set fits a list field; nothing else is converted."""
    if tp is Any:
        return True, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            fits, converted = _coerce(value, arg)
            if fits:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool), value  # finiteness: below
    if tp is str:
        return isinstance(value, str), value
    if origin is list or tp is list:
        if not isinstance(value, list | tuple | set | frozenset):
            return False, value
        items = sorted(value) if isinstance(value, set | frozenset) else list(value)
        if not args:
            return True, items
        out = []
        for item in items:
            fits, item = _coerce(item, args[0])
            if not fits:
                return False, value
            out.append(item)
        return True, out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            return False, value
        if not args:
            return True, value
        out_d = {}
        for k, v in value.items():
            fits_k, k = _coerce(k, args[0])
            fits_v, v = _coerce(v, args[1])
            if not (fits_k and fits_v):
                return False, value
            out_d[k] = v
        return True, out_d
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value  # an annotation this checker does not know: the method's own checks apply


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list | tuple):
        return any(_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return False


def _element_problem(value: Any, tp: Any) -> tuple[str, Any, Any] | None:
    """For a list/dict value of the right container type: the first element that does not fit, as
    (``"[key]"``, element, its expected type), so the message names ``rank_pattern['q']``, not the dict."""
    for arg in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,):
        origin, args = typing.get_origin(arg), typing.get_args(arg)
        if origin is dict and isinstance(value, dict) and args:
            for k, v in value.items():
                if not _coerce(k, args[0])[0]:
                    return f" key {k!r}", k, args[0]
                if not _coerce(v, args[1])[0]:
                    return f"[{k!r}]", v, args[1]
        if origin is list and isinstance(value, list | tuple) and args:
            for i, v in enumerate(value):
                if not _coerce(v, args[0])[0]:
                    return f"[{i}]", v, args[0]
    return None


def _huge_int(value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return not -(2**63) <= value < 2**63
    if isinstance(value, list | tuple):
        return any(_huge_int(v) for v in value)
    if isinstance(value, dict):
        return any(_huge_int(v) for v in value.values())
    return False


def check_field_types(config: PeftConfig) -> None:
    """Every field against its annotation (bool takes a JSON bool, int an integer, float a finite number, list
    and dict fields their element types); refuses with the field, the value, the expected type and a fix."""
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        tp = hints.get(f.name, Any)
        value = getattr(config, f.name)
        fits, converted = _coerce(value, tp)
        if not fits:
            element = _element_problem(value, tp)
            name = f.name
            if element is not None:
                suffix, value, tp = element
                name += suffix
            hint = ""
            if isinstance(value, str) and value.lower() in ("true", "false") and _coerce(True, tp)[0]:
                hint = f" (write {value.lower()} without quotes)"
            elif isinstance(value, str) and _coerce([value], tp)[0]:
                hint = f" (for one name write [{value!r}])"
            raise PeftConfigError(
                f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__}){hint}; fix it in the "
                f"{config.PEFT_TYPE or type(config).__name__} config"
            )
        if _huge_int(converted):
            raise PeftConfigError(
                f"{f.name}={value!r} does not fit in 64 bits; no size or seed is that large: fix the "
                f"{config.PEFT_TYPE or type(config).__name__} config"
            )
        if _non_finite(converted):
            raise PeftConfigError(
                f"{f.name} must be a finite number, got {value!r}; NaN/Infinity make the outputs NaN or silently "
                f"wrong: give a finite value in the {config.PEFT_TYPE or type(config).__name__} config"
            )
        if converted is not value:
            object.__setattr__(config, f.name, converted)


# Fields that hold regular expressions, and the regex each is embedded in where it is used.
PATTERN_FIELDS: dict[str, str] = {
    "target_modules": "{}", "exclude_modules": "{}", "feedforward_modules": "{}",
    "layers_pattern": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.",
}
PATTERN_KEY_FIELDS: dict[str, str] = {"rank_pattern": r"(.*\.)?({})$", "alpha_pattern": r"(.*\.)?({})$"}


def check_patterns(config: PeftConfig) -> None:
    """Every regex a config holds compiles and matches module names in bounded time (see patterns.py)."""
    for name, used_as in PATTERN_FIELDS.items():
        value = getattr(config, name, None)
        if name == "layers_pattern" and isinstance(value, list):
            for item in value:
                check_pattern(item, name, used_as)
        elif isinstance(value, str) and value.lower() != "all-linear":
            check_pattern(value, name, used_as)
    for name, used_as in PATTERN_KEY_FIELDS.items():
        for key in getattr(config, name, None) or {}:
            check_pattern(key, f"{name} key", used_as)


_REGISTRY: dict[str, type[PeftConfig]] = {}
_C = typing.TypeVar("_C", bound="type[PeftConfig]")


def register_config(cls: _C) -> _C:
    """Class decorator: make a config loadable by its ``peft_type``."""
    _REGISTRY[cls.PEFT_TYPE] = cls
    return cls


def _load_configs() -> None:
    """Fill the registry: each config module registers its classes when imported. ``import peftkit`` loads
    nothing (so the command line starts fast), hence the first lookup imports them all: ``peftkit.configs``,
    which needs no torch (``peftkit inspect`` reads a file's config without it; the layers register the same
    classes again when ``peftkit.methods`` loads)."""
    import importlib

    importlib.import_module("peftkit.configs")


def known_peft_types() -> list[str]:
    _load_configs()
    return sorted(_REGISTRY)


def config_class_for(peft_type: str) -> type[PeftConfig]:
    key = str(peft_type).upper()
    if key not in _REGISTRY:
        _load_configs()
    if key not in _REGISTRY:
        raise PeftConfigError(
            f"unknown peft_type {peft_type!r}; peftkit knows: {', '.join(known_peft_types())}. "
            "Fix the 'peft_type' in adapter_config.json or use one of these methods."
        )
    return _REGISTRY[key]


@dataclass
class PeftConfig:
    """Fields shared by every method (HF PEFT's names)."""

    PEFT_TYPE: ClassVar[str] = ""
    # Options of HF PEFT's config that peftkit does not implement: accepted only when "off".
    UNSUPPORTED_KEYS: ClassVar[frozenset[str]] = frozenset()
    # Values for keys a file lacks, where the field's default changed after files were written without it.
    FILE_DEFAULTS: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None

    @property
    def peft_type(self) -> str:
        return self.PEFT_TYPE

    def __post_init__(self) -> None:
        check_field_types(self)
        check_patterns(self)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None:
            valid = {t.value for t in TaskType}
            if self.task_type not in valid:
                raise PeftConfigError(
                    f"unknown task_type {self.task_type!r}; use one of {sorted(valid)} or None"
                )
        self._check_targeting_fields()

    def _check_targeting_fields(self) -> None:
        """What every targeting method's config shares: module-name sets become sorted lists (as JSON holds
        them), layers_pattern needs layers_to_transform (which needs a list of names), and SEQ_CLS trains the
        classification head through modules_to_save, as HF PEFT does."""
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            if isinstance(getattr(self, name, None), set | tuple):
                setattr(self, name, sorted(getattr(self, name)))
        if getattr(self, "layers_pattern", None) and getattr(self, "layers_to_transform", None) is None:
            raise PeftConfigError("layers_pattern needs layers_to_transform; set both or neither")
        if isinstance(getattr(self, "target_modules", None), str) and getattr(self, "layers_to_transform", None) is not None:
            raise PeftConfigError("layers_to_transform cannot be used with a regex target_modules; give a list of names")
        if self.task_type == "SEQ_CLS" and hasattr(self, "modules_to_save"):
            extra = [h for h in SEQ_CLS_HEAD_NAMES if h not in (self.modules_to_save or [])]
            self.modules_to_save = list(self.modules_to_save or []) + extra

    def refuse_target(self, module) -> str | None:
        """Why this config cannot adapt ``module`` (checked for every target before the model changes),
        or None. Method options narrow what the method's layers support (DoRA: Linear/Conv1D only)."""
        return None

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("local"):
                continue  # a run-time option (like HF PEFT's get_peft_model arguments), not part of the file
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        out["peft_type"] = self.PEFT_TYPE
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the right config class from a dict (an adapter_config.json's content)."""
        if not isinstance(data, dict):
            raise PeftConfigError(
                f"an adapter config must be a JSON object (a dict), got {type(data).__name__}; is this an "
                "adapter_config.json?"
            )
        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.PEFT_TYPE
        if peft_type and not isinstance(peft_type, str):
            raise PeftConfigError(f"peft_type must be a string such as \"LORA\", got {peft_type!r}")
        if not peft_type:
            raise PeftConfigError("adapter config has no 'peft_type'; add e.g. \"peft_type\": \"LORA\"")
        target = config_class_for(peft_type)
        if cls is not PeftConfig and target is not cls and not issubclass(target, cls):
            raise PeftConfigError(
                f"config is for peft_type {peft_type!r}, not {cls.PEFT_TYPE!r}; read it with "
                f"{target.__name__} or PeftConfig.from_pretrained (which picks the class from the file)"
            )
        names = {f.name for f in dataclasses.fields(target)}
        kwargs: dict[str, Any] = {}
        refused: list[str] = []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key in BOOKKEEPING_KEYS:
                continue
            elif _is_off(value):
                continue  # an option peftkit lacks, but switched off: the maths is unchanged
            elif key in target.UNSUPPORTED_KEYS:
                refused.append(f"{key}={value!r}")
            else:
                refused.append(f"{key}={value!r} (unknown key)")
        for key, value in target.FILE_DEFAULTS.items():
            kwargs.setdefault(key, value)
        if refused:
            raise PeftConfigError(
                f"{target.PEFT_TYPE} config uses options peftkit does not implement: {', '.join(refused)}; "
                "they would change the adapter's maths, so the file cannot be loaded faithfully. "
                "Remove them (or set them to null/false) only if the adapter was trained without them."
            )
        return target(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        if (kind := not_regular(path)) is not None:  # a FIFO would block the read forever
            raise AdapterFileError(f"{os.fspath(path)!r} is {kind}, not a regular file; replace it with the saved file")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise PeftConfigError(f"no {CONFIG_NAME} at {os.fspath(path)!r}; is this an adapter folder?") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise PeftConfigError(
                f"{os.fspath(path)!r} is not valid JSON in UTF-8 ({str(exc).splitlines()[0][:120]}); the file is corrupt"
            ) from None
        except OSError as exc:
            raise PeftConfigError(f"cannot read {os.fspath(path)!r} ({exc.strerror or exc}); is this an adapter "
                                  "folder?") from None
        if not isinstance(data, dict):
            raise PeftConfigError(
                f"{os.fspath(path)!r} must hold a JSON object (keys like \"peft_type\"), not a {type(data).__name__}"
            )
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, subfolder: str | None = None, **kwargs: Any) -> PeftConfig:
        """Read ``adapter_config.json`` of a folder, or of a Hub id (``revision``, ``token``, ``cache_dir``,
        ``local_files_only`` as in HF PEFT; see :func:`peftkit.hub.resolve_adapter`)."""
        from .hub import HUB_KEYWORDS, resolve_adapter

        hub = {k: v for k, v in kwargs.items() if k in HUB_KEYWORDS and k != "subfolder"}
        return cls.from_json_file(os.path.join(resolve_adapter(folder, subfolder, **hub), CONFIG_NAME))

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        if (problem := folder_target_problem(folder)) is not None:
            raise PeftError(f"cannot write to {os.fspath(folder)!r}: {problem}; choose another path")
        atomic_write_bytes(os.path.join(folder, CONFIG_NAME), self.to_json_string().encode())

    def copy(self, **changes: Any) -> PeftConfig:
        return dataclasses.replace(self, **changes)


def list_field(default: Any = None) -> Any:
    """A dataclass field whose default is a fresh copy of a mutable value."""
    if default is None:
        return field(default=None)
    return field(default_factory=lambda: type(default)(default))
