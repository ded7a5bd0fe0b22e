"""``peftkit merge BASE ADAPTER OUT``: fold an adapter into its base model and write a plain model folder."""

from __future__ import annotations

import json
import os
from typing import Any

import torch.nn as nn

from .config import PeftConfig
from .errors import AdapterFileError, PeftError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def resolve_base(base: str) -> tuple[str, dict[str, Any]]:
    """(folder, from_pretrained kwargs) of a base model: minilm, smollm2 or a transformers folder."""
    if base == "minilm":
        from .embedded import minilm_dir

        return str(minilm_dir()), {}
    if base == "smollm2":
        from .embedded import smollm2_gguf

        folder, gguf = smollm2_gguf()
        return str(folder), {"gguf_file": gguf}
    if not os.path.isdir(base):
        raise PeftError(f"base model {base!r} is neither minilm / smollm2 nor an existing model folder")
    ggufs = sorted(f for f in os.listdir(base) if f.endswith(".gguf"))
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(base))
    return base, ({"gguf_file": ggufs[0]} if ggufs and not has_weights else {})


def _run_pooling(adapter: str) -> str:
    """The pooling of the peftkit run that wrote ``adapter`` (its run_config.yaml sits one level up)."""
    path = os.path.join(os.path.dirname(os.path.abspath(adapter)), "run_config.yaml")
    if not os.path.isfile(path):
        return "cls"
    try:
        import yaml

        with open(path, encoding="utf-8") as fh:
            return (yaml.safe_load(fh) or {}).get("model", {}).get("pooling", "cls")
    except Exception:  # noqa: BLE001 - an unreadable run config just means the default head
        return "cls"


def _num_labels(adapter: str) -> int | None:
    from .io import read_adapter_weights

    for key, tensor in read_adapter_weights(adapter).items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")) and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def load_base_for(base: str, adapter: str, config: PeftConfig) -> nn.Module:
    """The base model class the adapter's task type needs, with the right number of labels."""
    import transformers

    folder, extra = resolve_base(base)
    task = config.task_type
    try:
        if task == "SEQ_CLS":
            labels = _num_labels(adapter) or 2
            if _run_pooling(adapter) == "mean":
                from .train.modeling import MeanPoolingClassifier

                return MeanPoolingClassifier(transformers.AutoModel.from_pretrained(folder, **extra), labels)
            return transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=labels, **extra)
        auto = {
            "CAUSAL_LM": transformers.AutoModelForCausalLM,
            "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
            "TOKEN_CLS": transformers.AutoModelForTokenClassification,
            "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
        }.get(task or "", transformers.AutoModel)
        return auto.from_pretrained(folder, **extra)
    except (OSError, ValueError) as exc:
        raise PeftError(f"cannot load the base model {base!r}: {str(exc).splitlines()[0]}") from None


def merge_to_folder(base: str, adapter: str, out: str) -> str:
    """Merge and write ``out`` atomically (a new folder). Returns a short description of what was written."""
    from .model import PeftModel

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise AdapterFileError(f"{adapter!r} has no adapter_config.json; give an adapter folder")
    if os.path.exists(out) and os.listdir(out):
        raise PeftError(f"output folder {out!r} exists and is not empty; choose a new folder or delete it")
    config = PeftConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(load_base_for(base, adapter, config), adapter)
    merged = model.merge_and_unload()  # refuses, with the reason, methods that cannot merge
    folder, extra = resolve_base(base)
    from .io import atomic_folder
    from .train.modeling import MeanPoolingClassifier

    with atomic_folder(out) as tmp:
        if isinstance(merged, MeanPoolingClassifier):
            from safetensors.torch import save_file

            merged.encoder_model.save_pretrained(tmp)
            save_file({k: v.contiguous() for k, v in merged.classifier.state_dict().items()},
                      os.path.join(tmp, "classifier.safetensors"))
            with open(os.path.join(tmp, "peftkit_head.json"), "w", encoding="utf-8") as fh:
                json.dump({"pooling": "mean", "classifier": "classifier.safetensors",
                           "num_labels": merged.classifier.out_features}, fh, indent=2)
            what = "encoder (transformers layout) + classifier.safetensors (mean pooling)"
        else:
            from .train.modeling import save_transformers

            save_transformers(merged, tmp)
            what = f"{type(merged).__name__} (transformers layout, safetensors)"
        try:
            import transformers

            transformers.AutoTokenizer.from_pretrained(folder, **extra).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a base without tokenizer files: the weights are still a complete model
    return what
