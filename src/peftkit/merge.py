"""``peftkit merge BASE ADAPTER OUT``: fold an adapter into its base model and write a plain model folder."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch.nn as nn

from .config import PeftConfig
from .errors import AdapterFileError, PeftError
from .quiet import no_gguf_progress_bar


def resolve_base(base: str) -> tuple[str, dict[str, Any]]:
    """(folder, from_pretrained kwargs) of a base model: minilm, smollm2 or a transformers folder."""
    if base == "minilm":
        from .embedded import minilm_dir

        return str(minilm_dir()), {}
    if base == "smollm2":
        from .embedded import smollm2_gguf

        folder, gguf = smollm2_gguf()
        no_gguf_progress_bar()
        return str(folder), {"gguf_file": gguf}
    if not os.path.isdir(base):
        raise PeftError(f"base model {base!r} is neither minilm / smollm2 nor an existing model folder")
    ggufs = sorted(f for f in os.listdir(base) if f.endswith(".gguf"))
    has_weights = any(f.endswith((".safetensors", ".bin")) for f in os.listdir(base))
    if ggufs and not has_weights:
        no_gguf_progress_bar()
        return base, {"gguf_file": ggufs[0]}
    return base, {}


def head_of(adapter: str, pooling: str | None) -> tuple[str, list[str] | None]:
    """(pooling, label names) of a classification adapter. The adapter's own ``peftkit_run.json`` says, or
    (runs before it) the ``run_config.yaml`` of the run folder it sits in, or ``--pooling``. The two poolings
    read different features, so a head merged with the wrong one scores near chance: never guess."""
    from .train.outputs import adapter_pooling, read_run_info

    recorded, where = adapter_pooling(adapter)
    if pooling is not None and pooling not in ("cls", "mean"):
        raise PeftError(f"--pooling {pooling!r} is not one of cls, mean")
    if recorded is not None and pooling is not None and pooling != recorded:
        raise PeftError(f"--pooling {pooling} contradicts the run that trained {adapter!r} ({where} says "
                        f"{recorded}); drop --pooling")
    chosen = pooling or recorded
    if chosen is None:
        raise PeftError(
            f"{adapter!r} is a classification adapter that does not say how its head pools (no peftkit_run.json "
            "in it, no run_config.yaml next to it); pass --pooling cls (transformers' own head, e.g. an HF PEFT "
            "adapter) or --pooling mean (a peftkit run with model.pooling: mean)")
    info = read_run_info(adapter) or {}
    labels = info.get("labels")
    return chosen, [str(x) for x in labels] if isinstance(labels, list) else None


def _num_labels(adapter: str) -> int | None:
    from .io import read_adapter_weights

    for key, tensor in read_adapter_weights(adapter).items():
        if key.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")) and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def load_base_for(base: str, adapter: str, config: PeftConfig, pooling: str | None = None,
                  meta: bool = False) -> nn.Module:
    """The base model class the adapter's task type needs, with the right head (pooling, labels), once the adapter
    is known to fit it (check_base_fits). ``meta``: built from the config alone on the meta device."""
    import torch
    import transformers

    from .train.modeling import pretrained_or_meta

    if not meta:
        check_base_fits(base, adapter, config, pooling)
    folder, extra = resolve_base(base)
    task = config.task_type
    try:
        if task == "SEQ_CLS":
            pooling, names = head_of(adapter, pooling)
            n = _num_labels(adapter)
            if names is not None and n is not None and len(names) != n:
                raise PeftError(f"{adapter!r}: its record names {len(names)} labels but its classifier has {n} "
                                "outputs; the folder mixes two runs: copy it again from one run")
            labels = n or (len(names) if names else None)
            if labels is None:
                raise PeftError(f"{adapter!r} holds no classifier weights and records no labels, so the number of "
                                "classes is unknown; save the adapter with its trained head (modules_to_save)")
            if pooling == "mean":
                from .train.modeling import MeanPoolingClassifier

                encoder = pretrained_or_meta(transformers.AutoModel, folder, extra, meta)
                with torch.device("meta") if meta else contextlib.nullcontext():
                    merged = MeanPoolingClassifier(encoder, labels)
            else:
                merged = pretrained_or_meta(transformers.AutoModelForSequenceClassification, folder, extra, meta,
                                          num_labels=labels)
            if names is not None:
                merged.config.id2label = dict(enumerate(names))
                merged.config.label2id = {name: i for i, name in enumerate(names)}
            return merged
        auto = {
            "CAUSAL_LM": transformers.AutoModelForCausalLM,
            "SEQ_2_SEQ_LM": transformers.AutoModelForSeq2SeqLM,
            "TOKEN_CLS": transformers.AutoModelForTokenClassification,
            "QUESTION_ANS": transformers.AutoModelForQuestionAnswering,
        }.get(task or "", transformers.AutoModel)
        return pretrained_or_meta(auto, folder, extra, meta)
    except (OSError, ValueError) as exc:
        raise PeftError(f"cannot load the base model {base!r}: {str(exc).splitlines()[0]}") from None


def check_base_fits(base: str, adapter: str, config: PeftConfig, pooling: str | None = None) -> None:
    """Refuse an adapter trained on another base model than ``base`` in a second, from configs and file headers,
    before the base's weights are read (a minute for a large model), naming both models."""
    from .model import check_adapter_fits

    check_adapter_fits(load_base_for(base, adapter, config, pooling, meta=True), adapter, given=base)


def merge_to_folder(base: str, adapter: str, out: str, pooling: str | None = None, *,
                    load_embedding_layers: bool = False) -> str:
    """Merge and write ``out`` atomically (a new folder). Returns a short description of what was written.

    ``pooling`` (cls / mean) is needed only for a classification adapter that records none (see head_of);
    ``load_embedding_layers`` as in :meth:`PeftModel.from_pretrained`."""
    from .model import PeftModel
    from .train.outputs import NonFiniteError, check_adapter_finite, nonfinite, read_run_info

    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise AdapterFileError(f"{adapter!r} has no adapter_config.json; give an adapter folder")
    if os.path.exists(out) and os.listdir(out):
        raise PeftError(f"output folder {out!r} exists and is not empty; choose a new folder or delete it")
    check_adapter_finite(adapter)
    config = PeftConfig.from_pretrained(adapter)
    model = PeftModel.from_pretrained(load_base_for(base, adapter, config, pooling), adapter,
                                      load_embedding_layers=load_embedding_layers)
    merged = model.merge_and_unload()  # refuses, with the reason, methods that cannot merge
    bad = nonfinite(merged.state_dict().items())  # finite factors can still overflow in B·A·scaling
    if bad:
        raise NonFiniteError(f"merging {adapter!r} gives NaN or infinite weights in {len(bad)} tensor(s) "
                             f"({', '.join(bad[:3])}); nothing was written. The adapter's values are too large "
                             "for the base's dtype: retrain with a lower training.lr")
    folder, extra = resolve_base(base)
    from .io import atomic_folder
    from .train.modeling import MeanPoolingClassifier

    with atomic_folder(out) as tmp:
        if isinstance(merged, MeanPoolingClassifier):
            from .train.modeling import save_mean_pooling_classifier

            id2label = getattr(merged.config, "id2label", None) or {}
            names = [id2label[i] for i in range(len(id2label))] if id2label else None
            save_mean_pooling_classifier(merged, tmp, names, (read_run_info(adapter) or {}).get("max_length"))
            what = "sentence-transformers folder: encoder, mean pooling, classifier as Dense; encode() gives the logits"
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
