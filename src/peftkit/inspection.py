"""``peftkit inspect DIR``: what an adapter folder holds, read from its files alone (no model needed).

Works on peftkit's and HF PEFT's folders, on sub-folders of named adapters, and on a ``peftkit train``
run folder or checkpoint (their ``adapter/``)."""

from __future__ import annotations

import json
import os
from typing import Any

from .config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig
from .errors import AdapterFileError
from .tensorfile import read_header, require_regular_file

# Path components that start an adapter's own tensors inside a module (HF PEFT's and peftkit's names).
_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
            "vera_lambda_b", "vera_lambda_d", "ia3_l", "adapter_down", "adapter_up", "adapter_norm",
            "prompt_embeddings", "prompt_encoder", "bias_delta", "beft")
_FROZEN = ("vera_A", "vera_B")
_PREFIX = "base_model.model."


def _module_of(key: str) -> tuple[str, str]:
    path = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part in _MARKERS or part.startswith(_MARKERS):
            return ".".join(parts[:i]) or "(model)", ".".join(parts[i:])
    return ".".join(parts[:-1]) or "(model)", parts[-1]


def _adapter_folders(folder: str) -> list[tuple[str, str]]:
    found = []
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        found.append(("default", folder))
    for entry in sorted(os.listdir(folder)):
        sub = os.path.join(folder, entry)
        if os.path.isdir(sub) and os.path.isfile(os.path.join(sub, CONFIG_NAME)):
            found.append((entry, sub))
    return found


def _run_base_model(folder: str) -> str | None:
    """The base model a ``peftkit train`` run recorded in ``peftkit_run.json`` (adapters saved before the run
    wrote it into adapter_config.json too)."""
    try:
        with open(os.path.join(folder, "peftkit_run.json"), encoding="utf-8") as fh:
            base = json.load(fh).get("base_model")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) else None


def describe_one(name: str, folder: str) -> dict[str, Any]:
    """One adapter folder, from its files alone and without torch: the config through the checks loading makes,
    the tensors' names, shapes and dtypes from the safetensors header (:mod:`peftkit.tensorfile`)."""
    for file_name in (CONFIG_NAME, WEIGHTS_NAME):
        require_regular_file(os.path.join(folder, file_name))  # a FIFO would block the read forever
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON in UTF-8 ({str(exc).splitlines()[0][:120]}); the file is corrupt") from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read {path} ({exc.strerror or exc})") from None
    PeftConfig.from_dict(config)  # the checks loading makes (types, finite values, regexes): one line if bad
    weights = os.path.join(folder, WEIGHTS_NAME)
    modules: dict[str, dict[str, list[int]]] = {}
    stored = frozen = 0
    dtypes: set[str] = set()
    if os.path.isfile(weights):
        for key, info in read_header(weights).items():
            n = info.numel
            dtypes.add(info.dtype)
            stored += n
            if key.rsplit(".", 1)[-1] in _FROZEN or any(f".{f}" in key for f in _FROZEN):
                frozen += n
            module, tensor = _module_of(key)
            modules.setdefault(module, {})[tensor] = info.shape
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    keys = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "lora_dropout", "num_virtual_tokens",
            "placement", "reduction_factor", "projection_prng_key", "feedforward_modules", "task_type")
    return {
        "name": name, "folder": folder, "peft_type": config.get("peft_type"),
        "base_model": config.get("base_model_name_or_path") or _run_base_model(folder),
        "key_config": {k: config[k] for k in keys if k in config and config[k] not in (None, [], {})},
        "config": config, "modules": modules, "n_modules": len(modules),
        "parameters": stored - frozen, "frozen_stored": frozen, "dtypes": sorted(dtypes), "bytes": size,
        "has_weights": os.path.isfile(weights),
    }


def describe(folder: str) -> dict[str, Any]:
    from .hub import resolve_adapter

    folder = resolve_adapter(folder)  # a Hub id: its cached snapshot (fetched once when online)
    if not os.path.isdir(folder):
        raise AdapterFileError(f"{folder!r} is not a folder; give an adapter folder (adapter_config.json inside)")
    run: dict[str, Any] = {}
    target = folder
    is_run = any(os.path.isfile(os.path.join(folder, f)) for f in ("summary.json", "run_config.yaml", "trainer_state.pt"))
    if os.path.isdir(os.path.join(folder, "adapter")) and (is_run or not _adapter_folders(folder)):
        target = os.path.join(folder, "adapter")  # a run folder or a checkpoint
        summary = os.path.join(folder, "summary.json")
        if os.path.isfile(summary):
            with open(summary, encoding="utf-8") as fh:
                run = json.load(fh)
    adapters = [describe_one(n, f) for n, f in _adapter_folders(target)]
    if not adapters:
        raise AdapterFileError(f"no {CONFIG_NAME} in {folder!r} or its sub-folders; is this an adapter folder?")
    return {"folder": folder, "adapters": adapters, "run": run}


def render(info: dict[str, Any], console: Any = None) -> None:
    """Tables for a terminal. Module names are never cut (q_proj / k_proj / v_proj would look alike): the
    module column is as wide as the longest name, and each tensor takes its own line in the other column."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for a in info["adapters"]:
        head = Table(title=f"adapter {a['name']!r} in {a['folder']}", show_header=False)
        head.add_column(style="bold")
        head.add_column()
        head.add_row("method (peft_type)", str(a["peft_type"]))
        head.add_row("base model", str(a["base_model"]))
        for k, v in a["key_config"].items():
            head.add_row(k, json.dumps(v) if not isinstance(v, str) else v)
        head.add_row("adapted modules", str(a["n_modules"]))
        head.add_row("trainable parameters", f"{a['parameters']:,}" + (
            f" (+{a['frozen_stored']:,} frozen projection values stored)" if a["frozen_stored"] else ""))
        head.add_row("dtypes", ", ".join(a["dtypes"]) or "-")
        head.add_row("size on disk", f"{a['bytes'] / 1024:,.1f} KiB")
        console.print(head)
        shapes = Table(title="tensors per module")
        rows = list(a["modules"].items())
        widest = max((len(m) for m, _ in rows[:40]), default=6)
        shapes.add_column("module", overflow="fold", min_width=min(widest, max(console.width - 24, 20)))
        shapes.add_column("tensors", overflow="fold")
        for module, tensors in rows[:40]:
            shapes.add_row(module, "\n".join(f"{t} {tuple(s)}" for t, s in tensors.items()))
        if len(rows) > 40:
            shapes.add_row(f"... {len(rows) - 40} more modules", "")
        console.print(shapes)
    if info["run"]:
        r = info["run"]
        console.print(f"run: method {r.get('method')}, {r.get('steps')} steps, eval {r.get('metrics')}")
