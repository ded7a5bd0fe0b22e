"""Prompt tuning, P-tuning and prefix tuning: the virtual tokens reach the model exactly, generate() equals a
greedy loop over the model's own forward, files round-trip, per-row adapters, training, and bad input."""

from __future__ import annotations

import contextlib
import os

import peft
import pytest
import torch
from conftest import tiny_bert_cls, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from transformers import DynamicCache

import peftkit
from peftkit import PeftConfigError, PeftError, PeftModel, get_peft_model
from peftkit.methods.prompts import ENCODER_FILE, PromptAdapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N = 3  # virtual tokens


def tiny_qwen2(seed: int = 0):
    """Qwen2: biased q/k/v projections, grouped-query attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": tiny_bert_cls}
TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}


def config(method: str, task: str, **kw) -> peftkit.PromptLearningConfig:
    if method == "prompt":
        return peftkit.PromptTuningConfig(task_type=task, num_virtual_tokens=N, **kw)
    if method == "ptuning":
        return peftkit.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_hidden_size=16, **kw)
    if method == "prefix_proj":
        return peftkit.PrefixTuningConfig(task_type=task, num_virtual_tokens=N, prefix_projection=True,
                                          encoder_hidden_size=8, **kw)
    return peftkit.PrefixTuningConfig(task_type=task, num_virtual_tokens=N, **kw)


def make(model_name: str, method: str, seed: int = 1, **kw) -> PeftModel:
    """A PeftModel whose adapter is clearly non-zero."""
    model = get_peft_model(MODELS[model_name](), config(method, TASK[model_name], **kw))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    return model.eval()


def store(model: PeftModel) -> PromptAdapters:
    return model.base_model.model.prompt_encoder


def batch(rows: int = 3, length: int = 6, left_pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    ids = torch.randint(1, 128, (rows, length))
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    return ids, mask


def greedy_loop(model, ids, mask, steps: int, **kw) -> torch.Tensor:
    """Greedy decoding by hand: the whole sequence through forward each step, positions from the mask as
    generate() computes them."""
    eos = model.base_model.model.generation_config.eos_token_id
    eos = -1 if eos is None else eos  # no EOS: never stops
    seq, m, done = ids, mask, torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        positions = (m.cumsum(-1) - 1).clamp(min=0)
        step = model(input_ids=seq, attention_mask=m, position_ids=positions, **kw).logits[:, -1].argmax(-1)
        step = torch.where(done, eos, step)  # generate() pads a finished row with EOS
        done |= step == eos
        seq = torch.cat([seq, step.unsqueeze(1)], dim=1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    return seq


@contextlib.contextmanager
def prompts_off(model: PeftModel):
    """Only the prompt off (a SEQ_CLS head trained with it stays on)."""
    store(model).disable_adapters = True
    try:
        yield
    finally:
        store(model).disable_adapters = False


def hand_cache(model: PeftModel, table: torch.Tensor, rows: int) -> DynamicCache:
    """The prefix as a cache, built from the paper: layer ℓ's keys and values, (rows, kv_heads, n, head_dim)."""
    cfg = model.peft_config["default"]
    layers, heads = cfg.num_layers, cfg.num_attention_heads
    head_dim = cfg.token_dim // heads
    cache = DynamicCache(config=model.base_model.model.config)
    flat = table.view(N, layers, 2, heads, head_dim)
    for layer in range(layers):
        keys = flat[:, layer, 0].permute(1, 0, 2).unsqueeze(0).expand(rows, -1, -1, -1)
        values = flat[:, layer, 1].permute(1, 0, 2).unsqueeze(0).expand(rows, -1, -1, -1)
        cache.update(keys, values, layer)
    return cache


# ---- the virtual tokens reach the model exactly -----------------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_prompt_is_prepended_to_inputs_embeds(model_name, method):
    model = make(model_name, method)
    ids, mask = batch()
    adapter = store(model)["default"]
    if method == "prompt":
        prompt = adapter.embedding.weight
    else:  # P-tuning: P = MLP(Pₑ), three Linear layers with ReLU between
        prompt = adapter.embedding.weight
        for layer in adapter.mlp_head:
            prompt = layer(prompt)
    base = model.base_model.model
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        embeds = torch.cat([prompt.expand(3, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        with prompts_off(model):
            want = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1)).logits
    assert got.shape == want.shape
    if model_name != "bert":
        assert got.shape[1] == N + ids.shape[1]  # logits include the virtual positions, as HF PEFT's
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_prefix_is_the_key_value_cache(model_name):
    model = make(model_name, "prefix")
    ids, mask = batch()
    table = store(model)["default"].embedding.weight
    cfg = model.peft_config["default"]
    if model_name == "llama":  # grouped-query: 2 key/value heads of 8 dims, not the hidden size 32
        assert (cfg.num_attention_heads, cfg.token_dim) == (2, 16)
    assert table.shape == (N, cfg.num_layers * 2 * cfg.token_dim)
    base = model.base_model.model
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        cache = hand_cache(model, table, 3)
        assert cache.layers[0].keys.shape == (3, cfg.num_attention_heads, N, cfg.token_dim // cfg.num_attention_heads)
        with prompts_off(model):
            want = base(input_ids=ids, attention_mask=torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1),
                        cache=cache).logits
            plain = base(input_ids=ids, attention_mask=mask).logits
    assert got.shape == plain.shape  # prefix tuning adds no positions to the output
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (got - plain).abs().max() > 1e-2


def test_bert_prompt_pads_token_type_ids_and_feature_extraction_keeps_virtual_positions():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)).eval()
    model = get_peft_model(encoder, peftkit.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=N))
    ids, mask = batch()
    types = torch.ones_like(ids)
    prompt = store(model)["default"].embedding.weight
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        with model.disable_adapter():
            want = encoder(inputs_embeds=torch.cat([prompt.expand(3, -1, -1), encoder.embeddings.word_embeddings(ids)], 1),
                           attention_mask=torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1),
                           token_type_ids=torch.cat([torch.zeros(3, N, dtype=torch.long), types], 1)).last_hidden_state
    assert got.shape == (3, N + 6, 32)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_labels_are_padded_for_the_virtual_tokens(method):
    model = make("llama", method)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels)
    virtual = N if method == "prompt" else 0  # prompt logits include the virtual positions; their labels are -100
    padded = torch.cat([torch.full((3, virtual), -100), labels], dim=1)
    assert got.logits.shape[1] == padded.shape[1]
    want = torch.nn.functional.cross_entropy(got.logits[:, :-1].reshape(-1, 128), padded[:, 1:].reshape(-1))
    torch.testing.assert_close(got.loss, want)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "prefix_proj"])
def test_disable_adapter_gives_the_base_model_exactly(model_name, method):
    model = make(model_name, method)
    ids, mask = batch()
    with torch.no_grad():
        want = MODELS[model_name]()(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            got = model(input_ids=ids, attention_mask=mask).logits
        on = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert (on[..., -want.shape[-2]:, :] if on.dim() == 3 else on).sub(want).abs().max() > 1e-2


# ---- parameter counts -------------------------------------------------------------------------------
def test_trainable_parameters_follow_the_formulas():
    cfg = tiny_llama().config
    layers, kv, head_dim, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    prompt = make("llama", "prompt")
    assert prompt.get_nb_trainable_parameters()[0] == N * d * 1  # n·d·num_transformer_submodules
    assert prompt.trainable_parameters_by_kind() == {"adapter": N * d, "heads": 0, "norms": 0, "biases": 0}
    prefix = make("llama", "prefix")
    assert prefix.get_nb_trainable_parameters()[0] == N * 2 * layers * kv * head_dim  # n·2·L·kv_heads·head_dim
    proj = make("llama", "prefix_proj")
    t, h = kv * head_dim, 8  # projection: Pₑ (n·t), Linear(t, h), Linear(h, 2·L·t)
    assert proj.get_nb_trainable_parameters()[0] == N * t + (t * h + h) + (h * 2 * layers * t + 2 * layers * t)
    cls = make("bert", "prompt")
    kinds = cls.trainable_parameters_by_kind()
    assert kinds["adapter"] == N * 32 and kinds["heads"] == 32 * 3 + 3  # the classifier trains with it


# ---- generate() equals a greedy loop over forward ---------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_generate_equals_a_greedy_loop_over_forward(model_name, method):
    model = make(model_name, method)
    ids, mask = batch()  # row 0 left-padded
    with torch.no_grad():
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want = greedy_loop(model, ids, mask, 6)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)


def test_generate_without_mask_and_other_decoding_settings():
    model = make("llama", "prefix")
    ids = batch()[0][1:]
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        seq = ids
        for _ in range(5):  # no mask, no positions: the model's own defaults (no row reaches EOS here)
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(greedy, seq) and not (seq[:, ids.shape[1]:] == 2).any()
        beams = model.generate(input_ids=ids, max_new_tokens=5, num_beams=3, num_return_sequences=2)
        torch.manual_seed(0)
        sampled = model.generate(input_ids=ids, max_new_tokens=5, do_sample=True, top_k=10, temperature=0.7)
    assert beams.shape == (4, ids.shape[1] + 5) and sampled.shape == (2, ids.shape[1] + 5)


# ---- several adapters --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_per_row_adapters_each_row_as_if_alone(method):
    model = make("llama", method)
    wide = config(method, "CAUSAL_LM").copy(num_virtual_tokens=5)
    model.add_adapter("wide", wide)
    with torch.no_grad():
        for p in store(model)["wide"].parameters():
            p.normal_()
    ids, mask = batch()
    names = ["default", "wide", "__base__"]
    length = ids.shape[1]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits[:, -length:]
        alone = []
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    out = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            else:
                model.set_adapter(name)
                out = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits
            alone.append(out[:, -length:])
        model.set_adapter("default")
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                   adapter_names=names)
        looped = greedy_loop(model, ids, mask, 4, adapter_names=names)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert torch.equal(generated, looped)


@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_per_row_generate_builds_the_prompts_once(method, monkeypatch):
    """generate(adapter_names=...) builds each adapter's virtual tokens at the first step only (later steps
    read them from the cache), and works out the rows' layout once per call."""
    model = make("llama", method)
    model.add_adapter("b", config(method, "CAUSAL_LM").copy(num_virtual_tokens=N + 2))
    ids, mask = batch()
    names = ["b", "default", "b"]
    built: list[str] = []
    for name in ("default", "b"):
        module = store(model)[name]
        monkeypatch.setattr(module, "forward", lambda f=module.forward, n=name: built.append(n) or f())
    layouts = []
    real_layout = type(store(model))._layout
    monkeypatch.setattr(type(store(model)), "_layout",
                        lambda self, *a: layouts.append(real_layout(self, *a)) or layouts[-1])
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, adapter_names=names)
    assert sorted(built) == ["b", "default"]  # once each, not once per step
    assert len(layouts) == 5 and all(layout is layouts[0] for layout in layouts)  # every step reuses the first's


def test_lora_and_prompt_rows_share_a_batch():
    model = make("llama", "prompt")
    model.add_adapter("lora", peftkit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids, mask = batch(rows=2, left_pad=0)
    length = ids.shape[1]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_names=["lora", "default"]).logits
        model.set_adapter("lora")
        lora_alone = model(input_ids=ids[:1]).logits
        model.set_adapter("default")
        prompt_alone = model(input_ids=ids[1:]).logits
    torch.testing.assert_close(mixed[:1, -length:], lora_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1:], prompt_alone, atol=1e-5, rtol=1e-5)


def test_switching_deleting_and_refusals():
    model = make("llama", "prompt")
    model.add_adapter("b", config("prefix", "CAUSAL_LM"))
    ids, _ = batch()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        model.set_adapter("b")
        b = model(input_ids=ids).logits
        model.set_adapter(["default", "b"])
        with pytest.raises(PeftError, match="set_adapter"):
            model(input_ids=ids)
        model.set_adapter("default")
        with pytest.raises(PeftError, match="separate batches"):
            model(input_ids=ids, adapter_names=["default", "b", "b"])
    assert a.shape[1] == ids.shape[1] + N and b.shape[1] == ids.shape[1]
    with pytest.raises(PeftError, match="cannot merge") as err:
        model.merge_and_unload()
    assert "\n" not in str(err.value)
    with pytest.raises(PeftError, match="cannot merge"):
        model.merge_adapter()
    model.delete_adapter("b")
    base = model.unload()
    assert not hasattr(base, "prompt_encoder") and not base._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits, atol=0, rtol=0)


# ---- files ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "bert"])
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix", "prefix_proj"])
def test_save_then_load_gives_equal_outputs(tmp_path, model_name, method):
    model = make(model_name, method)
    ids, mask = batch()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "prompt_embeddings" in tensors
    assert os.path.exists(tmp_path / ENCODER_FILE) == (method in ("ptuning", "prefix_proj"))
    loaded = PeftModel.from_pretrained(MODELS[model_name](), tmp_path)
    assert isinstance(store(loaded)["default"], peftkit.methods.prompts.SoftPrompt)  # the output, as HF PEFT
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=1e-5)
    assert loaded.get_nb_trainable_parameters()[0] == 0


@pytest.mark.parametrize("method", ["ptuning", "prefix_proj"])
def test_training_resumes_from_the_saved_encoder(tmp_path, method):
    model = make("llama", method)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    want = dict(store(model)["default"].named_parameters())
    got = dict(store(resumed)["default"].named_parameters())
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.requires_grad for p in got.values())
    # without the encoder file (an HF PEFT folder), the saved prompt itself trains on
    os.remove(tmp_path / ENCODER_FILE)
    table = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    weight = store(table)["default"].embedding.weight
    assert weight.requires_grad
    torch.testing.assert_close(weight, load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"])


def test_stale_encoder_file_is_refused(tmp_path):
    make("llama", "ptuning", seed=1).save_pretrained(tmp_path)
    os.makedirs(tmp_path / "other")
    make("llama", "ptuning", seed=2).save_pretrained(tmp_path / "other")
    os.replace(tmp_path / "other" / ENCODER_FILE, tmp_path / ENCODER_FILE)
    model = tiny_llama()
    with pytest.raises(peftkit.AdapterFileError, match="does not reproduce prompt_embeddings"):
        PeftModel.from_pretrained(model, tmp_path, is_trainable=True)
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks  # rolled back


# ---- training -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix_proj"])
def test_training_the_virtual_tokens_lowers_the_loss(method):
    """A tiny task: continue any sequence with token 7. Only the virtual tokens (and their encoder) train. The
    random base gets larger weights, so that its input has a say (at init scale 0.02 its output barely moves)."""
    base = tiny_llama()
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.mul_(15)
    torch.manual_seed(0)
    model = get_peft_model(base, config(method, "CAUSAL_LM"))
    model.train()
    ids = torch.randint(1, 128, (8, 6))
    ids[:, 3:] = 7
    labels = torch.full_like(ids, -100)
    labels[:, 3:] = 7
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(20):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# ---- initialisation ---------------------------------------------------------------------------------------
class WordTokenizer:
    """A tokenizer object (nothing is downloaded): one id per word."""

    name_or_path = "word-tokenizer"

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [len(w) * 7 % 128 for w in text.split()]}


def test_text_init_takes_a_tokenizer_object():
    tok = WordTokenizer()
    cfg = peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text="classify this text", tokenizer_name_or_path=tok)
    assert cfg.tokenizer is tok and cfg.to_dict()["tokenizer_name_or_path"] == "word-tokenizer"
    assert "tokenizer" not in cfg.to_dict()
    model = get_peft_model(tiny_llama(), cfg)
    ids = torch.tensor((tok("classify this text")["input_ids"] * 2)[:5])
    want = model.base_model.model.get_input_embeddings().weight[ids]
    torch.testing.assert_close(store(model)["default"].embedding.weight, want)


def test_sample_vocab_init_uses_vocabulary_embeddings():
    model = get_peft_model(tiny_llama(), peftkit.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = model.base_model.model.get_input_embeddings().weight
    for row in store(model)["default"].embedding.weight:
        assert (vocab - row).abs().sum(-1).min() == 0


# ---- bad input: one-line errors naming the fix ------------------------------------------------------------
@pytest.mark.parametrize("n", [0, -2, None])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(PeftConfigError, match="num_virtual_tokens must be a positive integer") as err:
        peftkit.PrefixTuningConfig(num_virtual_tokens=n)
    assert "\n" not in str(err.value)


def test_text_init_without_a_tokenizer():
    with pytest.raises(PeftConfigError, match="needs a tokenizer: pass tokenizer="):
        peftkit.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")


def test_prefix_file_for_another_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    make("llama", "prefix").save_pretrained(tmp_path)
    for change, word in [({"num_hidden_layers": 3}, "num_layers=2"), ({"num_key_value_heads": 4}, "key/value heads")]:
        torch.manual_seed(0)
        kw = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64) | change
        other = LlamaForCausalLM(LlamaConfig(**kw))
        with pytest.raises(PeftConfigError, match=word) as err:
            PeftModel.from_pretrained(other, tmp_path)
        assert "\n" not in str(err.value) and "another model" in str(err.value)
        assert not hasattr(other, "prompt_encoder")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_inputs_too_long_once_the_virtual_tokens_are_added(method):
    model = make("gpt2", method)  # n_positions = 64
    ids = torch.randint(1, 128, (1, 64 - N + 1))
    with pytest.raises(PeftError, match=f"keep inputs to at most {64 - N} tokens") as err:
        model(input_ids=ids)
    assert "\n" not in str(err.value)
    with torch.no_grad():
        model(input_ids=ids[:, 1:])  # exactly at the limit is fine


def test_prefix_refuses_to_train_under_gradient_checkpointing():
    model = get_peft_model(tiny_llama(), config("prefix", "CAUSAL_LM"))
    model.base_model.model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(PeftError, match="gradient_checkpointing_disable"):
        model(input_ids=batch()[0])
    with torch.no_grad():
        model(input_ids=batch()[0])  # no gradients, no checkpointing: the cache stays


def test_encoder_decoder_models_are_refused_clearly():
    from conftest import tiny_t5

    with pytest.raises(PeftConfigError, match="encoder-decoder"):
        get_peft_model(tiny_t5(), peftkit.PromptTuningConfig(num_virtual_tokens=4))


# ---- the other entry points ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "ptuning"])
def test_state_dict_round_trip_and_inject_adapter_in_model(method):
    model = make("llama", method)
    state = peftkit.get_peft_model_state_dict(model)
    other = get_peft_model(tiny_llama(), config(method, "CAUSAL_LM"))
    result = peftkit.set_peft_model_state_dict(other, state)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    plain = peftkit.inject_adapter_in_model(config(method, "CAUSAL_LM"), tiny_llama())  # no PeftModel wrapper
    assert isinstance(plain.prompt_encoder, PromptAdapters)
    with torch.no_grad():
        assert plain(input_ids=ids).logits.shape == (3, N + ids.shape[1], 128)


def test_loaded_prompt_adapters_serve_one_batch(tmp_path):
    make("llama", "prompt", seed=1).save_pretrained(tmp_path / "a")
    make("llama", "ptuning", seed=2).save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    ids, mask = batch()
    names = ["b", "a", "b"]
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                   adapter_names=names)
        assert torch.equal(generated, greedy_loop(model, ids, mask, 4, adapter_names=names))
        model.set_adapter("b")
        alone = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated[[0, 2]], alone[[0, 2]])


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_half_precision_base_keeps_fp32_virtual_tokens(method):
    base = tiny_llama().to(torch.bfloat16)
    model = get_peft_model(base, config(method, "CAUSAL_LM"))
    assert all(p.dtype == torch.float32 for p in store(model).parameters())
    ids = batch()[0]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and generated.shape == (3, ids.shape[1] + 3)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "prefix"])
def test_right_padding_leaves_each_rows_tokens_as_if_alone(method):
    model = make("llama", method)
    ids, _ = batch(rows=2, left_pad=0)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding, as for training batches
    virtual = N if method != "prefix" else 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[:1, :-2]).logits
    torch.testing.assert_close(padded[:1, : virtual + ids.shape[1] - 2], alone, atol=1e-5, rtol=1e-5)


# ---- prefix initialised from a text's own keys and values (Li & Liang: "activations of real words") ----------
def id_tokenizer(text: str) -> dict:
    """A tokenizer object for tests: the text is its token ids."""
    return {"input_ids": [int(t) for t in text.split()]}


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_from_text_equals_the_text_before_the_input(model_name, projection, tmp_path):
    """An untrained prefix initialised from text T makes the model on x what the frozen model is on [T; x] at
    x's positions (for the projected form: MLP(Pₑ) reproduces T's keys and values), and the file loads in HF PEFT."""
    text = [5, 17, 99, 42]
    cfg = peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=len(text), prefix_projection=projection,
                                     prefix_init_text=" ".join(map(str, text)), tokenizer=id_tokenizer)
    base = MODELS[model_name]()
    ids = torch.randint(1, 120, (2, 7))
    with torch.no_grad():
        want = base(input_ids=torch.cat([torch.tensor(text).expand(2, -1), ids], 1)).logits[:, len(text):]
    model = get_peft_model(base, cfg).eval()
    assert model.get_nb_trainable_parameters()[0] > 0
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if projection:  # still an MLP that trains: Pₑ and both layers
        assert {n.split("prompt_encoder.default.")[-1] for n, p in model.named_parameters() if p.requires_grad} == {
            "embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"}
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, want, atol=2e-5, rtol=1e-4)


def test_prefix_from_text_repeats_a_short_text_and_refuses_what_it_cannot_do():
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_init_text="7 8", tokenizer=id_tokenizer)
    model = get_peft_model(tiny_llama(), peftkit.PrefixTuningConfig(**cfg))
    keys = store(model).text_key_values(model.peft_config["default"], model.base_model.model)
    torch.testing.assert_close(store(model)["default"].embedding.weight, keys, atol=0, rtol=0)
    with torch.no_grad():
        again = tiny_llama()(input_ids=torch.tensor([[7, 8, 7, 8, 7]]), use_cache=True).past_key_values
    torch.testing.assert_close(keys.view(5, 2, 2, 2, 8)[:, 1, 0].permute(1, 0, 2), again.layers[1].keys[0])
    with pytest.raises(PeftConfigError, match="needs a tokenizer"):
        peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prefix_init_text="1 2")
    with pytest.raises(PeftConfigError, match="keep one"):
        peftkit.PrefixTuningConfig(**cfg, init_weights="zero")
    for model, bad, error, match in (
        (tiny_llama(), {"prefix_projection": True, "encoder_hidden_size": 4}, PeftConfigError, "raise encoder_hidden_size"),
    ):
        with pytest.raises(error, match=match):
            get_peft_model(model, peftkit.PrefixTuningConfig(**{**cfg, **bad}))
        # the model is left as it was: no prompt store, no hook
        assert not hasattr(model, "prompt_encoder") and not any(m._forward_pre_hooks for m in model.modules())


def test_prefix_from_text_on_an_encoder_is_its_own_key_and_value_projections():
    """BERT returns no cache, but writes into one it is given: the prefix starts at the outputs of every layer's
    key and value Linear for the text (read here by hooks, independently of any cache)."""
    base = tiny_bert_cls()
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = [getattr(layer.attention.self, name).register_forward_hook(
        lambda mod, args, out, key=(i, name): seen.__setitem__(key, out.detach()))
        for i, layer in enumerate(base.bert.encoder.layer) for name in ("key", "value")]
    with torch.no_grad():
        base(input_ids=torch.tensor([[7, 8, 7, 8, 7]]))
    for hook in hooks:
        hook.remove()
    model = get_peft_model(base, peftkit.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5,
                                                            prefix_init_text="7 8", tokenizer=id_tokenizer))
    table = store(model)["default"].embedding.weight.view(5, 2, 2, 2, 16)  # (n, layer, k/v, heads, d_h)
    for (layer, name), out in seen.items():
        torch.testing.assert_close(table[:, layer, ("key", "value").index(name)], out[0].view(5, 2, 16),
                                   atol=1e-6, rtol=0)


def test_prefix_preset_is_the_papers_projected_form():
    from peftkit.train.methods import PREFIX_INIT_TEXT, method_entry

    entry = method_entry("prefix")
    cfg = entry.make_config("causal_lm", {}, tiny_llama(), tokenizer=id_tokenizer)
    assert (cfg.prefix_projection, cfg.prefix_init_text, cfg.tokenizer) == (True, PREFIX_INIT_TEXT, id_tokenizer)
    assert entry.make_config("causal_lm", {"prefix_init_text": "1 2"}, tiny_llama(),
                             tokenizer=id_tokenizer).prefix_init_text == "1 2"
    zero = entry.make_config("causal_lm", {"init_weights": "zero"}, tiny_llama(), tokenizer=id_tokenizer)
    assert zero.prefix_init_text is None  # the run's own start wins
    encoder = entry.make_config("classification", {}, tiny_bert_cls(), tokenizer=id_tokenizer)
    # an encoder starts from zero keys and values (real words disturb its features: see _prefix_configure)
    assert (encoder.prefix_projection, encoder.prefix_init_text, encoder.init_weights) == (True, None, "zero")
    assert entry.make_config("classification", {}, tiny_bert_cls()).init_weights == "zero"  # no tokenizer needed
    own = entry.make_config("classification", {"prefix_init_text": "1 2"}, tiny_bert_cls(), tokenizer=id_tokenizer)
    assert (own.prefix_init_text, own.init_weights) == ("1 2", None)
