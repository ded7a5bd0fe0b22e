"""Method families. Importing this package registers every method with the config registry."""

from . import bitfit, lora  # noqa: F401  (registers BITFIT, BEFT, LORA)
