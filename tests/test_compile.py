"""torch.compile: the fused LoRA layer (forward and backward) and the per-row path (``adapter_names``) compile
as one graph each (``fullgraph=True``: a break inside a LoRA layer is an error) and give eager's numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from peftkit import LoraConfig, get_peft_model
from peftkit.methods import lora_kernels
from peftkit.methods.base import RowAdapters
from peftkit.methods.lora import LoraLinear


def _two_adapters():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False))
    return pm


def _layer(pm) -> LoraLinear:
    return next(m for m in pm.modules() if isinstance(m, LoraLinear))


def _compiled_layer_equals_eager(layer: LoraLinear, x: torch.Tensor, out_tol: float = 1e-6) -> None:
    """The layer compiled as one graph (fullgraph, aot_eager) gives eager's output (to ``out_tol``) and gradients of
    x, A and B, and the adapter really trains."""
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(got.float().square().sum(), [x, *params])
    want = layer(x)
    expected = torch.autograd.grad(want.float().square().sum(), [x, *params])
    torch.testing.assert_close(got, want, rtol=out_tol, atol=out_tol)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert expected[0].abs().sum() > 0 and expected[1].abs().sum() > 0


def test_fused_lora_layer_compiles_as_one_graph_forward_and_backward() -> None:
    pm = _two_adapters().train()
    layer = _layer(pm)
    torch.manual_seed(1)
    _compiled_layer_equals_eager(layer, torch.randn(3, 5, layer.in_features, requires_grad=True))


def test_an_eager_dropout_forward_left_unverified_does_not_break_the_compiled_graph() -> None:
    """An eager forward with dropout whose backward never ran leaves its input noted (x̄ saved in its place:
    lora_kernels.verify_inputs looks for it at the next backward); a compiled backward must leave that
    process-wide record alone (mutating it from the traced backward is a graph break, an error under fullgraph)."""
    torch.manual_seed(0)
    dropping = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["o_proj"], lora_dropout=0.1)).train()
    x = torch.randn(3, 5, _layer(dropping).in_features, requires_grad=True)
    _layer(dropping)(x)  # no backward
    assert lora_kernels._inputs.unverified
    pm = _two_adapters().train()
    layer = _layer(pm)
    torch.manual_seed(1)  # the input of the test above
    _compiled_layer_equals_eager(layer, torch.randn(3, 5, layer.in_features, requires_grad=True))
    assert not lora_kernels._inputs.unverified  # the eager backward after it looked (x is alive: the layer keeps x)
    assert _layer(dropping)._lora_input_choice.keep_input


@pytest.mark.parametrize("names, tokens, grouped", [
    (["b", "default", "__base__", "b"], 5, True),  # adapters grouped: two bmm over the stacked tables
    (["default"] * 7 + ["b"], 64, False),  # one large group and long rows: each row gathers its weights
])
def test_per_row_layer_compiles_as_one_graph(names, tokens, grouped) -> None:
    pm = _two_adapters().eval()
    layer = _layer(pm)
    rows = RowAdapters.from_names(names)
    assert rows.groups.worth_it(len(names), tokens) is grouped
    torch.manual_seed(2)
    x = torch.randn(len(names), tokens, layer.in_features)
    layer.row_adapters = rows
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        want = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    layer.row_adapters = None
    for row, name in enumerate(names):  # and each row is that row's adapter alone
        with torch.no_grad(), pm.disable_adapter() if name == "__base__" else _active(pm, name):
            torch.testing.assert_close(got[row], layer(x[row:row + 1])[0], rtol=1e-5, atol=1e-6)


class _active:
    def __init__(self, pm, name: str) -> None:
        self.pm, self.name = pm, name

    def __enter__(self) -> None:
        self.pm.set_adapter(self.name)

    def __exit__(self, *exc: object) -> None:
        self.pm.set_adapter("default")


def test_whole_model_has_no_graph_break_inside_lora_layers() -> None:
    """Dynamo over the whole model, mixed rows: any break it reports is outside peftkit's layers."""
    pm = _two_adapters().eval()
    ids = torch.randint(1, 128, (3, 6))
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(pm)(input_ids=ids, adapter_names=["b", "__base__", "default"])
    inside = [r for r in explained.break_reasons
              if any("peftkit/methods" in (f.filename or "") for f in r.user_stack)]
    assert inside == [], [r.reason for r in inside]
    assert explained.graph_count >= 1


@pytest.mark.slow
def test_inductor_compiled_lora_layer_equals_eager_for_training_and_mixed_rows() -> None:
    """The inductor backend (C++ on CPU): a fused training forward + backward and a mixed-rows forward of a LoRA
    layer equal eager."""
    pm = _two_adapters().train()
    layer = _layer(pm)
    torch.manual_seed(3)
    x = torch.randn(2, 4, layer.in_features, requires_grad=True)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    got = torch.autograd.grad(compiled(x).square().sum(), [x, *params])
    want = torch.autograd.grad(layer(x).square().sum(), [x, *params])
    for g, e in zip(got, want, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    pm.eval()
    layer.row_adapters = RowAdapters.from_names(["b", "__base__"])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x.detach()), layer(x.detach()), rtol=1e-5, atol=1e-5)


def test_lora_layer_on_an_nf4_base_compiles_as_one_graph() -> None:
    """QLoRA: the fused node decodes the NF4 weight itself (forward and backward); that compiles with the layer as
    one graph and gives eager's numbers."""
    pytest.importorskip("torchao")
    from peftkit import quantize_base
    from peftkit.quantize import quantization_of

    torch.manual_seed(0)
    model = tiny_llama()
    quantize_base(model, "nf4", skip=["lm_head"])
    pm = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    layer = _layer(pm)
    assert quantization_of(layer.get_base_layer().weight) == "nf4"
    _compiled_layer_equals_eager(layer, torch.randn(3, 5, layer.in_features, requires_grad=True))


def test_lora_layer_on_a_bf16_base_compiles_as_one_graph() -> None:
    """A bf16 base (its matmuls widened to fp32 on CPUs without bf16 units, lora_kernels.wide_matmul_dtype) with
    fp32 adapters compiles as one graph and gives eager's output exactly, and its gradients."""
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama().to(torch.bfloat16),
                        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    layer = _layer(pm)
    _compiled_layer_equals_eager(layer, torch.randn(3, 5, layer.in_features, dtype=torch.bfloat16,
                                                    requires_grad=True), out_tol=0)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_lora_layer_with_dropout_compiles_with_one_mask_per_step(backend: str) -> None:
    """With dropout the mask's seed is drawn in Python (a graph break): the compiled layer runs, and its backward
    applies the mask its forward drew (inside compile backward draws it again from the seed instead of keeping its
    gaps): A's gradient equals the finite-difference derivative of the compiled loss (fp64, same seed). With
    aot_eager the mask is eager's own (same torch.manual_seed, same output and gradients); inductor replaces
    torch's random ops with its own generator, so there the mask is another, equally distributed one."""
    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama().double(), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False,
                                                          lora_dropout=0.3)).train()
    layer = _layer(pm)
    A = layer.lora_A["default"].weight
    x = torch.randn(3, 5, layer.in_features, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend)

    def loss(run, seed: int = 5) -> torch.Tensor:
        lora_kernels.clear_caches()  # else a run finds the previous one's x̄ (same x) in the siblings' cache
        torch.manual_seed(seed)
        return run(x).square().sum()

    got = loss(compiled)
    (grad_A,) = torch.autograd.grad(got, [A])
    direction, eps = torch.randn_like(A), 1e-6
    with torch.no_grad():
        A.add_(eps * direction)
        plus = loss(compiled)
        A.sub_(2 * eps * direction)
        minus = loss(compiled)
        A.add_(eps * direction)
    torch.testing.assert_close((plus - minus) / (2 * eps), (grad_A * direction).sum(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert not torch.equal(loss(compiled, seed=6), got.detach())  # another seed, another mask
    if backend == "aot_eager":
        want = loss(layer)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_A, torch.autograd.grad(want, [A])[0], rtol=1e-10, atol=1e-12)
