"""Method families. Importing this package registers every method with the config registry."""

from . import adapters, bitfit, ia3, lora  # noqa: F401  (registers BOTTLENECK, BITFIT, BEFT, IA3, LORA)
