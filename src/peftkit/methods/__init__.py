"""Method families. Importing this package registers every method with the config registry."""

from . import adapters, bitfit, delta_lora, ia3, lora  # noqa: F401  (each registers its methods)
