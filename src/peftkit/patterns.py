"""Regexes from adapter files, matched with a time limit.

A downloaded ``adapter_config.json`` can hold a regex with catastrophic backtracking (``([a-z_.0-9]+)+Z``)
in ``target_modules``, ``exclude_modules``, ``feedforward_modules``, ``layers_pattern`` or the keys of
``rank_pattern`` / ``alpha_pattern``; Python's ``re`` would then spend longer than the universe's age on one
module name. Every user-given pattern is matched here, through the ``regex`` package (a core dependency:
it is what transformers already installs, and it is the only engine with a per-call timeout; a
fallback to ``re`` would bring the hang back). A match that runs out of time raises one PeftConfigError
naming the field, so loading fails in about a second instead of never finishing.

A leaf module: it imports nothing of peftkit's except the errors.
"""

from __future__ import annotations

import functools

import regex

from .errors import PeftConfigError

# Seconds one match may take: real module names are < 200 characters, and sane patterns match them in µs.
MATCH_TIMEOUT_S = 0.25

# Probed when a config is built, so a pathological pattern is refused before any model is seen (and by
# ``peftkit inspect``): names shaped like real ones, long enough to make exponential backtracking show.
_PROBES = (
    "model.decoder.layers.10.self_attn.q_proj.base_layer.lora_A.default",
    "base_model.model.transformer.h.11.mlp.c_fc_" + "a1_." * 12,
)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str, field: str) -> regex.Pattern:
    """``pattern`` compiled (cached), or a PeftConfigError naming ``field`` if it is not a valid regex."""
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, TypeError, ValueError, RecursionError, OverflowError) as exc:
        raise PeftConfigError(
            f"{field}={pattern!r} is not a valid regular expression ({exc}); fix the pattern or give a list of names"
        ) from None


def _timed_out(pattern: str, field: str) -> PeftConfigError:
    return PeftConfigError(
        f"{field}={pattern!r} takes over {MATCH_TIMEOUT_S}s to match one module name (catastrophic backtracking); "
        "the config is unsafe or broken: give a list of module names or a simpler regex"
    )


def _run(method: str, pattern: str, text: str, field: str, shown: str | None) -> regex.Match | None:
    compiled = compile_pattern(pattern, field)
    try:
        return getattr(compiled, method)(text, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        raise _timed_out(pattern if shown is None else shown, field) from None


def fullmatch(pattern: str, text: str, field: str, shown: str | None = None) -> regex.Match | None:
    """``re.fullmatch(pattern, text)`` with a time limit; ``field`` names the config field in errors and
    ``shown`` the user's own pattern where ``pattern`` embeds it in a larger one."""
    return _run("fullmatch", pattern, text, field, shown)


def match(pattern: str, text: str, field: str, shown: str | None = None) -> regex.Match | None:
    """``re.match(pattern, text)`` with a time limit."""
    return _run("match", pattern, text, field, shown)


def check_pattern(pattern: str, field: str, used_as: str = "{}") -> None:
    """Refuse an invalid pattern, or one that backtracks catastrophically on a realistic module name.
    ``used_as`` is the regex the pattern is embedded in where it is used (``"(.*\\.)?({})$"``)."""
    compile_pattern(pattern, field)  # the message quotes the user's pattern, not the embedding
    for probe in _PROBES:
        match(used_as.replace("{}", pattern), probe, field, shown=pattern)
