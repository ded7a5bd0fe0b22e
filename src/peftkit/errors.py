"""Exceptions. Each message names the problem and the fix in one line.

They derive from ``ValueError`` (or ``KeyError`` for names), as HF PEFT's do, so existing ``except``
clauses keep working.
"""

from __future__ import annotations


class PeftError(ValueError):
    """Base class of peftkit's errors."""


class PeftConfigError(PeftError):
    """A config value or an adapter_config.json is invalid or unsupported."""


class TargetModulesError(PeftError):
    """target_modules matched nothing, or matched a module type the method cannot adapt."""


class AdapterNameError(PeftError, KeyError):
    """An adapter name is unknown or already taken."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AdapterFileError(PeftError):
    """An adapter file is missing, corrupt, or does not fit the model."""


class BaseModelMismatchError(AdapterFileError, TargetModulesError):
    """An adapter does not fit the model given because it was trained on another base model (the message names
    both). A subclass of both errors that checks of files and of targets raised before, so their handlers hold."""


class NoTrainableParametersError(PeftError, RuntimeError):
    """Training was started on a model with no trainable parameters."""
