"""peftkit against AdapterHub itself (the ``adapters`` package, 1.3.0): equal outputs and parameter counts for
its Pfeiffer (seq_bn) and Houlsby (double_seq_bn) adapters on BERT, Llama and GPT-2, its files read by peftkit
and peftkit's files read by it. The AdapterHub side runs in its own venv (tests/adapterhub_reference.py);
the peftkit side runs here (transformers 5) and, once, in that venv too (transformers 4.57)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import adapterhub_reference as ref
import pytest
import torch
from safetensors.torch import load_file, save_file

from peftkit import AdapterFileError, BottleneckConfig, PeftModel, get_peft_model, save_adapterhub
from peftkit.adapterhub import is_adapterhub_folder
from peftkit.methods.base import adapter_layers

ROOT = Path(__file__).resolve().parents[1]
REF_PYTHON = ROOT / ".venv-adapterhub" / "bin" / "python"
pytestmark = pytest.mark.skipif(
    not REF_PYTHON.exists(),
    reason="needs the AdapterHub reference venv: run `bash scripts/adapterhub_env.sh` (builds .venv-adapterhub: "
           "torch, adapters==1.3.0, transformers 4.57; about 2 minutes and 1.2 GB)",
)
TOL = 1e-5
# AdapterHub config name -> the peftkit config that computes the same thing
PEFTKIT = {
    "seq_bn": {"placement": "pfeiffer"},
    "double_seq_bn": {"placement": "houlsby", "train_layer_norms": False},
}


def _reference(command: str, workdir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([str(REF_PYTHON), str(ROOT / "tests" / "adapterhub_reference.py"), command, str(workdir)],
                   check=True, env=env, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("adapterhub")
    _reference("make", workdir)
    return workdir, json.loads((workdir / "made.json").read_text())


def _base(workdir: Path, case: str):
    model = ref.build(ref.CASES[case][0])
    model.load_state_dict(load_file(workdir / case / "base.safetensors"))
    return model


def _adapter_params(pm) -> int:
    return sum(p.numel() for _, layer in adapter_layers(pm.model) for p in layer.adapter_parameters("default"))


@pytest.mark.parametrize("case", list(ref.CASES))
def test_adapterhub_folder_gives_adapterhubs_outputs(made, case: str) -> None:
    workdir, counts = made
    expected = load_file(workdir / case / "ah_out.safetensors")
    folder = workdir / case / "ah"
    assert is_adapterhub_folder(folder)
    pm = PeftModel.from_pretrained(_base(workdir, case), folder)
    out = ref.output(pm)
    assert (out - expected["out"]).abs().max().item() <= TOL
    assert (expected["out"] - expected["base"]).abs().max().item() > 0.1  # the adapter really changes the output
    assert _adapter_params(pm) == counts[case]["trainable"]
    assert pm.get_nb_trainable_parameters()[0] == 0  # loaded for inference
    config = pm.peft_config["default"]
    assert config.original_ln_before == (ref.CASES[case][1] == "seq_bn")
    assert config.non_linearity == ("relu" if ref.CASES[case][1] == "seq_bn" else "swish")


@pytest.mark.parametrize("case", ["bert_seq_bn", "llama_seq_bn"])
def test_the_old_pfeiffer_composition_would_fail(made, case: str) -> None:
    """The check can fail: the same weights with the adapter reading h (peftkit's old pfeiffer) differ."""
    workdir, _ = made
    from peftkit.adapterhub import read_adapterhub

    model = _base(workdir, case)
    config, tensors = read_adapterhub(workdir / case / "ah", model)
    folder = workdir / case / "old"
    config.copy(original_ln_before=False).save_pretrained(folder)
    save_file(tensors, folder / "adapter_model.safetensors")
    out = ref.output(PeftModel.from_pretrained(model, folder))
    assert (out - load_file(workdir / case / "ah_out.safetensors")["out"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", list(ref.CASES))
def test_peftkit_configs_match_adapterhubs_parameter_counts(made, case: str) -> None:
    workdir, counts = made
    pm = get_peft_model(_base(workdir, case), BottleneckConfig(**PEFTKIT[ref.CASES[case][1]]))
    assert pm.get_nb_trainable_parameters()[0] == counts[case]["trainable"]


def test_pickle_only_adapterhub_folder_is_refused_with_the_conversion(made) -> None:
    workdir, _ = made
    folder = workdir / "bert_seq_bn" / "ah_pickle"
    model = _base(workdir, "bert_seq_bn")
    with pytest.raises(AdapterFileError, match=r"pytorch_adapter.bin \(a pickle\).*use_safetensors=True"):
        PeftModel.from_pretrained(model, folder)
    assert not list(adapter_layers(model))  # untouched


def test_adapterhub_loads_peftkit_folders(made) -> None:
    workdir, _ = made
    outputs = {}
    for case, (_, ah_config) in ref.CASES.items():
        torch.manual_seed(3)
        pm = get_peft_model(_base(workdir, case), BottleneckConfig(**PEFTKIT[ah_config], scaling=0.5))
        with torch.no_grad():
            for _, layer in adapter_layers(pm.model):
                for p in layer.adapter_parameters("default"):
                    p.copy_(torch.randn_like(p) * 0.3)
        pm.eval()
        save_adapterhub(pm, workdir / case / "pk_ah")
        outputs[case] = ref.output(pm)
    _reference("load", workdir)
    for case, out in outputs.items():
        loaded = load_file(workdir / case / "ah_loaded_out.safetensors")["out"]
        assert (loaded - out).abs().max().item() <= TOL, case
        assert (out - load_file(workdir / case / "ah_out.safetensors")["base"]).abs().max().item() > 0.1


def test_peftkit_matches_adapterhub_inside_its_venv(made) -> None:
    """peftkit under transformers 4.57 (AdapterHub's pin) too: the same comparison, run in the reference venv."""
    workdir, _ = made
    script = (
        "import json, sys; sys.path.insert(0, 'tests'); import adapterhub_reference as ref, transformers\n"
        "from safetensors.torch import load_file\nfrom peftkit import PeftModel\nout = {}\n"
        "for case, (family, _) in ref.CASES.items():\n"
        f"    d = '{workdir}/' + case\n"
        "    m = ref.build(family); m.load_state_dict(load_file(d + '/base.safetensors'))\n"
        "    pm = PeftModel.from_pretrained(m, d + '/ah')\n"
        "    out[case] = (ref.output(pm) - load_file(d + '/ah_out.safetensors')['out']).abs().max().item()\n"
        "print(json.dumps({'transformers': transformers.__version__, 'diffs': out}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([str(REF_PYTHON), "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["transformers"].startswith("4.57")
    assert set(result["diffs"]) == set(ref.CASES) and max(result["diffs"].values()) <= TOL, result


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
