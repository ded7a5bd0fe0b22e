"""Method families. Importing this package registers every method with the config registry."""

from . import bitfit, ia3, lora  # noqa: F401  (registers BITFIT, BEFT, IA3, LORA)
