"""Injection on tiny RoBERTa, BERT, DeBERTa-v2 and GPT-2 models: targets, trainable marking, counts,
merging back to plain modules."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora, tiny_bert, tiny_deberta, tiny_gpt2, tiny_roberta
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.families import lora_defaults, seq_cls_heads
from lorakit.lora import (
    LoraConfig,
    LoraFusedLinear,
    LoraLinear,
    TargetNotFoundError,
    count_parameters,
    inject_lora,
    lora_modules,
    mark_trainable,
    merge_lora,
    unload_lora,
    unmerge_lora,
)

ARCHS = {
    "roberta": (tiny_roberta, ["query", "value"]),
    "bert": (tiny_bert, ["query", "value"]),
    "deberta-v2": (tiny_deberta, ["query_proj", "value_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn"]),
}
# GPT-2's q and v slices of its fused c_attn (equal thirds), as lorakit.families gives them.
GPT2_QV = {"target_modules": ["c_attn[q,v]"], "fused_slices": {"c_attn": ("q", "k", "v")}}


def qv(arch: str, **kwargs) -> LoraConfig:
    """The paper's q/v targets for one of ARCHS, written out (the core takes no default)."""
    if arch == "gpt2":
        return LoraConfig(**GPT2_QV, **kwargs)
    return LoraConfig(target_modules=ARCHS[arch][1], **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_default_targets_are_the_papers_query_and_value(arch: str) -> None:
    factory, leaves = ARCHS[arch]
    model = factory()
    adapted = inject_lora(model, lora_defaults(model, LoraConfig(r=4, alpha=8)))
    assert {n.rsplit(".", 1)[-1] for n in adapted} == set(leaves)
    if arch == "gpt2":  # one fused c_attn per layer holding q and v
        assert len(adapted) == 2
        assert all(isinstance(m, LoraFusedLinear) and m.adapted == ("q", "v") for _, m in lora_modules(model))
    else:  # two layers, q and v each
        assert len(adapted) == 4
        assert all(isinstance(m, LoraLinear) for _, m in lora_modules(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_injected_model_starts_as_the_base_and_merges_back_to_plain_modules(arch: str, token_batch) -> None:
    factory, _ = ARCHS[arch]
    model = factory()
    base_types = {n: type(m) for n, m in model.named_modules()}
    with torch.no_grad():
        base_out = model(**token_batch).logits
    inject_lora(model, qv(arch, r=4, alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(model(**token_batch).logits, base_out)  # B = 0 at start
    randomize_lora(model)
    with torch.no_grad():
        adapted_out = model(**token_batch).logits
        assert (adapted_out - base_out).abs().max() > 1e-6
        merge_lora(model)
        assert (model(**token_batch).logits - adapted_out).abs().max().item() <= 1e-5
        unmerge_lora(model)
        assert (model(**token_batch).logits - adapted_out).abs().max().item() <= 1e-5
        unload_lora(model)
        assert {n: type(m) for n, m in model.named_modules()} == base_types  # plain Linear/Conv1D again
        assert (model(**token_batch).logits - adapted_out).abs().max().item() <= 1e-5


def test_target_that_matches_nothing_is_an_error_listing_candidates() -> None:
    model = tiny_roberta()
    with pytest.raises(TargetNotFoundError) as err:
        inject_lora(model, LoraConfig(target_modules=["query", "FAKE"]))
    msg = str(err.value)
    assert "FAKE" in msg and "query" in msg and "value" in msg and "candidates" in msg
    assert not list(lora_modules(model))  # nothing half-injected
    with pytest.raises(TargetNotFoundError, match="regex"):
        inject_lora(model, LoraConfig(target_modules=r".*\.nothing"))
    with pytest.raises(TargetNotFoundError, match="slices"):
        inject_lora(tiny_gpt2(), LoraConfig(**{**GPT2_QV, "target_modules": ["c_attn[q,x]"]}))
    with pytest.raises(TargetNotFoundError, match="has no slices"):  # slices not declared: never guessed
        inject_lora(tiny_gpt2(), LoraConfig(target_modules=["c_attn[q,v]"]))


def test_regex_targets_match_full_names() -> None:
    model = tiny_roberta()
    adapted = inject_lora(model, LoraConfig(target_modules=r"roberta\.encoder\.layer\.0\..*(query|key)"))
    assert adapted == [
        "roberta.encoder.layer.0.attention.self.query",
        "roberta.encoder.layer.0.attention.self.key",
    ]


def test_embedding_and_conv1d_targets() -> None:
    model = tiny_gpt2()
    adapted = inject_lora(model, LoraConfig(target_modules=["wte", "c_proj"]))
    kinds = {type(model.get_submodule(n)).__name__ for n in adapted}
    assert kinds == {"LoraEmbedding", "LoraLinear"}
    assert isinstance(model.get_submodule("transformer.h.0.mlp.c_proj").base_layer, Conv1D)


def test_trainable_marking_and_counts_with_bias_modes() -> None:
    model = tiny_roberta()
    inject_lora(model, qv("roberta", r=4, alpha=8))
    names = mark_trainable(model, "none", seq_cls_heads("roberta"))
    assert all("lora_" in n or n.startswith("classifier.") for n in names)
    counts = count_parameters(model)
    lora = 2 * 2 * (4 * 32 + 32 * 4)  # 2 layers × (q, v) × (A + B)
    head = 32 * 32 + 32 + 32 * 2 + 2
    assert counts.lora == lora and counts.trainable == lora + head
    assert counts.total == sum(p.numel() for p in model.parameters())
    with_all = mark_trainable(model, "all", ())
    assert "roberta.encoder.layer.0.attention.output.dense.bias" in with_all
    lora_only = mark_trainable(model, "lora_only", ())
    assert "roberta.encoder.layer.0.attention.self.query.base_layer.bias" in lora_only
    assert "roberta.encoder.layer.0.attention.self.key.bias" not in lora_only
    with pytest.raises(TargetNotFoundError, match="modules_to_save"):
        mark_trainable(model, "none", ["head_that_is_not_there"])


def test_deberta_pooler_is_part_of_the_head() -> None:
    model = tiny_deberta()
    inject_lora(model, qv("deberta-v2", r=2, alpha=4))
    names = mark_trainable(model, "none", seq_cls_heads("deberta-v2"))
    assert "pooler.dense.weight" in names and "classifier.weight" in names


def test_lora_weights_follow_the_base_weights_device_and_stay_fp32() -> None:
    model = tiny_roberta().to(torch.bfloat16)
    inject_lora(model, qv("roberta", r=2, alpha=4))
    for _, m in lora_modules(model):
        assert m.lora_A.dtype == torch.float32 and m.lora_A.device == m.base_layer.weight.device
        assert m.base_layer.weight.dtype == torch.bfloat16


def test_unload_without_merge_restores_the_base() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    ref = model(x).detach()
    inject_lora(model, LoraConfig(r=2, alpha=2, target_modules=["0", "2"]))
    randomize_lora(model)
    unload_lora(model, merge=False)
    assert isinstance(model[0], nn.Linear)
    torch.testing.assert_close(model(x), ref)
