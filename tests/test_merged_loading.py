"""Issue 17: a merged model anyone can load, adapters that name their base model, and an adapter on the wrong
base model refused in one line that names both models, before the base's weights are read.

- ``peftkit merge`` of a mean-pooling classifier writes a sentence-transformers folder: the real library's
  ``SentenceTransformer(folder).encode(texts)`` returns peftkit's logits (its Dense layer is the classifier), its
  first two modules peftkit's pooled features, and the encoder's config.json the run's class names. A CLS-pooled
  classifier is a transformers ``*ForSequenceClassification`` folder with the real id2label / label2id.
- ``peftkit train`` records ``base_model_name_or_path`` (HF PEFT's field) and ``peftkit inspect`` shows it.
- An adapter on another kind (or size) of model: ``BaseModelMismatchError`` naming both models, the model given
  left untouched; the CLI says so before it loads any weight. Another checkpoint of the same architecture loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiny_run
import torch
from typer.testing import CliRunner

from peftkit import AdapterFileError, BaseModelMismatchError, LoraConfig, PeftModel, get_peft_model
from peftkit.cli import app
from peftkit.train import Runner, evaluate_adapter, parse_spec

cli = CliRunner()
TEXTS = ["good w1 w2 w3 the movie", "awful w5 w6", "w7 great w8 w9 w10 w11 w12 is a fine w13 w14 w15 w16 w17 w18"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merged_loading")
    tiny_run.model_folder(root, "bert")
    tiny_run.model_folder(root, "llama")
    tiny_run.classification_data(root / "cls.jsonl", n=48)
    tiny_run.lm_data(root / "lm.jsonl", n=24)
    return root


def cls_config(root: Path, out: Path, pooling: str = "mean", max_length: int = 32) -> dict:
    return {"model": {"name": str(root / "tiny-bert"), "max_length": max_length, "pooling": pooling},
            "method": {"name": "lora", "r": 4, "target_modules": ["query", "value"]},
            "data": {"train": str(root / "cls.jsonl")},
            "training": {"max_steps": 3, "batch_size": 8, "lr": 5e-2, "output_dir": str(out)}}


def lm_config(root: Path, out: Path) -> dict:
    return {"model": {"name": str(root / "tiny-llama"), "max_length": 32},
            "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
            "data": {"train": str(root / "lm.jsonl")},
            "training": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "output_dir": str(out)}}


@pytest.fixture(scope="module")
def mean_run(root, tmp_path_factory) -> Runner:
    runner = Runner(parse_spec(cls_config(root, tmp_path_factory.mktemp("mean") / "run")), quiet=True)
    runner.train()
    return runner


@torch.no_grad()
def peftkit_outputs(runner: Runner, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, mean-pooled features) of the run's own (unmerged) model, tokenized as peftkit's eval does."""
    model = runner.model.eval()
    enc = runner.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model.base_model.model.encoder_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)
    return model(**enc).logits, pooled


# ---- 1. a merged model anyone can load -------------------------------------------------------------------


def test_merged_mean_pooling_classifier_is_a_sentence_transformers_folder_with_peftkits_logits(root, mean_run, tmp_path):
    from sentence_transformers import SentenceTransformer

    res = cli.invoke(app, ["merge", str(root / "tiny-bert"), str(mean_run.out) + "/adapter", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    model = SentenceTransformer(str(tmp_path / "m"), device="cpu")  # the README's one line
    logits = model.encode(TEXTS, convert_to_tensor=True)
    expected, pooled = peftkit_outputs(mean_run, TEXTS, 32)
    assert logits.shape == (3, 2) and model.get_sentence_embedding_dimension() == 2
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 1e-3  # a head that really computes something
    encoder = SentenceTransformer(modules=list(model)[:2], device="cpu")  # the merged encoder's own embeddings
    torch.testing.assert_close(encoder.encode(TEXTS, convert_to_tensor=True), pooled, atol=1e-5, rtol=1e-5)
    config = model[0].auto_model.config
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    assert model.max_seq_length == 32  # the run's max_length: long texts are truncated where peftkit truncated
    assert not (tmp_path / "m" / "peftkit_head.json").exists() and not (tmp_path / "m" / "classifier.safetensors").exists()


def test_merged_cls_classifier_loads_in_auto_model_for_sequence_classification_with_class_names(root, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    runner = Runner(parse_spec(cls_config(root, tmp_path / "run", pooling="cls")), quiet=True)
    runner.train()
    res = cli.invoke(app, ["merge", str(root / "tiny-bert"), str(tmp_path / "run" / "adapter"), str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert merged.config.id2label == {0: "neg", 1: "pos"} and merged.config.label2id == {"neg": 0, "pos": 1}
    enc = AutoTokenizer.from_pretrained(tmp_path / "m")(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, runner.model.eval()(**enc).logits, atol=1e-5, rtol=1e-5)


def test_full_fine_tune_of_a_mean_pooling_classifier_is_a_sentence_transformers_folder(root, tmp_path):
    from sentence_transformers import SentenceTransformer

    cfg = cls_config(root, tmp_path / "run")
    cfg["method"] = {"name": "full"}
    runner = Runner(parse_spec(cfg), quiet=True)
    runner.train()
    model = SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu")
    enc = runner.tokenizer(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        expected = runner.model.eval()(**enc).logits
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-5)
    assert model[0].auto_model.config.id2label == {0: "neg", 1: "pos"}


@pytest.mark.slow
def test_merged_minilm_bbc_classifier_gives_peftkits_logits_in_sentence_transformers(tmp_path):
    """The demo's model and data: MiniLM with a LoRA on BBC News, merged, read by the real library."""
    from sentence_transformers import SentenceTransformer

    from peftkit.demo import classify_config
    from peftkit.merge import merge_to_folder

    cfg = classify_config("lora", str(tmp_path / "run"), steps=2)
    cfg["data"].update(max_train=32, max_eval=8)
    cfg["training"].update(batch_size=16, lr=5e-3)
    runner = Runner(parse_spec(cfg), quiet=True)
    runner.train()
    merge_to_folder("minilm", str(tmp_path / "run" / "adapter"), str(tmp_path / "merged"))
    model = SentenceTransformer(str(tmp_path / "merged"), device="cpu")
    articles = [r["text"] for r in runner.data.eval_records[:4]]  # held-out BBC articles
    assert max(len(runner.tokenizer(a)["input_ids"]) for a in articles) > 96  # truncation is part of what is checked
    expected, pooled = peftkit_outputs(runner, articles, 96)
    torch.testing.assert_close(model.encode(articles, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-5)
    encoder = SentenceTransformer(modules=list(model)[:2], device="cpu")
    torch.testing.assert_close(encoder.encode(articles, convert_to_tensor=True), pooled, atol=1e-5, rtol=1e-5)
    names = model[0].auto_model.config.id2label
    assert [names[i] for i in range(5)] == runner.data.labels == ["business", "entertainment", "politics", "sports",
                                                                  "tech"]
    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


# ---- 2. the adapter names its base model --------------------------------------------------------------------


def test_train_records_the_base_model_and_inspect_shows_it(root, mean_run):
    adapter = Path(mean_run.out) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "tiny-bert")
    res = cli.invoke(app, ["inspect", str(adapter), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["adapters"][0]["base_model"] == str(root / "tiny-bert")


def test_embedded_and_hub_names_are_recorded_as_hub_ids():
    from peftkit.train.modeling import base_model_id

    spec = parse_spec({"model": {"name": "minilm"}, "method": {"name": "lora"}, "data": {"train": "bbc_news"}},
                      ".", "t")
    assert base_model_id(spec) == "sentence-transformers/all-MiniLM-L6-v2"
    spec = parse_spec({"model": {"name": "org/some-model", "task": "causal_lm"}, "method": {"name": "lora"},
                       "data": {"train": "chatterbot"}}, ".", "t")
    assert base_model_id(spec) == "org/some-model"


# ---- 3. an adapter on the wrong base model ------------------------------------------------------------------


def _lora_on_tiny_llama(tmp_path: Path, hidden: int = 32, seed: int = 0, name: str = "tiny-llama") -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path / name
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bert_adapter_on_a_llama_names_both_models_and_leaves_the_llama_untouched(root, mean_run):
    from transformers import AutoModelForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(root / "tiny-llama")
    before, modules = _state(llama), [n for n, _ in llama.named_modules()]
    with pytest.raises(BaseModelMismatchError) as err:
        PeftModel.from_pretrained(llama, str(Path(mean_run.out) / "adapter"))
    message = str(err.value)
    assert "\n" not in message
    assert f"this adapter was trained on {root / 'tiny-bert'}; the model given is {root / 'tiny-llama'}" in message
    assert "'bert" in message and "modules_to_save" not in message
    assert [n for n, _ in llama.named_modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())


def test_llama_adapter_on_a_wider_llama_names_both_models(tmp_path):
    from transformers import AutoModelForCausalLM

    small, wide = _lora_on_tiny_llama(tmp_path), _lora_on_tiny_llama(tmp_path, hidden=64, name="wide-llama")
    base = AutoModelForCausalLM.from_pretrained(small)
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(small)
    target = AutoModelForCausalLM.from_pretrained(wide)
    before = _state(target)
    with pytest.raises(BaseModelMismatchError, match=f"trained on {small}; the model given is {wide} "
                       r"\(LlamaForCausalLM\), which it does not fit \('base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight' "
                       r"is \(4, 32\) in the file but \(4, 64\) on this model\)"):
        PeftModel.from_pretrained(target, str(tmp_path / "adapter"))
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_load_adapter_onto_the_wrong_base_names_both_models(tmp_path):
    from transformers import AutoModelForCausalLM

    small, wide = _lora_on_tiny_llama(tmp_path), _lora_on_tiny_llama(tmp_path, hidden=64, name="wide-llama")
    get_peft_model(AutoModelForCausalLM.from_pretrained(small), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "small-adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(wide), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "wide-adapter")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(wide), str(tmp_path / "wide-adapter"))
    with pytest.raises(BaseModelMismatchError, match=f"trained on {small}; the model given is {wide}"):
        peft.load_adapter(str(tmp_path / "small-adapter"), "other")
    assert list(peft.peft_config) == ["default"]


def test_another_checkpoint_of_the_same_architecture_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    first, second = _lora_on_tiny_llama(tmp_path), _lora_on_tiny_llama(tmp_path, seed=1, name="other-checkpoint")
    get_peft_model(AutoModelForCausalLM.from_pretrained(first), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(second), str(tmp_path / "adapter"))
    assert list(model.peft_config) == ["default"]  # the recorded name differs; the shapes fit: it loads


def test_a_broken_config_on_its_own_base_keeps_its_own_message(tmp_path):
    from transformers import AutoModelForCausalLM

    small = _lora_on_tiny_llama(tmp_path)
    get_peft_model(AutoModelForCausalLM.from_pretrained(small), LoraConfig(r=4, target_modules=["q_proj"])
                   ).save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 8}))
    with pytest.raises(AdapterFileError) as err:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small), str(tmp_path / "adapter"))
    assert not isinstance(err.value, BaseModelMismatchError) and "wrong r" in str(err.value)


def test_cli_merge_onto_the_wrong_base_says_so_before_loading_any_weight(root, mean_run, tmp_path, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the base model's weights were loaded before the mismatch was found")

    for auto in (transformers.AutoModelForSequenceClassification, transformers.AutoModel,
                 transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", no_weights)
    adapter = str(Path(mean_run.out) / "adapter")
    res = cli.invoke(app, ["merge", str(root / "tiny-llama"), adapter, str(tmp_path / "m")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert res.output.startswith(f"error: {adapter}: this adapter was trained on {root / 'tiny-bert'}; the model "
                                 f"given is {root / 'tiny-llama'}")
    assert not (tmp_path / "m").exists()


def test_cli_eval_with_a_config_naming_another_base_says_so_before_loading_any_weight(root, mean_run, tmp_path,
                                                                                     monkeypatch):
    import transformers
    import yaml

    shutil.copytree(Path(mean_run.out) / "adapter", tmp_path / "adapter")
    cfg = cls_config(root, tmp_path / "eval")
    cfg["model"].update(name=str(root / "tiny-llama"), task="classification")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    res = cli.invoke(app, ["eval", str(tmp_path / "run.yaml"), "--adapter", str(tmp_path / "adapter")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert f"this adapter was trained on {root / 'tiny-bert'}; the model given is {root / 'tiny-llama'}" in res.output


def test_eval_on_its_own_base_still_scores(root, mean_run):
    spec = parse_spec(cls_config(root, Path(mean_run.out)), ".", "t")
    metrics = evaluate_adapter(spec, str(Path(mean_run.out) / "adapter"))
    assert metrics["accuracy"] == pytest.approx(mean_run.evaluate()["accuracy"])


def test_a_nan_adapter_recorded_on_another_path_keeps_its_own_message(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    small = _lora_on_tiny_llama(tmp_path)
    config = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(small), config).save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, weights)
    shutil.copytree(small, tmp_path / "copy")  # the same model under another name: the adapter fits it
    with pytest.raises(AdapterFileError) as err:
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "copy"), str(tmp_path / "adapter"))
    assert not isinstance(err.value, BaseModelMismatchError) and "NaN" in str(err.value)
