"""transformers' ``Trainer`` with peftkit models: adapter-only checkpoints that resume exactly.

Trainer saves ``model.save_pretrained`` only for its own known classes (PreTrainedModel, HF PEFT's
PeftModel); for any other model it writes the *full* state dict to every checkpoint, and on resume it
cannot find an adapter. ``adapter_checkpoints(trainer)`` fixes both for a peftkit model, on any Trainer
subclass (TRL's SFTTrainer included), without changing the training itself:

* each checkpoint holds the adapter in HF PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable by peftkit and HF PEFT) plus ``peftkit_training_state.safetensors``
  (every trainable tensor and Delta-LoRA's step state: what an exact resume needs), next to the optimizer,
  scheduler and RNG files Trainer writes itself;
* ``trainer.train(resume_from_checkpoint=...)`` restores that state (or, for a folder with only an adapter,
  the adapter's tensors);
* a Delta-LoRA adapter gets its step hook attached (``peftkit.optim.delta_lora_callback``).

    trainer = adapter_checkpoints(Trainer(model=peft_model, args=args, train_dataset=ds))
    # or: trainer = PeftTrainer(model=peft_model, args=args, train_dataset=ds)
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

from ..errors import AdapterFileError
from ..io import atomic_write_bytes
from ..model import PeftModel

STATE_NAME = "peftkit_training_state.safetensors"


def _peft(model: Any) -> PeftModel | None:
    while model is not None and not isinstance(model, PeftModel):
        model = getattr(model, "module", None)  # DDP / accelerate wrappers
    return model


def _save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    peft_model = _peft(self.model)
    if peft_model is None:
        return self._peftkit_original_save(output_dir, state_dict)
    output_dir = output_dir if output_dir is not None else self.args.output_dir
    if not self.args.should_save:
        return None
    os.makedirs(output_dir, exist_ok=True)
    peft_model.save_pretrained(output_dir)
    from safetensors.torch import save

    from ..train.state import training_state

    state = {k: v.detach().cpu().contiguous() for k, v in training_state(peft_model).items()}
    atomic_write_bytes(os.path.join(output_dir, STATE_NAME), save(state))
    tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(output_dir)
    torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
    return None


def _load(self: Any, resume_from_checkpoint: str, model: Any = None) -> None:
    peft_model = _peft(model if model is not None else self.model)
    if peft_model is None:
        return self._peftkit_original_load(resume_from_checkpoint, model)
    from safetensors.torch import load_file

    from ..io import read_adapter_weights
    from ..model import set_peft_model_state_dict
    from ..train.state import load_training_state

    state_file = os.path.join(resume_from_checkpoint, STATE_NAME)
    if os.path.isfile(state_file):
        device = next(peft_model.parameters()).device
        load_training_state(peft_model, {k: v.to(device) for k, v in load_file(state_file).items()})
    elif os.path.isfile(os.path.join(resume_from_checkpoint, "adapter_config.json")):
        set_peft_model_state_dict(peft_model, read_adapter_weights(resume_from_checkpoint), peft_model.active_adapter)
    else:
        raise AdapterFileError(f"checkpoint {resume_from_checkpoint!r} holds no peftkit adapter; resume from a "
                               "folder written by a Trainer given adapter_checkpoints()")
    return None


def _load_best(self: Any) -> None:
    if _peft(self.model) is None:
        return self._peftkit_original_load_best()
    return _load(self, self.state.best_model_checkpoint)


def adapter_checkpoints(trainer: Any) -> Any:
    """Make ``trainer`` (a transformers Trainer or subclass) write and resume adapter-only checkpoints
    for a peftkit model. Returns the same trainer."""
    if getattr(trainer, "_peftkit_patched", False):
        return trainer
    trainer._peftkit_original_save = trainer._save
    trainer._peftkit_original_load = trainer._load_from_checkpoint
    trainer._peftkit_original_load_best = trainer._load_best_model
    trainer._save = types.MethodType(_save, trainer)
    trainer._load_from_checkpoint = types.MethodType(_load, trainer)
    trainer._load_best_model = types.MethodType(_load_best, trainer)
    trainer._peftkit_patched = True
    peft_model = _peft(trainer.model)
    if peft_model is not None:
        from ..methods.delta_lora import delta_lora_layers

        has_hook = any(type(c).__name__ == "DeltaLoraCallback" for c in trainer.callback_handler.callbacks)
        if not has_hook and any(True for _ in delta_lora_layers(peft_model)):
            from ..optim import delta_lora_callback

            trainer.add_callback(delta_lora_callback())
    return trainer


def is_fused_lm_head_patch(peft_model: PeftModel, value: Any) -> bool:
    """Is ``value`` TRL's fused LM-head forward (``trl.trainer.utils.add_fused_lm_head``) bound to ``peft_model``?"""
    function = getattr(value, "__func__", None)
    return (getattr(value, "__self__", None) is peft_model and function is not None
            and function.__code__.co_name == "_fused_forward")  # functools.wraps renamed the function itself


def move_fused_lm_head(peft_model: PeftModel, patch: Any) -> None:
    """Put TRL's fused LM-head patch where it belongs. SFTTrainer replaces the forward of the model it is
    given with one that reads ``self.base_model`` as the transformer backbone (transformers' meaning); on a
    PeftModel ``base_model`` is HF PEFT's tuner wrapper (the whole model). So the same patch, with the same
    options, goes on the wrapped transformers model instead, and PeftModel.forward passes its
    ``fused_lm_head=True`` through. PeftModel.__setattr__ calls this when SFTTrainer assigns the patch."""
    from trl.trainer.utils import add_fused_lm_head

    function = patch.__func__
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
    options = {name: cells[name].cell_contents for name in ("temperature", "cast_lm_head_to_fp32", "outputs")
               if name in cells}
    add_fused_lm_head(peft_model.base_model.model, **options)


def _trainer_class() -> type:
    from transformers import Trainer

    class PeftTrainer(Trainer):
        """``transformers.Trainer`` with :func:`adapter_checkpoints` applied."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            adapter_checkpoints(self)

    return PeftTrainer


def __getattr__(name: str) -> Any:
    if name == "PeftTrainer":
        cls = _trainer_class()
        globals()["PeftTrainer"] = cls
        return cls
    raise AttributeError(name)
