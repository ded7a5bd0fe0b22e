"""What a run shows and leaves behind: a progress bar, metrics as JSONL, a PNG plot, a final table."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Any

from ..io import atomic_write_bytes


class Metrics:
    """``metrics.jsonl``: one JSON object per line (``split`` is "train" or "eval"). On resume, rows after
    the checkpoint's step and a partial last line (a run killed mid-write) are dropped.

    A train row's ``loss`` is the mean training loss of the ``loss_steps`` optimizer steps since the previous
    train row (smoother to plot); ``step_loss`` is the loss of the row's own step alone. The console line
    prints both, labelled the same way. An eval row's ``loss`` is the mean over the whole eval split."""

    def __init__(self, path: str, resume_step: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    if row.get("step", 0) <= resume_step:
                        self.rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in self.rows)
        atomic_write_bytes(path, text.encode())

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


def integer_steps(ax) -> None:
    """Optimizer steps are whole numbers: ticks only at integers, and an x range of at least two steps (a
    panel with one eval point would otherwise span 2.84-3.16 with ticks every 0.04)."""
    from matplotlib.ticker import MaxNLocator

    lo, hi = ax.get_xlim()
    if hi - lo < 2:
        mid = round((lo + hi) / 2)
        ax.set_xlim(mid - 1, mid + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot(rows: list[dict[str, Any]], path: str, title: str, metric: str) -> bool:
    """Train/eval loss against steps (left) and the eval metric (right), written atomically as PNG.
    Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax1.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax1.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss", color="tab:orange")
        ax2.plot([r["step"] for r in evals], [r.get(metric) for r in evals], "o-", color="tab:green")
    for ax in (ax1, ax2):
        integer_steps(ax)
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel(f"eval {metric}")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def progress_line(step: int, total: int, loss: float, tokens_per_s: float, eta: float,
                  mean_loss: float | None = None, mean_of: int = 1) -> str:
    """The plain progress line (logs, CI), each loss labelled: the step's own, and the mean that
    metrics.jsonl records for this step (over the steps since its previous train row)."""
    mean = f"  mean loss {mean_loss:.4f} (last {mean_of} steps)" if mean_loss is not None and mean_of > 1 else ""
    return (f"step {step}/{total}  step loss {loss:.4f}{mean}  {tokens_per_s:,.0f} tok/s  eta {eta:.0f}s")


class Progress:
    """A rich progress bar (steps, loss, tokens/s, ETA) on a terminal; a plain line every ``log_every``
    steps otherwise (logs, CI). Silent on ranks other than 0."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool = True, label: str = "training") -> None:
        self.total, self.log_every, self.enabled = total, log_every, enabled
        self.bar = None
        self.t0 = time.perf_counter()
        self.start = start
        if not enabled:
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress
        except ImportError:
            return
        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self.bar = RichProgress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("step loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = self.bar.add_task(label, total=total, completed=start, loss="-", speed="-")
        self.bar.start()

    def update(self, step: int, loss: float, tokens_per_s: float, mean_loss: float | None = None,
               mean_of: int = 1) -> None:
        """``loss``: this step's; ``mean_loss``: the mean of the last ``mean_of`` steps, the value the
        metrics.jsonl row of this step holds (see :class:`Metrics`)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", speed=f"{tokens_per_s:,.0f}")
        elif step % self.log_every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            done = step - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            print(progress_line(step, self.total, loss, tokens_per_s, eta, mean_loss, mean_of), flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def table(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column summary table (rich when available)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for k, v in rows:
            print(f"  {k:<34} {v}")
        return
    t = Table(title=title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    Console(file=sys.stdout).print(t)
