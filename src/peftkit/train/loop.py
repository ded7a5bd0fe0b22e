"""The training loop of ``peftkit train``: one process or several (torchrun), exact resume.

Loss normalisation: every optimizer step sums the per-example (classification) or per-token (causal LM)
losses of its whole global batch, on every process and every accumulation micro-batch, and divides by
the global count, known up front from the data. Gradients of the trainable tensors alone are then summed
over processes (one all-reduce of a flat buffer). So N processes give the adapter one process gives
with the same global batch, whatever the token counts per rank.

``training.distributed.strategy: fsdp`` shards the model with FSDP2 (peftkit.distributed.shard): the same
loop, data order and loss normalisation; FSDP's reduce-scatter sums the gradients (divide factor 1), each
process keeps the shards it owns, the optimizer steps on them. Checkpoints are then written through
torch.distributed.checkpoint (each process its shards of the trainable state and the optimizer; see
``_checkpoint``), which reshards on load: such a run resumes on another number of processes too, with the
same global batch. The final adapter is gathered once and written by the main process.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import distributed as fsdp
from ..errors import NoTrainableParametersError, PeftError
from ..io import atomic_folder, atomic_write_bytes
from ..methods.prompts import ENCODER_FILE
from .data import Dataset, Order, build_dataset, collate, data_fingerprint
from .methods import method_entry
from .modeling import (
    apply_method,
    base_model_id,
    classifier_module,
    load_base,
    load_tokenizer,
    model_task,
    quantize,
)
from .outputs import (
    RUN_INFO,
    NonFiniteError,
    check_adapter_finite,
    read_run_info,
    refuse_foreign_outputs,
    remove_previous_outputs,
    run_config_next_to,
    run_info_bytes,
)
from .report import Metrics, Progress, plot, table
from .spec import RunSpec
from .state import (
    SHARDS,
    checkpoints,
    load_training_state,
    read_checkpoint,
    rng_state,
    set_rng_state,
    training_state,
    write_checkpoint,
    write_sharded_checkpoint,
)

# Training keys that change the maths: a resumed run must use the values it started with.
_RESUME_KEYS = ("lr", "schedule", "warmup_steps", "batch_size", "grad_accum", "weight_decay", "max_grad_norm",
                "loraplus_lr_ratio", "head_lr", "seed")


def fused_adamw_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW takes these tensors (floating point, each on a device torch has the kernel
    for, DTensors included), as transformers' Trainer does by default (``adamw_torch_fused``). On CPU torch's
    default AdamW is a Python loop of ~12 ops a tensor: with LoRA's many small tensors (two a target) that loop
    is the optimizer's whole cost (112 tensors: 7.2 ms a step against 1.4 ms fused, `benchmarks/lora_floor.py
    --parts optimizer`; benchmarks/RESULTS.md, issue 20 session 16). The same update up to rounding (~1e-7 relative)."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # a torch without the helper: the two devices every torch with fused AdamW has
        devices = {"cpu", "cuda"}
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


@dataclass
class RunResult:
    output_dir: str
    method: str
    task: str
    steps: int
    metrics: dict[str, float]
    trainable: int
    total: int
    adapter_dir: str | None
    adapter_bytes: int
    wall_s: float
    step_s: float
    tokens_per_s: float
    strategy: str = "ddp"
    processes: int = 1
    base_param_bytes: int = 0
    """The frozen base's parameters, all of them (packed size when quantised)."""
    base_param_bytes_per_process: int = 0
    """What the main process holds of them: all with ddp, its shards (about 1/N) with fsdp."""
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def _world() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available() and os.environ.get("PEFTKIT_DEVICE", "") != "cpu":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return world, rank, device


TRAINING_ONLY_FILES = (ENCODER_FILE,)
"""Files of an adapter folder that only resuming training reads: a P-tuning or projected-prefix encoder (HF PEFT
and inference load the virtual tokens it made, in adapter_model.safetensors)."""


def _folder_bytes(path: str) -> int:
    """The adapter as deployed: every file but the training-only ones (a 20-token projected prefix on MiniLM
    is 368 KiB of virtual tokens and 7.5 MiB of MLP that made them)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if f not in TRAINING_ONLY_FILES)


def _training_only_bytes(path: str | None) -> int:
    if not path or not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, f)) for f in TRAINING_ONLY_FILES
               if os.path.isfile(os.path.join(path, f)))


def _macro_f1(preds: list[int], gold: list[int], n: int) -> float:
    scores = []
    for c in range(n):
        tp = sum(1 for p, g in zip(preds, gold, strict=True) if p == c and g == c)
        fp = sum(1 for p, g in zip(preds, gold, strict=True) if p == c and g != c)
        fn = sum(1 for p, g in zip(preds, gold, strict=True) if p != c and g == c)
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


class Scorer:
    """Loss and evaluation of a model on a tokenised dataset (shared by training and ``peftkit eval``)."""

    def __init__(self, spec: RunSpec, task: str, data: Dataset, tokenizer: Any, model: nn.Module,
                 device: torch.device) -> None:
        self.spec, self.task, self.data, self.tokenizer = spec, task, data, tokenizer
        self.model, self.device = model, device
        self._features: dict[str, torch.Tensor] | None = None

    # ---- loss ---------------------------------------------------------------------------------------
    def _loss_sum(self, split: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(summed loss, logits, non-pad tokens) of the examples ``indices`` of ``split``."""
        examples = self.data.train if split == "train" else self.data.eval
        batch = collate([examples[i] for i in indices], self.tokenizer.pad_token_id)
        tokens = int(batch["attention_mask"].sum())
        labels = batch["labels"].to(self.device)
        if self._features is not None:
            logits = classifier_module(self.model)(self._features[split][indices])
            return F.cross_entropy(logits.float(), labels, reduction="sum"), logits, tokens
        out = self.model(input_ids=batch["input_ids"].to(self.device),
                         attention_mask=batch["attention_mask"].to(self.device))
        logits = out.logits if hasattr(out, "logits") else out[0]
        if self.task == "classification":
            return F.cross_entropy(logits.float(), labels, reduction="sum"), logits, tokens
        width = labels.shape[1]
        logits = logits[:, -width:]  # prompt / P-tuning logits include the virtual positions first
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss, logits, tokens

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            bs = self.spec.training.eval_batch_size
            total_loss, count, preds, gold = 0.0, 0, [], []
            n = len(self.data.eval)
            for i in range(0, n, bs):
                idx = list(range(i, min(n, i + bs)))
                loss, logits, _ = self._loss_sum("eval", idx)
                total_loss += float(loss)
                if self.task == "classification":
                    count += len(idx)
                    preds += logits.argmax(-1).tolist()
                    gold += [self.data.eval[j].label for j in idx]
                else:
                    count += sum(self.data.eval[j].loss_tokens() for j in idx)
            loss = total_loss / max(count, 1)
            if self.task == "classification":
                acc = sum(p == g for p, g in zip(preds, gold, strict=True)) / len(gold)
                return {"loss": loss, "accuracy": acc, "f1": _macro_f1(preds, gold, len(self.data.labels or []))}
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
        finally:
            self.model.train(was_training)

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.task == "classification" else "perplexity"


class Runner(Scorer):
    """Builds everything a run needs from a :class:`RunSpec`; ``train()`` runs it, ``evaluate()`` scores it."""

    def __init__(self, spec: RunSpec, *, quiet: bool = False, head_state: dict[str, torch.Tensor] | None = None,
                 resume: bool = False, overwrite: bool = False) -> None:
        self.spec, self.quiet = spec, quiet
        self.world, self.rank, self.device = _world()
        self.entry = method_entry(spec.method.name)
        self.strategy = spec.training.distributed.strategy
        self.sharded = self.strategy == "fsdp" and self.world > 1
        self._check_distributed()
        self.out = spec.resolve(spec.training.output_dir)
        self.ckpt_dir = os.path.join(self.out, "checkpoints")
        self._resume_from = None
        if resume and overwrite:
            raise PeftError("--resume continues the run in output_dir, --overwrite deletes it: give one of them")
        if resume:
            found = checkpoints(self.ckpt_dir)
            if found:
                self._resume_from = found[-1]
        if self._resume_from is None:  # a new run: the folder must not hold another run's outputs
            self._claim_output(overwrite, resume)
        self.task = model_task(spec)
        self.data_hashes = data_fingerprint(spec)
        t = spec.training
        torch.manual_seed(t.seed)
        self.tokenizer = load_tokenizer(spec)
        self.data: Dataset = build_dataset(spec, self.tokenizer, self.task)
        base, self.source = load_base(spec, self.task, self.data.labels)
        self.quant_report = quantize(base, spec)
        from ..quantize import model_weight_bytes

        self.base_bytes = model_weight_bytes(base)  # real bytes: a quantised base counts its packed size
        if head_state is not None:
            classifier_module(base).load_state_dict(head_state)
        self.global_batch = t.batch_size * t.grad_accum * self.world
        n = len(self.data.train)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * n / self.global_batch))
        self.model = apply_method(base, spec.method, self.task, base_model=base_model_id(spec),
                                  total_steps=self.total_steps, tokenizer=self.tokenizer).to(self.device)
        self.base_param_bytes = fsdp.local_parameter_bytes(self.model, trainable=False)
        d = t.distributed
        if self.sharded:  # before the optimizer: the parameters become DTensors
            fsdp.shard(self.model, activation_checkpointing=d.activation_checkpointing,
                       mixed_precision=d.mixed_precision, cpu_offload=d.cpu_offload, gradient_reduction="sum")
        elif d.activation_checkpointing:
            fsdp.checkpoint_blocks(self.model)
        self.base_param_bytes_local = fsdp.local_parameter_bytes(self.model, trainable=False)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise NoTrainableParametersError(f"method {self.entry.name!r} left nothing to train on this model")
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.n_total = sum(p.numel() for p in self.model.parameters())
        self.lr = t.lr if t.lr is not None else self.entry.lr
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.delta_handle = None
        from ..methods.delta_lora import delta_lora_layers

        if any(True for _ in delta_lora_layers(self.model)):
            from ..optim import attach

            self.delta_handle = attach(self.model, self.optimizer)
        self.order = Order(n, t.seed)
        self._features: dict[str, torch.Tensor] | None = None
        if self.entry.name == "head":
            self._cache_features()
        self.start_step = 0
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.is_main = self.rank == 0

    # ---- set-up -----------------------------------------------------------------------------------
    def _check_distributed(self) -> None:
        """What training.distributed asks that this launch cannot do, refused before anything is written."""
        d = self.spec.training.distributed
        if self.strategy != "fsdp":
            return
        fsdp.check_options(d.mixed_precision, d.cpu_offload, "sum", self.device)
        if self.world == 1 and (d.mixed_precision or d.cpu_offload):
            raise PeftError("training.distributed: mixed_precision and cpu_offload act while FSDP gathers shards, "
                            "and one process has none; launch with torchrun --nproc_per_node 2 or more, or drop them")

    def _claim_output(self, overwrite: bool, resume: bool) -> None:
        """Refuse (or, with ``overwrite``, clean) an output folder holding a previous run's outputs; every
        process checks before any of them writes, so all refuse together."""
        if not overwrite:
            refuse_foreign_outputs(self.out, resume)
            return
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            remove_previous_outputs(self.out)
        if self.world > 1:
            dist.barrier()

    def run_info(self) -> dict[str, Any]:
        """What ``peftkit_run.json`` records (see peftkit.train.outputs)."""
        m = self.spec.model
        info: dict[str, Any] = {"task": self.task, "method": self.entry.name,
                                "base_model": m.name if m.name in ("minilm", "smollm2") else base_model_id(self.spec),
                                "max_length": m.max_length, "data_sha256": self.data_hashes}
        if self.task == "classification":
            info.update(pooling=m.pooling, num_labels=len(self.data.labels or []), labels=self.data.labels)
        if getattr(self, "final_metrics", None):  # the final adapter: its held-out metrics (push_to_hub's card shows them)
            info.update(steps=self.total_steps, metrics=self.final_metrics)
        return info

    def _write_adapter(self, folder: str) -> None:
        """The adapter in HF PEFT's layout with ``peftkit_run.json`` beside it; the record goes first, so a
        folder with an ``adapter_config.json`` (written last) always has its record."""
        os.makedirs(folder, exist_ok=True)
        atomic_write_bytes(os.path.join(folder, RUN_INFO), run_info_bytes(self.run_info()))
        self.model.save_pretrained(folder)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.spec.training
        ratio = t.loraplus_lr_ratio if t.loraplus_lr_ratio is not None else self.entry.loraplus_lr_ratio
        heads = [p for n, p in self.model.named_parameters() if p.requires_grad and "modules_to_save" in n]
        ids = frozenset(id(p) for p in heads)
        if ratio is not None:  # LoRA+ groups for the adapter; the head keeps head_lr and weight_decay below
            from ..optim import loraplus_param_groups

            groups = loraplus_param_groups(self.model, lr=self.lr, loraplus_lr_ratio=ratio,
                                           weight_decay=t.weight_decay, exclude=ids)
        else:
            groups = [{"params": [p for p in self.trainable if id(p) not in ids], "lr": self.lr}]
        if heads:
            groups.append({"params": heads, "lr": t.head_lr if t.head_lr is not None else self.lr})
        groups = [g for g in groups if g["params"]]
        fused = fused_adamw_supported([p for g in groups for p in g["params"]])
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=t.weight_decay, fused=fused or None)

    def _lr_factor(self, step: int) -> float:
        t = self.spec.training
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, self.total_steps - t.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        if t.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    @torch.no_grad()
    def _cache_features(self) -> None:
        """``head``: the frozen model's input to the classifier, computed once per example (eval mode)."""
        head = classifier_module(self.model)
        captured: list[torch.Tensor] = []
        hook = head.register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
        was_training = self.model.training
        self.model.eval()
        try:
            self._features = {}
            for split, examples in (("train", self.data.train), ("eval", self.data.eval)):
                feats = []
                for i in range(0, len(examples), self.spec.training.eval_batch_size):
                    batch = collate(examples[i: i + self.spec.training.eval_batch_size], self.tokenizer.pad_token_id)
                    captured.clear()
                    self.model(input_ids=batch["input_ids"].to(self.device),
                               attention_mask=batch["attention_mask"].to(self.device))
                    feats.append(captured[-1])
                self._features[split] = torch.cat(feats)
        finally:
            hook.remove()
            self.model.train(was_training)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _checkpoint(self, step: int) -> None:
        rngs = [rng_state()]
        if self.world > 1:
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        payload = {
            "step": step, "scheduler": self.scheduler.state_dict(), "rng": rngs, "world": self.world,
            "training": {k: getattr(self.spec.training, k) for k in _RESUME_KEYS},
            "method": self.spec.to_dict()["method"], "base": self._resume_model(),
            "data_sha256": self.data_hashes, "strategy": self.strategy, "global_batch": self.global_batch,
            "mixed_precision": self.spec.training.distributed.mixed_precision,
        }
        if self.strategy == "fsdp":  # every process writes its shards; no adapter/ (gathered once, at the end)
            write_sharded_checkpoint(
                self.ckpt_dir, step, payload, lambda folder: fsdp.save_sharded(self.model, self.optimizer, folder),
                self.spec.training.keep_last, self.world, self.rank)
            return
        if self.is_main:
            payload.update(model=training_state(self.model), optimizer=self.optimizer.state_dict())
            writer = self._write_adapter if hasattr(self.model, "peft_config") else None
            write_checkpoint(self.ckpt_dir, step, payload, writer, self.spec.training.keep_last)
        if self.world > 1:
            dist.barrier()

    def _restore(self, path: str) -> int:
        state = read_checkpoint(path)
        now = {k: getattr(self.spec.training, k) for k in _RESUME_KEYS}
        then_strategy = state.get("strategy", "ddp")
        # fsdp checkpoints reshard: the number of processes may change while the global batch stays
        reshards = then_strategy == "fsdp" and self.strategy == "fsdp" and "global_batch" in state
        per_process = ("batch_size", "grad_accum") if reshards else ()
        changed = [f"training.{k}" for k in _RESUME_KEYS if k not in per_process and state["training"].get(k) != now[k]]
        if state.get("method") != self.spec.to_dict()["method"]:
            changed.append("method")
        if "base" in state and state["base"] != self._resume_model():
            changed.append("model")
        if then_strategy != self.strategy:
            changed.append(f"training.distributed.strategy ({then_strategy} → {self.strategy})")
        elif state.get("mixed_precision") != self.spec.training.distributed.mixed_precision:
            changed.append(f"training.distributed.mixed_precision ({state.get('mixed_precision')} → "
                           f"{self.spec.training.distributed.mixed_precision})")
        if reshards and state["global_batch"] != self.global_batch:
            changed.append(f"the global batch (batch_size × grad_accum × processes: {state['global_batch']} → "
                           f"{self.global_batch}; with {self.world} process(es) keep it at {state['global_batch']})")
        if not reshards and state.get("world") != self.world:
            hint = " (strategy fsdp checkpoints can change it)" if self.strategy == "ddp" else ""
            changed.append(f"number of processes ({state.get('world')} → {self.world}){hint}")
        for key, digest in (state.get("data_sha256") or {}).items():  # absent in checkpoints before hashes
            if self.data_hashes.get(key) != digest:
                where = getattr(self.spec.data, key.split(".", 1)[1])
                changed.append(f"the content of {key} ({self.spec.resolve(where) if where else 'none'})")
        if changed:
            raise PeftError(f"cannot resume {path!r}: the run changed {', '.join(changed)}; "
                            "resume with the config it started with, or start a new output_dir")
        if self.strategy == "fsdp":
            fsdp.load_sharded(self.model, self.optimizer, os.path.join(path, SHARDS))
        else:
            load_training_state(self.model, {k: v.to(self.device) for k, v in state["model"].items()})
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        if self.rank < len(rngs):
            set_rng_state(rngs[self.rank])
        else:  # more processes than the run had: a generator of its own for each new one (dropout masks)
            torch.manual_seed(self.spec.training.seed * 1_000_003 + int(state["step"]) * 1_009 + self.rank)
        return int(state["step"])

    def _resume_model(self) -> dict[str, Any]:
        """The model keys that change the maths (a resumed run must load the base it started from)."""
        m = self.spec.model
        return {"name": m.name if m.name in ("minilm", "smollm2") else os.path.abspath(self.spec.resolve(m.name)),
                "task": self.task, "dtype": m.dtype, "max_length": m.max_length, "pooling": m.pooling}

    # ---- training -------------------------------------------------------------------------------------
    def _diverged(self, step: int, what: str) -> NonFiniteError:
        """The one-line error of a run whose loss, gradients or weights stopped being finite."""
        found = checkpoints(self.ckpt_dir)
        last = f"the last good checkpoint is {found[-1][1]!r}" if found else "no checkpoint was written before it"
        return NonFiniteError(
            f"training stopped at step {step}: {what} not finite (NaN or infinity), so the run wrote no final "
            f"adapter or model; {last}. Lower training.lr (now {self.lr:g}) or set training.max_grad_norm")

    def _micro_batches(self, step: int) -> tuple[list[list[int]], int]:
        t = self.spec.training
        g = self.global_batch
        positions = range(step * g, (step + 1) * g)
        indices = [self.order.example(p) for p in positions]
        denom = sum(self.data.train[i].loss_tokens() for i in indices)
        mine = []
        for m in range(t.grad_accum):
            lo = (m * self.world + self.rank) * t.batch_size
            mine.append(indices[lo: lo + t.batch_size])
        return mine, denom

    def _sync_grads(self) -> None:
        if self.world == 1 or self.sharded:  # fsdp: its reduce-scatter in backward summed them already
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(self.trainable, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset: offset + n].view_as(p).clone()
            offset += n

    def train(self) -> RunResult:
        spec, t = self.spec, self.spec.training
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            import yaml

            atomic_write_bytes(os.path.join(self.out, "run_config.yaml"),
                               yaml.safe_dump(spec.to_dict(), sort_keys=False).encode())
        if self._resume_from is not None:
            self.start_step = self._restore(self._resume_from[1])
        metrics = Metrics(self.metrics_path, resume_step=self.start_step) if self.is_main else None
        progress = Progress(self.total_steps, self.start_step, t.log_every, enabled=self.is_main and not self.quiet)
        if self._resume_from is not None:
            progress.message(f"resumed from {self._resume_from[1]} (step {self.start_step})")
        self.model.train()
        wall0 = time.perf_counter()
        step_time, step_tokens, steps_done = 0.0, 0, 0
        last_eval: dict[str, float] = {}
        window: list[float] = []  # losses since the last metrics row: the row's "loss" is their mean
        try:
            for step in range(self.start_step, self.total_steps):
                t0 = time.perf_counter()
                batches, denom = self._micro_batches(step)
                loss_sum = torch.zeros((), device=self.device)
                tokens = 0
                for m, idx in enumerate(batches):
                    if not idx:
                        continue
                    if self.sharded:  # reduce-scatter once per step, after the last micro-batch
                        self.model.set_requires_gradient_sync(m == len(batches) - 1)
                    loss, _, n_tok = self._loss_sum("train", idx)
                    (loss / denom).backward()
                    loss_sum += loss.detach()
                    tokens += n_tok
                self._sync_grads()
                grads = [p.grad for p in self.trainable if p.grad is not None]
                if t.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self.trainable, t.max_grad_norm)
                else:
                    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
                norm = fsdp.full_tensor(norm)  # sharded gradients: the norm of all of them, on every process
                if self.sharded and not self.is_main:
                    norm = torch.zeros_like(norm)  # already global: the all-reduce below must add it once
                # one all-reduce (the one the loss needed anyway) also carries the gradient norm: the gradients
                # are already summed, so every process sees the same values and all stop together
                packed = torch.stack([loss_sum.double(), torch.tensor(float(tokens), dtype=torch.float64,
                                                                      device=self.device), norm.double()])
                if self.world > 1:
                    dist.all_reduce(packed)
                loss_total, tokens_f, norm_value = packed.tolist()
                loss_value, tokens = loss_total / denom, int(tokens_f)
                if not math.isfinite(loss_value):
                    raise self._diverged(step + 1, "the training loss is")
                if not math.isfinite(norm_value):
                    raise self._diverged(step + 1, "the gradient norm is")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                # AdamW can turn finite gradients into non-finite weights (a huge lr): check what trains, after
                # the step (ddp: processes hold identical weights, so they agree without talking; fsdp: each
                # checks its shards and one all-reduce makes them agree)
                peaks = torch._foreach_norm([fsdp.local_tensor(p) for p in self.trainable], float("inf"))
                finite = torch.isfinite(torch.stack([n.float() for n in peaks])).all().to(torch.int32)
                if self.sharded:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if not bool(finite):
                    raise self._diverged(step + 1, "after the optimizer step, the trained weights are")
                dt = time.perf_counter() - t0
                step_time += dt
                step_tokens += tokens
                steps_done += 1
                done = step + 1
                tps = tokens / dt if dt > 0 else 0.0
                window.append(loss_value)
                progress.update(done, loss_value, tps, mean_loss=sum(window) / len(window), mean_of=len(window))
                if metrics is not None and (done % t.log_every == 0 or done == self.total_steps):
                    metrics.log({"step": done, "split": "train", "loss": sum(window) / len(window),
                                 "loss_steps": len(window), "step_loss": loss_value,
                                 "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tps,
                                 "epoch": done * self.global_batch / len(self.data.train)})
                if done % t.log_every == 0:
                    window.clear()
                if (t.eval_every and done % t.eval_every == 0) or done == self.total_steps:
                    if self.sharded:  # every forward gathers shards from all: all evaluate, the main one logs
                        last_eval = self.evaluate()
                    if self.is_main:
                        last_eval = last_eval if self.sharded else self.evaluate()
                        assert metrics is not None
                        metrics.log({"step": done, "split": "eval", **last_eval})
                        plot(metrics.rows, os.path.join(self.out, "plot.png"),
                             f"{self.entry.name} on {self.source}", self.metric_name)
                        progress.message(f"step {done}: eval " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                    if self.world > 1:
                        dist.barrier()
                if t.save_every and done % t.save_every == 0 and done < self.total_steps:
                    self._checkpoint(done)
        finally:
            progress.close()
        if not last_eval and (self.is_main or self.sharded):  # resumed at the very end
            last_eval = self.evaluate()
        self.final_metrics = dict(last_eval or {})
        adapter_dir, size = self._save_final()
        wall = time.perf_counter() - wall0
        result = RunResult(
            output_dir=self.out, method=self.entry.name, task=self.task, steps=self.total_steps,
            metrics=last_eval, trainable=self.n_trainable, total=self.n_total, adapter_dir=adapter_dir,
            adapter_bytes=size, wall_s=wall, step_s=step_time / max(steps_done, 1),
            tokens_per_s=step_tokens / step_time if step_time else 0.0,
            history=list(metrics.rows) if metrics is not None else [], strategy=self.strategy,
            processes=self.world, base_param_bytes=self.base_param_bytes,
            base_param_bytes_per_process=self.base_param_bytes_local,
        )
        if self.is_main:
            atomic_write_bytes(os.path.join(self.out, "summary.json"), (json.dumps(result.to_dict(), indent=2) + "\n").encode())
        if self.delta_handle is not None:
            self.delta_handle.remove()
        return result

    def _save_final(self) -> tuple[str | None, int]:
        if self.sharded:  # the adapter's tensors gathered once onto the main process, which writes as below
            with fsdp.gathered(self.model, fsdp.saved_tensors(self.model), self.is_main):
                return self._save_final_here()
        return self._save_final_here()

    def _save_final_here(self) -> tuple[str | None, int]:
        if not self.is_main:
            return None, 0
        if hasattr(self.model, "peft_config"):
            folder = os.path.join(self.out, "adapter")
            self._write_adapter(folder)
        elif self.entry.name == "head":
            from safetensors.torch import save as save_bytes

            folder = os.path.join(self.out, "head.safetensors")
            state = {k: v.detach().contiguous() for k, v in classifier_module(self.model).state_dict().items()}
            atomic_write_bytes(folder, save_bytes(state))
        else:
            from .modeling import MeanPoolingClassifier

            folder = os.path.join(self.out, "model")
            with atomic_folder(folder, replace=True) as tmp:  # whole, and with the user's umask
                if isinstance(self.model, MeanPoolingClassifier):  # SentenceTransformer(folder) loads it
                    from .modeling import save_mean_pooling_classifier

                    save_mean_pooling_classifier(self.model, tmp, self.data.labels, self.spec.model.max_length)
                    self.tokenizer.save_pretrained(tmp)
                else:
                    from .modeling import save_transformers

                    save_transformers(self.model, tmp)  # a GGUF-loaded base too (its weights are dense)
        return folder, _folder_bytes(folder) if os.path.exists(folder) else 0

    def summary_rows(self, result: RunResult) -> list[tuple[str, str]]:
        rows = [("method", self.entry.name), ("base model", self.source), ("task", self.task),
                ("optimizer steps", f"{result.steps} (global batch {self.global_batch}, {self.world} process(es), "
                                    f"{self.strategy})")]
        if self.sharded:
            rows.append(("base weights per process", f"{result.base_param_bytes_per_process / 2**20:,.2f} MiB of "
                                                     f"{result.base_param_bytes / 2**20:,.2f} MiB (sharded)"))
        rows += [(f"eval {k}", f"{v:.4f}") for k, v in result.metrics.items()]
        rows += [("trainable parameters", f"{result.trainable:,} of {result.total:,} ({100 * result.trainable / result.total:.3f}%)"),
                 ("adapter size", f"{result.adapter_bytes / 1024:,.1f} KiB ({result.adapter_dir})" + (
                     f"; + {extra / 1024:,.1f} KiB prompt encoder, kept to resume training"
                     if (extra := _training_only_bytes(result.adapter_dir)) else "")),
                 ("step time", f"{result.step_s * 1000:,.0f} ms ({result.tokens_per_s:,.0f} tokens/s)"),
                 ("wall time", f"{result.wall_s:.1f} s"),
                 ("metrics / plot", f"{self.metrics_path} / {os.path.join(self.out, 'plot.png')}")]
        return rows


def run_training(spec: RunSpec, *, resume: bool = False, quiet: bool = False, overwrite: bool = False,
                 head_state: dict[str, torch.Tensor] | None = None) -> RunResult:
    """Build the run, train it (resuming from its last checkpoint when ``resume``; deleting a previous
    run's outputs first when ``overwrite``), print the summary."""
    runner = Runner(spec, quiet=quiet, head_state=head_state, resume=resume, overwrite=overwrite)
    result = runner.train()
    if runner.is_main and not quiet:
        table(f"peftkit train: {runner.entry.name}", runner.summary_rows(result))
    return result


def evaluate_adapter(spec: RunSpec, adapter: str, load_embedding_layers: bool = False) -> dict[str, float]:
    """``peftkit eval``: the run's model with a saved adapter (or head / full model) on the eval split.
    ``load_embedding_layers``: as in :meth:`PeftModel.from_pretrained`."""
    from ..model import PeftModel, check_adapter_fits

    task = model_task(spec)
    is_head = os.path.isfile(adapter) and adapter.endswith(".safetensors")
    if not is_head and not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise PeftError(f"--adapter {adapter!r} is neither an adapter folder (adapter_config.json) nor a head "
                        "file (head.safetensors)")
    check_adapter_finite(adapter)
    tokenizer = load_tokenizer(spec)
    data = build_dataset(spec, tokenizer, task)
    if not is_head:
        _check_adapter_fits_run(adapter, spec, task, data.labels)
        # another base model is refused in a second, from configs and file headers, before its weights load
        check_adapter_fits(load_base(spec, task, data.labels, meta=True)[0], adapter, given=spec.model.name)
    base, _ = load_base(spec, task, data.labels)
    quantize(base, spec)
    if is_head:
        from safetensors.torch import load_file

        classifier_module(base).load_state_dict(load_file(adapter))
        model: nn.Module = base
    else:
        model = PeftModel.from_pretrained(base, adapter, load_embedding_layers=load_embedding_layers)
    return Scorer(spec, task, data, tokenizer, model, torch.device("cpu")).evaluate()


def _check_adapter_fits_run(adapter: str, spec: RunSpec, task: str, labels: list[str] | None) -> None:
    """``peftkit eval`` builds the model from the config: refuse when the adapter's run recorded another
    task, pooling or label set (the scores would be silently wrong, e.g. a mean-pooling head read at CLS)."""
    info = read_run_info(adapter)
    where = os.path.join(adapter, RUN_INFO)
    if info is None:  # a run before peftkit_run.json: its run_config.yaml, when it is still next to it
        config = run_config_next_to(adapter)
        model = config.get("model") if config else None
        if not isinstance(model, dict):
            return
        info = {"pooling": model.get("pooling", "cls")} if task == "classification" else {}
        where = os.path.join(os.path.dirname(os.path.abspath(adapter)), "run_config.yaml")
    wrong = []
    if info.get("task") not in (None, task):
        wrong.append(f"task {info['task']!r} (the config: {task!r}; set model.task)")
    if task == "classification":
        if info.get("pooling") not in (None, spec.model.pooling):
            wrong.append(f"pooling {info['pooling']!r} (the config: {spec.model.pooling!r}; set model.pooling: "
                         f"{info['pooling']})")
        if info.get("labels") is not None and info["labels"] != labels:
            wrong.append(f"labels {info['labels']} (the config's data: {labels}; evaluate on data with the "
                         "run's labels)")
    if wrong:
        raise PeftError(f"--adapter {adapter!r} does not fit this config: its run ({where}) used "
                        + "; ".join(wrong))
