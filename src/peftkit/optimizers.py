"""HF PEFT's import path for its optimizer helpers (``from peft.optimizers import ...``), so scripts port by
changing the package name. The implementations live in peftkit.optim and peftkit.methods.lora_fa."""

from .methods.lora_fa import create_lorafa_optimizer
from .optim import create_loraplus_optimizer

__all__ = ["create_lorafa_optimizer", "create_loraplus_optimizer"]
