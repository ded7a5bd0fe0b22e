"""Third-party noise that is not the user's business, switched off one message at a time.

Each filter names exactly what it drops, so a library's other warnings (a deprecated argument, a weight that
was not loaded) still reach the user. A leaf module: it imports nothing of ours and nothing heavy, so the
command line can install the filters before it knows which command runs.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

_ENUM_NOTICE = "is an Enum subclass and is now natively supported"


def torchao_enum_notice(record: logging.LogRecord) -> bool:
    """torch >= 2.13 warns that torchao 0.18 registers its Enums (KernelPreference, ScaleCalculationMode) as
    pytree constants, once per class, on every import of torchao (transformers imports it): torchao's to fix."""
    args = record.args if isinstance(record.args, tuple) else ()
    return (isinstance(record.msg, str) and _ENUM_NOTICE in record.msg and len(args) == 1
            and str(getattr(args[0], "__module__", "")).split(".")[0] == "torchao")


def torchao_optional_kernel(record: logging.LogRecord) -> bool:
    """torchao tries to load every C++ kernel it ships, those built for other GPUs included, and logs each
    one that cannot load on this machine; peftkit's nf4 / int8 use none of them."""
    msg = record.msg if isinstance(record.msg, str) else ""
    return msg.startswith("Failed to load ") and "torchao" in msg and "/_C" in msg


class _Drop(logging.Filter):
    def __init__(self, test: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.test = test

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.test(record)


_INSTALLED: set[str] = set()


def quiet_third_party() -> None:
    """Install the log filters (idempotent). Loggers filter the records created on them, so each filter sits
    on the logger that emits its message."""
    for logger_name, test in (("torch.utils._pytree", torchao_enum_notice), ("torchao", torchao_optional_kernel)):
        if logger_name not in _INSTALLED:
            logging.getLogger(logger_name).addFilter(_Drop(test))
            _INSTALLED.add(logger_name)


def no_gguf_progress_bar() -> None:
    """transformers de-quantises a GGUF file under a tqdm bar of its own, outside its disable_progress_bar
    switch: hundreds of lines in a log for a load that takes seconds. Turn that one bar off (before a load
    from a GGUF file; transformers is imported by then anyway)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - without transformers there is no GGUF load to quieten
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not getattr(bar, "peftkit_quiet", False):
        quiet = functools.partial(bar, disable=True)
        quiet.peftkit_quiet = True  # type: ignore[attr-defined]
        gguf_utils.tqdm = quiet


def no_loading_bars() -> None:
    """transformers draws a "Loading weights" tqdm bar for every model load, and huggingface_hub one per
    download. Both read ``HF_HUB_DISABLE_PROGRESS_BARS`` when transformers is imported, so the command line
    sets it (unless the user did) before that; where transformers is already imported (the CLI called from
    Python, e.g. a test run), its switch is turned off directly, as long as the variable says so."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
