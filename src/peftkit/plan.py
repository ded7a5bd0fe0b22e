"""``peftkit plan MODEL``: will a fine-tune fit, per device, before anything is loaded?

The model is built from its config on the ``meta`` device (no weights, no memory) and the peftkit method is
put on it exactly as training would, so the parameter counts are exact. Memory per device is then:

    weights       frozen base at the compute dtype (NF4 for qlora: 4 bits + int8 block scales + the per-scaler-
                  block factors, as torchao stores them; the output head stays dense), trainable parameters as
                  peftkit keeps them (adapters fp32; ``full`` at the compute dtype)
    gradients     trainable parameters only, fp32
    optimizer     AdamW: 2 × fp32 per trainable parameter, plus an fp32 master copy when the trainable parameters
                  are held in bf16/fp16 (mixed precision)
    activations   what autograd saves for backward, per token and layer, from the architecture (see
                  :func:`layer_bytes_per_token`), plus the loss head's logits, at the per-device batch × seq;
                  with activation checkpointing, one layer input per layer plus the larger of the loss head's
                  peak and one recomputed layer (the logits are held through backward); qlora: the larger of
                  the head's peak and the held logits plus one dequantised NF4 weight (2 × its elements: it
                  lives inside one layer's matmul, never at the start of backward)
    gathered      fsdp only, in backward: the root group (embeddings, final norm, head) whole, the running block
                  and the prefetched one whole, and the running block's gradients before their reduce-scatter
    comm buffers  ddp with more than one device: the reducer's flat gradient buckets (a copy of the gradients)
    optimizer step  AdamW's temporaries: CUDA's default (foreach) AdamW makes sqrt(v) of every tensor at once,
                  one array the size of the moments
    overhead      fixed, per device: CUDA context, cuBLAS workspace and NCCL buffers (:data:`OVERHEAD_BYTES`)

Activations and gradients do not peak together: backward frees a layer's activations as it allocates its
gradients. The plan is the larger of the start of backward (weights, optimizer state, activations, the head's
gradient, gathered groups) and the optimizer step (weights, optimizer state, every gradient, the step's
temporaries, the logits still held). ddp: every device holds all of it; fsdp: each parameter's dim 0 is cut
into N chunks (:class:`Stored`), so weights, gradients and optimizer state are about 1/N, exactly as FSDP2
stores them. Validation against measured torch memory: ``benchmarks/plan_accuracy.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import PeftError

GIB = 2**30
OVERHEAD_BYTES = GIB
"""Per device, outside torch's allocator: the CUDA context (~0.5 GiB on Hopper), cuBLAS workspaces and NCCL
buffers. A fixed estimate, stated in every plan; measured torch memory (the validation) excludes it."""

DTYPES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
STRATEGIES = ("ddp", "fsdp")
PLANNED_METHODS = ("full", "lora", "rslora", "loraplus", "lora_fa", "dora", "qlora")
"""Methods whose activations the model covers (the LoRA family and full fine-tuning); validated ones:
lora, dora, qlora, full (``benchmarks/plan_accuracy.py``)."""

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_MEMORY = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*")
_ENCODERS = ("bert", "roberta", "xlm-roberta", "electra")  # BERT's layer and module names
_DECODERS = ("llama", "mistral", "qwen2", "qwen3")  # Llama's block: RMSNorm, q/k/v/o, gate/up/down, GQA


# ---- input ----------------------------------------------------------------------------------------


def parse_memory(text: str) -> int:
    """Bytes in ``text``: ``80GiB`` (2^30), ``80GB`` (10^9), ``24G`` (as GiB, like nvidia-smi and ``free -g``)."""
    match = _MEMORY.fullmatch(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise PeftError(f"memory {text!r} is not understood; give a number and a unit: 80GiB (2^30 bytes), 80GB "
                        "(10^9 bytes), 24G (read as GiB), 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Architecture:
    """The shapes the memory model reads from a transformers config."""

    name: str
    family: str  # "decoder" (Llama-style: RMSNorm, gated MLP, causal attention) or "encoder" (BERT-style)
    task: str  # "causal_lm" or "classification"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def load_config(model: str | dict[str, Any]) -> Any:
    """A transformers config from a dict of config values (``model_type`` required), an embedded name (minilm,
    smollm2), a local model folder, or a Hub id already in the Hugging Face cache. Reads no weights."""
    from transformers import AutoConfig

    if isinstance(model, dict):
        values = dict(model)
        kind = values.pop("model_type", None)
        if kind is None:
            raise PeftError("a config given as values needs model_type (e.g. 'llama')")
        return AutoConfig.for_model(kind, **values)
    if model in ("minilm", "smollm2"):
        from .merge import resolve_base

        folder, extra = resolve_base(model)
        return AutoConfig.from_pretrained(folder, **extra)
    if os.path.isdir(model):
        files = os.listdir(model)
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if "config.json" not in files and not ggufs:
            raise PeftError(f"{model!r} has no config.json; give a transformers model folder, a Hub id or minilm / "
                            "smollm2")
        extra = {"gguf_file": ggufs[0]} if ggufs and "config.json" not in files else {}
        return AutoConfig.from_pretrained(model, **extra)
    from .hub import is_hub_id

    if not is_hub_id(model):
        raise PeftError(f"model {model!r} is not a folder, a Hub id (org/name) or minilm / smollm2")
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        how = f"fetch its config once with: hf download {model} config.json" if offline else str(exc).splitlines()[0]
        raise PeftError(f"model {model!r} was not found{' in the Hugging Face cache (offline)' if offline else ''}; "
                        f"{how}") from None


def architecture_of(config: Any, name: str = "") -> Architecture:
    """The shapes of a Llama-style or BERT-style config; any other family is refused (its saved activations
    are not modelled, so a plan would be silently wrong)."""
    kind = getattr(config, "model_type", "")
    if kind not in _ENCODERS + _DECODERS:
        raise PeftError(f"peftkit plan models Llama-style ({', '.join(_DECODERS)}) and BERT-style "
                        f"({', '.join(_ENCODERS)}) models, not model_type {kind!r}; measure it with peftkit compare")
    encoder = kind in _ENCODERS
    causal = not encoder
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return Architecture(
        name=name or getattr(config, "_name_or_path", "") or kind, family="encoder" if encoder else "decoder",
        task="causal_lm" if causal and not encoder else "classification", hidden=hidden,
        intermediate=int(config.intermediate_size), layers=int(config.num_hidden_layers), heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads), head_dim=head_dim,
        vocab=int(config.vocab_size))


# ---- exact parameter counts on the meta device ---------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One adapted linear module of a block: its name inside the block and shape."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Counts:
    """Exact counts of the model with the method on it (built on the meta device)."""

    total: int
    """Parameters of the model with the method (base + adapters; tied weights once)."""
    trainable: int
    weight_bytes: int
    """Every parameter and buffer as stored: the compute dtype, fp32 adapters, NF4-packed linears for qlora."""
    trainable_dtype_bytes: int
    """Bytes per element of the trainable parameters (4: fp32; 2: held in bf16/fp16, so a master copy exists)."""
    block_weight_bytes: int
    """One transformer block's weights as stored (the unit fsdp gathers)."""
    block_trainable: int
    quantized: int = 0
    """Linear weights stored NF4 (qlora)."""
    targets: tuple[Target, ...] = ()
    rank: int = 0
    head_trainable: bool = False
    """The LM head / classifier trains (full fine-tuning, or a classification head)."""
    largest_quantized: int = 0
    """Elements of the largest NF4 weight (dequantised, whole, for each of its matmuls)."""
    stored: tuple[Stored, ...] = ()
    """Every parameter and buffer (once), as FSDP2 splits it across processes."""
    head_trainable_elements: int = 0
    """Trainable elements of the output head (its gradient is allocated first in backward)."""
    root_weight_bytes: int = 0
    """Parameters outside the transformer blocks as stored (embeddings, final norm, head: fsdp's root group)."""

    def weights_on(self, processes: int) -> int:
        """Bytes of parameters and buffers each of ``processes`` holds under fsdp (the first, the largest)."""
        return sum(t.bytes_on(processes) for t in self.stored)

    def trainable_on(self, processes: int) -> int:
        """Trainable elements each of ``processes`` holds under fsdp (so its gradients and optimizer state)."""
        return sum(t.trainable_on(processes) for t in self.stored)


@dataclass(frozen=True)
class Stored:
    """One parameter or buffer as FSDP2 keeps it on each of N processes: a parameter's dim 0 is cut into chunks
    of ceil(rows / N) rows (torch.chunk; the first process holds a full chunk, and every process's storage is
    padded to one), a buffer stays whole on each. An NF4 weight splits its packed codes, block scales and
    scaler factors by rows (torchao's all-gather hooks) and keeps its scaler mean and lookup table whole."""

    rows: int
    """Size of dim 0; 0 for a buffer (not sharded)."""
    split_bytes: int
    whole_bytes: int = 0
    trainable_elements: int = 0

    def bytes_on(self, processes: int) -> int:
        split = -(-self.rows // processes) * self.split_bytes // self.rows if self.rows else 0
        return split + self.whole_bytes

    def trainable_on(self, processes: int) -> int:
        return -(-self.rows // processes) * self.trainable_elements // self.rows if self.rows else 0


def nf4_bytes(numel: int, element_bytes: int, block_size: int = 64, scaler_block_size: int = 256) -> int:
    """Bytes of one NF4 weight as torchao's NF4Tensor stores it: 4-bit codes, an int8 scale per block, a factor
    per scaler block and the scalers' mean (both in the weight's dtype), and its 16-entry lookup table."""
    return sum(nf4_split_whole(numel, element_bytes, block_size, scaler_block_size))


def nf4_split_whole(numel: int, element_bytes: int, block_size: int = 64,
                    scaler_block_size: int = 256) -> tuple[int, int]:
    """(bytes fsdp splits across processes: codes, block scales, scaler factors; bytes each keeps whole: the
    scalers' mean and the lookup table) of one NF4 weight."""
    blocks = numel // block_size
    return numel // 2 + blocks + (blocks // scaler_block_size) * element_bytes, element_bytes + 16 * element_bytes


def _torch_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise PeftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[dtype]


def meta_model(config: Any, arch: Architecture, method: str, dtype: str = "bf16",
               options: dict[str, Any] | None = None, num_labels: int = 2) -> tuple[Any, dict[str, int]]:
    """(model with the method on it, NF4 linears name -> scaler block size) built on the meta device."""
    import copy

    import torch
    import transformers

    from .quantize import QuantizationReport, quantization_plan
    from .train.methods import method_entry

    entry = method_entry(method)
    if method not in PLANNED_METHODS:
        raise PeftError(f"peftkit plan models the activations of {', '.join(PLANNED_METHODS)}; for {method!r} "
                        "measure it with: peftkit compare CONFIG --methods " + method)
    config = copy.deepcopy(config)
    with torch.device("meta"):
        if arch.task == "causal_lm":
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=_torch_dtype(dtype))
        else:
            config.num_labels = num_labels
            model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=_torch_dtype(dtype))
    nf4: dict[str, int] = {}
    if entry.quantization:
        settings = {k: v for k, v in entry.quantization.items() if k in ("block_size", "scaler_block_size")}
        report = QuantizationReport("nf4", settings)
        nf4 = quantization_plan(model, "nf4", settings.get("block_size", 64), settings.get("scaler_block_size", 256),
                                None, report)
    from .train.modeling import apply_method
    from .train.spec import MethodSpec

    with torch.device("meta"):
        model = apply_method(model, MethodSpec(name=method, options=dict(options or {})), arch.task)
    return model, nf4


def count_parameters(config: Any, arch: Architecture, method: str, dtype: str = "bf16",
                     options: dict[str, Any] | None = None, num_labels: int = 2) -> Counts:
    """Exact parameter counts and stored bytes of ``method`` on the model ``config`` describes."""
    model, nf4 = meta_model(config, arch, method, dtype, options, num_labels)
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        stem = name.removesuffix(".base_layer")
        key = next((n for n in nf4 if stem == n or stem.endswith("." + n)), None)
        if key is not None and weight is not None:
            owners[id(weight)] = key
    block_prefix = _first_block(model)
    blocks_prefix = block_prefix[:-2].rsplit(".", 1)[0] + "." if block_prefix else ""  # "model.layers."
    seen: set[int] = set()
    total = trainable = weight_bytes = block_bytes = block_trainable = quantized = root_bytes = 0
    trainable_bytes = 4
    largest = 0
    head_trainable = False
    stored: list[Stored] = []
    tensors = [(n, p, True) for n, p in model.named_parameters()] + [(n, b, False) for n, b in model.named_buffers()]
    for name, p, is_param in tensors:
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        split, whole = nbytes, 0
        if id(p) in owners:
            split, whole = nf4_split_whole(p.numel(), p.element_size(), 64, nf4[owners[id(p)]])
            nbytes = split + whole
            quantized += p.numel()
            largest = max(largest, p.numel())
        weight_bytes += nbytes
        if is_param:
            total += p.numel()
            rows = int(p.shape[0]) if p.ndim else 1
            stored.append(Stored(rows, split, whole, p.numel() if p.requires_grad else 0))
            if p.requires_grad:
                trainable += p.numel()
                trainable_bytes = min(trainable_bytes, p.element_size())
                head_trainable |= _is_head(name)
            if not (blocks_prefix and name.startswith(blocks_prefix)):
                root_bytes += nbytes
        else:
            stored.append(Stored(0, 0, nbytes))
        if block_prefix and name.startswith(block_prefix):
            block_bytes += nbytes
            if is_param and p.requires_grad:
                block_trainable += p.numel()
    targets, rank = _block_targets(model, block_prefix)
    return Counts(total=total, trainable=trainable, weight_bytes=weight_bytes, trainable_dtype_bytes=trainable_bytes,
                  block_weight_bytes=block_bytes, block_trainable=block_trainable, quantized=quantized,
                  targets=targets, rank=rank, head_trainable=head_trainable,
                  largest_quantized=largest, stored=tuple(stored), head_trainable_elements=_head_trainable(model),
                  root_weight_bytes=root_bytes)


def _head_trainable(model: Any) -> int:
    """Trainable elements of the output head modules (a weight tied to the embeddings counts here too)."""
    heads = [m for name, m in model.named_modules() if re.search(r"(^|\.)(lm_head|classifier|score)$", name)]
    inner = {id(sub) for m in heads for sub in list(m.modules())[1:]}
    params = {id(p): p for m in heads if id(m) not in inner for p in m.parameters() if p.requires_grad}
    return sum(p.numel() for p in params.values())


def _is_head(name: str) -> bool:
    return bool(re.search(r"(^|\.)(lm_head|classifier|score)(\.|$)", name))


def _first_block(model: Any) -> str:
    """Name prefix of the first transformer block (``....layers.0.`` / ``....layer.0.``)."""
    for name, _ in model.named_modules():
        if re.search(r"\.(layers|layer|h|blocks)\.0$", name):
            return name + "."
    return ""


def _block_targets(model: Any, prefix: str) -> tuple[tuple[Target, ...], int]:
    """The adapted linears of the first block and the LoRA rank (from the adapters' A matrices)."""
    from .methods.base import AdapterLayer

    targets, rank = [], 0
    for name, module in model.named_modules():
        if not (prefix and name.startswith(prefix) and isinstance(module, AdapterLayer)):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        if base is None or not hasattr(base, "in_features"):
            continue
        targets.append(Target(name[len(prefix):], int(base.in_features), int(base.out_features)))
        for p_name, p in module.named_parameters():
            if "lora_A" in p_name and p.ndim == 2:
                rank = max(rank, int(p.shape[0]))
    return tuple(targets), rank


# ---- activations --------------------------------------------------------------------------------------
_GROUPS = {  # which block linears read the same input (their saved input is one tensor)
    "attn_in": ("q_proj", "k_proj", "v_proj", "query", "key", "value"),
    "attn_out": ("o_proj", "attention.output.dense"),
    "mlp_in": ("gate_proj", "up_proj", "intermediate.dense"),
    "mlp_mid": ("down_proj", "output.dense"),
}


_KEPT_OUTPUTS = {  # linears whose output the next op saves anyway (counted in the block's terms above)
    "decoder": ("v_proj", "gate_proj", "up_proj"),  # SDPA keeps v; SiLU keeps gate, the product keeps up
    "encoder": ("query", "key", "value", "intermediate.dense"),  # SDPA keeps q, k, v; GELU its input
    # the math path (a mask, or attention dropout, on CPU) saves head-split copies of q, k, v instead (measured)
    "encoder, math attention": ("intermediate.dense",),
}


def _group(target: str) -> str:
    for group, names in _GROUPS.items():
        if any(target == n or target.endswith("." + n) for n in names):
            return "mlp_mid" if target.endswith("output.dense") and "attention" not in target else group
    return target


def layer_bytes_per_token(arch: Architecture, counts: Counts, method: str, act_bytes: int,
                          seq: int, attention: str = "fused") -> dict[str, float]:
    """Bytes autograd saves per token in one block, by term (measured term by term on transformers' Llama and
    BERT layers; ``benchmarks/plan_accuracy.py`` checks the sums).

    Llama-style block (h hidden, I intermediate, H heads, KV kv heads, d head dim, a = activation bytes):
    both RMSNorms keep their fp32 input and 1/rms (2·(4h + 4)); SDPA keeps q, k, v, its output and the fp32
    log-sum-exp (a·(2Hd + 2·KVd) + 4H); the gated MLP keeps gate, up and act(gate) (3·a·I).
    BERT-style block: the layer input, q, k, v, the attention output, both LayerNorm inputs, the first one's
    output, the two hidden-dropout masks (float on CPU; CUDA keeps them as bool, so this errs high there) and
    the GELU input/output (a·(10h + 2I)), the LayerNorms' fp32 statistics, and with ``attention="math"``
    (an attention mask on CPU: no fused kernel) the scores, their dropout mask and probabilities (3·a·H·S).
    Then by method: ``full`` keeps each distinct linear input (q/k/v share one, gate/up share one) and, its
    norm weights training, the normalised inputs; LoRA keeps A·x (r per target) and x once per input group in
    the activations' dtype (peftkit's fused LoRA, fp32 adapters on a bf16 base included). DoRA's fused function
    (fp32 adapters on a bf16 base included) saves x and A·x as LoRA does, plus its own output y in the
    activations' dtype (backward's magnitude gradient is Σ g ⊙ (y − b)/m): no extra bytes where the next op keeps y anyway
    (:data:`_KEPT_OUTPUTS`: v, gate, up on Llama; q, k, v and the intermediate on BERT, but only the intermediate
    on the math attention path), a·d_out for the others (Llama's q and k before RoPE, o, down); its
    per-target m/n vectors are per layer, not per token, and left out. qlora's NF4 base
    saves only its packed weight (torchao's linear), so its activations are LoRA's; the dequantised weight is a
    temporary (:func:`plan_memory`)."""
    h, inter, heads, kv, d = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim
    a = act_bytes
    terms: dict[str, float] = {}
    groups = {_group(t.name) for t in counts.targets}
    r = counts.rank
    if arch.family == "decoder":
        terms["norms (fp32 input, 1/rms)"] = 2 * (4 * h + 4)
        terms["attention (q, k, v, out, lse)"] = a * (2 * heads * d + 2 * kv * d) + 4 * heads
        terms["mlp (gate, up, act)"] = 3 * a * inter
        group_size = {"attn_in": h, "attn_out": 0, "mlp_in": h, "mlp_mid": inter}  # attn_out = SDPA's output
    else:
        terms["block (input, q, k, v, out, norms, dropout, gelu)"] = a * (10 * h + 2 * inter) + 4 * 4
        if attention == "math":
            terms["attention scores (math path)"] = 3 * a * heads * seq
        group_size = {"attn_in": 0, "attn_out": 0, "mlp_in": 0, "mlp_mid": 0}  # all already kept above
    if method == "full":
        terms["linear inputs"] = a * sum(group_size.values())
        if arch.family == "decoder":
            terms["normalised inputs (norm weights train)"] = 2 * a * h
        return terms
    # peftkit's fused LoRA and DoRA, fp32 adapters on any base: x once per group, in the activations' dtype
    terms["linear inputs (x, once per group)"] = a * sum(group_size[g] for g in groups if g in group_size)
    terms["LoRA A·x (r per target)"] = 4 * r * len(counts.targets)
    if method == "dora":  # the fused DoRA's own output, where nothing else keeps it
        math = arch.family == "encoder" and attention == "math"
        kept = _KEPT_OUTPUTS["encoder, math attention" if math else arch.family]
        terms["DoRA outputs (not kept downstream)"] = a * sum(
            t.out_features for t in counts.targets if not any(t.name == n or t.name.endswith("." + n) for n in kept))
    return terms


def head_bytes_per_token(arch: Architecture, counts: Counts, act_bytes: int) -> dict[str, float]:
    """Bytes per token outside the blocks at the step's peak (the start of backward): for a causal LM the final
    norm's fp32 input, the logits (a·V, alive until the step ends), fp32 log-softmax output kept for backward and
    two fp32 V-wide buffers of the cross-entropy backward; a classifier's are per sequence and negligible."""
    if arch.task != "causal_lm":
        return {}
    v, h, a = arch.vocab, arch.hidden, act_bytes
    terms = {"final norm": 4 * h + 4, "logits": a * v, "log-softmax (fp32)": 4 * v,
             "cross-entropy backward (2 fp32 buffers)": 2 * 4 * v}
    if counts.head_trainable:
        terms["head input, normalised input (head trains)"] = 2 * a * h
    return terms


# ---- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    method: str
    strategy: str
    checkpointing: bool

    def __str__(self) -> str:
        return "+".join([self.method, self.strategy] + (["checkpointing"] if self.checkpointing else []))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of one setting; ``parts`` name each component (``torch_bytes`` excludes the fixed
    overhead: what torch's allocator would hold at the step's peak)."""

    model: str
    setting: Setting
    gpus: int
    batch: int
    seq: int
    dtype: str
    capacity: int
    counts: Counts
    parts: dict[str, int]
    """What is allocated at the step's peak, by component (the larger phase of :attr:`phases`)."""
    activation_terms: dict[str, float] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    """Both candidate peaks: "backward" (its start: every activation, the head's gradient, fsdp's gathered
    groups) and "optimizer step" (every gradient, AdamW's temporaries, the logits the caller still holds)."""
    resident: dict[str, int] = field(default_factory=dict)
    """Weights, gradients and optimizer state per device once they exist (fsdp: this process's shards)."""

    @property
    def phase(self) -> str:
        """Which phase of the step :attr:`parts` (the peak) is."""
        return max(self.phases, key=lambda k: sum(self.phases[k].values())) if self.phases else ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def torch_bytes(self) -> int:
        return self.total - self.parts.get("overhead", 0)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def verdict(self) -> str:
        need, has = self.total / GIB, self.capacity / GIB
        return (f"fits ({need:.1f} GiB of {has:.1f} GiB per device)" if self.fits
                else f"does not fit (needs {need:.1f} GiB, has {has:.1f} GiB per device)")


@dataclass(frozen=True)
class PlanReport:
    asked: MemoryPlan
    cheapest: MemoryPlan | None
    """The first setting that fits, in order of cost (see :func:`candidates`); None when nothing does."""
    tried: list[MemoryPlan]


def plan_memory(arch: Architecture, counts: Counts, setting: Setting, *, gpus: int, batch: int,
                seq: int, capacity: int, dtype: str = "bf16", attention: str = "fused",
                precision: str = "mixed") -> MemoryPlan:
    """Per-device memory of ``setting`` (the module docstring lists the components). ``precision``: "mixed"
    (the usual recipe: trainable parameters held in bf16 get an fp32 master copy, fp32 gradients and fp32
    AdamW state) or "pure" (what ``peftkit train`` does with ``model.dtype: bfloat16``: gradients and AdamW
    state in each parameter's own dtype; the same for fp32 and for LoRA, whose adapters are fp32).

    Activations and gradients are never all alive together: backward frees each layer's activations as it
    allocates that layer's gradients, so the peak is the larger of two moments (see :attr:`MemoryPlan.phases`):
    the start of backward (all activations; of the gradients only the head's) and AdamW's step (all gradients
    and, as CUDA's default foreach AdamW computes sqrt(v) for every tensor at once, one more array of the
    moments' size; the logits the caller still holds)."""
    act = DTYPES[dtype]
    n = gpus if setting.strategy == "fsdp" else 1
    trainable = counts.trainable_on(n) if counts.stored else -(-counts.trainable // n)
    grad_element = counts.trainable_dtype_bytes if precision == "pure" else 4
    grads = grad_element * trainable
    if precision == "pure":
        optim = 2 * counts.trainable_dtype_bytes * trainable
    else:
        optim = 8 * trainable + (4 * trainable if counts.trainable_dtype_bytes < 4 else 0)
    weights = counts.weights_on(n) if counts.stored else -(-counts.weight_bytes // n)
    layer = layer_bytes_per_token(arch, counts, setting.method, act, seq, attention)
    per_layer = sum(layer.values())
    head_terms = head_bytes_per_token(arch, counts, act)
    head = sum(head_terms.values())
    # an NF4 weight is dequantised for each of its matmuls (forward, and backward's g·W) and freed after it: the
    # decoded values and the product, 2 × its elements at the compute dtype, alive only inside one layer, where the
    # loss head's buffers are not (the logits are: the caller holds them); autograd saves only the packed weight
    transient = 2 * counts.largest_quantized * act
    tokens = batch * seq
    logits = tokens * head_terms.get("logits", 0)
    if setting.checkpointing:  # layer inputs, then the loss head's peak or one recomputed layer (logits still held)
        activations = tokens * arch.layers * act * arch.hidden + max(tokens * head,
                                                                     tokens * per_layer + logits + transient)
    else:
        activations = tokens * arch.layers * per_layer + max(tokens * head, logits + transient)
    backward = {"weights": weights, "gradients": grad_element * counts.head_trainable_elements,
                "optimizer": optim, "activations": int(activations)}
    step = {"weights": weights, "gradients": grads, "optimizer": optim,
            "optimizer step": grad_element * trainable,  # foreach AdamW: sqrt(v) of every trainable tensor
            "logits (held)": int(tokens * head_terms.get("logits", 0))}
    if setting.strategy == "fsdp" and gpus > 1:
        # the root group (embeddings, final norm, head) stays gathered from its pre-backward to the end of backward;
        # a block is gathered while it runs and the next one is prefetched; the running block's gradients are
        # whole until their reduce-scatter
        backward["gathered"] = (counts.root_weight_bytes + 2 * counts.block_weight_bytes
                                + grad_element * counts.block_trainable)
    if setting.strategy == "ddp" and gpus > 1:
        backward["comm buffers"] = step["comm buffers"] = grads
    phases = {"backward": backward, "optimizer step": step}
    peak = max(phases.values(), key=lambda part: sum(part.values()))
    parts = {**peak, "overhead": OVERHEAD_BYTES}
    return MemoryPlan(model=arch.name, setting=setting, gpus=gpus, batch=batch, seq=seq, dtype=dtype,
                      capacity=capacity, counts=counts, parts=parts, activation_terms=layer, phases=phases,
                      resident={"weights": weights, "gradients": grads, "optimizer": optim})


def candidates(method: str, gpus: int) -> list[Setting]:
    """Settings in order of cost: the user's method under ddp, fsdp (sharding costs communication), then each
    with activation checkpointing (a second forward per step); a LoRA-family method then tries qlora (an NF4
    base: slower matmuls, a little quality)."""
    out: list[Setting] = []
    methods = [method] + (["qlora"] if method in PLANNED_METHODS and method not in ("full", "qlora") else [])
    for m in methods:
        for ckpt in (False, True):
            for strategy in STRATEGIES:
                if strategy == "fsdp" and gpus == 1:
                    continue
                out.append(Setting(m, strategy, ckpt))
    return out


def plan(model: str | dict[str, Any], method: str = "lora", *, gpus: int = 1, gpu_memory: str | int = "80GiB",
         batch: int = 1, seq: int = 2048, strategy: str = "ddp", checkpointing: bool = False, dtype: str = "bf16",
         options: dict[str, Any] | None = None, attention: str = "fused", precision: str = "mixed",
         name: str = "") -> PlanReport:
    """The plan ``peftkit plan`` prints: the asked setting and the cheapest one that fits."""
    from .train.methods import METHODS

    if method not in METHODS:
        raise PeftError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if strategy not in STRATEGIES:
        raise PeftError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if dtype not in DTYPES:
        raise PeftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if precision not in ("mixed", "pure"):
        raise PeftError(f"precision {precision!r} is not one of mixed, pure")
    for what, value in (("gpus", gpus), ("batch", batch), ("seq", seq)):
        if not isinstance(value, int) or value < 1:
            raise PeftError(f"--{what} must be a positive integer, got {value!r}")
    capacity = gpu_memory if isinstance(gpu_memory, int) else parse_memory(gpu_memory)
    config = load_config(model)
    arch = architecture_of(config, name or (model if isinstance(model, str) else ""))
    counted: dict[str, Counts] = {}

    def one(setting: Setting) -> MemoryPlan:
        if setting.method not in counted:
            counted[setting.method] = count_parameters(config, arch, setting.method, dtype, options)
        return plan_memory(arch, counted[setting.method], setting, gpus=gpus, batch=batch, seq=seq,
                           capacity=capacity, dtype=dtype, attention=attention, precision=precision)

    asked = one(Setting(method, strategy, checkpointing))
    tried = [asked if s == asked.setting else one(s) for s in candidates(method, gpus)]
    cheapest = next((p for p in tried if p.fits), None)
    return PlanReport(asked=asked, cheapest=cheapest, tried=tried)


# ---- validation: the same setting, built for real and measured ---------------------------------------


def build_model(config: Any, method: str, *, dtype: str = "fp32", seed: int = 0, num_labels: int = 5,
                options: dict[str, Any] | None = None, checkpointing: bool = False) -> Any:
    """``config`` built with random weights (seeded) and ``method`` put on it as ``peftkit train`` does (qlora: an
    NF4 base first; activation checkpointing as ``model.gradient_checkpointing``), in training mode: what
    :func:`count_parameters` counts on the meta device, for real."""
    import torch
    import transformers

    from .quantize import quantize_base
    from .train.methods import method_entry
    from .train.modeling import apply_method
    from .train.spec import MethodSpec

    arch = architecture_of(config)
    torch.manual_seed(seed)
    dt = _torch_dtype(dtype)
    if arch.task == "causal_lm":
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dt)
    else:
        config.num_labels = num_labels
        model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=dt)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method_entry(method).quantization:
        quantize_base(model, "nf4")
    model = apply_method(model, MethodSpec(name=method, options=dict(options or {})), arch.task)
    return model.train()


def measure_step(config: Any, method: str, *, batch: int, seq: int, dtype: str = "fp32", seed: int = 0,
                 num_labels: int = 5, pad: int = 0, options: dict[str, Any] | None = None,
                 checkpointing: bool = False, foreach: bool = True) -> dict[str, Any]:
    """Build ``config`` with random weights, put ``method`` on it as ``peftkit train`` does (qlora: an NF4 base
    first), take one AdamW step (so its state exists), then measure the second step with
    :class:`~peftkit.measure.TorchMemoryTracker`: peak live tensor bytes from the forward to ``zero_grad``, and
    the peak of each phase (forward, backward, optimizer step). ``foreach``: AdamW's implementation; True is
    what torch picks on CUDA (sqrt(v) of every tensor at once), False its CPU default (one tensor at a time).
    Also returns ``peftkit compare``'s accounting: weights + gradients + optimizer state + the bytes autograd
    saves (distinct storages that are not parameters). ``pad``: padded positions in the first sequence
    (encoders: an attention mask, as classification batches have). It stands for a GPU: bf16 bases are multiplied
    in bf16 (``use_wide_matmul(False)``), without the fp32 copies peftkit makes on CPUs that lack bf16 units."""
    import torch

    from .quantize import model_weight_bytes, tensor_nbytes

    arch = architecture_of(config)
    model = build_model(config, method, dtype=dtype, seed=seed, num_labels=num_labels, options=options,
                        checkpointing=checkpointing)
    ids, mask, labels = _batch(arch, batch, seq, num_labels, pad, torch.Generator().manual_seed(seed))
    from .methods.lora_kernels import use_wide_matmul

    with use_wide_matmul(False):  # the GPU this stands for multiplies bf16 in bf16: no fp32 copies (lora_kernels)
        measured = _measured_steps(model, ids, mask if pad else None, labels, foreach)
    params = [*model.parameters(), *model.buffers()]
    keys = set()
    for p in params:
        try:
            keys.add(p.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError):
            pass
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            if storage._cdata not in keys:
                saved[storage._cdata] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            saved[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask if pad else None, labels=labels)
    saved_bytes = sum(saved.values())
    del out
    weights = model_weight_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optim = sum(tensor_nbytes(t) for t in measured.pop("state"))
    return {**measured, "weights": weights, "gradients": grads, "optimizer": optim,
            "saved_activations": saved_bytes, "compare_accounting": weights + grads + optim + saved_bytes,
            "trainable": sum(p.numel() for p in trainable)}


def _batch(arch: Architecture, batch: int, seq: int, num_labels: int, pad: int, generator: Any) -> tuple[Any, ...]:
    """(input ids, attention mask with ``pad`` padded positions in the first sequence, labels)."""
    import torch

    ids = torch.randint(0, arch.vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[0, seq - pad:] = 0
    labels = ids if arch.task == "causal_lm" else torch.randint(0, num_labels, (batch,), generator=generator)
    return ids, mask, labels


def _measured_steps(model: Any, ids: Any, mask: Any, labels: Any, foreach: bool, warmup: int = 1,
                    resident: Callable[[], list[Any]] | None = None) -> dict[str, Any]:
    """``warmup`` AdamW steps of ``model``, then one more measured by phase. Returns the peaks, the bytes of the
    gradients this process holds after backward (fsdp: its shards), AdamW's moments and step counters, and the
    optimizer state. ``resident()`` (called after the warm-up): more tensors that exist before the measured step
    and are counted from its start (DDP's gradient buckets)."""
    import torch

    from .distributed import local_tensor
    from .measure import TorchMemoryTracker
    from .quantize import tensor_nbytes

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=foreach)
    grads: list[int] = []

    def step(tracker: TorchMemoryTracker | None = None) -> None:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        if tracker is not None:
            tracker.phase("forward")
        out.loss.backward()
        if tracker is not None:
            tracker.phase("backward")
        grads.append(sum(tensor_nbytes(local_tensor(p.grad)) for p in trainable if p.grad is not None))
        optimizer.step()
        if tracker is not None:
            tracker.phase("optimizer step")
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    params = {id(p): p for p in [*model.parameters(), *model.buffers()]}
    state = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    before = [*params.values(), *state, ids, labels, *([] if mask is None else [mask]), *(resident() if resident else [])]
    with TorchMemoryTracker(before) as tracker:
        step(tracker)
    moments = sum(tensor_nbytes(local_tensor(t)) for st in optimizer.state.values()
                  for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"peak_bytes": tracker.peak, "start_bytes": tracker.start, "phases": dict(tracker.phases),
            "gradients_local": grads[-1], "optimizer_moments_local": moments,
            "optimizer_steps_local": sum(tensor_nbytes(st["step"]) for st in optimizer.state.values()),
            "foreach": foreach, "state": state}


def measure_sharded_step(config: Any, method: str, *, batch: int, seq: int, dtype: str = "fp32", seed: int = 0,
                         options: dict[str, Any] | None = None, checkpointing: bool = False,
                         foreach: bool = True, strategy: str = "fsdp") -> dict[str, Any]:
    """:func:`measure_step` on several processes: every process of the default process group calls it
    (torchrun). The model is built the same on each (seeded), then sharded with
    :func:`peftkit.distributed.shard` (strategy "fsdp"; activation checkpointing per block if asked) or wrapped
    in DistributedDataParallel ("ddp"); each process takes its own ``batch`` (the plan's per-device batch).
    Returns this process's numbers: the bytes it holds of parameters and buffers (fsdp: its local shards, a
    DTensor's ``to_local()``; buffers are whole), of gradients after backward and of AdamW's moments, its peak
    torch memory by phase, and for ddp the bytes of the reducer's gradient buckets (allocated before the
    measured step and alive throughout, so they are added to its peaks)."""
    import torch
    import torch.distributed as dist

    from .distributed import local_tensor, shard
    from .quantize import tensor_nbytes

    arch = architecture_of(config)
    if arch.task != "causal_lm":
        raise PeftError("measure_sharded_step measures causal LMs; classifiers are measured with measure_step")
    if strategy not in STRATEGIES:
        raise PeftError(f"strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    model = build_model(config, method, dtype=dtype, seed=seed, options=options,
                        checkpointing=checkpointing and strategy == "ddp")
    bucket_calls: list[tuple[int, Any]] = []
    if strategy == "fsdp":
        shard(model, activation_checkpointing=checkpointing)
    else:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        model = torch.nn.parallel.DistributedDataParallel(model)

        def recorded(state, bucket):  # noqa: ANN001, ANN202 - DDP rejects any annotation but GradBucket's, and
            # this module's annotations are strings: DDP's own allreduce, keeping hold of each flat bucket
            bucket_calls.append((bucket.index(), bucket.buffer()))
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, recorded)
    rank = dist.get_rank()
    ids, _, labels = _batch(arch, batch, seq, 0, 0, torch.Generator().manual_seed(seed + 1 + rank))
    buckets: list[Any] = []

    def current_buckets() -> list[Any]:
        """The reducer's flat gradient buckets as the last warm-up step's backward reduced them (DDP reduces its
        buckets in index order, so they are the calls from the last index 0 on). They are allocated outside any
        op a dispatch mode sees and alive throughout, so they are counted from the measured step's start, once:
        adding their sizes on top instead counted them twice, since the step's ops return views of them
        (as_strided, the gradient copies into them), which the tracker weighs by their whole storage."""
        last = max(i for i, (index, _) in enumerate(bucket_calls) if index == 0)
        run = bucket_calls[last:]
        if [index for index, _ in run] != list(range(len(run))):
            raise PeftError(f"DDP reduced its buckets out of order: {[index for index, _ in bucket_calls]}")
        buckets[:] = [buffer for _, buffer in run]
        bucket_calls.clear()
        return list(buckets)

    # ddp rebuilds its buckets in the second step's forward: measure the third
    from .methods.lora_kernels import use_wide_matmul

    with use_wide_matmul(False):  # as in measure_step
        measured = _measured_steps(model, ids, None, labels, foreach, warmup=1 if strategy == "fsdp" else 2,
                                   resident=current_buckets if strategy == "ddp" else None)
    del measured["state"]
    comm = sum(b.untyped_storage().nbytes() for b in buckets)
    params = {id(p): p for p in model.parameters()}
    buffers = {id(b): b for b in model.buffers()}
    local = sum(tensor_nbytes(local_tensor(p)) for p in params.values())
    return {**measured, "rank": rank, "processes": dist.get_world_size(), "strategy": strategy,
            "parameters_local": local, "buffers": sum(tensor_nbytes(b) for b in buffers.values()),
            "comm_buffers": comm,
            "trainable_local": sum(local_tensor(p).numel() for p in params.values() if p.requires_grad)}
