"""TRL's SFTTrainer and transformers pipelines with a peftkit model (tiny Llama, an in-memory dataset)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiny_run
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from peftkit import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peftkit.integrations.transformers import adapter_checkpoints  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_run.model_folder(tmp_path_factory.mktemp("trl"), "llama")


def dataset():
    from datasets import Dataset

    words = tiny_run.WORDS
    return Dataset.from_list([{"prompt": " ".join(words[i % 9: i % 9 + 3]),
                               "completion": " " + " ".join(words[i % 7: i % 7 + 2])} for i in range(32)])


def sft(folder: Path, out: Path, steps: int = 4, patch: bool = True):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
                     learning_rate=5e-2, report_to=[], use_cpu=True, max_length=32, seed=0, logging_steps=1,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset(),
                         processing_class=AutoTokenizer.from_pretrained(folder))
    return (adapter_checkpoints(trainer) if patch else trainer), model


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_sft_trainer_trains_checkpoints_hold_the_adapter_and_resume_exactly(folder, tmp_path) -> None:
    trainer, model = sft(folder, tmp_path / "a")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = {n: p.detach() for n, p in model.named_parameters()}
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_" in n for n in moved)  # only the adapter trained (lora_A and lora_B)
    assert any("lora_B" in n for n in moved)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit_training_state.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    # the checkpoint is a plain adapter folder: peftkit loads it
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), checkpoint)
    final = adapter_state(model)
    resumed_trainer, resumed = sft(folder, tmp_path / "b")
    resumed_trainer.train(resume_from_checkpoint=str(checkpoint))
    for name, value in adapter_state(resumed).items():
        assert torch.equal(value, final[name]), name


def test_sft_trainer_without_adapter_checkpoints_still_trains_the_adapter(folder, tmp_path) -> None:
    """SFTTrainer puts its fused LM-head forward on the model it is given; on a PeftModel it lands on the wrapped
    transformers model (whose base_model is the backbone TRL expects), and the loss is the model's own."""
    trainer, model = sft(folder, tmp_path / "c", steps=2, patch=False)
    assert model.__dict__["forward"].__class__.__name__ == "_SignedForward"
    inner = model.base_model.model
    assert inner.__dict__["forward"].__func__.__code__.co_name == "_fused_forward"
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        fused = model(**batch, fused_lm_head=True)
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logp = torch.log_softmax(plain.logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    expected = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != -100)
    torch.testing.assert_close(fused.log_probs * (labels != -100), expected, rtol=1e-4, atol=1e-5)
    before = adapter_state(model)
    trainer.train()
    assert any(not torch.equal(before[n], v) for n, v in adapter_state(model).items())


def test_text_generation_pipeline_with_several_adapters_per_row(folder) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    prompts = ["w1 w2 w3", "w4 w5"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "return_full_text": False}
    mixed = pipe(prompts, adapter_names=["default", "b"], batch_size=2, **kwargs)
    alone = []
    for name, prompt in zip(["default", "b"], prompts, strict=True):
        model.set_adapter(name)
        alone.append(pipe(prompt, **kwargs)[0]["generated_text"])
        ids = tok(prompt, return_tensors="pt")
        direct = model.generate(**ids, max_new_tokens=6, do_sample=False)
        assert tok.decode(direct[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == alone[-1]
    assert [row[0]["generated_text"] for row in mixed] == alone
    assert alone[0] != alone[1]  # the adapters differ, so the test can fail


def test_text_classification_pipeline(tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    bert = tiny_run.model_folder(tmp_path, "bert")
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(bert),
                           LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS", init_lora_weights=False))
    model.eval()
    tok = AutoTokenizer.from_pretrained(bert)
    scores = pipeline("text-classification", model=model, tokenizer=tok, top_k=None)(["w1 w2 w3"])[0]
    with torch.no_grad():
        probs = model(**tok("w1 w2 w3", return_tensors="pt")).logits.softmax(-1)[0]
    got = {row["label"]: row["score"] for row in scores}
    assert got == pytest.approx({f"LABEL_{i}": float(p) for i, p in enumerate(probs)}, rel=1e-5)
