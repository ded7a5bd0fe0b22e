"""Sibling LoRA targets (q, k, v; gate, up) computed in one node (lora_joint.JointLoraFunction): equal to the
plain-torch reference and to the per-target path in fp64, grouped from the module tree when LoRA is added, never
joined where a changed decision or a stale output could matter."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn
from conftest import tiny_llama, tiny_t5
from test_lora_fused import _count_nodes, _kept

from peftkit import LoraConfig, get_peft_model
from peftkit.methods import lora_joint
from peftkit.methods.lora_joint import use_joint
from peftkit.methods.lora_kernels import use_fused


def _step(pm: nn.Module, ids: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, logits, gradients, JointLoraFunction nodes in the graph) of one training step."""
    pm.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = pm(ids, labels=ids)
    joint = _count_nodes(out.loss, "JointLoraFunction")
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads, joint


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_siblings_join_and_equal_the_reference_fp64(p: float) -> None:
    pm = get_peft_model(tiny_llama().double(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules="all-linear", lora_dropout=p))
    pm.train()
    ids = torch.randint(1, 128, (3, 9))
    loss1, _, _, joint1 = _step(pm, ids)
    loss2, logits, grads, joint2 = _step(pm, ids)
    # q/k/v and gate/up are one node each, per layer, from the first step on
    assert joint1 == joint2 == 2 * 2
    assert _count_nodes(pm(ids, labels=ids).loss, "LoraFunction") == 2 * (2 + 2)  # + o and down, per target
    with use_joint(False):
        sep_loss, sep_logits, sep, sep_joint = _step(pm, ids)
    with use_fused(False):
        ref_loss, ref_logits, ref, _ = _step(pm, ids)
    assert sep_joint == 0
    torch.testing.assert_close(loss2, ref_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss1, loss2, rtol=0, atol=1e-12)  # same seed, same masks: the same step
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-10)
    _assert_same(grads, ref, atol=1e-10)
    _assert_same(grads, sep, atol=1e-10)
    assert len(grads) == 2 * 7 * 2  # A and B of every target got its gradient


@pytest.mark.parametrize("p", [0.1, 0.4])
@pytest.mark.parametrize("packed", [False, True])
def test_joint_function_gradcheck(packed: bool, p: float) -> None:
    """JointLoraFunction's backward against finite differences: three targets of different ranks and widths,
    a bias, dropout (its gaps kept at p 0.1, its bits at 0.4, or drawn again); one output unused (its gradient
    arrives as None)."""
    torch.manual_seed(0)
    kw = {"dtype": torch.float64}
    x = torch.randn(2, 3, 5, **kw, requires_grad=True)
    shapes = [(4, 2), (6, 3), (4, 1)]  # (d_out, r)
    tensors = []
    for d_out, r in shapes:
        tensors += [torch.randn(d_out, 5, **kw), torch.randn(d_out, **kw, requires_grad=True),
                    torch.randn(r, 5, **kw, requires_grad=True), torch.randn(d_out, r, **kw, requires_grad=True)]
    seed = 99 if p > 0.2 else 3
    from peftkit.methods.lora_kernels import dropout_keep

    def fn(x, *params, used=(0, 1, 2)):
        full = list(tensors)
        for i, t in zip([1, 2, 3, 5, 6, 7, 9, 10, 11], params, strict=True):
            full[i] = t
        dropped = x.detach() * dropout_keep(x.shape, p, seed, x.device, x.dtype)
        gaps = _kept(dropout_keep(x.shape, p, seed, x.device), p) if packed else None  # kept, or drawn again
        outs = lora_joint.JointLoraFunction.apply(x, dropped, (0.7, 1.3, 2.0), p, seed, gaps, None, *full)
        return tuple(outs[i] for i in used)

    params = [t for t in tensors if t.requires_grad]
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradcheck(lambda *a: fn(*a, used=(0, 2)), (x, *params))

    # and against the paper's y = W x + b + s · B A x̃ written out, x̃ = x ⊙ keep / (1 − p)
    from peftkit.methods.lora_kernels import keep_probability

    keep = dropout_keep(x.shape, p, seed, x.device, x.dtype)
    assert 0 < keep.eq(0).sum() < x.numel()
    outs = fn(x, *params)
    for i, (W, b, A, B) in enumerate(zip(*[iter(tensors)] * 4, strict=True)):
        ref = x @ W.T + b + [0.7, 1.3, 2.0][i] * ((x * keep / keep_probability(p)) @ A.T) @ B.T
        torch.testing.assert_close(outs[i], ref, rtol=0, atol=1e-12)


class _Attention(nn.Module):
    """q/k/v, read in an order the test chooses: every call says which input each projection reads."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)
        self.plan = ("a", "a", "a")
        self.poke: str | None = None  # None, or "x": x changed in place after q; "A": k's A changed after q

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        inputs = {"a": a * 1.0, "b": b * 1.0}  # non-leaf inputs (changed in place below)
        q = self.q_proj(inputs[self.plan[0]])
        if self.poke == "x":
            with torch.no_grad():
                inputs[self.plan[1]].mul_(2.0)
        if self.poke == "A":
            with torch.no_grad():
                self.k_proj.lora_A["default"].weight.add_(0.5)
        k = self.k_proj(inputs[self.plan[1]])
        v = self.v_proj(inputs[self.plan[2]])
        return q.sum(-1, keepdim=True) * k.sum(-1, keepdim=True) + v.sum(-1, keepdim=True)


def _attention_peft():
    torch.manual_seed(0)
    return get_peft_model(_Attention().double(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                            target_modules=["q_proj", "k_proj", "v_proj"]))


def _outputs(pm, a, b, joint: bool = True) -> tuple[torch.Tensor, int]:
    with use_fused(True), use_joint(joint):
        out = pm(a, b)
        return out.detach(), _count_nodes(out.sum(), "JointLoraFunction")


def _followers(layer: nn.Module) -> tuple[nn.Module, ...] | None:
    return layer.__dict__.get(lora_joint._FOLLOWERS)


def test_groups_come_from_the_module_tree_and_leave_out_cross_attention() -> None:
    model = tiny_llama()
    get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert _followers(attn.q_proj) == (attn.k_proj, attn.v_proj) and _followers(mlp.gate_proj) == (mlp.up_proj,)
        assert all(_followers(m) is None for m in (attn.k_proj, attn.v_proj, attn.o_proj, mlp.up_proj, mlp.down_proj))
    t5 = tiny_t5()
    get_peft_model(t5, LoraConfig(r=2, target_modules=["q", "k", "v"]))
    self_attn = t5.decoder.block[0].layer[0].SelfAttention
    cross = t5.decoder.block[0].layer[1].EncDecAttention  # q reads the decoder's states, k and v the encoder's
    assert _followers(self_attn.q) == (self_attn.k, self_attn.v)
    assert all(_followers(m) is None for m in (cross.q, cross.k, cross.v))
    only_qv = tiny_llama()
    get_peft_model(only_qv, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    attn = only_qv.model.layers[0].self_attn
    assert _followers(attn.q_proj) == (attn.v_proj,)


def test_a_group_whose_members_read_other_inputs_is_dropped_and_every_output_stays_right() -> None:
    """A model whose q reads one input and k and v another (named like siblings): q computes k's and v's outputs
    once for nothing, they compute their own, and the group is dropped for good."""
    pm = _attention_peft()
    a, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    model = pm.base_model.model
    assert _followers(model.q_proj) == (model.k_proj, model.v_proj)
    model.plan = ("a", "b", "b")
    for call in range(3):
        out, joint = _outputs(pm, a, b)
        with use_fused(False):
            torch.testing.assert_close(out, pm(a, b).detach(), rtol=0, atol=1e-12)
        assert joint == (1 if call == 0 else 0)  # q's output came from the joint node, the first time only
        # the drop, asked for in the first call, takes effect at q's next call
        assert _followers(model.q_proj) == ((model.k_proj, model.v_proj) if call == 0 else ())


@pytest.mark.parametrize("poke", ["x", "A"])
def test_a_follower_never_takes_a_stale_output(poke: str) -> None:
    """x changed in place between q and k, or k's adapter weight changed: k computes its own output from what it
    reads now (the joint output computed at q's call is not used)."""
    pm = _attention_peft()
    a, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    assert _outputs(pm, a, b)[1] == 1
    model = pm.base_model.model
    model.poke = poke
    out, _ = _outputs(pm, a, b)
    if poke == "A":  # the reference's forward adds its 0.5 again: start it from the same weights
        with torch.no_grad():
            model.k_proj.lora_A["default"].weight.sub_(0.5)
    with use_fused(False):
        ref = pm(a, b).detach()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert model.q_proj.__dict__[lora_joint._DROP]  # to be dropped: k's (and v's) output was computed for nothing


def test_inference_keeps_the_per_target_path_and_checkpointing_gives_the_same_step(monkeypatch) -> None:
    """No gradients, no joining; checkpointing (non-reentrant: the replay joins as the forward did; reentrant: the
    forward runs without gradients, the replay joins) gives the un-checkpointed step's gradients bit for bit."""
    model = tiny_llama().double()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear",
                                          lora_dropout=0.2))
    ids = torch.randint(1, 128, (2, 7))
    calls = []

    class Counted(lora_joint.JointLoraFunction):
        @classmethod
        def apply(cls, *args):
            calls.append(1)
            return super().apply(*args)

    monkeypatch.setattr(lora_joint, "JointLoraFunction", Counted)
    pm.eval()
    with torch.no_grad():
        pm(ids)
    assert not calls
    pm.train()
    _, _, plain, _ = _step(pm, ids)
    assert len(calls) == 4
    with use_fused(False):
        _, _, ref, _ = _step(pm, ids)
    _assert_same(plain, ref, atol=1e-10)
    for reentrant in (False, True):
        pm.base_model.model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        calls.clear()
        _, _, grads, _ = _step(pm, ids)
        assert len(calls) == (2 if reentrant else 4) * 2  # per layer: q/k/v and gate/up, in forward and/or replay
        _assert_same(grads, plain, atol=0)
        # x̄ saved in place of x throughout (no input found alive at backward: lora_kernels.InputChoice)
        choices = [m._lora_input_choice for m in pm.modules() if "_lora_input_choice" in m.__dict__]
        assert len(choices) == 2 * 4 and not any(c.keep_input for c in choices)
        pm.base_model.model.gradient_checkpointing_disable()


def test_a_group_dropped_inside_a_checkpointed_forward_replays_as_it_ran() -> None:
    """The drop waits for the leader's next call outside backward: the replay of the step that found the
    mismatch joins again (else it would save other tensors than the forward: torch's CheckpointError)."""
    from torch.utils.checkpoint import checkpoint

    pm = _attention_peft()
    model = pm.base_model.model
    model.plan = ("a", "b", "b")
    a, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        with use_fused(fused):
            pm.zero_grad(set_to_none=True)
            checkpoint(pm, a, b, use_reentrant=False).pow(2).sum().backward()
            grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None})
    _assert_same(grads[0], grads[1], atol=1e-12)
    assert _followers(model.q_proj) == (model.k_proj, model.v_proj)  # asked to drop, not yet dropped
    assert _outputs(pm, a, b)[1] == 0 and _followers(model.q_proj) == ()


def test_groups_travel_with_copies_of_the_model() -> None:
    """A model pickles and deep-copies with its groups (plain attributes, not submodules: the state dict is
    unchanged); the copy's leaders lead the copy's layers and give the same step."""
    pm = get_peft_model(tiny_llama().double(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules="all-linear"))
    pm.train()
    ids = torch.randint(1, 128, (2, 7))
    loss, _, grads, joint = _step(pm, ids)
    assert joint == 4
    for clone in (copy.deepcopy(pm), pickle.loads(pickle.dumps(pm))):
        attn = clone.base_model.model.model.layers[1].self_attn
        assert _followers(attn.q_proj) == (attn.k_proj, attn.v_proj)
        assert clone.state_dict().keys() == pm.state_dict().keys()
        loss_c, _, grads_c, joint_c = _step(clone, ids)
        assert joint_c == 4
        torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
        _assert_same(grads_c, grads, atol=0)


@pytest.mark.parametrize("base", ["nf4", "bf16", "bf16_fp32_adapters"])
def test_joint_on_an_nf4_or_half_base_equals_the_per_target_path(base: str) -> None:
    """An NF4 base is decoded by the joint node as by the per-target one; a bf16 base with bf16 adapters
    (autocast_adapter_dtype=False) takes the same widened base matmuls; a bf16 base with fp32 adapters (the
    default) computes x̄ and H in fp32 from a cast of x and adds each cast term as the per-target path does. The
    joint node's sums run in another order: fp32 to 1e-5, bf16 to its rounding; and both equal the plain-torch
    reference (use_fused(False), which keeps an fp32 copy of x per target) to bf16's rounding."""
    from test_qlora import quantized_llama, small_llama

    model = quantized_llama() if base == "nf4" else small_llama(dtype=torch.bfloat16)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear",
                                          lora_dropout=0.1, autocast_adapter_dtype=base == "bf16_fp32_adapters"))
    pm.train()
    adapter_dtype = torch.float32 if base != "bf16" else torch.bfloat16
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {adapter_dtype}
    ids = torch.randint(1, 128, (2, 7))
    loss, _, grads, joint = _step(pm, ids)
    assert joint == 2 * 2
    with use_joint(False):
        sep_loss, _, sep, sep_joint = _step(pm, ids)
    assert sep_joint == 0 and grads.keys() == sep.keys() and len(grads) == 28
    # bf16: the largest relative difference in a gradient was 0.015 (median), 0.03 (95th percentile) over 40 seeds
    tol = 1e-5 if base == "nf4" else 3e-2
    references = [(sep, tol)]
    if base != "nf4":  # the reference rounds in other places (an fp32 copy of x per target, bf16 sums): 6 %
        with use_fused(False):
            ref_loss, _, ref, ref_joint = _step(pm, ids)
        assert ref_joint == 0
        torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
        references.append((ref, 3 * tol))
    torch.testing.assert_close(loss, sep_loss, rtol=tol, atol=tol)
    for other, atol in references:
        for name in grads:
            scale = other[name].float().abs().max().item()
            torch.testing.assert_close(grads[name].float(), other[name].float(), rtol=0,
                                       atol=atol * max(scale, 1e-3), msg=name)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_with_dropout_x_bar_is_saved_where_only_lora_keeps_x(monkeypatch, p: float) -> None:
    """In a Llama block q/k/v's and gate/up's input (a norm's output) and down_proj's (the MLP's product) are kept
    by nothing but LoRA: their nodes save x̄ itself, so backward makes x̄ again only for o_proj (whose input is a
    view of the attention's output, which attention keeps). The same saved bytes and the same step, to the bit,
    as saving x everywhere (session 14), and no input is found alive at backward."""
    from saved_bytes import saved_bytes

    from peftkit.methods import lora_kernels

    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules="all-linear", lora_dropout=p))
    pm.train()
    ids = torch.randint(1, 128, (3, 9))
    rebuilt = []
    real = lora_kernels._dropped_for_backward

    def spy(x, p, seed, dtype, need_dropped, gaps, saved_dropped=False):  # counts the x̄ made again from x
        if need_dropped and not saved_dropped:
            rebuilt.append(1)
        return real(x, p, seed, dtype, need_dropped, gaps, saved_dropped)

    monkeypatch.setattr(lora_kernels, "_dropped_for_backward", spy)
    monkeypatch.setattr(lora_joint, "_dropped_for_backward", spy)
    steps = {}
    for mode in ("x_bar", "x"):
        if mode == "x":
            for m in pm.modules():
                if type(m).__name__ == "LoraLinear":
                    lora_kernels.input_choice(m).keep_input = True
        rebuilt.clear()
        torch.manual_seed(3)
        size = saved_bytes(pm, ids)
        _, _, grads, _ = _step(pm, ids, seed=3)
        steps[mode] = (size, grads, len(rebuilt))
        if mode == "x_bar":
            choices = [m._lora_input_choice for m in pm.modules() if "_lora_input_choice" in m.__dict__]
            assert len(choices) == 2 * 4 and not any(c.keep_input for c in choices)  # q (leader), o, gate, down
    assert steps["x_bar"][0] == steps["x"][0]
    assert steps["x_bar"][2] == 2 * 2 and steps["x"][2] == 2 * 2 * 4  # o_proj's per layer vs every group's
    assert steps["x_bar"][1].keys() == steps["x"][1].keys()
    for name, grad in steps["x_bar"][1].items():
        assert torch.equal(grad, steps["x"][1][name]), name
