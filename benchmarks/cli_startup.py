"""How long the ``peftkit`` command takes to answer, before and after: wall time of whole processes.

Commands: ``peftkit --help``, ``peftkit inspect FOLDER`` (a LoRA on a tiny Llama built from a config, q/k/v
targets), and ``python -c "import peftkit"``. Each runs ``--repeats`` times in a fresh subprocess, with
``PYTHONPATH`` pointing at this checkout's ``src`` ("now") and, with ``--before SRC``, at another checkout's
``src`` (e.g. the main branch: "before"); the two alternate run by run, so a busy machine slows both alike,
and the table shows medians and their ratio. It also lists which heavy modules each command imported.

    python benchmarks/cli_startup.py                                  # now only
    python benchmarks/cli_startup.py --before /work/main/src          # side by side

Writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "transformers", "numpy", "safetensors", "torchao")
REPORT = ("sys.stderr.write('MODULES ' + ' '.join(sorted({m.split('.')[0] for m in sys.modules} & set("
          + repr(HEAVY) + "))) + '\\n')\n")
PROBE = ("import sys, runpy\nsys.argv = ['peftkit', *sys.argv[1:]]\ntry:\n    runpy.run_module('peftkit', "
         "run_name='__main__')\nexcept SystemExit:\n    pass\n" + REPORT)
MAKE_ADAPTER = """
import sys
from transformers import LlamaConfig, LlamaForCausalLM
from peftkit import LoraConfig, get_peft_model
base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])).save_pretrained(sys.argv[1])
"""


def _env(src: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=src, HF_HUB_OFFLINE="1", COLUMNS="80")
    env.pop("PEFTKIT_DEBUG", None)
    return env


def run_once(src: str, argv: list[str]) -> tuple[float, list[str]]:
    """(wall seconds, heavy modules imported) of one command in a fresh interpreter."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], env=_env(src), capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed with {src}: {proc.stderr[-500:]}")
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES")]
    return wall, (line[-1].split()[1:] if line else [])


def import_once(src: str) -> tuple[float, list[str]]:
    code = "import sys, peftkit\n" + REPORT
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=_env(src), capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES")]
    return wall, (line[-1].split()[1:] if line else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--before", help="another checkout's src folder to compare with (e.g. /work/main/src)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_startup.json"))
    args = ap.parse_args()
    now_src = str(ROOT / "src")
    sources = {"now": now_src, **({"before": args.before} if args.before else {})}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = os.path.join(tmp, "lora")
        subprocess.run([sys.executable, "-c", MAKE_ADAPTER, adapter], env=_env(now_src), check=True,
                       capture_output=True)
        commands = {"peftkit --help": ["--help"], "peftkit inspect FOLDER": ["inspect", adapter],
                    "import peftkit": None}
        times: dict[str, dict[str, list[float]]] = {c: {s: [] for s in sources} for c in commands}
        modules: dict[str, dict[str, list[str]]] = {c: {} for c in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                for label, src in sources.items():  # alternate: before, now, before, now ...
                    wall, mods = run_once(src, argv) if argv is not None else import_once(src)
                    times[name][label].append(wall)
                    modules[name][label] = mods
    rows = []
    for name in commands:
        row = {"command": name, "repeats": args.repeats}
        for label in sources:
            row[f"{label}_median_s"] = statistics.median(times[name][label])
            row[f"{label}_all_s"] = times[name][label]
            row[f"{label}_heavy_modules"] = modules[name][label]
        if "before" in sources:
            row["before_over_now"] = row["before_median_s"] / row["now_median_s"]
        rows.append(row)
    head = f"{'command':<24} {'now (median s)':>15}" + (f" {'before':>9} {'ratio':>7}" if "before" in sources else "")
    print(head + "  heavy modules imported (now)")
    for r in rows:
        line = f"{r['command']:<24} {r['now_median_s']:>15.2f}"
        if "before" in sources:
            line += f" {r['before_median_s']:>9.2f} {r['before_over_now']:>6.1f}x"
        print(line + "  " + (", ".join(r["now_heavy_modules"]) or "none"))
    result = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
