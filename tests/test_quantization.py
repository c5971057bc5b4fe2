"""The quantized base (``lorakit.quantization``): exact forward and input gradient against the dequantized
weight, nothing dense saved for backward, the walk over a model, LoRA on top (gradients, frozen base,
mixed batches), and back to dense."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff, randomize_lora, tiny_roberta
from torch import nn

from lorakit.lora import LoraConfig, inject_lora, mark_trainable, mixed_batch
from lorakit.quantization import (
    Int8Linear,
    NF4Linear,
    QuantizedLinear,
    base_weight_bytes,
    dequantize_model,
    quantize_model,
    quantized_layers,
)

pytest.importorskip("torchao")
METHODS = ["nf4", "int8"]
LAYERS = {"nf4": NF4Linear, "int8": Int8Linear}


def _layer(method: str, out_f: int = 256, in_f: int = 128, bias: bool = True) -> QuantizedLinear:
    torch.manual_seed(0)
    dense = nn.Linear(in_f, out_f, bias=bias)
    return LAYERS[method](dense.weight, dense.bias)


def _roberta(**kw):
    torch.manual_seed(0)  # 128 wide, 512 inner: every block weight is a multiple of 64·256 elements
    return tiny_roberta(hidden_size=128, intermediate_size=512, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_forward_and_input_gradient_are_the_dequantized_weights(method: str) -> None:
    layer = _layer(method)
    w = layer.dequantize()
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, x @ w.t() + layer.bias)
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.allclose(x.grad, grad @ w, atol=1e-6, rtol=0)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    # the quantization itself is close to the original
    torch.manual_seed(0)
    original = nn.Linear(128, 256).weight.detach()
    tolerance = {"nf4": 0.12, "int8": 0.01}[method]
    assert (w - original).norm() / original.norm() < tolerance


@pytest.mark.parametrize("method", METHODS)
def test_backward_saves_no_dense_float_weight(method: str) -> None:
    layer = _layer(method, 1024, 512)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, 512, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    plain = [t for t in saved if not hasattr(t, "__tensor_flatten__")]  # not a tensor subclass (NF4)
    dense = [t for t in plain if t.is_floating_point() and t.numel() >= 512 * 1024]
    assert not dense, [(t.dtype, tuple(t.shape)) for t in dense]
    kept = 0
    for t in saved:
        if not hasattr(t, "__tensor_flatten__"):
            kept += t.numel() * t.element_size()
        else:  # torchao's NF4 tensor: its inner tensors
            names, _ = t.__tensor_flatten__()
            kept += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
    assert kept == layer.weight_bytes()  # exactly the quantized storage, no input, no float weight
    assert kept <= 0.26 * 512 * 1024 * 4


def test_model_walk_keeps_embeddings_norms_and_head() -> None:
    model = _roberta()
    report = quantize_model(model, "nf4")
    names = [n for n, _ in quantized_layers(model)]
    assert len(names) == 2 * 6 and report.unquantized == {}
    assert all(".layer." in n for n in names)
    assert (
        type(model.classifier.dense) is nn.Linear
        and type(model.roberta.embeddings.word_embeddings) is nn.Embedding
    )
    assert report.quantized_bytes < 0.15 * report.dense_bytes


def test_unblockable_layers_stay_dense_and_are_counted() -> None:
    model = tiny_roberta()  # 32 wide: 1,024-element weights, not a multiple of 64·256
    report = quantize_model(model, "nf4")
    assert report.quantized == [] and len(report.unquantized) == 12
    assert len(quantize_model(tiny_roberta(), "int8").quantized) == 12  # int8 blocks any row


@pytest.mark.parametrize("method", METHODS)
def test_gpt2_conv1d_is_transposed(method: str, token_batch: dict) -> None:
    torch.manual_seed(0)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=120, n_embd=128, n_layer=2, n_head=4, n_positions=80)
    ).eval()
    report = quantize_model(model, method)
    assert len(report.quantized) == 8 and report.unquantized == {}
    with torch.no_grad():
        quantized = model(**token_batch).logits
        dequantize_model(model)  # back to Conv1D holding dequant(W)ᵀ
        assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        assert max_diff(model(**token_batch).logits, quantized) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_lora_on_quantized_base_trains_only_the_adapter(method: str, token_batch: dict) -> None:
    model = _roberta()
    quantize_model(model, method)
    config = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    inject_lora(model, config)
    mark_trainable(model, "none", ["classifier"])
    randomize_lora(model)
    frozen = {n: _plain(p).clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    loss = model(**token_batch, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith("classifier."):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for layer_name, layer in quantized_layers(model):
        assert not layer.weight.requires_grad, layer_name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(_plain(p), frozen[n]), n


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.get_original_weight() if hasattr(t, "get_original_weight") else t.detach()


@pytest.mark.parametrize("method", METHODS)
def test_lora_on_quantized_equals_lora_on_dequantized(method: str, token_batch: dict) -> None:
    model = _roberta()
    quantize_model(model, method)
    inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value", "dense"]))
    randomize_lora(model)
    with torch.no_grad():
        quantized = model(**token_batch).logits
        dequantize_model(model)
        assert not quantized_layers(model)
        assert max_diff(model(**token_batch).logits, quantized) < 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_mixed_batch_on_quantized_base(method: str, token_batch: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model = _roberta()
    quantize_model(model, method)
    for name in ["a", "b"]:
        inject_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]), adapter=name)
    randomize_lora(model, seed=1)
    from lorakit.lora import set_active_adapter

    with torch.no_grad():
        alone = {}
        for name in ["a", "b"]:
            set_active_adapter(model, name)
            alone[name] = model(**token_batch).logits
        with mixed_batch(model, ["a", "b", "a"]):
            mixed = model(**token_batch).logits
    expected = torch.stack([alone["a"][0], alone["b"][1], alone["a"][2]])
    assert max_diff(mixed, expected) < 1e-5


def test_base_weight_bytes_nf4_is_a_quarter() -> None:
    model = _roberta(vocab_size=8)
    before = base_weight_bytes(model)
    report = quantize_model(model, "nf4")
    after = base_weight_bytes(model)
    assert before - after == report.dense_bytes - report.quantized_bytes
