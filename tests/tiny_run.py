"""Tiny transformers model folders (random weights, a word-level tokenizer) and tiny data for the trainer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = [f"w{i}" for i in range(40)] + ["good", "great", "fine", "bad", "awful", "poor", "the", "is", "a", "movie"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]


def tokenizer(folder: Path, kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def model_folder(root: Path, kind: str = "llama", seed: int = 0) -> Path:
    """A transformers model folder: 'llama' (causal LM) or 'bert' (sequence classification)."""
    folder = root / f"tiny-{kind}"
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    n = len(SPECIAL) + len(WORDS)
    torch.manual_seed(seed)
    if kind == "bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0, num_labels=2,
                         architectures=["BertForSequenceClassification"])
        model = BertForSequenceClassification(cfg)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=0, eos_token_id=4, bos_token_id=None, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tokenizer(folder, kind)
    return folder


def classification_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            cue = rng.choice(["good", "great", "fine"] if label == "pos" else ["bad", "awful", "poor"])
            words = [rng.choice(WORDS[:40]) for _ in range(rng.randint(3, 9))]
            words.insert(rng.randrange(len(words) + 1), cue)
            fh.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def lm_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            start = rng.randrange(30)
            words = [f"w{(start + k) % 40}" for k in range(rng.randint(4, 12))]  # counting: learnable
            fh.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path
