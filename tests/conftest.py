"""Tiny models built from transformers configs with random weights (nothing is downloaded)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
# Tiny matrices: thread start-up costs far more than the maths (up to 1000x on a busy 2-core machine).
torch.set_num_threads(1)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


class TinyNet(torch.nn.Module):
    """A user's own model: no transformers, mixed layer types."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            [torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8), "norm": torch.nn.LayerNorm(8)}) for _ in range(3)]
        )
        self.head = torch.nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        for block in self.blocks:
            h = block["norm"](h + torch.relu(block["fc"](h)))
        return self.head(h.mean(1))


@pytest.fixture
def ids() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randint(1, 128, (2, 7))


def rows_match_alone(pm, names, ids, rtol=1e-4, atol=1e-5) -> torch.Tensor:
    """``adapter_names=names`` logits, each row checked against that row run alone with its adapter active
    (``"__base__"``: adapters disabled); returns the mixed logits."""
    mixed = pm(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with pm.disable_adapter():
                expected = pm(ids[row:row + 1]).logits
        else:
            pm.set_adapter(name)
            expected = pm(ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], expected, rtol=rtol, atol=atol)
    return mixed


# ---- the command line in a fresh interpreter, and which heavy libraries it imported -------------------------
HEAVY_MODULES = ("torch", "safetensors", "transformers", "torchao", "numpy", "pydantic")  # pydantic: typer's coercion
_PROBE = f"""
import json, runpy, sys
sys.argv = ["peftkit", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("peftkit", run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY_MODULES!r}))
sys.stderr.write("PROBE " + json.dumps({{"heavy": heavy, "code": code}}) + "\\n")
"""


def peftkit_probe(*argv: str) -> tuple[str, dict]:
    """``peftkit ARGV`` in a fresh interpreter: (its stdout, {"heavy": the ``HEAVY_MODULES`` it imported, "code":
    its exit status})."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=300)
    probe = [ln for ln in proc.stderr.splitlines() if ln.startswith("PROBE ")]
    assert probe, proc.stderr[-2000:]
    return proc.stdout, json.loads(probe[-1].removeprefix("PROBE "))
