"""Several adapters in one batch: each row through its own adapter equals running that adapter alone."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import rows_match_alone, tiny_bert_cls, tiny_gpt2, tiny_llama
from test_peft_model import randomize

from peftkit import AdapterNameError, LoraConfig, PeftError, get_peft_model


def _three_adapters(make, **cfg):
    pm = get_peft_model(make(), LoraConfig(r=4, init_lora_weights=False, **cfg))
    pm.add_adapter("b", LoraConfig(r=2, init_lora_weights=False, **cfg))
    pm.add_adapter("c", LoraConfig(r=8, lora_alpha=3, init_lora_weights=False, **cfg))
    for name in ("default", "b", "c"):
        randomize(pm, name)
    return pm.eval()


@pytest.mark.parametrize("make, targets", [
    (tiny_llama, "all-linear"),
    (tiny_gpt2, ["c_attn", "c_proj", "c_fc", "wte"]),
    (tiny_llama, ["q_proj", "embed_tokens"]),
])
def test_rows_equal_single_adapter_runs(make, targets) -> None:
    pm = _three_adapters(make, target_modules=targets)
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (5, 6))
    names = ["b", "__base__", "default", "c", "b"]
    mixed = rows_match_alone(pm, names, ids)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2  # the adapters really differ


def test_per_row_heads_for_sequence_classification() -> None:
    pm = _three_adapters(tiny_bert_cls, target_modules=["query", "value"], task_type="SEQ_CLS")
    with torch.no_grad():
        for name in ("default", "b", "c"):
            pm.base_model.model.classifier.modules_to_save[name].weight.normal_()
    ids = torch.randint(1, 128, (3, 6))
    names = ["c", "default", "b"]
    mixed = pm(ids, adapter_names=names).logits
    for row, name in enumerate(names):
        pm.set_adapter(name)
        torch.testing.assert_close(mixed[row], pm(ids[row:row + 1]).logits[0], rtol=1e-4, atol=1e-5)


def test_generate_with_adapter_names() -> None:
    pm = _three_adapters(tiny_llama, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(1, 128, (2, 5))
    out = pm.generate(ids, adapter_names=["b", "c"], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    for row, name in enumerate(["b", "c"]):
        pm.set_adapter(name)
        alone = pm.generate(ids[row:row + 1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
        assert torch.equal(out[row:row + 1], alone)


def test_adapter_names_errors() -> None:
    pm = _three_adapters(tiny_llama, target_modules=["q_proj"])
    ids = torch.randint(1, 128, (2, 5))
    with pytest.raises(AdapterNameError, match=r"unknown adapter\(s\) \['x'\]"):
        pm(ids, adapter_names=["x", "b"])
    with pytest.raises(PeftError, match="3 entries but the batch has 2 rows"):
        pm(ids, adapter_names=["b", "c", "b"])
    pm.merge_adapter()
    with pytest.raises(PeftError, match="unmerge_adapter"):
        pm(ids, adapter_names=["b", "c"])


@pytest.mark.parametrize("method", ["lora+dora", "vera_shared", "vera_ranks", "ia3"])
def test_every_mixable_method_rows_equal_alone(method) -> None:
    from peftkit import IA3Config, VeraConfig

    torch.manual_seed(0)
    if method == "lora+dora":  # DoRA and plain LoRA rows in one batch
        make = [LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False),
                LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False),
                LoraConfig(r=3, target_modules=["q_proj"], use_dora=True, init_lora_weights=False)]
    elif method.startswith("vera"):
        ranks = (4, 4, 4) if method == "vera_shared" else (4, 6, 4)
        make = [VeraConfig(r=r, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False) for r in ranks]
    else:
        make = [IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                          init_ia3_weights=False) for _ in range(3)]
    pm = get_peft_model(tiny_llama(), make[0])
    for i, cfg in enumerate(make[1:]):
        pm.add_adapter(f"x{i}", cfg)
    for name in ("default", "x0", "x1"):
        randomize(pm, name)
    pm.eval()
    ids = torch.randint(1, 128, (6, 5))
    names = ["x1", "default", "__base__", "x0", "default", "x1"]
    mixed = rows_match_alone(pm, names, ids)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2


def test_stacked_weights_are_cached_and_follow_weight_changes() -> None:
    pm = _three_adapters(tiny_llama, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(1, 128, (3, 4))
    names = ["b", "c", "default"]
    with torch.no_grad():
        first = pm(ids, adapter_names=names).logits
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        tables = layer._row_tables[1]
        assert torch.equal(pm(ids, adapter_names=names).logits, first)
        assert layer._row_tables[1] is tables  # reused, not rebuilt
        layer.lora_B["c"].weight.mul_(2)  # an in-place change (as an optimizer step) invalidates the stack
        changed = pm(ids, adapter_names=names).logits
    assert layer._row_tables[1] is not tables
    assert (changed[1] - first[1]).abs().max() > 1e-4 and torch.equal(changed[0], first[0])
    pm.set_adapter("c")
    torch.testing.assert_close(changed[1:2], pm(ids[1:2]).logits, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # a weight replaced by another tensor (same shape, new storage) invalidates it too
        tables = layer._row_tables[1]
        old = layer.lora_A["b"].weight
        new = torch.nn.Parameter(old * 3)
        while new._version < old._version:  # the same version count: only the storage tells them apart
            new.mul_(1)
        assert new._version == old._version
        layer.lora_A["b"].weight = new
        replaced = pm(ids, adapter_names=names).logits
        assert layer._row_tables[1] is not tables
        assert (replaced[0] - changed[0]).abs().max() > 1e-4 and torch.equal(replaced[1], changed[1])
        tables = layer._row_tables[1]
        layer.scaling["default"] *= 2  # and so does a new scaling
        rescaled = pm(ids, adapter_names=names).logits
        assert layer._row_tables[1] is not tables and (rescaled[2] - replaced[2]).abs().max() > 1e-4


def test_dora_stacked_factor_follows_the_magnitude() -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                 init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    pm.eval()
    ids = torch.randint(1, 128, (2, 4))
    names = ["default", "b"]
    with torch.no_grad():
        first = pm(ids, adapter_names=names).logits
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        tables = layer._row_tables[1]
        layer.lora_magnitude_vector["default"].mul_(1.5)
        changed = pm(ids, adapter_names=names).logits
    assert layer._row_tables[1] is not tables
    assert (changed[0] - first[0]).abs().max() > 1e-4 and torch.equal(changed[1], first[1])
    pm.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(changed[:1], pm(ids[:1]).logits, rtol=1e-4, atol=1e-5)


def test_mixed_rows_train_with_gradients() -> None:
    """Per-row adapters with gradients (no dropout): each adapter's gradient equals its rows' run alone."""
    pm = _three_adapters(tiny_llama, target_modules=["q_proj", "v_proj"]).train()
    pm.set_adapter(["default", "b", "c"])  # all trainable
    ids = torch.randint(1, 128, (2, 4))
    pm(ids, adapter_names=["b", "c"], labels=ids).loss.backward()
    grad_b = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["b"].weight.grad.clone()
    pm.zero_grad()
    pm.set_adapter("b")
    out = pm(ids[:1], labels=ids[:1]).logits
    loss_b = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum") / (2 * 3)
    loss_b.backward()
    torch.testing.assert_close(grad_b, pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["b"].weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_row_groups_layout() -> None:
    """Rows grouped by adapter: each group padded to the largest with one of its own rows; base rows last."""
    from peftkit.methods.base import RowAdapters

    rows = RowAdapters.from_names(["b", "__base__", "a", "b", "b"])
    assert rows.names == ("b", "a") and rows.pick.tolist() == [0, 2, 1, 0, 0]
    groups = rows.groups
    assert (groups.count, groups.width) == (3, 3)
    assert groups.slot_rows.tolist() == [0, 3, 4, 2, 2, 2, 1, 1, 1]
    assert groups.row_slot.tolist() == [0, 6, 3, 1, 2]
    assert RowAdapters.from_names(["a", "b"]).groups.count == 2  # no base group when every row has an adapter
    assert groups.worth_it(batch=5, tokens=1) and not RowAdapters.from_names(["a"] * 15 + ["b"]).groups.worth_it(16, 64)


@pytest.mark.parametrize("names", [
    ["b", "__base__", "default", "c", "b", "__base__", "default", "c"],  # grouped at every length
    ["default"] * 7 + ["c"],  # one big group: long rows gather per row, a generate step groups
])
def test_grouped_and_gathered_rows_agree_with_rows_alone(names) -> None:
    from peftkit.methods.base import RowAdapters

    pm = _three_adapters(tiny_llama, target_modules="all-linear")
    torch.manual_seed(5)
    long_ids = torch.randint(1, 128, (len(names), 40))
    rows = RowAdapters.from_names(names)
    branches = {rows.groups.worth_it(len(names), 40), rows.groups.worth_it(len(names), 1)}
    assert branches == ({True} if names[0] == "b" else {True, False})
    rows_match_alone(pm, names, long_ids)
    out = pm.generate(long_ids[:, :4], adapter_names=names, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    for row, name in enumerate(names):
        with pm.disable_adapter() if name == "__base__" else contextlib.nullcontext():
            if name != "__base__":
                pm.set_adapter(name)
            alone = pm.generate(long_ids[row:row + 1, :4], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(out[row:row + 1], alone)


def test_greedy_generation_with_adapter_names_equals_hf_peft(tmp_path) -> None:
    """The same saved adapters in HF PEFT: adapter_names generations give the same tokens, logits agree."""
    import copy

    from peft import PeftModel as HFPeftModel

    torch.manual_seed(0)
    base = tiny_llama()
    hf_base = copy.deepcopy(base)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    pm.eval().save_pretrained(tmp_path)
    hf = HFPeftModel.from_pretrained(hf_base, tmp_path).eval()
    hf.load_adapter(tmp_path / "b", adapter_name="b")
    ids = torch.randint(1, 128, (4, 5))
    names = ["b", "default", "__base__", "b"]
    greedy = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        torch.testing.assert_close(pm(ids, adapter_names=names).logits, hf(ids, adapter_names=names).logits,
                                   rtol=1e-5, atol=1e-5)
        ours = pm.generate(input_ids=ids, adapter_names=names, **greedy)
        theirs = hf.generate(input_ids=ids, adapter_names=names, **greedy)
        plain = pm.generate(input_ids=ids, adapter_names=["__base__"] * 4, **greedy)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[[0, 1, 3]], plain[[0, 1, 3]])  # the adapters change what is generated


def test_a_generate_call_checks_each_layers_tables_once(monkeypatch) -> None:
    """The stacked tables' cache key (every adapter weight's storage and version) is read on a layer's first call
    of a generate call, not on every step; the next call reads it again and sees a change made in between."""
    from peftkit.methods import lora_kernels
    from peftkit.methods.lora import LoraLinear

    pm = _three_adapters(tiny_llama, target_modules=["q_proj", "v_proj", "down_proj"])
    layers = {id(m) for m in pm.modules() if isinstance(m, LoraLinear)}
    checked: list[int] = []
    real = lora_kernels._row_key
    monkeypatch.setattr(lora_kernels, "_row_key", lambda layer, names: checked.append(id(layer)) or real(layer, names))
    ids = torch.randint(1, 128, (3, 5))
    names = ["b", "c", "default"]
    greedy = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    first = pm.generate(ids, adapter_names=names, **greedy)
    assert sorted(checked) == sorted(layers)  # once per layer over 6 steps (prefill + 5 decode steps)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["c"].weight.mul_(40)
    again = pm.generate(ids, adapter_names=names, **greedy)
    assert len(checked) == 2 * len(layers)
    pm.set_adapter("c")
    assert torch.equal(again[1:2], pm.generate(ids[1:2], **greedy))  # the change is used
    assert torch.equal(again[[0, 2]], first[[0, 2]]) and not torch.equal(again[1], first[1])


def test_base_matmul_into_the_rows_term_equals_base_then_term(monkeypatch) -> None:
    """Without gradients the mixed rows' s·B A x is written first and x Wᵀ + b accumulated into it; with gradients
    the base layer runs first and the term is added: the same values (fp32 rounding apart), grouped and gathered,
    with a bias (GPT-2's Conv1D) and without."""
    from peftkit.methods import lora_kernels

    taken: list[bool] = []
    real = lora_kernels._plain_base
    monkeypatch.setattr(lora_kernels, "_plain_base",
                        lambda layer, x: taken.append((out := real(layer, x)) is not None) or out)
    for make, targets in ((tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])):
        pm = _three_adapters(make, target_modules=targets)
        with torch.no_grad():  # GPT-2's biases start at zero
            biases = [p.normal_(0, 0.5) for n, p in pm.named_parameters() if n.endswith("base_layer.bias")]
        assert bool(biases) == (make is tiny_gpt2)
        for names in (["b", "__base__", "default", "c"], ["default"] * 7 + ["c"]):
            ids = torch.randint(1, 128, (len(names), 40))
            with torch.no_grad():
                fused = pm(ids, adapter_names=names).logits
            reference = pm(ids, adapter_names=names).logits  # gradients on: base layer, then the term
            assert reference.requires_grad
            torch.testing.assert_close(fused, reference.detach(), rtol=1e-5, atol=1e-5)
            assert (fused[0] - fused[-1]).abs().max() > 1e-2
    assert taken and all(taken)  # every call without gradients took the base matmul itself
