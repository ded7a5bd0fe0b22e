"""Adapters on the Hugging Face Hub: one resolution for every entry point, and upload with a model card.

``resolve_adapter`` turns what a user passes as an adapter (a local folder, or a Hub id ``org/name`` with
``revision`` / ``subfolder``) into a local folder. A Hub id goes through huggingface_hub's own
``snapshot_download`` into its cache, fetching only an adapter's files (never ``*.bin``, never a base
model's weights that share the repository) and reusing the cache; ``HF_HUB_OFFLINE=1`` and
``local_files_only=True`` read the cache alone. ``PeftModel.from_pretrained``, ``load_adapter``,
``PeftConfig.from_pretrained`` and the ``peftkit`` commands all call it, so an id means the same everywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

from .errors import AdapterFileError, PeftError

# the files of an adapter folder (peftkit's and HF PEFT's): nothing else is downloaded
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "prompt_encoder.safetensors",
                 "peftkit_run.json", "README.md")
# HF PEFT's keywords for where an adapter comes from (from_pretrained, load_adapter, PeftConfig.from_pretrained)
HUB_KEYWORDS = ("subfolder", "revision", "token", "cache_dir", "local_files_only")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_id(name: str) -> bool:
    """``org/name`` (huggingface_hub's repo id form) that is not an existing local path."""
    return HUB_ID.fullmatch(name) is not None and ".." not in name and not os.path.exists(name)


def _snapshot(name: str, kind: str, *, where: str, fetch: str, patterns: list[str], revision: str | None,
              token: str | bool | None, cache_dir: str | os.PathLike | None, local_files_only: bool = False,
              error: type[PeftError] = PeftError) -> str:
    """``snapshot_download`` of the files ``patterns`` name, with each of huggingface_hub's failures (missing
    package, not cached while offline, no such repository or revision, the network) turned into one line that
    names ``kind`` and ``where`` (the id, revision, subfolder) and, when the cache lacks it, the ``fetch`` command."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise PeftError(f"{kind} {name!r} is not a local folder; to load it from the Hugging Face Hub install "
                        "huggingface_hub (pip install \"peftkit[hf]\")") from None
    try:
        return snapshot_download(name, revision=revision, cache_dir=cache_dir, token=token,
                                 local_files_only=local_files_only, allow_patterns=patterns)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        held = "only partly" if type(exc).__name__ == "IncompleteSnapshotError" else "not"
        raise error(f"{kind} {where} is not a local folder, and it is {held} in the Hugging Face cache while the Hub "
                    "may not be reached (HF_HUB_OFFLINE=1, local_files_only, or no connection); "
                    f"fetch it once with: {fetch}") from None
    except RepositoryNotFoundError:
        raise error(f"{kind} {name!r} is not a local folder, and the Hub has no repository {name!r} (or it is "
                    "private: pass token=, or log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise error(f"Hub repository {name!r} has no revision {revision!r}; give a branch, tag or commit it "
                    "has") from None
    except (EntryNotFoundError, HfHubHTTPError, OSError) as exc:
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise error(f"cannot fetch {kind} {where} from the Hub: {why}") from None


def resolve_adapter(model_id: str | os.PathLike, subfolder: str | None = None, *, revision: str | None = None,
                    token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False) -> str:
    """The local folder of an adapter given as a folder or a Hub id (see the module docstring)."""
    name = os.fspath(model_id)
    if os.path.exists(name) or not is_hub_id(name):
        return os.path.join(name, subfolder) if subfolder else name
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    where = f"{name!r} (revision {revision or 'main'}{f', subfolder {subfolder!r}' if subfolder else ''})"
    fetch = f"hf download {name}" + (f" --revision {revision}" if revision else "")
    snapshot = _snapshot(name, "adapter", where=where, fetch=fetch, patterns=[prefix + f for f in ADAPTER_FILES],
                         revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                         error=AdapterFileError)
    folder = os.path.join(snapshot, subfolder) if subfolder else snapshot
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise AdapterFileError(f"Hub repository {where} holds no adapter_config.json"
                               + ("" if subfolder else "; is the adapter in a subfolder? pass subfolder=..."))
    return folder


# ---- base models: fetched once, then read from the cache by processes that stay offline -------------------
# what loading a transformers model needs (config, tokenizer, safetensors weights): never a pickle (*.bin, *.pt),
# never another framework's copy (*.h5, *.msgpack, *.onnx), never every quantisation of a GGUF repository
MODEL_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja")


def _missing_model_files(folder: str, gguf_file: str | None) -> list[str]:
    """What a model folder lacks to load: config.json and the safetensors weights (every shard an index
    names), or the named GGUF file."""
    if gguf_file:
        return [] if os.path.isfile(os.path.join(folder, gguf_file)) else [gguf_file]
    missing = [] if os.path.isfile(os.path.join(folder, "config.json")) else ["config.json"]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [*missing, "a readable model.safetensors.index.json"]
        return missing + [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        missing.append("*.safetensors weights")
    return missing


def fetch_model(name: str, *, gguf_file: str | None = None, revision: str | None = None,
                token: str | bool | None = None, cache_dir: str | os.PathLike | None = None) -> str:
    """A base model given as a Hub id, in huggingface_hub's cache: fetched once (only ``MODEL_FILES``, or the one
    GGUF file and the tokenizer's files), the cache reused, ``HF_HUB_OFFLINE=1`` honoured (the cache alone). Then
    processes started with ``HF_HUB_OFFLINE=1`` (``peftkit compare``'s workers) load it by its id from the cache.
    Returns the snapshot folder; anything missing is one error line with the command that fetches it."""
    fetch = f"hf download {name}" + (f" --revision {revision}" if revision else "") + (
        f" {gguf_file}" if gguf_file else "")
    patterns = [gguf_file, *(p for p in MODEL_FILES if p != "*.safetensors")] if gguf_file else list(MODEL_FILES)
    snapshot = _snapshot(name, "model", where=f"{name!r} (revision {revision or 'main'})", fetch=fetch,
                         patterns=patterns, revision=revision, token=token, cache_dir=cache_dir)
    missing = _missing_model_files(snapshot, gguf_file)
    if missing:
        raise PeftError(f"model {name!r}: {snapshot} lacks {', '.join(missing)} (the cache holds only part of it, "
                        f"or the repository has no such files); fetch it with: {fetch}")
    return snapshot


# ---- upload ------------------------------------------------------------------------------------------
PAPERS = {
    "LORA": ("LoRA", "Hu et al. 2021, https://arxiv.org/abs/2106.09685"),
    "LORA+DORA": ("DoRA", "Liu et al. 2024, https://arxiv.org/abs/2402.09353"),
    "LORA_FA": ("LoRA-FA", "Zhang et al. 2023, https://arxiv.org/abs/2308.03303"),
    "DELTA_LORA": ("Delta-LoRA", "Zi et al. 2023, https://arxiv.org/abs/2309.02411"),
    "VERA": ("VeRA", "Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454"),
    "IA3": ("(IA)³", "Liu et al. 2022, https://arxiv.org/abs/2205.05638"),
    "BOTTLENECK": ("bottleneck adapters", "Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; "
                   "Pfeiffer et al. 2020, https://arxiv.org/abs/2005.00247"),
    "BEFT": ("BitFit", "Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199"),
    "BITFIT": ("BitFit", "Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199"),
    "PROMPT_TUNING": ("prompt tuning", "Lester et al. 2021, https://arxiv.org/abs/2104.08691"),
    "P_TUNING": ("P-tuning", "Liu et al. 2021, https://arxiv.org/abs/2103.10385"),
    "PREFIX_TUNING": ("prefix tuning", "Li & Liang 2021, https://arxiv.org/abs/2101.00190"),
}
HF_PEFT_TYPES = {"LORA", "VERA", "IA3", "BEFT", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"}


def model_card(config: Any, repo_id: str, trainable: int | None = None, total: int | None = None,
               metrics: dict[str, float] | None = None) -> str:
    """README.md for an adapter repository: base model, method and paper, trainable parameters, the run's
    metrics when known, and the lines that load it in peftkit and (for HF PEFT's methods) in HF PEFT."""
    peft_type = config.PEFT_TYPE
    if peft_type == "LORA" and getattr(config, "use_dora", False):
        peft_type = "LORA+DORA"
    method, paper = PAPERS.get(peft_type, (peft_type, ""))
    base = config.base_model_name_or_path
    task = config.task_type
    header = ["---", "library_name: peftkit", "tags:", "- peftkit", "- peft", f"- {method.lower()}"]
    if base:
        header.append(f"base_model: {base}")
    header.append("---")
    lines = [*header, "", f"# {repo_id.split('/')[-1]}", "",
             f"A {method} adapter{f' for `{base}`' if base else ''}, trained with peftkit.", "",
             f"- **Method**: {method} ({paper})" if paper else f"- **Method**: {method}",
             f"- **Base model**: {base or 'not recorded'}"]
    if task:
        lines.append(f"- **Task type**: {task}")
    if trainable is not None and total:
        lines.append(f"- **Trainable parameters**: {trainable:,d} of {total:,d} ({100 * trainable / total:.4f}%)")
    elif trainable is not None:
        lines.append(f"- **Adapter parameters**: {trainable:,d}")
    if metrics:
        lines += ["", "## Metrics (from `peftkit train`)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    base_line = f'"{base}"' if base else '"<base model>"'
    lines += ["", "## Use", "", "peftkit:", "", "```python", "from transformers import AutoModelForCausalLM"
              if task != "SEQ_CLS" else "from transformers import AutoModelForSequenceClassification",
              "from peftkit import PeftModel", "",
              f"base = {'AutoModelForCausalLM' if task != 'SEQ_CLS' else 'AutoModelForSequenceClassification'}"
              f".from_pretrained({base_line})",
              f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```"]
    if config.PEFT_TYPE in HF_PEFT_TYPES:
        lines += ["", "HF PEFT reads the same files:", "", "```python", "from peft import PeftModel", "",
                  f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```"]
    else:
        lines += ["", f"HF PEFT has no {method}; the files load in peftkit."]
    return "\n".join(lines) + "\n"


def folder_card(folder: str | os.PathLike, repo_id: str) -> str:
    """The model card of an adapter folder: its config, its stored trainable parameters (from the safetensors
    header) and, for a folder written by ``peftkit train``, the run's held-out metrics (``peftkit_run.json``)."""
    import json

    from .config import PeftConfig
    from .inspection import describe_one

    folder = os.fspath(folder)
    config = PeftConfig.from_pretrained(folder)
    info = describe_one("default", folder)
    metrics = None
    record = os.path.join(folder, "peftkit_run.json")
    if os.path.isfile(record):
        with open(record, encoding="utf-8") as fh:
            run = json.load(fh)
        metrics = run.get("metrics") if isinstance(run, dict) else None
        if config.base_model_name_or_path is None and isinstance(run, dict) and run.get("base_model"):
            config.base_model_name_or_path = run["base_model"]
    return model_card(config, repo_id, info["parameters"], None, metrics)


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, commit_message: str | None = None,
                card: str | None = None) -> Any:
    """Upload an adapter folder (its adapter files and a README.md model card) to ``repo_id`` through
    huggingface_hub, creating the repository if needed. Returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi

    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise AdapterFileError(f"{folder!r} has no adapter_config.json; push an adapter folder")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as staging:
        for name in os.listdir(folder):  # the adapter's own files only (other adapters' sub-folders too)
            source = os.path.join(folder, name)
            if os.path.isfile(source) and name in ADAPTER_FILES:
                shutil.copyfile(source, os.path.join(staging, name))
            elif os.path.isfile(os.path.join(source, "adapter_config.json")):
                os.mkdir(os.path.join(staging, name))
                for inner in ADAPTER_FILES:
                    if os.path.isfile(os.path.join(source, inner)):
                        shutil.copyfile(os.path.join(source, inner), os.path.join(staging, name, inner))
        if card is not None:
            with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as fh:
                fh.write(card)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=staging,
                                 commit_message=commit_message or "Upload adapter with peftkit")
