"""The run description of ``peftkit train``: a YAML file with four sections, checked in full before work.

    model:      {name: minilm | smollm2 | <transformers folder>, task: classification | causal_lm, ...}
    method:     {name: lora | dora | vera | ... , <any field of that method's config>}
    data:       {train: <file or embedded name>, format: classification | text | instruction, ...}
    training:   {lr, schedule, epochs | max_steps, batch_size, grad_accum, seed, eval_every, ...,
                 distributed: {strategy: ddp | fsdp, activation_checkpointing, mixed_precision, cpu_offload}}

Every problem (unknown key, wrong type, missing file, unknown method or method field) is collected with
its YAML path and reported together in one :class:`SpecError`, so a user fixes the file in one pass.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PeftError

EMBEDDED_MODELS = ("minilm", "smollm2")
EMBEDDED_DATA = ("bbc_news", "chatterbot")


class SpecError(PeftError):
    """One or more problems in a run config; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s), nothing was run:\n{lines}")


@dataclass
class ModelSpec:
    name: str = "minilm"
    """An embedded model (minilm, smollm2) or a local transformers model folder."""
    task: str | None = None
    """classification | causal_lm; None picks from the model (minilm: classification, else causal_lm)."""
    gguf_file: str | None = None
    dtype: str = "float32"
    max_length: int = 128
    gradient_checkpointing: bool = False
    pooling: str = "cls"
    """classification only: "cls" (the model's own head) or "mean" (masked mean of the last hidden states)."""


@dataclass
class MethodSpec:
    name: str = "lora"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    train: str = "bbc_news"
    """A local .jsonl / .csv / .txt file, or an embedded set: bbc_news, chatterbot."""
    eval: str | None = None
    format: str | None = None
    """classification | text | instruction; None picks from the task and the embedded set."""
    eval_fraction: float = 0.2
    text_field: str = "text"
    label_field: str = "label"
    prompt_field: str = "prompt"
    response_field: str = "response"
    template: str = "{prompt}\n"
    """Instruction format: the prompt template; the loss covers only the response that follows it."""
    chat_template: bool = True
    """Instruction format: use the tokenizer's chat template when it has one (instead of ``template``)."""
    max_train: int | None = None
    max_eval: int | None = None
    seed: int = 0


@dataclass
class DistributedSpec:
    """How ``torchrun`` processes share the work (one process ignores it, but for fsdp's checkpoint format)."""

    strategy: str = "ddp"
    """ddp: every process holds the whole model; fsdp: the base and the adapters sharded (FSDP2)."""
    activation_checkpointing: bool = False
    """fsdp: recompute each transformer block's activations in backward."""
    mixed_precision: str | None = None
    """fsdp: "bf16" computes in bf16 and reduces gradients in fp32; null keeps the model's dtype."""
    cpu_offload: bool = False
    """fsdp on GPUs: keep the shards in CPU memory, on the GPU only while used."""


STRATEGIES = ("ddp", "fsdp")
FSDP_REFUSED = {
    "head": "it trains a classifier on features cached once by a single forward pass, nothing worth sharding",
    "delta_lora": "its step-K snapshot of A and B lives outside the module's parameters, where FSDP cannot shard it",
}
"""Methods strategy fsdp refuses, and why (the fix: strategy ddp)."""


@dataclass
class TrainingSpec:
    lr: float | None = None
    """None: the method's recommended rate (peftkit.train.methods)."""
    schedule: str = "linear"
    warmup_steps: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    loraplus_lr_ratio: float | None = None
    head_lr: float | None = None
    """Learning rate of trained heads (modules_to_save); None: the same as ``lr``."""
    seed: int = 0
    eval_every: int | None = None
    """Evaluate every N optimizer steps (and always at the end); None: only at the end."""
    save_every: int | None = None
    keep_last: int = 2
    log_every: int = 10
    output_dir: str = "runs/peftkit"
    eval_batch_size: int = 32
    distributed: DistributedSpec = field(default_factory=DistributedSpec)


SCHEDULES = ("linear", "cosine", "constant")
TASKS = ("classification", "causal_lm")
FORMATS = ("classification", "text", "instruction")


@dataclass
class RunSpec:
    model: ModelSpec = field(default_factory=ModelSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    quantization: dict[str, Any] | None = None
    base_dir: str = "."
    """Folder relative paths in the YAML file are resolved against (the file's folder); ``--set`` paths are
    relative to the current directory (made absolute by :func:`command_line_path`)."""

    def resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": dataclasses.asdict(self.model),
            "method": {"name": self.method.name, **self.method.options},
            "data": dataclasses.asdict(self.data),
            "training": dataclasses.asdict(self.training),
        }
        if self.quantization:
            out["quantization"] = dict(self.quantization)
        return out


# ---- parsing ------------------------------------------------------------------------------------


def _type_ok(value: Any, hint: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for the small set of types the spec uses."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, coerced = _type_ok(value, option)
            if ok:
                return True, coerced
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if hint is str:
        return isinstance(value, str), value
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return True, value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _section(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            problems.append(f"{path}.{key}: unknown key (known: {', '.join(sorted(known))})")
            continue
        if dataclasses.is_dataclass(hints[key]):  # a nested section (training.distributed)
            kwargs[key] = _section(hints[key], value, f"{path}.{key}", problems)
            continue
        ok, coerced = _type_ok(value, hints[key])
        if not ok:
            problems.append(f"{path}.{key}: expected {_type_name(hints[key])}, got {value!r}")
            continue
        kwargs[key] = coerced
    return cls(**kwargs)


def _nonfinite_floats(section: Any, path: str, problems: list[str]) -> None:
    """NaN / infinity in any float field (``lr: .nan`` compares false with every bound, so it must be named)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{path}.{f.name}: must be a finite number, got {value}")


def _check_method_options(entry: Any, options: dict[str, Any], problems: list[str]) -> None:
    """Type-check the method's options against its config class (``r: four``), every field, before any
    model loads; when every type fits, build the config once so its own checks (ranges, choices) run too."""
    cls = entry.config_class()
    if cls is None:
        return
    hints = typing.get_type_hints(cls)
    allowed = entry.option_names()
    bad = False
    for key, value in options.items():
        if key not in allowed:
            problems.append(f"method.{key}: not a field of {entry.name}'s config "
                            f"({', '.join(sorted(allowed)) or 'it has none'})")
            bad = True
            continue
        hint = hints.get(key)
        if hint is not None and _checkable(hint):
            ok, coerced = _type_ok(value, hint)
            if not ok:
                problems.append(f"method.{key}: expected {_type_name(hint)}, got {value!r}")
                bad = True
            elif isinstance(coerced, float) and not math.isfinite(coerced):
                problems.append(f"method.{key}: must be a finite number, got {coerced}")
                bad = True
            else:
                options[key] = coerced  # YAML reads 1e-3 as a string: the config gets the number
    if bad:
        return
    try:
        entry.make_config("causal_lm", options, None)
    except Exception as exc:  # noqa: BLE001 - any refusal of the config class is a problem of the file
        problems.append(f"method: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def _checkable(hint: Any) -> bool:
    """Whether ``_type_ok`` understands every part of ``hint`` (lists, Any, classes: left to the config)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return all(_checkable(h) for h in typing.get_args(hint))
    return hint in (int, float, bool, str, type(None))


def _check_values(spec: RunSpec, problems: list[str]) -> None:
    from .methods import METHODS, method_entry

    m, d, t = spec.model, spec.data, spec.training
    if m.task is not None and m.task not in TASKS:
        problems.append(f"model.task: {m.task!r} is not one of {', '.join(TASKS)}")
    from ..hub import is_hub_id

    if m.name not in EMBEDDED_MODELS and not os.path.isdir(spec.resolve(m.name)) and not is_hub_id(m.name):
        problems.append(
            f"model.name: {m.name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}) "
            "nor an existing transformers model folder nor a Hub id (org/name)"
        )
    if m.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"model.dtype: {m.dtype!r} is not one of float32, bfloat16, float16")
    if m.pooling not in ("cls", "mean"):
        problems.append(f"model.pooling: {m.pooling!r} is not one of cls, mean")
    if m.max_length <= 0:
        problems.append(f"model.max_length: must be positive, got {m.max_length}")
    if spec.method.name not in METHODS:
        problems.append(f"method.name: unknown method {spec.method.name!r}; known: {', '.join(METHODS)}")
    else:
        _check_method_options(method_entry(spec.method.name), spec.method.options, problems)
    for section, path in ((m, "model"), (d, "data"), (t, "training")):
        _nonfinite_floats(section, path, problems)
    for name in ("train", "eval"):
        value = getattr(d, name)
        if value is not None and value not in EMBEDDED_DATA and not os.path.isfile(spec.resolve(value)):
            problems.append(
                f"data.{name}: file not found: {spec.resolve(value)!r} "
                f"(give a .jsonl/.csv/.txt file or one of {', '.join(EMBEDDED_DATA)})"
            )
    if d.format is not None and d.format not in FORMATS:
        problems.append(f"data.format: {d.format!r} is not one of {', '.join(FORMATS)}")
    if not 0.0 < d.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction: must be between 0 and 1, got {d.eval_fraction}")
    if t.schedule not in SCHEDULES:
        problems.append(f"training.schedule: {t.schedule!r} is not one of {', '.join(SCHEDULES)}")
    for name in ("batch_size", "grad_accum", "keep_last", "log_every", "eval_batch_size"):
        if getattr(t, name) <= 0:
            problems.append(f"training.{name}: must be positive, got {getattr(t, name)}")
    for name in ("max_steps", "eval_every", "save_every"):
        value = getattr(t, name)
        if value is not None and value <= 0:
            problems.append(f"training.{name}: must be positive or null, got {value}")
    for name in ("lr", "head_lr"):
        value = getattr(t, name)
        if value is not None and math.isfinite(value) and value <= 0:
            problems.append(f"training.{name}: must be positive, got {value}")
    if t.max_grad_norm is not None and math.isfinite(t.max_grad_norm) and t.max_grad_norm <= 0:
        problems.append(f"training.max_grad_norm: must be positive or null, got {t.max_grad_norm}")
    if math.isfinite(t.weight_decay) and t.weight_decay < 0:
        problems.append(f"training.weight_decay: must be 0 or more, got {t.weight_decay}")
    if t.epochs <= 0 and t.max_steps is None:
        problems.append("training.epochs: must be positive (or set training.max_steps)")
    if t.loraplus_lr_ratio is not None and t.loraplus_lr_ratio <= 0:
        problems.append(f"training.loraplus_lr_ratio: must be positive, got {t.loraplus_lr_ratio}")
    _check_distributed(spec, problems)


def _check_distributed(spec: RunSpec, problems: list[str]) -> None:
    d = spec.training.distributed
    if d.strategy not in STRATEGIES:
        problems.append(f"training.distributed.strategy: {d.strategy!r} is not one of {', '.join(STRATEGIES)}")
        return
    from ..distributed import MIXED_PRECISION

    if d.mixed_precision is not None and d.mixed_precision not in MIXED_PRECISION:
        problems.append(f"training.distributed.mixed_precision: {d.mixed_precision!r} is not one of "
                        f"{', '.join(MIXED_PRECISION)} or null")
    if d.strategy == "ddp":
        for name, hint in (("activation_checkpointing", "model.gradient_checkpointing"),
                           ("mixed_precision", "model.dtype"), ("cpu_offload", None)):
            if getattr(d, name) not in (None, False):
                problems.append(f"training.distributed.{name}: applies to strategy fsdp; set strategy: fsdp"
                                + (f", or use {hint} with ddp" if hint else ""))
        return
    if spec.method.name in FSDP_REFUSED:
        problems.append(f"training.distributed.strategy: fsdp cannot train method {spec.method.name!r}: "
                        f"{FSDP_REFUSED[spec.method.name]}; use strategy ddp")
    if d.activation_checkpointing and spec.method.name == "prefix":
        problems.append("training.distributed.activation_checkpointing: prefix tuning keeps its prefixes in the "
                        "key/value cache, which checkpointing turns off; drop activation_checkpointing for prefix")
    quant = spec.quantization if isinstance(spec.quantization, dict) else {}
    if quant.get("method") == "int8":
        problems.append("training.distributed.strategy: fsdp cannot shard an int8 base (torchao's Int8Tensor has no "
                        "FSDP2 all-gather hooks); use quantization method nf4, or strategy ddp")


def parse_spec(data: Any, base_dir: str = ".", source: str = "config") -> RunSpec:
    """Build a :class:`RunSpec` from a parsed YAML mapping, or raise :class:`SpecError` with every problem."""
    problems: list[str] = []
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError([f"the top level must be a mapping with model/method/data/training, got {type(data).__name__}"], source)
    known = {"model", "method", "data", "training", "quantization"}
    for key in data:
        if key not in known:
            problems.append(f"{key}: unknown section (known: {', '.join(sorted(known))})")
    method_data = data.get("method") or {}
    if isinstance(method_data, str):
        method_data = {"name": method_data}
    if not isinstance(method_data, dict):
        problems.append(f"method: expected a mapping or a method name, got {type(method_data).__name__}")
        method_data = {}
    method_data = dict(method_data)
    name = method_data.pop("name", "lora")
    if not isinstance(name, str):
        problems.append(f"method.name: expected str, got {name!r}")
        name = "lora"
    quant = data.get("quantization")
    if quant is not None and not isinstance(quant, dict | str):
        problems.append(f"quantization: expected a mapping such as {{method: nf4}}, got {quant!r}")
        quant = None
    if isinstance(quant, str):
        quant = {"method": quant}
    spec = RunSpec(
        model=_section(ModelSpec, data.get("model"), "model", problems),
        method=MethodSpec(name=name, options=method_data),
        data=_section(DataSpec, data.get("data"), "data", problems),
        training=_section(TrainingSpec, data.get("training"), "training", problems),
        quantization=quant,
        base_dir=base_dir,
    )
    _check_values(spec, problems)
    if problems:
        raise SpecError(problems, source)
    return spec


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``--set training.lr=1e-4 --set method.r=16``: values are parsed as YAML (numbers, lists, null)."""
    import yaml

    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. training.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else {"name": node[part]} if part == "method" else node[part]
            if not isinstance(node[part], dict):
                problems.append(f"--set {key}: {part} is not a section")
                break
            node = node[part]
        else:
            node[parts[-1]] = command_line_path(key.strip(), value)
    if problems:
        raise SpecError(problems, "command line")
    return data


def command_line_path(key: str, value: Any) -> Any:
    """A relative path given with ``--set`` is relative to the current directory, as in every command line
    (a path inside the YAML file is relative to the file's folder: see :meth:`RunSpec.resolve`), so it is
    made absolute here. Names that are not paths stay as they are: an embedded model or data set (unless a
    file of that name is here) and a Hub id (org/name) that is not a local folder."""
    if not isinstance(value, str) or not value or os.path.isabs(value):
        return value
    if key == "training.output_dir":
        return os.path.abspath(value)
    if key == "model.name":
        from ..hub import is_hub_id

        if value in EMBEDDED_MODELS or is_hub_id(value):
            return value
        return os.path.abspath(value)
    if key in ("data.train", "data.eval"):
        return value if value in EMBEDDED_DATA and not os.path.isfile(value) else os.path.abspath(value)
    return value


def _unique_key_loader() -> type:
    """A SafeLoader that refuses a key given twice in one mapping, at any depth (plain YAML keeps the last
    one silently: two ``training:`` blocks would drop the first)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override what it merges
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the base class reports it
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {first}, again at line {line}); "
                            "keep one and merge the two", key_node.start_mark)
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with duplicate keys refused; a syntax error becomes one :class:`SpecError`."""
    import yaml

    try:
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([f"not valid YAML{where}: {getattr(exc, 'problem', exc)}"], source) from None


def load_spec(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunSpec:
    """Read a YAML run config (None: all defaults, i.e. the demo), apply ``--set`` overrides, check it."""
    data: Any = {}
    base_dir = "."
    source = "defaults"
    if path is not None:
        source = os.fspath(path)
        p = Path(path)
        if not p.is_file():
            raise SpecError([f"config file not found: {source!r}"], source)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SpecError(["not UTF-8 text; save the config as UTF-8"], source) from None
        data = read_yaml(text, source)
        if data is None:  # an empty file (or only comments) is a mistake, not "all defaults"
            raise SpecError(["the file is empty; give at least model/method/data/training sections "
                             "(see examples/configs/)"], source)
        base_dir = str(p.parent)
    if not isinstance(data, dict):
        raise SpecError([f"the top level must be a mapping with model/method/data/training, got "
                         f"{type(data).__name__}"], source)
    data = apply_overrides(data, overrides or [])
    return parse_spec(data, base_dir, source)
