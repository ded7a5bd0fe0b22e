"""Prompt tuning's, P-tuning's and prefix tuning's configs, HF PEFT's names and fields (the virtual tokens,
the encoders and how they reach the model: :mod:`peftkit.methods.prompts`)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import PeftConfig, register_config
from ..errors import PeftConfigError


class PromptTuningInit(enum.StrEnum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(enum.StrEnum):
    MLP = "MLP"
    LSTM = "LSTM"


# ---- configs (HF PEFT's names and fields) ------------------------------------------------------------
@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt method shares. Those left None are read from the model when the adapter is added
    (as HF PEFT does, and written to the file): ``token_dim`` (hidden size; for prefix tuning kv_heads·head_dim),
    ``num_layers``, ``num_attention_heads`` (prefix tuning: the key/value heads) and
    ``num_transformer_submodules`` (1)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise PeftConfigError(
                f"num_virtual_tokens must be a positive integer, got {n!r}; set e.g. num_virtual_tokens=20"
            )
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers",
                     "encoder_hidden_size", "encoder_num_layers"):
            value = getattr(self, name, None)
            if value is not None and value <= 0:
                raise PeftConfigError(f"{name} must be a positive integer or null (read from the model), got {value!r}")
        if not 0.0 <= getattr(self, "encoder_dropout", 0.0) < 1.0:
            raise PeftConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}")


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Soft prompt of ``num_virtual_tokens`` embeddings. ``prompt_tuning_init``: "RANDOM" (N(0, 1)),
    "SAMPLE_VOCAB" (embeddings of random vocabulary tokens) or "TEXT" (the embeddings of
    ``prompt_tuning_init_text``, repeated or cut to length), which needs a tokenizer: ``tokenizer`` (any object
    that maps text to ``{"input_ids": [...]}``; not written to the file) or ``tokenizer_name_or_path`` (a local
    folder, or a tokenizer object, which is moved to ``tokenizer``)."""

    PEFT_TYPE: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict | None = None
    tokenizer: Any = field(default=None, metadata={"local": True}, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init)).upper()
        if self.prompt_tuning_init not in {i.value for i in PromptTuningInit}:
            raise PeftConfigError(
                f"prompt_tuning_init={self.prompt_tuning_init!r}; use 'RANDOM', 'SAMPLE_VOCAB' or 'TEXT'"
            )
        if self.tokenizer_name_or_path is not None and not isinstance(self.tokenizer_name_or_path, str | os.PathLike):
            self.tokenizer = self.tokenizer_name_or_path  # a tokenizer object: keep it, write its name
            self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None) or None
        if self.prompt_tuning_init == "TEXT" and not self.inference_mode:
            if self.tokenizer is None and not self.tokenizer_name_or_path:
                raise PeftConfigError(
                    "prompt_tuning_init='TEXT' needs a tokenizer: pass tokenizer=<your tokenizer object> or "
                    "tokenizer_name_or_path=<local tokenizer folder>"
                )
            if not self.prompt_tuning_init_text:
                raise PeftConfigError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text, e.g. 'Classify the sentiment:'"
                )


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the prompt comes from an encoder, an MLP (3 Linear layers, ReLU between; HF PEFT's layout:
    ``encoder_num_layers`` is not used) or a bidirectional LSTM of ``encoder_num_layers`` layers followed by
    an MLP. ``encoder_hidden_size`` None means ``token_dim``."""

    PEFT_TYPE: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        if kind.upper() not in {"MLP", "LSTM"}:
            raise PeftConfigError(f"encoder_reparameterization_type={kind!r}; use 'MLP' or 'LSTM'")
        self.encoder_reparameterization_type = kind.upper()


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trained keys and values for every layer. ``prefix_projection`` trains them as
    MLP(Pₑ) (Linear(token_dim, encoder_hidden_size), tanh, Linear(encoder_hidden_size, L·2·token_dim)), Li &
    Liang's reparametrisation P_θ[i, :] = MLP_θ(P'_θ[i, :]) (their "Parametrization of P_θ"); the file holds
    its output either way.

    Initialisation: N(0, 1) keys and values (HF PEFT's default; an untrained prefix then disturbs every
    token), ``init_weights="zero"`` (zero keys and values), or ``prefix_init_text``: the frozen model's own
    keys and values for that text's first ``num_virtual_tokens`` tokens (repeated to length), Li & Liang's
    initialisation "with activations of real words" (their initialisation study). It needs ``tokenizer`` (a
    tokenizer object or a local folder); neither is written to the file. With ``prefix_projection`` the MLP's
    output layer is solved (least squares, minimum norm, over the random tanh features of Pₑ) so that MLP(Pₑ)
    reproduces those keys and values exactly, which needs num_virtual_tokens ≤ encoder_hidden_size."""

    PEFT_TYPE: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None
    prefix_init_text: str | None = field(default=None, metadata={"local": True})
    tokenizer: Any = field(default=None, metadata={"local": True}, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise PeftConfigError(f"init_weights={self.init_weights!r}; use None (random) or 'zero'")
        if self.prefix_init_text is not None and not self.inference_mode:
            if not self.prefix_init_text:
                raise PeftConfigError("prefix_init_text is empty; give a text such as 'Summarize the article:'")
            if self.init_weights == "zero":
                raise PeftConfigError("prefix_init_text and init_weights='zero' both set the start; keep one")
            if self.tokenizer is None:
                raise PeftConfigError("prefix_init_text needs a tokenizer: pass tokenizer=<your tokenizer object> "
                                      "or tokenizer=<local tokenizer folder>")

