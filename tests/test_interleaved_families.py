"""Fused q|k|v projections laid out per head (issue 24): GPT-NeoX's and BLOOM's ``query_key_value`` (num_heads
groups of q|k|v), Falcon's (per head; per key/value group in its new decoder architecture, a group's q heads
then its k and v; contiguous under multi-query), GPT-BigCode's ``c_attn`` without multi-query. On tiny
models of the installed transformers:

* each slice's update lands on the rows the model's attention reads as that slice: the expected ΔW is
  built here by viewing it as the attention code views the fused output, not from lorakit's layout;
* with one token, attention weights are all 1 whatever q and k are, so an update to q alone must leave the
  logits unchanged and one to v must change them (a check independent of any layout written down: a
  layout off by one row would leak into v);
* PEFT loads the block-structured file and gives the same logits, merging keeps them, lorakit reads the
  file's layout back, and a mixed batch over two adapters equals each alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from conftest import max_diff, perturb_heads, randomize_lora
from safetensors import safe_open

from lorakit.lora import (
    FusedLayout,
    LoraConfig,
    LoraFusedLinear,
    activated,
    add_adapter,
    inject_lora,
    load_adapter,
    lora_modules,
    mark_trainable,
    mixed_logits,
    save_adapter,
    unload_lora,
)

H, HEADS, HD = 32, 4, 8  # hidden, heads, head_dim
CONFIGS: dict[str, dict] = {
    "gpt_neox": dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                     intermediate_size=64),
    "bloom": dict(vocab_size=128, hidden_size=H, n_layer=2, n_head=HEADS),
    "falcon": dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                   new_decoder_architecture=True, num_kv_heads=2),
    "falcon-per-head": dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                            new_decoder_architecture=False, multi_query=False),
    "falcon-multi-query": dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                               new_decoder_architecture=False, multi_query=True),
    "gpt_bigcode": dict(vocab_size=128, n_embd=H, n_layer=2, n_head=HEADS, multi_query=False),
}  # fmt: skip
MODULE = {
    "gpt_neox": "gpt_neox.layers.{i}.attention.query_key_value",
    "bloom": "transformer.h.{i}.self_attention.query_key_value",
    "falcon": "transformer.h.{i}.self_attention.query_key_value",
    "gpt_bigcode": "transformer.h.{i}.attn.c_attn",
}
PER_HEAD = FusedLayout((("q", HD), ("k", HD), ("v", HD)), HEADS)
# Written out from each attention's code (the comment quotes how it splits the fused output).
LAYOUTS: dict[str, FusedLayout] = {
    # GPTNeoXAttention: .view(*input_shape, -1, 3 * head_size) then .chunk(3, dim=-1)
    "gpt_neox": PER_HEAD,
    # BloomAttention._reshape: .view(batch, seq, num_heads, 3, head_dim), q = [..., 0, :]
    "bloom": PER_HEAD,
    # FalconAttention, new architecture: .view(..., num_kv_heads, -1, head_dim), q = [..., :-2, :]
    "falcon": FusedLayout((("q", 2 * HD), ("k", HD), ("v", HD)), 2),
    # FalconAttention otherwise: .unflatten(-2, (num_heads, 3)).unbind(-2)
    "falcon-per-head": PER_HEAD,
    # FalconAttention with multi_query: .split([num_heads, 1, 1], dim=-2): contiguous
    "falcon-multi-query": FusedLayout((("q", H), ("k", HD), ("v", HD))),
    # GPTBigCodeAttention without multi_query: .view(..., num_heads, 3 * head_dim).split(3 * [head_dim])
    "gpt_bigcode": PER_HEAD,
}


def _model_type(case: str) -> str:
    return case.split("-")[0]


def tiny(case: str, kind: str = "lm") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(_model_type(case), pad_token_id=0, **CONFIGS[case])
    auto = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    return auto.from_config(config).eval()


def lora_config(case: str, kind: str, slices: str = "q,v") -> LoraConfig:
    suffix = MODULE[_model_type(case)].rsplit(".", 1)[-1]
    return LoraConfig(
        r=4,
        alpha=8,
        target_modules=[f"{suffix}[{slices}]"],
        modules_to_save=["score"] if kind == "seq_cls" else [],
        fused_slices={suffix: LAYOUTS[case]},
    )


def _q_and_v_views(case: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Views of the q rows and the v rows of a (out, in) matrix as the attention code reads the fused
    output (heads, head_dim, in), in the attention's own head order (Falcon's q: (group, head, ...))."""
    model_type = _model_type(case)
    if case == "falcon":  # (num_kv_heads, heads per group + 2, head_dim): a group's q heads, then k, v
        return lambda m: (m.view(2, HEADS // 2 + 2, HD, -1)[:, :-2], m.view(2, HEADS // 2 + 2, HD, -1)[:, -1])
    if case == "falcon-multi-query":  # (num_heads + 2, head_dim): q heads, k, v
        return lambda m: (m.view(HEADS + 2, HD, -1)[:HEADS], m.view(HEADS + 2, HD, -1)[-1:])
    assert model_type in ("gpt_neox", "bloom", "falcon", "gpt_bigcode")
    return lambda m: (m.view(HEADS, 3, HD, -1)[:, 0], m.view(HEADS, 3, HD, -1)[:, 2])


CASES = list(LAYOUTS)


@pytest.mark.parametrize("case", CASES)
def test_each_slice_update_lands_on_the_rows_the_attention_reads(case: str) -> None:
    model = tiny(case)
    inject_lora(model, lora_config(case, "lm"))
    randomize_lora(model)
    layer = model.get_submodule(MODULE[_model_type(case)].format(i=1))
    assert isinstance(layer, LoraFusedLinear) and layer.adapted == ("q", "v")
    s = layer.scaling
    fan_in = layer.lora_A[0].shape[1]
    expected = torch.zeros(layer.fan_out, fan_in)
    q_rows, v_rows = _q_and_v_views(case)(expected)
    with torch.no_grad():
        # B_q's rows are the q heads in the attention's order, head_dim rows each (B_v's: the v heads).
        q_rows.copy_((s * layer.lora_B[0] @ layer.lora_A[0]).view(q_rows.shape))
        v_rows.copy_((s * layer.lora_B[1] @ layer.lora_A[1]).view(v_rows.shape))
        delta = layer.delta_weight()
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
        x = torch.randn(2, 5, fan_in)
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ expected.T, rtol=0, atol=1e-5)
        w0 = layer.base_layer.weight.clone()
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight - w0, expected, rtol=0, atol=1e-6)
        layer.unmerge()
        assert max_diff(delta, torch.roll(expected, 1, dims=0)) > 1e-3  # one row off would be caught


@pytest.mark.parametrize("case", CASES)
def test_with_one_token_a_q_update_changes_nothing_and_a_v_update_does(case: str) -> None:
    """One token attends only to itself (weight 1, whatever q·k is): the logits depend on v, not on q."""
    ids = torch.tensor([[5], [17]])
    outputs = {}
    for slices in ("q", "v"):
        model = tiny(case)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            inject_lora(model, lora_config(case, "lm", slices))
            randomize_lora(model)
            outputs[slices] = max_diff(model(input_ids=ids).logits, before)
    assert outputs["q"] <= 1e-5
    assert outputs["v"] > 1e-3


@pytest.mark.parametrize("kind", ["seq_cls", "lm"])
@pytest.mark.parametrize("case", CASES)
def test_peft_loads_the_file_lorakit_reads_its_layout_back_and_merge_keeps_the_logits(
    case: str, kind: str, tmp_path: Path, token_batch
) -> None:
    base = tiny(case, kind)
    model = copy.deepcopy(base)
    config = lora_config(case, kind)
    inject_lora(model, config)
    mark_trainable(model, config.bias, config.modules_to_save)
    randomize_lora(model)
    perturb_heads(model, list(config.modules_to_save))
    with torch.no_grad():
        ours = model(**token_batch).logits
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny",
                 task_type="SEQ_CLS" if kind == "seq_cls" else "CAUSAL_LM")  # fmt: skip
    path = MODULE[_model_type(case)].format(i=0)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        layout = json.loads(f.metadata()["lorakit.fused_slices"])[path]
    expected = LAYOUTS[case]
    assert layout == {**expected.as_record(), "adapted": ["q", "v"], "r": 4}
    assert layout.get("groups", 1) == expected.groups

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tmp_path)
    recorded = loaded.fused_slices[path]
    assert (recorded if isinstance(recorded, FusedLayout) else FusedLayout(tuple(recorded))) == expected
    with torch.no_grad():
        assert max_diff(ours, theirs(**token_batch).logits) <= 1e-5
        assert max_diff(ours, fresh(**token_batch).logits) == 0.0
        merged = unload_lora(model, merge=True)
        assert not list(lora_modules(merged))
        assert max_diff(ours, merged(**token_batch).logits) <= 1e-5


@pytest.mark.parametrize("case", ["gpt_neox", "falcon"])
def test_a_mixed_batch_of_two_per_head_adapters_equals_each_alone(case: str, token_batch) -> None:
    model = tiny(case, "seq_cls")
    add_adapter(model, "qv", lora_config(case, "seq_cls"))
    add_adapter(model, "k", lora_config(case, "seq_cls", "k"))
    randomize_lora(model)
    rows = ["qv", "k", None]
    with torch.no_grad():
        alone = {}
        for name in ("qv", "k", None):
            with activated(model, name):
                alone[name] = model(**token_batch).logits
        assert max_diff(alone["qv"], alone["k"]) > 1e-4
        mixed, _ = mixed_logits(model, rows, **token_batch)
    for i, name in enumerate(rows):
        assert max_diff(mixed[i], alone[name][i]) <= 1e-5, (i, name)


def test_training_a_per_head_slice_moves_only_its_rows() -> None:
    """A backward pass through the hand-written gradient: B_q's gradient exists and the frozen base gets
    none; after one SGD step ΔW is still zero on every k row."""
    model = tiny("gpt_neox")
    inject_lora(model, lora_config("gpt_neox", "lm"))
    mark_trainable(model, "none", [])
    randomize_lora(model)
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(3))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    layer = model.get_submodule(MODULE["gpt_neox"].format(i=0))
    assert layer.lora_B[0].grad is not None and layer.lora_B[0].grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
        k_rows = layer.delta_weight().view(HEADS, 3, HD, -1)[:, 1]
    assert torch.count_nonzero(k_rows) == 0


def test_analysis_and_resize_read_and_write_each_slice_on_its_per_head_rows(
    tmp_path: Path, token_batch
) -> None:
    """``lorakit analyze`` reads q's ΔW and W0 on every head's q rows; a lossless ``lorakit resize`` (the
    stored rank) writes each slice back on those rows, so the logits stay the same."""
    from lorakit.analysis.resize import resize
    from lorakit.analysis.updates import base_weights, open_adapter

    base = tiny("gpt_neox", "seq_cls")
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    config = lora_config("gpt_neox", "seq_cls")
    inject_lora(model, config)
    mark_trainable(model, config.bias, config.modules_to_save)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", config, str(tmp_path / "base"), task_type="SEQ_CLS")

    path = MODULE["gpt_neox"].format(i=1)
    updates = {u.name: u for u in open_adapter(tmp_path / "adapter").updates}
    with torch.no_grad():
        q_rows, v_rows = _q_and_v_views("gpt_neox")(model.get_submodule(path).delta_weight().double())
    torch.testing.assert_close(updates[f"{path}[q]"].delta(), q_rows.reshape(-1, H), rtol=0, atol=1e-6)
    torch.testing.assert_close(updates[f"{path}[v]"].delta(), v_rows.reshape(-1, H), rtol=0, atol=1e-6)
    w0 = base_weights(open_adapter(tmp_path / "adapter"))[f"{path}[q]"]
    q_w0, _ = _q_and_v_views("gpt_neox")(base.get_submodule(path).weight.detach())
    assert torch.equal(w0, q_w0.reshape(-1, H))

    resize(tmp_path / "adapter", rank=4, out=tmp_path / "resized")
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "resized")
    with torch.no_grad():
        assert max_diff(model(**token_batch).logits, reloaded(**token_batch).logits) <= 1e-5
