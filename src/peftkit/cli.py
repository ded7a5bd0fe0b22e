"""``peftkit``: the command line (needs the cli extra: ``pip install "peftkit[cli,hf]"``).

    peftkit demo [--method lora] [--task classify|chat]     a real fine-tune, no arguments, no download
    peftkit train CONFIG.yaml [--set training.lr=1e-4] [--resume | --overwrite]
    peftkit eval CONFIG.yaml --adapter runs/x/adapter
    peftkit merge BASE ADAPTER OUT [--pooling cls|mean]
    peftkit inspect ADAPTER_DIR
    peftkit plan MODEL --method qlora --gpus 2 --gpu-memory 24GiB --batch 4 --seq 2048 [--strategy fsdp]

Errors are one line (``error: ...``) with exit status 2; ``--debug`` shows the stack trace instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

# no HF_HUB_OFFLINE default: `push` uploads and a Hub id downloads; local folders and the embedded models
# never reach the network, and HF_HUB_OFFLINE=1 set by the user still reads the cache alone
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

try:
    import typer
    from typer.core import TyperArgument, TyperCommand, TyperGroup
except ImportError:  # pragma: no cover - the cli extra is missing
    sys.stderr.write('error: the peftkit command needs its extra: pip install "peftkit[cli,hf]"\n')
    raise SystemExit(2) from None

# Nothing heavy is imported here: ``peftkit --help`` and ``peftkit inspect`` start without torch or transformers
# (tests/test_cli.py checks it; benchmarks/cli_startup.py times it). Each command imports what it uses.


def _readable_metavars(params: list) -> None:
    """Usage and help in the words every CLI uses: ``train [OPTIONS] CONFIG``, ``--lr TEXT``, and no value
    shown for flags (typer would print ``{config}``, ``<str>``, ``<list[str]>`` and ``--help <bool>``)."""
    for param in params:
        if param.metavar is not None:
            continue
        if isinstance(param, TyperArgument):
            param.metavar = param.name.upper()
            param.display_type_rich = lambda ctx: "TEXT"  # typer shows an argument's type as <str>
        elif getattr(param, "is_flag", False):
            param.metavar = ""
        else:
            annotation = param.type_descriptor.annotation
            param.metavar = {int: "INTEGER", float: "FLOAT"}.get(annotation, "TEXT")


def _plain_values_pass_through(params: list) -> None:
    """typer (0.29) coerces each value with a pydantic TypeAdapter it builds on first use, and importing pydantic
    costs more than the rest of ``peftkit inspect`` (0.5 s of an idle machine's second). The values of a plain
    ``str`` parameter and of a flag are a str, a bool or None already, which such an adapter returns unchanged, so
    they take typer's own pass-through instead: the same values, without pydantic. Other types (ints, lists,
    parsers, a flag read from an environment variable) keep typer's coercion; so does every parameter under a
    typer without these internals."""
    try:
        from typer._coercion import PassThroughRuntimeParam
    except ImportError:  # pragma: no cover - another typer
        return
    for param in params:
        desc = getattr(param, "type_descriptor", None)
        if desc is None or getattr(param, "_runtime_param", False) is not None or desc.file_annotation is not None:
            continue
        plain_str = desc.annotation is str and getattr(desc.parameter_info, "parser", None) is None
        flag = desc.annotation is bool and getattr(param, "is_flag", False) and not getattr(param, "envvar", None)
        if (plain_str or flag) and not param.multiple and param.nargs == 1:
            param._runtime_param = PassThroughRuntimeParam(annotation=desc.annotation,
                                                           parameter_info=desc.parameter_info)


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        _readable_metavars(params)
        _plain_values_pass_through(params)
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        rv = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                rv.append(param.metavar if param.required else f"[{param.metavar}]")
        return rv


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)
        _readable_metavars(params)
        _plain_values_pass_through(params)
        return params


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich", cls=_Group,
                  help="Parameter-efficient fine-tuning: train, evaluate, merge and inspect adapters.")
_DEBUG = {"on": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show stack traces on errors.")] = False) -> None:
    from .quiet import no_loading_bars, quiet_third_party

    _DEBUG["on"] = debug or os.environ.get("PEFTKIT_DEBUG") == "1"
    quiet_third_party()  # only the named torchao notices; every other warning still reaches the user
    no_loading_bars()  # transformers' "Loading weights" bars (a log line per load)


def _fail(message: str) -> None:
    first = message.splitlines()
    typer.secho(f"error: {first[0] if first else message}", fg="red", err=True)
    for line in first[1:]:
        typer.echo(line, err=True)
    raise typer.Exit(2)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn peftkit's errors (and missing files, missing extras) into one clear line, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import PeftError

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _fail("interrupted; `peftkit train CONFIG --resume` continues from the last checkpoint")
        except Exception as exc:  # noqa: BLE001 - the point is to report every failure as one line
            if _DEBUG["on"]:
                raise
            if isinstance(exc, PeftError):
                _fail(str(exc))
            if isinstance(exc, FileNotFoundError):
                _fail(f"file not found: {exc.filename}")
            if isinstance(exc, ImportError):
                _fail(f"{exc}; install the extras: pip install \"peftkit[cli,hf,plot]\"")
            _fail(f"{type(exc).__name__}: {exc} (run with --debug for the stack trace)")

    return wrapper


LOAD_EMBEDDING_HELP = ("Accept an adapter file that also holds base-model weights its config does not declare "
                       "(HF PEFT's save_embedding_layers=True writes the embeddings): they replace the base's. "
                       "Without it such a file is refused.")

# ---- train / eval ---------------------------------------------------------------------------------


@app.command(cls=_Command, epilog="Example: peftkit train examples/configs/minilm_bbc_lora.yaml --set training.lr=1e-3")
@friendly
def train(
    config: Annotated[str, typer.Argument(help="YAML run config (model, method, data, training).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: SECTION.KEY=VALUE.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in training.output_dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite",
        help="Delete a previous run's outputs in training.output_dir (only what a run writes) and start clean.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress output.")] = False,
) -> None:
    """Fine-tune a model with any method; writes the adapter, metrics.jsonl, plot.png and checkpoints."""
    from .train import load_spec, run_training

    spec = load_spec(config, set_ or [])
    run_training(spec, resume=resume, quiet=quiet, overwrite=overwrite)


@app.command("eval", cls=_Command,
             epilog="Example: peftkit eval examples/configs/minilm_bbc_lora.yaml --adapter runs/demo/lora/adapter")
@friendly
def eval_(
    config: Annotated[str, typer.Argument(help="The run's YAML config (model and data sections are used).")],
    adapter: Annotated[str, typer.Option(help="Adapter folder (or head.safetensors) to evaluate.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: SECTION.KEY=VALUE.")] = None,
    load_embedding_layers: Annotated[bool, typer.Option("--load-embedding-layers", help=LOAD_EMBEDDING_HELP)] = False,
) -> None:
    """Metrics of a saved adapter on the config's eval split."""
    from .hub import resolve_adapter
    from .train import evaluate_adapter, load_spec
    from .train.report import table

    adapter = resolve_adapter(adapter)  # a Hub id (org/name): its cached snapshot
    spec = load_spec(config, set_ or [])
    metrics = evaluate_adapter(spec, adapter, load_embedding_layers=load_embedding_layers)
    table(f"peftkit eval: {adapter}", [(f"eval {k}", f"{v:.4f}") for k, v in metrics.items()])
    typer.echo(json.dumps(metrics))


# ---- merge ------------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog="Example: peftkit merge smollm2 runs/demo/chat-lora/adapter merged-smollm2")
@friendly
def merge(
    base: Annotated[str, typer.Argument(help="Base model: a transformers folder, or minilm / smollm2.")],
    adapter: Annotated[str, typer.Argument(help="Adapter folder (peftkit or HF PEFT) or Hub id (org/name).")],
    out: Annotated[str, typer.Argument(help="Output folder for the merged model.")],
    pooling: Annotated[str | None, typer.Option(
        help="Classification adapters that record none: cls (transformers' head) or mean.")] = None,
    load_embedding_layers: Annotated[bool, typer.Option("--load-embedding-layers", help=LOAD_EMBEDDING_HELP)] = False,
) -> None:
    """Merge an adapter into its base model and write the result (safetensors, transformers layout)."""
    from .hub import resolve_adapter
    from .merge import merge_to_folder

    written = merge_to_folder(base, resolve_adapter(adapter), out, pooling, load_embedding_layers=load_embedding_layers)
    typer.echo(f"merged model written to {out} ({written})")


# ---- push ---------------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog="Example: peftkit push runs/demo/lora/adapter my-name/minilm-bbc-lora --private")
@friendly
def push(
    adapter: Annotated[str, typer.Argument(help="Adapter folder (peftkit or HF PEFT).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, org/name (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
) -> None:
    """Upload an adapter folder to the Hugging Face Hub with a model card; log in first (hf auth login)."""
    from .hub import folder_card, push_folder

    push_folder(adapter, repo_id, private=private, commit_message=message, card=folder_card(adapter, repo_id))
    typer.echo(f"pushed {adapter} to https://huggingface.co/{repo_id}")


# ---- export -----------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog="Examples: peftkit export runs/demo/vera/adapter lora-out --base minilm   |   "
             "peftkit export runs/demo/chat-dora/adapter lora-out --base smollm2 --rank 32   |   "
             "peftkit export runs/demo/chat-lora/adapter chat.gguf --to gguf --base smollm2")
@friendly
def export(
    adapter: Annotated[str, typer.Argument(help="Adapter folder (peftkit or HF PEFT).")],
    out: Annotated[str, typer.Argument(help="Output folder for the exported adapter.")],
    to: Annotated[str, typer.Option(help="lora (a plain LoRA folder, HF PEFT layout) or gguf (a llama.cpp LoRA "
                                        "adapter file).")] = "lora",
    rank: Annotated[int | None, typer.Option(help="DoRA / IA3 only: rank of the truncated-SVD approximation.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (a transformers folder, minilm or smollm2); "
                                              "needed for VeRA, DoRA and IA3.")] = None,
    merged: Annotated[bool, typer.Option("--merged", help="With --to gguf: the whole model with the adapter merged, its "
                                              "metadata and tokenizer from the base's GGUF.")] = False,
    gguf_type: Annotated[str, typer.Option(help="With --merged: f16 or q8_0.")] = "f16",
) -> None:
    """Write a LoRA-family adapter as a plain LoRA or llama.cpp GGUF (DoRA, IA3: a rank-k SVD, error printed)."""
    from .errors import PeftError
    from .export import to_gguf, to_lora

    if to not in ("lora", "gguf"):
        raise PeftError(f"--to {to!r} is not a known format; use --to lora or --to gguf")
    if os.path.exists(out):
        raise PeftError(f"output folder {out!r} already exists; choose a new folder or delete it")
    if merged and to != "gguf":
        raise PeftError("--merged writes a GGUF model: add --to gguf (for a merged transformers folder: peftkit merge)")
    base_model = None
    if base is not None:
        from .config import PeftConfig
        from .merge import load_base_for

        base_model = load_base_for(base, adapter, PeftConfig.from_pretrained(adapter))
    if merged:
        from .export import GGUF_OUT_TYPES, merged_to_gguf
        from .merge import resolve_base
        from .model import PeftModel

        if gguf_type not in GGUF_OUT_TYPES:
            raise PeftError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_OUT_TYPES)}")
        if base_model is None:
            raise PeftError("--merged needs --base, the model the adapter was trained on (loaded from its GGUF)")
        folder, extra = resolve_base(base)
        if "gguf_file" not in extra:
            raise PeftError(f"--merged takes the tokenizer and metadata from the base's GGUF, and {base!r} was not "
                            "loaded from one; write a merged folder with `peftkit merge` and convert it with "
                            "llama.cpp's convert_hf_to_gguf.py")
        count = merged_to_gguf(PeftModel.from_pretrained(base_model, adapter), out,
                               os.path.join(folder, extra["gguf_file"]), gguf_type)
        typer.echo(f"merged model written to {out} (GGUF {gguf_type}, {count} tensors, metadata from {extra['gguf_file']})")
        return
    report = (to_lora if to == "lora" else to_gguf)(adapter, out, rank, base_model=base_model)
    typer.echo(report.summary())
    typer.echo(f"{'plain LoRA adapter' if to == 'lora' else 'llama.cpp LoRA adapter (GGUF)'} written to {out}")


# ---- inspect ----------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog="Example: peftkit inspect runs/demo/lora/adapter")
@friendly
def inspect(
    folder: Annotated[str, typer.Argument(help="Adapter folder (peftkit or HF PEFT), a run folder, or a Hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Method, config, per-module shapes, trainable parameters and size of an adapter folder."""
    from .inspection import describe, render

    info = describe(folder)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        render(info)


# ---- demo -------------------------------------------------------------------------------------------


@app.command(cls=_Command, epilog="Examples: peftkit demo   |   peftkit demo --method vera   |   peftkit demo --task chat")
@friendly
def demo(
    task: Annotated[str, typer.Option(help="classify (MiniLM on BBC News) or chat (SmolLM2 on chatterbot).")] = "classify",
    method: Annotated[str, typer.Option(help="Any method name: lora, dora, vera, ia3, houlsby, bitfit, ...")] = "lora",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the demo's own).")] = None,
    out: Annotated[str, typer.Option(help="Output folder.")] = "runs/demo",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: SECTION.KEY=VALUE.")] = None,
) -> None:
    """A real fine-tune of a real model on real data, all shipped by PyPI packages (nothing downloaded)."""
    from .demo import run_demo

    run_demo(task=task, method=method, steps=steps, out=out, overrides=set_ or [])


# ---- compare ----------------------------------------------------------------------------------------


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"{what} {item!r}: expected NAME=VALUE")
        out[key.strip()] = value
    return out


@app.command(cls=_Command, epilog="Examples: peftkit compare --quick   |   peftkit compare run.yaml --methods full,lora,vera,ia3 "
             "--sweep   |   peftkit compare --task chat")
@friendly
def compare(
    config: Annotated[str | None, typer.Argument(help="YAML run config (default: MiniLM on BBC News).")] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods (default: all that fit).")] = None,
    task: Annotated[str, typer.Option(help="Without CONFIG: classify (MiniLM/BBC) or chat (SmolLM2/chatterbot).")] = "classify",
    out: Annotated[str | None, typer.Option(help="Report folder (default: runs/compare, runs/compare-chat with "
                                              "--task chat; with CONFIG: its training.output_dir/compare).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run: 4 steps on a little data.")] = False,
    sweep: Annotated[bool, typer.Option("--sweep", help="Try 0.3x, 1x, 3x each method's rate; keep the best on eval.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip methods already finished in OUT.")] = False,
    lr: Annotated[list[str] | None, typer.Option(help="A method's rate: METHOD=VALUE (repeatable).")] = None,
    option: Annotated[list[str] | None, typer.Option(help="A method option: METHOD.KEY=VALUE (repeatable).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: SECTION.KEY=VALUE.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Seconds allowed per method run.")] = None,
) -> None:
    """Every method on the same data, steps and seed: metric, parameters, time, memory, size, forgetting."""
    import yaml

    from .compare import run_compare

    lrs = {k: float(v) for k, v in _pairs(lr, "--lr").items()}
    options: dict[str, dict] = {}
    for key, value in _pairs(option, "--option").items():
        method, _, field = key.partition(".")
        if not field:
            _fail(f"--option {key!r}: expected METHOD.KEY=VALUE, e.g. lora.r=16")
        options.setdefault(method, {})[field] = yaml.safe_load(value)
    names = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    report = run_compare(config, names, task=task, out=out, quick=quick, sweep=sweep, resume=resume, lrs=lrs,
                         options=options, overrides=set_ or [], timeout=timeout, echo=typer.echo)
    print_compare_table(report)
    typer.echo(f"report: {os.path.join(report['out'], 'compare.md')} and compare.html, compare.json, plots")


def print_compare_table(report: dict[str, Any], console: Any = None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .compare import console_table

    head, rows, errors = console_table(report)
    t = Table(title="peftkit compare (every column: compare.md)", box=box.SIMPLE_HEAD)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    console = console or Console()
    console.print(t)
    for line in errors:
        console.print(line, markup=False)


# ---- plan ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_lines(report: Any, memory_text: str) -> list[str]:
    """The text ``peftkit plan`` prints for a :class:`peftkit.plan.PlanReport`."""
    p = report.asked
    c = p.counts
    lines = [f"{p.model}: {c.total:,d} parameters, {c.trainable:,d} trainable ({100 * c.trainable / c.total:.3f}%)"
             + (f", {c.quantized:,d} stored NF4" if c.quantized else ""),
             f"setting: {p.setting} on {p.gpus} device(s), batch {p.batch} × seq {p.seq} per device, {p.dtype}; "
             f"memory per device {memory_text} = {_gib(p.capacity)}",
             "", f"{'per device':<16}{'GiB':>10}"]
    lines += [f"{name:<16}{value / 2**30:>10.2f}" for name, value in p.parts.items()]
    lines += [f"{'total':<16}{p.total / 2**30:>10.2f}", ""]
    held = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in p.resident.items())
    if p.phase == "backward":
        lines.append("at the start of backward, the step's peak (every activation; gradients are allocated as "
                     f"backward frees them); held throughout, GiB: {held}")
    else:
        lines.append("at the optimizer step, the step's peak (every gradient and AdamW's temporaries; the "
                     f"activations are freed); held throughout, GiB: {held}")
    lines.append(p.verdict())
    if report.cheapest is None:
        lines.append(f"nothing tried fits ({', '.join(str(t.setting) for t in report.tried)}); "
                     "use more or larger devices, a smaller batch or a shorter seq")
    elif report.cheapest.setting == p.setting:
        lines.append(f"cheapest setting that fits: {p.setting} (as asked)")
    else:
        lines.append(f"cheapest setting that fits: {report.cheapest.setting} ({_gib(report.cheapest.total)} per "
                     "device)")
    lines.append("overhead = CUDA context, cuBLAS and NCCL buffers, a fixed estimate; activations assume SDPA "
                 "(fused attention kernels)")
    return lines


@app.command("plan", epilog="Examples: peftkit plan smollm2 --method lora --gpu-memory 24GiB --batch 8 --seq 512   |   "
             "peftkit plan meta-llama/Llama-2-7b-hf --method qlora --gpu-memory 24GB   |   "
             "peftkit plan ./llama-70b --method lora --gpus 8 --strategy fsdp --checkpointing")
@friendly
def plan_(
    model: Annotated[str, typer.Argument(help="A transformers model folder (config.json is enough), a Hub id "
                                              "already in the cache, or minilm / smollm2. No weights are read.")],
    method: Annotated[str, typer.Option(help="lora, dora, qlora, rslora, loraplus, lora_fa or full.")] = "lora",
    gpus: Annotated[int, typer.Option(help="Number of devices.")] = 1,
    gpu_memory: Annotated[str, typer.Option(help="Memory per device with its unit: 80GiB (2^30 bytes), "
                                                 "80GB (10^9), 24G (read as GiB).")] = "80GiB",
    batch: Annotated[int, typer.Option(help="Micro-batch per device (sequences).")] = 1,
    seq: Annotated[int, typer.Option(help="Tokens per sequence.")] = 2048,
    strategy: Annotated[str, typer.Option(help="ddp (every device holds everything) or fsdp (weights, "
                                               "gradients and optimizer state sharded over the devices).")] = "ddp",
    checkpointing: Annotated[bool, typer.Option(help="Activation checkpointing (keeps one input per layer).")] = False,
    dtype: Annotated[str, typer.Option(help="Compute dtype of the base model: bf16, fp16 or fp32.")] = "bf16",
    precision: Annotated[str, typer.Option(help="mixed (an fp32 master copy, fp32 gradients and AdamW state "
                                                "for trainable bf16 weights) or pure (as peftkit train's "
                                                "model.dtype does).")] = "mixed",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table.")] = False,
) -> None:
    """Will a fine-tune fit? Weights, gradients, optimizer state and activations per device from the model's config
    (exact parameter counts from a model built on the meta device), the verdict, and the cheapest setting that fits."""
    from .plan import plan as make_plan

    report = make_plan(model, method, gpus=gpus, gpu_memory=gpu_memory, batch=batch, seq=seq, strategy=strategy,
                       checkpointing=checkpointing, dtype=dtype, precision=precision)
    if as_json:
        def one(p: Any) -> dict[str, Any]:
            return {"setting": str(p.setting), "parts_bytes": p.parts, "total_bytes": p.total, "fits": p.fits,
                    "peak_phase": p.phase, "phases_bytes": p.phases, "resident_bytes": p.resident}

        typer.echo(json.dumps({"model": report.asked.model, "parameters": report.asked.counts.total,
                               "trainable": report.asked.counts.trainable, "capacity_bytes": report.asked.capacity,
                               "asked": one(report.asked), "verdict": report.asked.verdict(),
                               "cheapest": one(report.cheapest) if report.cheapest else None,
                               "tried": [one(p) for p in report.tried]}, indent=2))
        return
    for line in plan_lines(report, gpu_memory):
        typer.echo(line)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
