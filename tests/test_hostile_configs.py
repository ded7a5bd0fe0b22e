"""Hostile configs and adapter folders: every bad input is one PeftError, and the model stays untouched.

Issue 15 ("never silently wrong"), the config / load-validation part: wrong types and non-finite values in
any method's config, regexes that backtrack catastrophically, a rank that does not fit its file, base weights
the config does not declare, NaN or integer tensors, adapter names that are paths, and a refusal part-way
through wrapping."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
import typing

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from peftkit import (
    LoraConfig,
    PeftConfig,
    PeftModel,
    get_peft_model,
    inject_adapter_in_model,
)
from peftkit.config import _REGISTRY, CONFIG_NAME, WEIGHTS_NAME
from peftkit.errors import AdapterFileError, AdapterNameError, PeftConfigError, PeftError
from peftkit.measure import current_rss, peak_rss, reset_peak_rss

HEAD = "base_model.model.lm_head.weight"


# ---- helpers -----------------------------------------------------------------------------------------
def fingerprint(model: torch.nn.Module) -> tuple:
    """Everything a refused load must leave as it was: state-dict keys and values, module types, grad flags."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    grads = [(n, p.requires_grad) for n, p in model.named_parameters()]
    return state, types, grads


def assert_same(model: torch.nn.Module, before: tuple, grads: bool = True) -> None:
    """``grads=False`` after unload(), which (as in HF PEFT) leaves the base frozen."""
    state, types, flags = fingerprint(model)
    assert list(state) == list(before[0])
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key
    assert types == before[1]
    assert not grads or flags == before[2]


def saved_lora(tmp_path, name: str = "ad", **kw) -> str:
    """A valid LoRA folder for the tiny Llama (random B, so the adapter changes outputs)."""
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **kw)
    folder = str(tmp_path / name)
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    return folder


def edit_config(folder: str, **changes) -> None:
    path = os.path.join(folder, CONFIG_NAME)
    with open(path) as fh:
        data = json.load(fh)
    data.update(changes)
    with open(path, "w") as fh:
        json.dump(data, fh)  # NaN / Infinity are written as JSON's extension, as Python and HF PEFT read them


def edit_weights(folder: str, **changes: torch.Tensor) -> None:
    path = os.path.join(folder, WEIGHTS_NAME)
    tensors = load_file(path)
    tensors.update({k.replace("__", "."): v for k, v in changes.items()})
    save_file(tensors, path)


# ---- the fuzz loop: every field of every method, with wrong-typed values --------------------------------
VALUES = ["x", "", "false", "16", True, False, 0, -1, 3, 2.5, math.nan, math.inf, -math.inf, [], ["a"], [1],
          {"a": 1}, {"a": "b"}, None, {}]
# Fields a method requires to be built at all.
REQUIRED = {"PROMPT_TUNING": {"num_virtual_tokens": 4}, "P_TUNING": {"num_virtual_tokens": 4},
            "PREFIX_TUNING": {"num_virtual_tokens": 4}}


def _kind(tp) -> set[type]:
    """The plain JSON kinds an annotation admits (for deciding which values must be refused)."""
    if tp is typing.Any:
        return {object}
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        return set().union(*(_kind(a) for a in args))
    return {typing.get_origin(tp) or tp}


def _must_refuse(value, kinds: set[type]) -> bool:
    if object in kinds:
        return False
    if isinstance(value, bool):
        return bool not in kinds
    if isinstance(value, float) and not math.isfinite(value):
        return True  # no field takes NaN or Infinity
    if isinstance(value, int):
        return not kinds & {int, float}
    if isinstance(value, float):
        return float not in kinds and not (int in kinds and value.is_integer())
    if isinstance(value, str):
        return str not in kinds
    if value is None:
        return type(None) not in kinds
    return type(value) not in kinds


FIELDS = [(peft_type, f.name) for peft_type, cls in sorted(_REGISTRY.items())
          for f in dataclasses.fields(cls) if not f.metadata.get("local")]


@pytest.mark.parametrize(("peft_type", "field"), FIELDS, ids=[f"{p}-{f}" for p, f in FIELDS])
def test_fuzz_every_config_field(peft_type, field, tmp_path) -> None:
    """Each value is accepted or refused with a PeftConfigError (never TypeError / AttributeError / ...);
    a value the annotation does not admit (a string for a bool, NaN for a float, True for an int) is refused
    by the constructor, by from_dict and by PeftConfig.from_pretrained of a folder."""
    cls = _REGISTRY[peft_type]
    kinds = _kind(typing.get_type_hints(cls)[field])
    refused_in_folder = False
    for value in VALUES:
        data = {**REQUIRED.get(peft_type, {}), field: value}
        outcomes = []
        for build in (lambda d=data: cls(**d), lambda d=data: PeftConfig.from_dict({"peft_type": peft_type, **d})):
            try:
                build()
                outcomes.append("ok")
            except PeftConfigError as exc:
                assert "\n" not in str(exc)
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1], (value, outcomes)
        if _must_refuse(value, kinds):
            assert outcomes[0] == "refused", f"{peft_type}.{field}={value!r} was accepted"
            if not refused_in_folder:  # the folder route, once per field
                folder = tmp_path / "a"
                folder.mkdir(exist_ok=True)
                (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": peft_type, **data}))
                with pytest.raises(PeftConfigError):
                    PeftConfig.from_pretrained(folder)
                refused_in_folder = True


@pytest.mark.parametrize(("changes", "message"), [
    ({"use_rslora": "false"}, r"use_rslora must be a bool .*write false without quotes"),
    ({"lora_alpha": "16"}, "lora_alpha must be"),
    ({"lora_alpha": None}, "lora_alpha must be"),
    ({"lora_alpha": math.nan}, "lora_alpha must be a finite number"),
    ({"lora_alpha": math.inf}, "lora_alpha must be a finite number"),
    ({"target_modules": 5}, "target_modules must be"),
    ({"modules_to_save": "lm_head"}, r"for one name write \['lm_head'\]"),
    ({"r": 8.5}, "r must be an integer"),
    ({"r": True}, "r must be an integer"),
    ({"alpha_pattern": {"(": 2}}, "not a valid regular expression"),
    ({"rank_pattern": {"q_proj": "4"}}, r"rank_pattern\['q_proj'\] must be an integer"),
])
def test_bad_config_file_refused_and_model_untouched(tmp_path, changes, message) -> None:
    folder = saved_lora(tmp_path)
    edit_config(folder, **changes)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(PeftConfigError, match=message):
        PeftModel.from_pretrained(model, folder)
    assert_same(model, before)
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    before = fingerprint(pm)
    with pytest.raises(PeftConfigError, match=message):
        pm.load_adapter(folder, "other")
    assert_same(pm, before)
    assert list(pm.peft_config) == ["default"]


@pytest.mark.parametrize(("field", "value"), [("lora_alpha", "16"), ("alpha_pattern", {"(": 2}),
                                             ("rank_pattern", {"q_proj": 0})])
def test_field_set_after_construction_is_checked_before_wrapping(field, value) -> None:
    config = LoraConfig(target_modules=["q_proj", "v_proj"])
    setattr(config, field, value)
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(PeftConfigError, match=field):
        get_peft_model(model, config)
    assert_same(model, before)


def test_integral_float_is_an_int_and_tuple_a_list() -> None:
    config = LoraConfig(r=8.0, target_modules=("q_proj", "v_proj"))
    assert config.r == 8 and type(config.r) is int
    assert config.target_modules == ["q_proj", "v_proj"]


def test_config_file_not_an_object_or_not_utf8(tmp_path) -> None:
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(PeftConfigError, match="must hold a JSON object"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_bytes(b'{"peft_type": "LORA", "r": \xff}')
    with pytest.raises(PeftConfigError, match="not valid JSON in UTF-8"):
        PeftConfig.from_pretrained(tmp_path)
    with pytest.raises(PeftConfigError, match="must be a JSON object"):
        PeftConfig.from_dict(["peft_type", "LORA"])
    with pytest.raises(PeftConfigError, match="peft_type must be a string"):
        PeftConfig.from_dict({"peft_type": ["LORA"]})


# ---- item 5: a refusal part-way through wrapping leaves everything as it was --------------------------------
@pytest.fixture
def fail_on_third_layer(monkeypatch):
    """A bug (or a hostile value) that only shows on the third module wrapped."""
    from peftkit.methods import lora

    original = lora.LoraLinear.update_layer
    calls = {"n": 0}

    def update_layer(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom on the third layer")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lora.LoraLinear, "update_layer", update_layer)
    return calls


def test_failure_part_way_through_get_peft_model_rolls_back(fail_on_third_layer) -> None:
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="boom"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    assert fail_on_third_layer["n"] == 3
    assert_same(model, before)
    assert not any("base_layer" in k for k in model.state_dict())


def test_failure_part_way_through_add_and_load_adapter_rolls_back(tmp_path, fail_on_third_layer) -> None:
    fail_on_third_layer["n"] = -100
    folder = saved_lora(tmp_path)  # wraps 4 modules: the third update_layer call fails below
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["k_proj"], init_lora_weights=False))
    before = fingerprint(pm)
    fail_on_third_layer["n"] = 0
    with pytest.raises(RuntimeError, match="boom"):
        pm.add_adapter("two", LoraConfig(target_modules=["q_proj", "v_proj"]))
    assert_same(pm, before)
    fail_on_third_layer["n"] = -4  # load_adapter first builds the 4 layers on meta tensors (shape check)
    with pytest.raises(RuntimeError, match="boom"):
        pm.load_adapter(folder, "two")
    assert_same(pm, before)
    assert list(pm.peft_config) == ["default"] and pm.active_adapters == ["default"]
    fail_on_third_layer["n"] = -100
    pm.load_adapter(folder, "two")  # and it still works afterwards
    assert list(pm.peft_config) == ["default", "two"]


def test_failure_after_wrapping_in_from_pretrained_rolls_back(tmp_path) -> None:
    """A file that lacks a tensor is only found out after the layers exist: still nothing changes."""
    folder = saved_lora(tmp_path)
    tensors = load_file(os.path.join(folder, WEIGHTS_NAME))
    tensors.pop(next(k for k in tensors if "v_proj.lora_B" in k))
    save_file(tensors, os.path.join(folder, WEIGHTS_NAME))
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(AdapterFileError, match="lacks 1 tensor"):
        PeftModel.from_pretrained(model, folder)
    assert_same(model, before)


# ---- item 11: adapter names --------------------------------------------------------------------------------
BAD_NAMES = ["v1.2", "", "../../x", "/abs/x", "a/b", "__base__", "__x", "a b", "é", "x" * 65, 3, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n) for n in BAD_NAMES])
def test_bad_adapter_names_refused_everywhere_before_any_change(tmp_path, name) -> None:
    folder = saved_lora(tmp_path)
    config = LoraConfig(target_modules=["q_proj"])
    model = tiny_llama()
    before = fingerprint(model)
    for call in (lambda: get_peft_model(model, config, adapter_name=name),
                 lambda: PeftModel.from_pretrained(model, folder, adapter_name=name),
                 lambda: inject_adapter_in_model(config, model, adapter_name=name)):
        with pytest.raises(AdapterNameError, match="adapter name"):
            call()
        assert_same(model, before)
    pm = get_peft_model(tiny_llama(), config)
    pm.add_adapter("other", LoraConfig(target_modules=["v_proj"]))
    before = fingerprint(pm)
    for call in (lambda: pm.add_adapter(name, config), lambda: pm.load_adapter(folder, name),
                 lambda: pm.add_weighted_adapter(["default", "other"], [1.0, 1.0], name, combination_type="cat")):
        with pytest.raises(AdapterNameError, match="adapter name"):
            call()
        assert_same(pm, before)
    assert list(pm.peft_config) == ["default", "other"]


def test_common_names_accepted_and_selected_adapters_string(tmp_path) -> None:
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    for name in ("lora_1", "my-adapter", "SFT2", "_private"):
        pm.add_adapter(name, LoraConfig(target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "out", selected_adapters="my-adapter")  # one name, not its characters
    assert sorted(os.listdir(tmp_path / "out")) == ["my-adapter"]
    pm.set_adapter(["default", "lora_1"])
    with pytest.raises(AdapterNameError, match="no adapter named '__base__'"):
        pm.set_adapter(["default", "__base__"])


def test_absolute_name_cannot_write_outside_the_folder(tmp_path) -> None:
    """Before: add_adapter('/abs/x') worked and save_pretrained(out) wrote to /abs/x."""
    pm = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    outside = str(tmp_path / "outside")
    with pytest.raises(AdapterNameError):
        pm.add_adapter(outside, LoraConfig(target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "out")
    assert not os.path.exists(outside)


# ---- item 6: base weights in an adapter file --------------------------------------------------------------
def test_undeclared_head_in_file_refused_unless_opted_in(tmp_path, ids) -> None:
    folder = saved_lora(tmp_path)
    new_head = torch.randn(128, 32)
    edit_weights(folder, **{HEAD.replace(".", "__"): new_head})
    model = tiny_llama()
    before = fingerprint(model)
    with torch.no_grad():
        base_out = model(ids).logits
    with pytest.raises(AdapterFileError, match="load_embedding_layers=True"):
        PeftModel.from_pretrained(model, folder)
    assert_same(model, before)
    pm = PeftModel.from_pretrained(model, folder, load_embedding_layers=True)
    assert torch.equal(model.lm_head.weight, new_head)  # loaded as asked
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(pm(ids).logits, base_out)  # disabled: the original head runs
    assert torch.equal(model.lm_head.weight, new_head)
    unloaded = pm.unload()
    assert_same(unloaded, before, grads=False)  # unload(): the base as it was, head included


def test_nan_head_refused_even_when_opted_in(tmp_path) -> None:
    folder = saved_lora(tmp_path)
    edit_weights(folder, **{HEAD.replace(".", "__"): torch.full((128, 32), math.nan)})
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(AdapterFileError, match="NaN/Inf"):
        PeftModel.from_pretrained(model, folder, load_embedding_layers=True)
    assert_same(model, before)


def test_declared_embedding_is_restored_by_unload(tmp_path, ids) -> None:
    """A config that targets embed_tokens saves its base weight (HF PEFT's save_embedding_layers); a file whose
    base weight differs replaces it while loaded, and unload() / delete_adapter() put the original back."""
    config = LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False)
    folder = str(tmp_path / "emb")
    get_peft_model(tiny_llama(), config).save_pretrained(folder)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in load_file(os.path.join(folder, WEIGHTS_NAME))
    new = torch.randn(128, 32)
    edit_weights(folder, **{key.replace(".", "__"): new})
    model = tiny_llama()
    before = fingerprint(model)
    with torch.no_grad():
        base_out = model(ids).logits
    pm = PeftModel.from_pretrained(model, folder)
    assert torch.equal(model.model.embed_tokens.get_base_layer().weight, new)
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(pm(ids).logits, base_out)
    assert_same(pm.unload(), before, grads=False)
    pm = PeftModel.from_pretrained(model, folder, adapter_name="emb")
    pm.add_adapter("keep", LoraConfig(target_modules=["v_proj"]))
    pm.delete_adapter("emb")
    assert torch.equal(model.model.embed_tokens.weight, before[0]["model.embed_tokens.weight"])


# ---- item 7: tensors that are not finite floats -------------------------------------------------------------
@pytest.mark.parametrize(("value", "message"), [
    (torch.full((32, 2), math.nan), "NaN/Inf"),
    (torch.full((32, 2), math.inf), "NaN/Inf"),
    (torch.ones(32, 2, dtype=torch.int8), "int8 in the file"),
    (torch.ones(32, 2, dtype=torch.bool), "bool in the file"),
])
def test_non_finite_or_integer_adapter_tensors_refused(tmp_path, value, message) -> None:
    folder = saved_lora(tmp_path)
    key = next(k for k in load_file(os.path.join(folder, WEIGHTS_NAME)) if k.endswith("q_proj.lora_B.weight"))
    edit_weights(folder, **{key.replace(".", "__"): value})
    model = tiny_llama()
    before = fingerprint(model)
    with pytest.raises(AdapterFileError, match=message):
        PeftModel.from_pretrained(model, folder)
    assert_same(model, before)


# ---- item 8: catastrophic regexes -------------------------------------------------------------------------
def test_catastrophic_regexes_fail_fast_in_a_subprocess(tmp_path) -> None:
    """Run in a child with a timeout, so a regression fails instead of hanging the suite. ``(.*){1,32000}[bc]``
    backtracks even in the regex engine (the issue's ``([a-z_.0-9]+)+Z`` does not: it is refused as matching
    nothing, quickly); each entry point refuses it with one PeftConfigError line within seconds."""
    folder = saved_lora(tmp_path)
    script = textwrap.dedent(f"""
        import json, os, sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import tiny_llama
        from peftkit import PeftModel, LoraConfig
        from peftkit.errors import PeftConfigError, PeftError
        from peftkit import patterns
        folder = {folder!r}
        path = os.path.join(folder, "adapter_config.json")
        original = json.load(open(path))
        evil = "(.*){{1,32000}}[bc]"
        cases = [dict(target_modules=evil), dict(exclude_modules=evil), dict(rank_pattern={{evil: 4}}),
                 dict(alpha_pattern={{evil: 4}}), dict(layers_pattern=evil, layers_to_transform=[0]),
                 dict(target_modules="([a-z_.0-9]+)+Z")]
        for case in cases:
            json.dump({{**original, **case}}, open(path, "w"))
            model = tiny_llama()
            start = time.time()
            try:
                PeftModel.from_pretrained(model, folder)
                print("LOADED", case)
            except PeftError as exc:
                assert "\\n" not in str(exc)
                print(type(exc).__name__, round(time.time() - start, 2))
        start = time.time()
        try:
            patterns.fullmatch(evil, "model.layers.0.mlp" * 4, "target_modules")  # the match-time limit itself
        except PeftConfigError:
            print("PeftConfigError", round(time.time() - start, 2))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    kinds, seconds = lines[0::2], [float(s) for s in lines[1::2]]
    assert kinds == ["PeftConfigError"] * 5 + ["TargetModulesError", "PeftConfigError"], out.stdout
    assert max(seconds) < 5.0, out.stdout


# ---- item 9: a huge r in a small folder ---------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("r", 2_000_000), ("rank_pattern", {"q_proj": 2_000_000}),
                                             ("r", 2**62), ("r", 10**30)])
def test_huge_rank_refused_before_allocating(tmp_path, field, value) -> None:
    """Before: r = 2,000,000 allocated ~1.7 GB before the shape check. Now the shapes are compared on meta
    tensors first: the refusal costs < 50 MB of peak RSS and leaves the model untouched."""
    folder = saved_lora(tmp_path)
    edit_config(folder, **{field: value})
    model = tiny_llama()
    before = fingerprint(model)
    reset_peak_rss()
    start = current_rss()
    with pytest.raises(PeftError, match="the config makes|too large to exist|does not fit in 64 bits"):
        PeftModel.from_pretrained(model, folder)
    assert peak_rss() - start < 50e6
    assert_same(model, before)


def test_huge_virtual_tokens_refused_before_allocating(tmp_path) -> None:
    from peftkit import PromptTuningConfig

    folder = str(tmp_path / "pt")
    get_peft_model(tiny_llama(), PromptTuningConfig(num_virtual_tokens=4)).save_pretrained(folder)
    edit_config(folder, num_virtual_tokens=20_000_000)  # 20M x 32 fp32 = 2.5 GB
    model = tiny_llama()
    before = fingerprint(model)
    reset_peak_rss()
    start = current_rss()
    with pytest.raises(AdapterFileError, match="the config makes"):
        PeftModel.from_pretrained(model, folder)
    assert peak_rss() - start < 50e6
    assert_same(model, before)


# ---- peftkit inspect: one line for every bad config ----------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2]", "must be a JSON object"),
    (b'{"peft_type": "LORA", "r": \xff}', "not valid JSON in UTF-8"),
    (b'{"peft_type": "LORA", "target_modules": 5}', "target_modules must be"),
    (b'{"peft_type": "LORA", "modules_to_save": "lm_head"}', "modules_to_save must be"),
    (b'{"peft_type": "LORA", "lora_alpha": "16"}', "lora_alpha must be"),
    (b'{"peft_type": "LORA", "lora_alpha": NaN}', "lora_alpha must be a finite number"),
    (b'{"peft_type": "LORA", "target_modules": "(.*){1,32000}[bc]"}', "catastrophic backtracking"),
])
def test_inspect_gives_one_line_errors(tmp_path, content, message) -> None:
    from typer.testing import CliRunner

    from peftkit.cli import app

    (tmp_path / CONFIG_NAME).write_bytes(content)
    res = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert res.exit_code == 2
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err and "(run with --debug" not in err



# ---- the library API: misuse is a PeftError with the fix, not a TypeError from deep inside -----------------
def _lora_pm():
    return get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))


API_MISUSE = {
    "get_peft_model with a dict config": lambda tmp: get_peft_model(tiny_llama(), {"peft_type": "LORA"}),
    "get_peft_model without a model": lambda tmp: get_peft_model(None, LoraConfig(target_modules=["q_proj"])),
    "from_pretrained with a dict config": lambda tmp: PeftModel.from_pretrained(
        tiny_llama(), saved_lora(tmp), config={"r": 2}),
    "from_pretrained of None": lambda tmp: PeftModel.from_pretrained(tiny_llama(), None),
    "load_adapter of 5": lambda tmp: _lora_pm().load_adapter(5, "x"),
    "set_adapter(5)": lambda tmp: _lora_pm().set_adapter(5),
    "save_pretrained(selected_adapters=5)": lambda tmp: _lora_pm().save_pretrained(tmp / "x", selected_adapters=5),
    "forward(adapter_names='default')": lambda tmp: _lora_pm()(torch.ones(1, 3, dtype=torch.long),
                                                                adapter_names="default"),
    "add_weighted_adapter(weights='1')": lambda tmp: _lora_pm().add_weighted_adapter(
        ["default"], "1", "w", combination_type="cat"),
    "add_weighted_adapter(weights=[nan])": lambda tmp: _lora_pm().add_weighted_adapter(
        ["default"], [math.nan], "w", combination_type="cat"),
}


@pytest.mark.parametrize("case", list(API_MISUSE))
def test_api_misuse_is_a_peft_error(tmp_path, case) -> None:
    with pytest.raises(PeftError) as info:
        API_MISUSE[case](tmp_path)
    assert "\n" not in str(info.value)


def test_string_adapter_names_mean_one_adapter(tmp_path) -> None:
    pm = _lora_pm()
    pm.add_adapter("other", LoraConfig(target_modules=["v_proj"], init_lora_weights=False))
    pm.merge_adapter("other")  # before: merged 'o', 't', ... -> "no adapter named 'o'"
    assert pm.base_model.model.model.layers[0].self_attn.v_proj.merged_adapters == ["other"]
