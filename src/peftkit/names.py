"""Adapter names: the one rule, checked in one place wherever a name enters peftkit.

A name becomes an ``nn.ModuleDict`` key (where ``.`` is refused, part-way through wrapping), a folder
under ``save_pretrained``'s directory (where ``/abs/x`` or ``../../x`` would write outside it) and a key
in ``adapter_names=[...]`` (where ``"__base__"`` means "no adapter"). So a name is an identifier: letters,
digits, ``_`` and ``-``, at most 64 characters, not starting with ``__`` (reserved). Every name HF PEFT
users commonly pick ("default", "lora_1", "my-adapter", "sft", "DPO2") passes.

A leaf module: it imports nothing of peftkit's except the errors.
"""

from __future__ import annotations

import re
from typing import Any

from .errors import AdapterNameError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
RULE = "letters, digits, '_' and '-' (1 to 64 characters, not starting with '__')"


def check_adapter_name(name: Any) -> str:
    """``name`` if it is a valid adapter name, else an AdapterNameError that says the rule and a fix."""
    if not isinstance(name, str):
        raise AdapterNameError(f"adapter name must be a string, got {name!r} ({type(name).__name__}); e.g. 'default'")
    if _NAME.fullmatch(name) is None or name.startswith("__"):
        fixed = re.sub(r"[^A-Za-z0-9_-]+", "_", name).lstrip("_")[:64] or "default"
        raise AdapterNameError(
            f"invalid adapter name {name!r}: names are {RULE}, because they become module keys and folder "
            f"names; use e.g. {fixed!r}"
        )
    return name


def adapter_name_list(names: Any, what: str) -> list[str]:
    """A str or a list of adapter names as a list (one string is one name, never its characters)."""
    if isinstance(names, str):
        return [names]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise AdapterNameError(f"{what} must be an adapter name or a list of names, got {names!r}")
    return list(names)
