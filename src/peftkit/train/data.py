"""Training data: reading (JSONL, CSV, text, embedded sets), tokenising once, a seeded order, batches.

The order of examples is a pure function of (seed, position): position ``p`` of the stream is example
``perm(epoch = p // N)[p % N]`` with one seeded permutation per epoch. Optimizer step ``s`` consumes the
positions ``[s·G, (s+1)·G)`` (G = the global batch); so the data position of a checkpoint is just its step,
and a resumed or multi-process run sees exactly the examples an uninterrupted single process would.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PeftError
from .spec import RunSpec


@dataclass
class Example:
    input_ids: list[int]
    label: int | None = None
    """Classification: the class index."""
    lm_labels: list[int] | None = None
    """Causal LM: per-token targets (-100 where no loss, e.g. the prompt of an instruction)."""

    def loss_tokens(self) -> int:
        """How many targets this example contributes to the loss (the logits at t predict token t+1)."""
        if self.lm_labels is None:
            return 1
        return sum(1 for t in self.lm_labels[1:] if t != -100)


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    labels: list[str] | None
    """Class names (classification)."""
    format: str
    eval_records: list[dict[str, Any]]
    """The eval split's raw records (prompts for generation demos)."""


# ---- reading ------------------------------------------------------------------------------------


def read_records(path: str, spec: RunSpec) -> list[dict[str, Any]]:
    """Records of a local file: .jsonl (one JSON object per line), .csv (a header row), .txt (documents
    separated by blank lines, as ``{text_field: ...}``)."""
    ext = os.path.splitext(path)[1].lower()
    records: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as fh:
            if ext in (".jsonl", ".json"):
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise PeftError(f"{path}:{n}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
                    if not isinstance(record, dict):
                        raise PeftError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
                    records.append(record)
            elif ext == ".csv":
                records = [dict(row) for row in csv.DictReader(fh)]
            elif ext in (".txt", ".md", ".text"):
                docs = [d.strip() for d in fh.read().split("\n\n")]
                records = [{spec.data.text_field: d} for d in docs if d]
            else:
                raise PeftError(f"{path}: unknown data file type {ext!r}; use .jsonl, .csv or .txt")
    except UnicodeDecodeError:
        raise PeftError(f"{path}: not UTF-8 text; re-encode the file as UTF-8") from None
    if not records:
        raise PeftError(f"{path}: no records found; the file is empty")
    return records


def _field(record: dict[str, Any], spec: RunSpec, key: str, path: str, index: int) -> Any:
    """``record``'s value for the field that ``data.<key>`` names (e.g. key="text_field")."""
    name = getattr(spec.data, key)
    if name not in record:
        raise PeftError(
            f"{path}: record {index} has no field {name!r} (it has {', '.join(map(str, record)) or 'none'}); "
            f"set data.{key} to the right name"
        )
    return record[name]


def _split(records: list[dict[str, Any]], fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(records)))
    if n_eval >= len(records):
        raise PeftError(f"only {len(records)} records: too few to hold out an eval split; add data or set data.eval")
    return [records[i] for i in order[n_eval:]], [records[i] for i in order[:n_eval]]


def load_records(spec: RunSpec, task: str) -> tuple[list[dict], list[dict], str]:
    """(train records, eval records, format)."""
    d = spec.data
    if d.train == "bbc_news":
        from ..embedded import load_bbc_split

        split = load_bbc_split(seed=d.seed, test_frac=d.eval_fraction, max_train=d.max_train)
        train = [{"text": t, "label": split.labels[y]} for t, y in zip(split.train_texts, split.train_y, strict=True)]
        evals = [{"text": t, "label": split.labels[y]} for t, y in zip(split.test_texts, split.test_y, strict=True)]
        d.text_field, d.label_field = "text", "label"
        fmt = d.format or "classification"
    elif d.train == "chatterbot":
        from ..embedded import load_chatterbot_pairs

        pairs = [{"prompt": q, "response": a} for q, a in load_chatterbot_pairs()]
        train, evals = _split(pairs, d.eval_fraction, d.seed)
        d.prompt_field, d.response_field = "prompt", "response"
        fmt = d.format or "instruction"
    else:
        records = read_records(spec.resolve(d.train), spec)
        if d.eval is not None:
            train, evals = records, read_records(spec.resolve(d.eval), spec)
        else:
            train, evals = _split(records, d.eval_fraction, d.seed)
        fmt = d.format or ("classification" if task == "classification" else "text")
    if d.eval is not None and d.train in ("bbc_news", "chatterbot"):
        evals = read_records(spec.resolve(d.eval), spec)
    if (fmt == "classification") != (task == "classification"):
        raise PeftError(
            f"data.format {fmt!r} does not fit model.task {task!r}; classification data needs a classification "
            "task, text/instruction data a causal_lm task"
        )
    if d.max_train is not None and len(train) > d.max_train:  # a seeded random subset, in the file's order
        keep = sorted(random.Random(d.seed).sample(range(len(train)), d.max_train))
        train = [train[i] for i in keep]
    if d.max_eval is not None and len(evals) > d.max_eval:  # held-out sets are often sorted by class
        keep = sorted(random.Random(d.seed + 1).sample(range(len(evals)), d.max_eval))
        evals = [evals[i] for i in keep]
    return train, evals, fmt


# ---- tokenising ---------------------------------------------------------------------------------


def _label_names(records: list[dict], spec: RunSpec, path: str) -> list[str]:
    values = [_field(r, spec, "label_field", path, i) for i, r in enumerate(records)]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v) for v in values})


def _instruction_prompt(tokenizer: Any, spec: RunSpec, prompt: str) -> str:
    if spec.data.chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return spec.data.template.format(prompt=prompt)


def encode(records: list[dict], spec: RunSpec, tokenizer: Any, fmt: str, labels: list[str] | None, what: str) -> list[Example]:
    max_len = spec.model.max_length
    out: list[Example] = []
    for i, r in enumerate(records):
        if fmt == "classification":
            text = str(_field(r, spec, "text_field", what, i))
            label = str(_field(r, spec, "label_field", what, i))
            assert labels is not None
            if label not in labels:
                raise PeftError(f"{what}: record {i} has label {label!r}, which the training data never uses ({', '.join(labels)})")
            ids = tokenizer(text, truncation=True, max_length=max_len)["input_ids"]
            out.append(Example(ids, label=labels.index(label)))
        elif fmt == "text":
            ids = tokenizer(str(_field(r, spec, "text_field", what, i)), truncation=True, max_length=max_len)["input_ids"]
            if len(ids) < 2:
                continue
            out.append(Example(ids, lm_labels=list(ids)))
        else:
            prompt = _instruction_prompt(tokenizer, spec, str(_field(r, spec, "prompt_field", what, i)))
            response = str(_field(r, spec, "response_field", what, i))
            p_ids = tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]
            r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            ids = (p_ids + r_ids + eos)[:max_len]
            labels_ = ([-100] * len(p_ids) + r_ids + eos)[:max_len]
            if all(t == -100 for t in labels_[1:]):
                continue  # the prompt alone fills max_length: nothing to learn from this record
            out.append(Example(ids, lm_labels=labels_))
    if not out:
        raise PeftError(f"{what}: no usable examples after tokenising (check the fields and model.max_length)")
    return out


def build_dataset(spec: RunSpec, tokenizer: Any, task: str) -> Dataset:
    train_records, eval_records, fmt = load_records(spec, task)
    labels = _label_names(train_records, spec, spec.data.train) if fmt == "classification" else None
    train = encode(train_records, spec, tokenizer, fmt, labels, f"data.train ({spec.data.train})")
    evals = encode(eval_records, spec, tokenizer, fmt, labels, f"data.eval ({spec.data.eval or 'held out'})")
    return Dataset(train, evals, labels, fmt, eval_records)


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in 1 MiB pieces (a data file may be larger than memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(spec: RunSpec) -> dict[str, str]:
    """``{"data.train": sha256, "data.eval": sha256}`` of the run's local data files (an embedded set is
    named instead): a resumed run must read the same examples, whatever the files are called."""
    out = {}
    for key in ("train", "eval"):
        value = getattr(spec.data, key)
        if value is None:
            continue
        if value in ("bbc_news", "chatterbot") and not os.path.isfile(spec.resolve(value)):
            out[f"data.{key}"] = f"embedded:{value}"
        else:
            out[f"data.{key}"] = file_sha256(spec.resolve(value))
    return out


# ---- order and batches --------------------------------------------------------------------------


class Order:
    """The seeded example stream (see the module docstring)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def example(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch][offset]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels (class ids, or token targets with -100)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples[0].lm_labels is None:
        batch["labels"] = torch.tensor([e.label for e in examples])
    else:
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e.lm_labels)] = torch.tensor(e.lm_labels)
        batch["labels"] = labels
    return batch
