"""Method families. Importing this package registers every method with the config registry."""

from . import adapters, bitfit, delta_lora, dora, ia3, lora, lora_fa, prompts, vera  # noqa: F401  (each registers its methods)
