"""Prompt tuning, P-tuning and prefix tuning: trained virtual tokens instead of trained weights.

* Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"): n soft
  tokens P ∈ R^{n×d} are prepended to the input embeddings,  h₀ = [P ; E(x)]  (d = the model's hidden size).
* P-tuning (Liu et al. 2021, "GPT Understands, Too"): the virtual tokens come from a prompt encoder,
  P = MLP(Pₑ)  or  P = MLP(BiLSTM(Pₑ)),  Pₑ ∈ R^{n×d} trained with it; then as prompt tuning.
* Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"): every
  layer ℓ attends to n trained keys and values before the sequence's own,
  attnℓ(x) = softmax(Qℓ [K_Pℓ ; Kℓ]ᵀ/√d_h) [V_Pℓ ; Vℓ],  with [K_P ; V_P] ∈ R^{n × L·2·kv_heads·d_h}
  (optionally reparameterised as MLP(Pₑ): ``prefix_projection``). The prefix is handed to the model as
  its key/value cache, so grouped-query models get kv_heads·d_h per layer, not the hidden size.

These are model-level methods: :class:`PromptAdapters` (one per model, attached as ``prompt_encoder``)
holds one module per adapter and rewrites the keyword arguments of the model's forward through a pre-hook:
virtual embeddings are prepended (and ``token_type_ids`` / token ``labels`` padded, labels with -100), or
the prefix is written into the cache; the attention mask gets n ones in front and explicit positions are
offset by n. A call whose cache already holds the virtual tokens (generate's later steps) only gets the
mask and positions extended, so ``generate`` runs exactly the model's own forward. Rows of one batch may
use different adapters (``adapter_names=``): each row's virtual tokens are right-aligned in a block as
wide as the longest, the rest masked out, with positions kept as the row's own.

Files are HF PEFT's: ``prompt_embeddings`` holds the virtual tokens (for P-tuning and a projected prefix,
the encoder's output) and heads trained with the adapter are keyed ``base_model.<path>``. The encoder of a
P-tuning or projected-prefix adapter is also written to ``prompt_encoder.safetensors`` (which HF PEFT
ignores), so training can resume from a saved adapter.
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.func import functional_call

from ..config import PeftConfig
from ..configs.prompts import (  # noqa: F401  (re-exported)
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from ..errors import AdapterFileError, PeftConfigError, PeftError
from .base import MethodSpec, ModelAdapters, register_method

ENCODER_FILE = "prompt_encoder.safetensors"
FILE_KEY = "prompt_embeddings"
ENCODER_KEY = "prompt_encoder."  # live keys of an encoder's parameters (never in adapter_model.safetensors)


# ---- the configs: peftkit.configs.prompts (torch-free: reading a file needs no tensors) ----------------


# ---- the adapter modules: each one's forward() is its virtual tokens as a (rows, width) table ----------
class SoftPrompt(nn.Module):
    """The virtual tokens themselves: prompt tuning, an unprojected prefix, and any prompt loaded for inference."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's encoder (HF PEFT's parameter names): P = mlp_head(Pₑ) or mlp_head(lstm_head(Pₑ))."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens * config.num_transformer_submodules, d)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp_head(x)


class PrefixEncoder(nn.Module):
    """Prefix tuning's projection (HF PEFT's names): [K_P ; V_P] = transform(Pₑ)."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        d, h = config.token_dim, config.encoder_hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, d)
        self.transform = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, config.num_layers * 2 * d))
        if config.init_weights == "zero":
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)


def prefix_to_cache_layout(table: torch.Tensor, num_layers: int, kv_heads: int) -> torch.Tensor:
    """(batch, n, L·2·kv_heads·d_h) → (L, 2, batch, kv_heads, n, d_h): each layer's prefix keys and values in
    the cache's layout (HF PEFT's order of the flat vector: layer, key/value, head, head dim)."""
    batch, n, width = table.shape
    head_dim = width // (num_layers * 2 * kv_heads)
    return table.view(batch, n, num_layers, 2, kv_heads, head_dim).permute(2, 3, 0, 4, 1, 5)


# ---- the model-level adapters ---------------------------------------------------------------------------
def _accepts(module: nn.Module, name: str, via_kwargs: bool = False) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params or (via_kwargs and any(p.kind is p.VAR_KEYWORD for p in params.values()))


def _cache_key(module: nn.Module) -> str:
    """transformers 5 names the key/value cache argument ``cache`` (``past_key_values`` before)."""
    return "past_key_values" if _accepts(module, "past_key_values") and not _accepts(module, "cache") else "cache"


def _max_positions(module: nn.Module) -> int | None:
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


class PromptAdapters(ModelAdapters):
    """The prompt adapters of one model (``model.prompt_encoder[name]``, as HF PEFT names them)."""

    ATTR = "prompt_encoder"

    def __init__(self) -> None:
        super().__init__()
        self.configs: dict[str, PromptLearningConfig] = {}

    def hook_target(self, model: nn.Module) -> nn.Module:
        """The model itself, or else the first module inside it, whose forward takes ``inputs_embeds`` and a
        key/value cache (a transformers model or backbone)."""
        for module in model.modules():
            if _accepts(module, "inputs_embeds") and (
                _accepts(module, "cache", via_kwargs=True) or _accepts(module, "past_key_values")
            ):
                return module
        raise PeftError(
            f"prompt methods need a module whose forward takes inputs_embeds and a key/value cache (a transformers "
            f"model); {type(model).__name__} has none"
        )

    # ---- adding, saving ---------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: PeftConfig, model: nn.Module) -> None:
        if adapter_name in self:
            raise PeftError(f"the model already has a prompt adapter named {adapter_name!r}")
        if config.inference_mode or isinstance(config, PromptTuningConfig) or (
            isinstance(config, PrefixTuningConfig) and not config.prefix_projection
        ):
            rows = config.num_virtual_tokens * config.num_transformer_submodules
            width = config.token_dim * (2 * config.num_layers if isinstance(config, PrefixTuningConfig) else 1)
            module: nn.Module = SoftPrompt(rows, width)
            if isinstance(config, PromptTuningConfig) and not config.inference_mode:
                _init_prompt(module, config, self.hook_target(model))
            if isinstance(config, PrefixTuningConfig) and config.init_weights == "zero":
                nn.init.zeros_(module.embedding.weight)
        elif isinstance(config, PromptEncoderConfig):
            module = PromptEncoder(config)
        else:
            module = PrefixEncoder(config)
        weight = self.hook_target(model).get_input_embeddings().weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        module = module.to(device=weight.device, dtype=dtype)
        if isinstance(config, PrefixTuningConfig) and config.prefix_init_text and not config.inference_mode:
            _init_prefix_from_text(module, config, self.text_key_values(config, model))
        self[adapter_name] = module
        self.configs[adapter_name] = config

    @torch.no_grad()
    def text_key_values(self, config: PrefixTuningConfig, model: nn.Module) -> torch.Tensor:
        """(n, L·2·kv_heads·d_h): the frozen model's keys and values for the init text's first n tokens (its
        positions 0..n−1, where the prefix sits), in the prefix's flat layout; prompt adapters switched off."""
        target = self.hook_target(model)
        n = config.num_virtual_tokens
        ids = _init_text_ids(config.tokenizer, None, config.prefix_init_text, n, "prefix_init_text")
        from transformers import DynamicCache

        # an empty cache handed in is filled by every attention layer, an encoder's too (BERT returns none of
        # its own but writes into the one it is given: the same path the prefix itself takes)
        cache = DynamicCache(config=getattr(target, "config", None))
        was_disabled, was_training = self.disable_adapters, target.training
        self.disable_adapters = True
        target.eval()
        try:
            target(input_ids=ids[None].to(target.get_input_embeddings().weight.device), use_cache=True,
                   **{_cache_key(target): cache})
        finally:
            self.disable_adapters = was_disabled
            target.train(was_training)
        if len(cache.layers) != config.num_layers or any(layer.keys is None for layer in cache.layers):
            raise PeftError(
                f"prefix_init_text needs the model's keys and values, and {type(target).__name__} wrote "
                f"{len(cache.layers)} of {config.num_layers} layers into the cache; leave prefix_init_text unset "
                "for this model"
            )
        per_layer = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]  # (2, kv, n, d_h)
        return torch.stack(per_layer).permute(3, 0, 1, 2, 4).reshape(n, -1)  # (n, L, 2, kv, d_h) flat

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.configs.pop(adapter_name, None)

    def is_encoder(self, adapter_name: str) -> bool:
        return not isinstance(self[adapter_name], SoftPrompt)

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """``prompt_embeddings`` (the live table), or an encoder's parameters under ``prompt_encoder.*``."""
        module = self[adapter_name]
        if not self.is_encoder(adapter_name):
            return {FILE_KEY: module.embedding.weight}
        return {ENCODER_KEY + k: p for k, p in module.named_parameters()}

    @torch.no_grad()
    def output(self, adapter_name: str) -> torch.Tensor:
        """The virtual tokens as inference uses them (an encoder runs in eval mode: no dropout)."""
        module = self[adapter_name]
        was_training = module.training
        module.eval()
        try:
            return module().detach()
        finally:
            module.train(was_training)

    def to_table(self, adapter_name: str, table: torch.Tensor) -> None:
        """Replace an encoder by the table it produces (a P-tuning file loaded without its encoder trains on)."""
        like = next(self[adapter_name].parameters())
        new = SoftPrompt(*table.shape).to(device=like.device, dtype=like.dtype)
        new.embedding.weight.requires_grad_(like.requires_grad)
        self[adapter_name] = new

    # ---- the rewrite ------------------------------------------------------------------------------
    def _layout(self, batch: int, device: torch.device) -> tuple[PromptLearningConfig, int, torch.Tensor | None,
                                                                  torch.Tensor]:
        """Where each row's virtual tokens sit: (config of the kind, width N of the block, mask (batch, N) or None
        when every row has all N, counts (batch,)). Worked out on the host from the configs, so it never waits on
        the device; with ``adapter_names`` it is kept for the whole call (every generate step reuses it)."""
        rows = self.row_adapters
        if rows is None:
            if len(self.active_adapters) > 1:
                raise PeftError(
                    f"prompt adapters {self.active_adapters} are all active, but a model reads one prompt at a time: "
                    "set_adapter() one of them, or give each row its own with adapter_names=[...]"
                )
            name = self.active_adapters[0]
            width = self._width(name)
            return self.configs[name], width, None, torch.full((batch,), width, device=device)
        rows.check_batch(batch)
        key = (rows, device)
        cached = getattr(self, "_row_layout", None)
        if cached is not None and cached[0][0] is rows and cached[0][1] == device:
            return cached[1]
        names = [n for n in rows.names if n in self]
        kinds = {isinstance(self.configs[n], PrefixTuningConfig) for n in names}
        if len(kinds) > 1:
            raise PeftError(
                f"adapter_names mixes prefix-tuning and prompt-embedding adapters ({names}) in one batch; "
                "run them in separate batches"
            )
        by_slot = [self._width(n) if n in self else 0 for n in rows.names] + [0]  # last slot: rows without one
        per_row = [by_slot[p] for p in rows.pick.tolist()]
        width = max(by_slot)
        counts = torch.tensor(per_row, device=device)
        mask = None
        if min(per_row) < width:
            mask = torch.arange(width, device=device).unsqueeze(0) >= width - counts.unsqueeze(1)
        layout = (self.configs[names[0]], width, mask, counts)
        self._row_layout = (key, layout)
        return layout

    def _width(self, name: str) -> int:
        """How many virtual tokens adapter ``name`` gives each row (its table's rows)."""
        return self[name].embedding.num_embeddings

    def _tables(self, batch: int, device: torch.device, width: int) -> torch.Tensor:
        """Each row's virtual tokens (batch, width, token width), right-aligned in the block, zeros before them."""
        rows = self.row_adapters
        if rows is None:
            return self[self.active_adapters[0]]().unsqueeze(0).expand(batch, -1, -1)
        made = {n: self[n]() for n in rows.names if n in self}
        some = next(iter(made.values()))
        padded = [
            torch.cat([some.new_zeros(width - made[n].shape[0], some.shape[1]), made[n]]) if n in made
            else some.new_zeros(width, some.shape[1]) for n in rows.names
        ]
        stacked = torch.stack([*padded, some.new_zeros(width, some.shape[1])])  # last: rows without a prompt
        return stacked[rows.on(device)[1]]

    def rewrite(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The virtual tokens into one call: the mask and any positions always; the prompt embeddings or the prefix
        cache only when the cache is empty (a later generate() step's cache already holds them)."""
        if self.row_adapters is not None and not any(n in self for n in self.row_adapters.names):
            return None
        names = inspect.signature(module.forward).parameters
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}  # every argument by name
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        if source is None:
            return None
        cache_key = "past_key_values" if "past_key_values" in kwargs else _cache_key(module)
        cache = kwargs.get(cache_key)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        config, width, vmask, counts = self._layout(source.shape[0], source.device)
        prefix = isinstance(config, PrefixTuningConfig)
        _check_length(module, source.shape[1], width, past)
        _extend_mask_and_positions(kwargs, source, vmask, counts, width, past, with_virtual_positions=not prefix)
        if past:
            return (), kwargs
        tables = self._tables(source.shape[0], source.device, width)
        if prefix:
            kwargs[cache_key] = _prefix_cache(module, config, tables, cache, embeds)
            return (), kwargs
        _prepend_prompt(module, kwargs, tables, source.shape[1])
        return (), kwargs


def _check_length(module: nn.Module, length: int, width: int, past: int) -> None:
    """Inputs plus virtual tokens must fit the model's positions."""
    limit = _max_positions(module)
    used = past + length + (0 if past else width)
    if limit is not None and used > limit:
        text = past - width if past else 0
        raise PeftError(
            f"{length} input tokens{f' after {text} cached' if text else ''} + {width} virtual tokens need {used} "
            f"positions, more than this model's maximum of {limit}; keep inputs to at most {limit - width - text} "
            "tokens or use fewer num_virtual_tokens"
        )


def _extend_mask_and_positions(kwargs: dict, source: torch.Tensor, vmask: torch.Tensor | None, counts: torch.Tensor,
                               width: int, past: int, with_virtual_positions: bool) -> None:
    """attention_mask gets the virtual block in front (ones, or each row's own); explicit positions are offset by
    each row's count of virtual tokens (and, where prompt embeddings enter this call, cover them too)."""
    batch, length = source.shape[:2]
    virtual = torch.ones(batch, width, dtype=torch.bool, device=source.device) if vmask is None else vmask
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise PeftError("prompt methods need a 2-D attention_mask (batch, sequence); pass the tokenizer's mask")
    seen_text = past - width if past else 0
    if mask is not None or vmask is not None:
        if mask is None:
            mask = torch.ones(batch, seen_text + length, dtype=torch.long, device=source.device)
        kwargs["attention_mask"] = torch.cat([virtual.to(mask.dtype), mask], dim=1)
    positions = kwargs.get("position_ids")
    if positions is None and vmask is not None:  # rows of unequal width: give each row its own positions
        positions = torch.arange(seen_text, seen_text + length, device=source.device).unsqueeze(0)
    if positions is not None:
        positions = positions.expand(batch, -1) + counts.unsqueeze(1).to(positions.dtype)
        if with_virtual_positions and not past:
            positions = torch.cat([(virtual.long().cumsum(1) - 1).clamp(min=0), positions], dim=1)
        kwargs["position_ids"] = positions


def _prefix_cache(module: nn.Module, config: PrefixTuningConfig, tables: torch.Tensor, cache: Any,
                  embeds: torch.Tensor | None) -> Any:
    """The (empty) cache with every layer's prefix keys and values written in: the model attends to them first."""
    if module.training and torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in module.modules()
    ):
        raise PeftError(
            "prefix tuning cannot train under gradient checkpointing (transformers then drops the key/value cache "
            "that holds the prefix); call model.gradient_checkpointing_disable(), or use prompt tuning"
        )
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=module.config)
    dtype = (embeds if embeds is not None else module.get_input_embeddings().weight).dtype
    layout = prefix_to_cache_layout(tables.to(dtype), config.num_layers, config.num_attention_heads)
    for layer in range(config.num_layers):
        cache.update(layout[layer, 0], layout[layer, 1], layer)
    return cache


def _prepend_prompt(module: nn.Module, kwargs: dict, tables: torch.Tensor, length: int) -> None:
    """h₀ = [P ; E(x)]; token_type_ids get zeros and token labels -100 for the virtual positions."""
    batch, width = tables.shape[:2]
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"] = torch.cat([tables.to(embeds.dtype), embeds], dim=1)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, width), types], dim=1)
    labels = kwargs.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == length:  # token labels: none on virtual
        kwargs["labels"] = torch.cat([labels.new_full((batch, width, *labels.shape[2:]), -100), labels], dim=1)


def _init_prompt(module: SoftPrompt, config: PromptTuningConfig, model: nn.Module) -> None:
    """SAMPLE_VOCAB / TEXT: start from the embeddings of vocabulary tokens (random ones, or the init text's)."""
    if config.prompt_tuning_init == "RANDOM":
        return
    embeddings = model.get_input_embeddings()
    rows = module.embedding.num_embeddings
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, embeddings.weight.shape[0], (rows,))
    else:
        tokenizer = config.tokenizer if config.tokenizer is not None else config.tokenizer_name_or_path
        ids = _init_text_ids(tokenizer, config.tokenizer_kwargs, config.prompt_tuning_init_text, rows,
                             "prompt_tuning_init_text")
    with torch.no_grad():
        module.embedding.weight.copy_(embeddings(ids.to(embeddings.weight.device)).float())


def _init_text_ids(tokenizer: Any, tokenizer_kwargs: dict | None, text: str, rows: int, name: str) -> torch.Tensor:
    """The text's token ids, repeated or cut to ``rows``; ``tokenizer`` an object or a local folder."""
    if isinstance(tokenizer, str | os.PathLike):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True, **(tokenizer_kwargs or {}))
        except OSError:
            raise PeftConfigError(
                f"no tokenizer at {str(tokenizer)!r} (peftkit downloads nothing); pass "
                "tokenizer=<your tokenizer object> or a local tokenizer folder"
            ) from None
    text_ids = list(tokenizer(text)["input_ids"])
    if not text_ids:
        raise PeftConfigError(f"{name} tokenizes to no tokens; give a non-empty text")
    return torch.tensor((text_ids * math.ceil(rows / len(text_ids)))[:rows])


@torch.no_grad()
def _init_prefix_from_text(module: nn.Module, config: PrefixTuningConfig, table: torch.Tensor) -> None:
    """Start the prefix at ``table`` (the text's keys and values). A projected prefix keeps its random Pₑ and
    first layer; its output layer becomes W₂ = (T − b₂)ᵀ · pinv(U)ᵀ with U = tanh(W₁ Pₑ + b₁) (n × h) and
    b₂ the rows' mean, exact when U has full row rank (n ≤ h)."""
    if isinstance(module, SoftPrompt):
        module.embedding.weight.copy_(table)
        return
    first, last = module.transform[0], module.transform[-1]
    U = torch.tanh(first(module.embedding.weight)).double()
    if U.shape[0] > U.shape[1] or torch.linalg.matrix_rank(U) < U.shape[0]:
        raise PeftConfigError(
            f"prefix_init_text with prefix_projection needs num_virtual_tokens ({U.shape[0]}) ≤ encoder_hidden_size "
            f"({U.shape[1]}) so that the MLP can reproduce every token's keys and values; raise encoder_hidden_size"
        )
    T = table.double()
    bias = T.mean(0)
    last.bias.copy_(bias)
    last.weight.copy_((T - bias).T @ torch.linalg.pinv(U).T)


# ---- completing a config for a model, and files ---------------------------------------------------------
def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def _first(config: Any, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def prepare_prompt_config(model: nn.Module, config: PromptLearningConfig) -> PromptLearningConfig:
    """Fill the sizes HF PEFT reads from the model (and writes to the file); check any given ones against it."""
    mc = _model_config(model)
    if getattr(mc, "is_encoder_decoder", False) or config.task_type == "SEQ_2_SEQ_LM":
        raise PeftConfigError(
            f"{config.PEFT_TYPE} in peftkit adapts decoder-only (CAUSAL_LM) and encoder (SEQ_CLS, FEATURE_EXTRACTION, "
            "TOKEN_CLS) models, not encoder-decoder ones; use LoRA or IA3 for this model"
        )
    layers = _first(mc, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _first(mc, "hidden_size", "n_embd", "d_model")
    heads = _first(mc, "num_attention_heads", "n_head", "num_heads")
    found: dict[str, int | None] = {"num_layers": layers, "num_attention_heads": heads, "token_dim": hidden,
                                    "num_transformer_submodules": 1}
    meaning = {"num_layers": "layers", "num_attention_heads": "attention heads", "token_dim": "hidden size",
               "num_transformer_submodules": "transformer stacks"}
    if isinstance(config, PrefixTuningConfig) and heads:
        kv_heads = _first(mc, "num_key_value_heads") or heads
        head_dim = _first(mc, "head_dim") or hidden // heads
        found.update(token_dim=kv_heads * head_dim, num_attention_heads=kv_heads)
        meaning.update(num_attention_heads="key/value heads", token_dim="key/value heads × head size")
    changes: dict[str, Any] = {}
    for key, value in found.items():
        given = getattr(config, key)
        if given is None:
            if value is None:
                raise PeftConfigError(f"cannot read {key} from this model (it has no transformers config); set {key}")
            changes[key] = value
        elif value is not None and given != value:
            raise PeftConfigError(
                f"this {config.PEFT_TYPE} adapter has {key}={given}, but the model has {value} {meaning[key]}; "
                "it was made for another model: "
                "load it on that one, or leave the field unset to size a new adapter for this model"
            )
    if getattr(config, "encoder_hidden_size", 0) is None:
        changes["encoder_hidden_size"] = changes.get("token_dim", config.token_dim)
    return config.copy(**changes) if changes else config


def _store(model: nn.Module) -> PromptAdapters:
    return getattr(model, PromptAdapters.ATTR)


def _rename_heads(tensors: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    """Heads trained with a prompt adapter are keyed ``base_model.<path>`` in HF PEFT's files (no ``model.``)."""
    return {new + k[len(old):] if k.startswith(old) else k: v for k, v in tensors.items()}


def prompt_to_file(model: nn.Module, adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                   prefix: str) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    store = _store(model)
    out = {k: v for k, v in tensors.items() if not k.startswith(ENCODER_KEY)}
    out[FILE_KEY] = store.output(adapter_name)
    return config, _rename_heads(out, prefix, "base_model.") if prefix else out


def prompt_extra_files(model: nn.Module, adapter_name: str, config: PeftConfig) -> dict[str, dict[str, torch.Tensor]]:
    store = _store(model)
    if not store.is_encoder(adapter_name):
        return {}
    return {ENCODER_FILE: {k: p for k, p in store[adapter_name].named_parameters()}}


def prompt_from_file(model: nn.Module, adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                     folder: str | None) -> dict[str, torch.Tensor]:
    """File → live tensors. An encoder (trainable P-tuning / projected prefix) comes from ``prompt_encoder.safetensors``
    and must reproduce the file's ``prompt_embeddings``; without that file the adapter trains its table directly."""
    store = _store(model)
    live = _rename_heads(tensors, "base_model.", "base_model.model.") if folder else dict(tensors)
    if not store.is_encoder(adapter_name) or FILE_KEY not in live:
        return live
    table = live.pop(FILE_KEY)
    path = os.path.join(folder, ENCODER_FILE) if folder else None
    if path is None or not os.path.exists(path):
        store.to_table(adapter_name, table)
        live[FILE_KEY] = table
        return live
    from ..io import require_regular_file

    require_regular_file(path)  # a FIFO would block the read forever
    encoder = load_file(path)
    module = store[adapter_name]
    own = dict(module.named_parameters())
    if set(encoder) != set(own) or any(encoder[k].shape != own[k].shape for k in own):
        raise AdapterFileError(f"{path!r} does not fit this adapter's encoder (another config?); delete it to "
                               "train the saved prompt_embeddings directly")
    with torch.no_grad():
        was = module.training
        module.eval()
        made = functional_call(module, {k: v.to(own[k]) for k, v in encoder.items()}, ())
        module.train(was)
    if made.shape != table.shape or not torch.allclose(made.float(), table.float().to(made.device), atol=1e-4, rtol=1e-3):
        raise AdapterFileError(
            f"{path!r} does not reproduce prompt_embeddings of adapter_model.safetensors (left from another save?); "
            "delete it to train the saved prompt_embeddings directly"
        )
    live.update({ENCODER_KEY + k: v for k, v in encoder.items()})
    return live


def _spec(config_cls: type[PromptLearningConfig]) -> MethodSpec:
    return register_method(MethodSpec(
        config_cls=config_cls, model_level=PromptAdapters, prepare_config=prepare_prompt_config,
        to_file=prompt_to_file, from_file=prompt_from_file, extra_files=prompt_extra_files,
    ))


PROMPT_TUNING = _spec(PromptTuningConfig)
P_TUNING = _spec(PromptEncoderConfig)
PREFIX_TUNING = _spec(PrefixTuningConfig)
