"""Every method's config, without torch: the dataclasses, their checks and the ``peft_type`` registry entries.

A config is what ``adapter_config.json`` holds, so reading one (``peftkit inspect``, ``PeftConfig.from_pretrained``,
``from peftkit import LoraConfig``) needs no tensors: these modules import nothing heavier than the standard
library and ``regex``. Each method's layers live in ``peftkit.methods.<same name>``, which re-exports its config,
so ``from peftkit.methods.lora import LoraConfig`` names the same class. Importing this package registers every
config with :mod:`peftkit.config`'s registry.
"""

from . import adapters, bitfit, delta_lora, ia3, lora, lora_fa, prompts, vera  # noqa: F401  (each registers its configs)
