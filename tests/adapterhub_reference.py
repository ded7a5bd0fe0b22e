"""The AdapterHub side of tests/test_adapterhub.py, run by ``.venv-adapterhub/bin/python`` (``adapters`` 1.3.0
pins transformers ~=4.57.6, so it cannot live in the main venv). Build that venv with scripts/adapterhub_env.sh.

    python tests/adapterhub_reference.py make WORKDIR   # per case: base weights, an AdapterHub folder, outputs
    python tests/adapterhub_reference.py load WORKDIR   # per case: AdapterHub loads peftkit's folder, outputs

Cases are tiny models built from a transformers config with a fixed seed; their base weights go to
``base.safetensors`` so that the peftkit side (in either venv) runs the very same model. Adapter weights are
random (not AdapterHub's init), so a wrong composition cannot pass.
"""

from __future__ import annotations

import json
import os
import sys

import torch

# case name -> (model family, AdapterHub config name)
CASES = {
    "bert_seq_bn": ("bert", "seq_bn"),
    "bert_double_seq_bn": ("bert", "double_seq_bn"),
    "llama_seq_bn": ("llama", "seq_bn"),
    "llama_double_seq_bn": ("llama", "double_seq_bn"),
    "gpt2_seq_bn": ("gpt2", "seq_bn"),
}
ADAPTER = "task"


def build(family: str, seed: int = 0):
    """A tiny model of ``family`` from its config (eager attention, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    elif family == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
                            bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


def inputs() -> torch.Tensor:
    return torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))


def output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=inputs())
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits).float().contiguous()


def _make(workdir: str) -> None:
    import adapters
    from safetensors.torch import save_file

    summary = {}
    for case, (family, ah_config) in CASES.items():
        folder = os.path.join(workdir, case)
        os.makedirs(folder, exist_ok=True)
        model = build(family)
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "base.safetensors"))
        base_out = output(model)
        adapters.init(model)
        model.add_adapter(ADAPTER, config=ah_config)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".adapters.{ADAPTER}." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.set_active_adapters(ADAPTER)
        model.train_adapter(ADAPTER)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.eval()
        model.save_adapter(os.path.join(folder, "ah"), ADAPTER, use_safetensors=True)
        model.save_adapter(os.path.join(folder, "ah_pickle"), ADAPTER)  # AdapterHub's default: a pickle
        save_file({"out": output(model), "base": base_out}, os.path.join(folder, "ah_out.safetensors"))
        summary[case] = {"trainable": trainable}
    with open(os.path.join(workdir, "made.json"), "w") as fh:
        json.dump(summary, fh)


def _load(workdir: str) -> None:
    import adapters
    from safetensors.torch import load_file, save_file

    for case, (family, _) in CASES.items():
        folder = os.path.join(workdir, case)
        if not os.path.isdir(os.path.join(folder, "pk_ah")):
            continue
        model = build(family)
        model.load_state_dict(load_file(os.path.join(folder, "base.safetensors")))
        adapters.init(model)
        name = model.load_adapter(os.path.join(folder, "pk_ah"), use_safetensors=True, set_active=True)
        model.eval()
        save_file({"out": output(model), "name": torch.tensor([len(name)])},
                  os.path.join(folder, "ah_loaded_out.safetensors"))


if __name__ == "__main__":
    {"make": _make, "load": _load}[sys.argv[1]](sys.argv[2])
