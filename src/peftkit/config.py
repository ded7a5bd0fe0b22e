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
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import AdapterFileError, PeftConfigError, PeftError
from .fsutil import atomic_write_bytes, folder_target_problem, not_regular

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


_REGISTRY: dict[str, type[PeftConfig]] = {}


def register_config(cls: type[PeftConfig]) -> type[PeftConfig]:
    """Class decorator: make a config loadable by its ``peft_type``."""
    _REGISTRY[cls.PEFT_TYPE] = cls
    return cls


def known_peft_types() -> list[str]:
    return sorted(_REGISTRY)


def config_class_for(peft_type: str) -> type[PeftConfig]:
    key = str(peft_type).upper()
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

    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None

    @property
    def peft_type(self) -> str:
        return self.PEFT_TYPE

    def __post_init__(self) -> None:
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
        data = dict(data)
        peft_type = data.pop("peft_type", None) or cls.PEFT_TYPE
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
        except json.JSONDecodeError as exc:
            raise PeftConfigError(f"{os.fspath(path)!r} is not valid JSON ({exc}); the file is corrupt") from None
        if not isinstance(data, dict):
            raise PeftConfigError(f"{os.fspath(path)!r} must hold a JSON object")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> PeftConfig:
        return cls.from_json_file(os.path.join(folder, CONFIG_NAME))

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
