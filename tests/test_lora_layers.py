"""The layer math against a direct W0 x + s·B A x, merge/unmerge round trips, dtypes and devices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.lora import LoraEmbedding, LoraFusedLinear, LoraLinear
from lorakit.lora.layers import lora_scaling


def _randomize(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _linear(fan_in: int = 12, fan_out: int = 9) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(fan_in, fan_out)


def test_linear_matches_direct_formula() -> None:
    base = _linear()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoraLinear(base, r=4, alpha=8)
    _randomize(layer)
    x = torch.randn(2, 5, 12)
    expected = x @ w0.T + b0 + 2.0 * (x @ layer.lora_A.detach().T @ layer.lora_B.detach().T)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_conv1d_matches_direct_formula_with_a_r_by_in() -> None:
    torch.manual_seed(0)
    base = Conv1D(9, 12)  # nf=out=9, nx=in=12; weight stored (in, out)
    nn.init.normal_(base.weight)
    layer = LoraLinear(base, r=3, alpha=6)
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (9, 3)
    _randomize(layer)
    x = torch.randn(4, 12)
    expected = x @ base.weight.detach() + base.bias.detach() + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected.detach(), rtol=0, atol=1e-5)


def test_init_b_zero_so_output_is_the_base_output() -> None:
    base = _linear()
    x = torch.randn(3, 12)
    expected = base(x)
    layer = LoraLinear(base, r=4, alpha=8)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on (r, in) draws from U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound
    torch.testing.assert_close(layer(x), expected)


def test_gaussian_init_and_rslora_scaling() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 8), r=16, alpha=32, init="gaussian", use_rslora=True)
    assert layer.scaling == pytest.approx(32 / 4)
    assert layer.lora_A.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert lora_scaling(16, 8) == 2.0


def test_dropout_zero_is_identity_and_dropout_only_on_lora_path() -> None:
    assert isinstance(LoraLinear(_linear(), r=2, alpha=2).lora_dropout, nn.Identity)
    base = _linear()
    layer = LoraLinear(base, r=2, alpha=2, dropout=0.5).train()
    x = torch.randn(8, 12)
    # With B = 0 the LoRA path adds nothing, so dropout must not touch the base output.
    torch.testing.assert_close(layer(x), base(x))


def test_lora_weights_stay_fp32_on_a_bf16_base_and_on_its_device() -> None:
    base = _linear().to(torch.bfloat16)
    layer = LoraLinear(base, r=4, alpha=8)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.device == base.weight.device
    _randomize(layer)
    x = torch.randn(2, 12, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = (
        x.float() @ base.weight.float().T
        + base.bias.float()
        + 2.0 * (x.float() @ layer.lora_A.T @ layer.lora_B.T)
    )
    torch.testing.assert_close(out.float(), ref.detach(), rtol=2e-2, atol=5e-2)


def test_gradients_reach_a_and_b_only() -> None:
    layer = LoraLinear(_linear(), r=4, alpha=8)
    _randomize(layer)
    layer(torch.randn(3, 12)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_slices_adapt_q_and_v_only(kind: str) -> None:
    torch.manual_seed(0)
    d = 8
    base = nn.Linear(d, 3 * d) if kind == "linear" else Conv1D(3 * d, d)
    nn.init.normal_(base.weight)
    x = torch.randn(2, 3, d)
    plain = base(x).detach()
    layer = LoraFusedLinear(base, ("q", "k", "v"), ("v", "q"), r=2, alpha=4)
    assert layer.adapted == ("q", "v")
    _randomize(layer)
    out = layer(x)
    s = 2.0
    dq = s * x @ layer.lora_A[0].T @ layer.lora_B[0].T
    dv = s * x @ layer.lora_A[1].T @ layer.lora_B[1].T
    torch.testing.assert_close(out[..., :d], plain[..., :d] + dq, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[..., d : 2 * d], plain[..., d : 2 * d], rtol=0, atol=1e-6)  # k untouched
    torch.testing.assert_close(out[..., 2 * d :], plain[..., 2 * d :] + dv, rtol=0, atol=1e-5)


def test_embedding_matches_direct_formula() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(20, 6, padding_idx=0)
    layer = LoraEmbedding(base, r=3, alpha=3)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0  # A zeros, B normal: starts as the base
    _randomize(layer)
    ids = torch.tensor([[1, 5, 0], [19, 2, 2]])
    delta = (layer.lora_embedding_B @ layer.lora_embedding_A).T  # (num, dim)
    torch.testing.assert_close(layer(ids), base(ids) + delta[ids], rtol=0, atol=1e-5)


def _layers() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    conv = Conv1D(24, 8)
    nn.init.normal_(conv.weight)
    return [
        ("linear", LoraLinear(_linear(), r=4, alpha=16), torch.randn(3, 12)),
        ("conv1d", LoraLinear(Conv1D(9, 12), r=4, alpha=16), torch.randn(3, 12)),
        ("fused", LoraFusedLinear(conv, ("q", "k", "v"), ("q", "v"), r=2, alpha=8), torch.randn(3, 8)),
        ("embedding", LoraEmbedding(nn.Embedding(30, 8), r=4, alpha=8), torch.tensor([[1, 2, 29]])),
    ]


@pytest.mark.parametrize("case", range(4))
def test_merge_unmerge_round_trip(case: int) -> None:
    name, layer, x = _layers()[case]
    _randomize(layer, seed=case)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x).detach()
    layer.merge()
    assert layer.merged
    merged_out = layer(x).detach()
    assert (merged_out - unmerged).abs().max().item() <= 1e-5, name
    base_only = layer.base_layer(x).detach()  # merged weights alone give the adapted output
    assert (base_only - unmerged).abs().max().item() <= 1e-5, name
    layer.unmerge()
    assert (layer.base_layer.weight - w0).abs().max().item() <= 1e-6, name


def test_merge_refuses_non_finite_weights() -> None:
    layer = LoraLinear(_linear(), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
        layer.lora_A.fill_(1.0)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base_layer.weight, w0)


def test_bad_fused_layouts_are_rejected() -> None:
    with pytest.raises(ValueError, match="equal slices"):
        LoraFusedLinear(nn.Linear(4, 10), ("q", "k", "v"), ("q",), r=1, alpha=1)
    with pytest.raises(ValueError, match="subset"):
        LoraFusedLinear(nn.Linear(4, 12), ("q", "k", "v"), ("x",), r=1, alpha=1)
    with pytest.raises(ValueError, match="positive"):
        LoraLinear(nn.Linear(4, 4), r=0, alpha=1)
