"""The fused LoRA linear op (lorakit.lora.low_rank): its hand-written gradient against autograd's, the
layers' outputs and gradients against the plain formula, and the cases that must fall back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from transformers.pytorch_utils import Conv1D

from lorakit.lora import LoraFusedLinear, LoraLinear, low_rank, mark_trainable
from lorakit.lora.low_rank import LoraLinearFunction, computes_itself, folding_is_cheaper


def _factors(fan_in: int, blocks: list[int], r: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(len(blocks) * r, fan_in, generator=gen, dtype=dtype, requires_grad=True)
    bs = [torch.randn(d, r, generator=gen, dtype=dtype, requires_grad=True) for d in blocks]
    return a, bs


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_hand_written_gradient_matches_numerical(
    conv1d: bool, shared: bool, with_bias: bool, groups: int
) -> None:
    """q|k|v slices (q and v adapted), contiguous or repeated per head in two groups (GPT-NeoX's layout)."""
    gen = torch.Generator().manual_seed(1)
    n, fan_in, d = 5, 4, 3
    out_features = 3 * d * groups
    weight = torch.randn((fan_in, out_features) if conv1d else (out_features, fan_in), generator=gen)
    weight = weight.double()  # frozen, as a LoRA base is
    bias = torch.randn(out_features, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, fan_in, generator=gen, dtype=torch.float64, requires_grad=True)
    lora_x = (
        None if shared else torch.randn(n, fan_in, generator=gen, dtype=torch.float64, requires_grad=True)
    )
    a, (bq, bv) = _factors(fan_in, [d * groups, d * groups], r=2)
    inputs = (x, lora_x, weight, bias if with_bias else None, a, 1.5, (0, 2 * d), conv1d, groups, bq, bv)
    assert gradcheck(LoraLinearFunction.apply, inputs, eps=1e-6, atol=1e-6)


def _reference(base: nn.Module, x: torch.Tensor, a_list, b_list, slices: list[int], n_slices: int, scale):
    """W0 x + b with s·B_i A_i x added to slice i: plain autograd, nothing fused."""
    out = base(x)
    d = out.shape[-1] // n_slices
    pieces = list(out.split(d, dim=-1))
    for a, b, i in zip(a_list, b_list, slices, strict=True):
        pieces[i] = pieces[i] + scale * (x @ a.t() @ b.t())
    return torch.cat(pieces, dim=-1)


def _grads(out: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
    return list(torch.autograd.grad((out * weights).sum(), tensors))


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_linear_output_and_gradients_match_the_formula(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 9) if kind == "linear" else Conv1D(9, 12)
    nn.init.normal_(base.weight)
    layer = LoraLinear(base, r=4, alpha=8)
    mark_trainable(layer, "all", ())  # the base bias trains too, as with bias: all
    with torch.no_grad():
        layer.lora_B.normal_()
    assert computes_itself(base)
    x = torch.randn(2, 5, 12, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, base.bias]
    ours = layer(x)
    ref = _reference(base, x, [layer.lora_A], [layer.lora_B], [0], 1, 2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(ours, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_slices_output_and_gradients_match_the_formula(kind: str) -> None:
    torch.manual_seed(0)
    d = 8
    base = nn.Linear(d, 3 * d) if kind == "linear" else Conv1D(3 * d, d)
    nn.init.normal_(base.weight)
    layer = LoraFusedLinear(base, ("q", "k", "v"), ("q", "v"), r=2, alpha=4)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(3, 4, d, requires_grad=True)
    params = [x, *layer.lora_A, *layer.lora_B]
    ours = layer(x)
    ref = _reference(base, x, list(layer.lora_A), list(layer.lora_B), [0, 2], 3, 2.0)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(ours, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_input_without_gradient_still_trains_a_and_b() -> None:
    """The first adapted layer reads frozen embeddings: no dL/dx to compute, A and B still learn."""
    torch.manual_seed(0)
    layer = LoraFusedLinear(Conv1D(24, 8), ("q", "k", "v"), ("q", "v"), r=2, alpha=4)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(2, 3, 8)
    params = [*layer.lora_A, *layer.lora_B]
    ref = _reference(layer.base_layer, x, list(layer.lora_A), list(layer.lora_B), [0, 2], 3, 2.0)
    for got, want in zip(_grads(layer(x), params), _grads(ref, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_dropout_reads_its_own_input() -> None:
    """With dropout the LoRA path sees dropout(x), the base x: the same masks give the same gradients as
    the formula applied to the dropped-out input."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 9), r=4, alpha=8, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 12, requires_grad=True)
    torch.manual_seed(5)
    ours = layer(x)
    torch.manual_seed(5)
    dropped = layer.lora_dropout(x)
    ref = layer.base_layer(x) + 2.0 * (dropped @ layer.lora_A.t() @ layer.lora_B.t())
    params = [x, layer.lora_A, layer.lora_B]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(_grads(ours, params), _grads(ref, params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _OwnLinear(nn.Linear):
    """A subclass with its own forward, as quantised layers are: lorakit must call it, not bypass it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


def test_subclassed_and_hooked_bases_run_their_own_forward() -> None:
    torch.manual_seed(0)
    own = LoraLinear(_OwnLinear(12, 9), r=4, alpha=8)
    hooked_base = nn.Linear(12, 9)
    calls = []
    hooked_base.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    hooked = LoraLinear(hooked_base, r=4, alpha=8)
    assert not computes_itself(own.base_layer) and not computes_itself(hooked_base)
    x = torch.randn(3, 12)
    for layer in (own, hooked):
        with torch.no_grad():
            layer.lora_B.normal_()
        expected = layer.base_layer(x) + 2.0 * (x @ layer.lora_A.t() @ layer.lora_B.t())
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the pre-hook ran for the layer's own call too (and for `expected`)


def test_a_trainable_base_weight_is_left_to_autograd() -> None:
    layer = LoraLinear(nn.Linear(6, 6), r=2, alpha=2)
    layer.base_layer.weight.requires_grad_(True)
    assert not computes_itself(layer.base_layer)
    layer(torch.randn(2, 6)).sum().backward()
    assert layer.base_layer.weight.grad is not None and layer.lora_A.grad is not None


def test_autocast_runs_the_matmuls_in_bf16_and_keeps_float32_gradients() -> None:
    torch.manual_seed(0)
    layer = LoraFusedLinear(Conv1D(48, 16), ("q", "k", "v"), ("q", "v"), r=4, alpha=8)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = _reference(layer.base_layer, x, list(layer.lora_A), list(layer.lora_B), [0, 2], 3, 2.0)
    torch.testing.assert_close(out.float(), ref.detach(), rtol=3e-2, atol=1e-1)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in [*layer.lora_A, *layer.lora_B])
    assert x.grad is not None and x.grad.dtype == torch.float32


def test_inference_mode_gives_the_training_forward() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 9), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 12)
    train_out = layer(x).detach()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), train_out, rtol=0, atol=0)


def test_folding_pays_only_for_many_tokens() -> None:
    # roberta-base's query (768 × 768): batch 1 × 128 keeps the LoRA path, 32 × 128 folds.
    assert not folding_is_cheaper(128, 768, 768, 768)
    assert folding_is_cheaper(32 * 128, 768, 768, 768)
    # gpt2-medium's c_attn with q and v adapted: a partial fold also copies W0, so it needs more tokens.
    assert not folding_is_cheaper(1024, 1024, 3072, 2048)
    assert folding_is_cheaper(4096, 1024, 3072, 2048)


def _spy_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which forward ``lora_linear`` takes, recorded by name."""
    taken: list[str] = []
    for name in ("_folded_forward", "_lora_forward"):
        real = getattr(low_rank, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            taken.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(low_rank, name, spy)
    return taken


@pytest.mark.parametrize("kind", ["linear", "linear-qv", "conv1d-qv"])
@pytest.mark.parametrize("tokens", [4, 400])
def test_forward_without_a_graph_matches_the_training_forward(
    kind: str, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under no_grad the op skips autograd.Function, and past ``folding_is_cheaper``'s threshold it folds
    BA into a transient weight: the same output either way, no graph, and W0 left as it was."""
    torch.manual_seed(0)
    d = 16
    if kind == "linear":
        layer: nn.Module = LoraLinear(nn.Linear(d, d), r=4, alpha=8)
    else:
        base = nn.Linear(d, 3 * d) if kind == "linear-qv" else Conv1D(3 * d, d)
        layer = LoraFusedLinear(base, ("q", "k", "v"), ("q", "v"), r=2, alpha=4)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(tokens, d)
    expected = layer(x).detach()
    taken = _spy_on(monkeypatch)
    with torch.no_grad():
        out = layer(x.view(2, tokens // 2, d))
    fan_out = layer.base_layer.weight.shape[1 if kind == "conv1d-qv" else 0]
    adapted = fan_out if kind == "linear" else 2 * d
    folds = folding_is_cheaper(tokens, d, fan_out, adapted)
    assert taken == ["_folded_forward" if folds else "_lora_forward"]
    assert (tokens == 400) == folds  # both paths are exercised
    assert out.grad_fn is None and out.shape == (2, tokens // 2, fan_out)
    torch.testing.assert_close(out.view(tokens, fan_out), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.base_layer.weight, w0)


def test_half_precision_never_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast W0 + s·BA would be rounded to bf16, losing most of a small update."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 16), r=4, alpha=8)
    taken = _spy_on(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(400, 16))
    assert folding_is_cheaper(400, 16, 16, 16)
    assert taken == ["_lora_forward"] and out.dtype == torch.bfloat16


def test_a_graph_is_recorded_when_the_input_wants_gradients() -> None:
    """Frozen adapter, input that needs dL/dx (saliency maps, say): the autograd op must run."""
    layer = LoraLinear(nn.Linear(16, 16), r=4, alpha=8).requires_grad_(False)
    x = torch.randn(400, 16, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
