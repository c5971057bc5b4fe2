"""Fused q|k|v projections whose slices differ in size (issue 24): Phi-3's ``qkv_proj`` under grouped-query
attention, GPT-BigCode's multi-query ``c_attn``, ModernBERT's ``Wqkv``. On tiny models of the installed
transformers: the default targets adapt exactly q and v, each slice's update lands on its own rows (checked
against a construction written out here, not lorakit's offsets), PEFT loads the block-structured file and
gives the same logits, merging keeps them, analysis splits at the same rows, old names-only files still
load, and per-head layouts get their slices (tests/test_interleaved_families.py checks their rows)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import max_diff, randomize_lora, tiny_gpt2
from conftest import perturb_heads as perturb
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorakit import families
from lorakit.lora import (
    LoraConfig,
    LoraFusedLinear,
    TargetNotFoundError,
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

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
CONFIGS: dict[str, dict] = {
    "phi3": {**TINY, "num_key_value_heads": 2, "head_dim": 8},  # q 4·8, k = v 2·8
    "gpt_bigcode": dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, multi_query=True),  # k = v = one head
    "modernbert": dict(TINY),
}
# Written out from the transformers attention code, not from lorakit.families: module path, (q, k, v) rows.
FUSED = {
    "phi3": ("model.layers.{i}.self_attn.qkv_proj", (32, 16, 16)),
    "gpt_bigcode": ("transformer.h.{i}.attn.c_attn", (32, 8, 8)),
    "modernbert": ("model.layers.{i}.attn.Wqkv", (32, 32, 32)),
}
HEADS = {"phi3": ["score"], "gpt_bigcode": ["score"], "modernbert": ["head", "classifier"]}
# ModernBERT is an encoder: its other head is the masked LM.
KINDS = [("phi3", "seq_cls"), ("phi3", "lm"), ("gpt_bigcode", "seq_cls"), ("gpt_bigcode", "lm")]
KINDS += [("modernbert", "seq_cls"), ("modernbert", "lm")]


def tiny(model_type: str, kind: str, **overrides) -> torch.nn.Module:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
    )

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, pad_token_id=0, **{**CONFIGS[model_type], **overrides})
    lm = AutoModelForMaskedLM if model_type == "modernbert" else AutoModelForCausalLM
    return (AutoModelForSequenceClassification if kind == "seq_cls" else lm).from_config(config).eval()


def lora_config(model: torch.nn.Module, kind: str, **kwargs) -> LoraConfig:
    """As lorakit.models builds it: the family's heads and (unless given) its paper targets, slice sizes
    from the model's config."""
    heads = families.seq_cls_heads(model.config.model_type) if kind == "seq_cls" else []
    config = LoraConfig(
        r=4, alpha=8, modules_to_save=heads, fused_slices=families.fused_slices(model.config), **kwargs
    )
    return families.lora_defaults(model, config)


def expected_delta(layer: LoraFusedLinear, sizes: tuple[int, int, int]) -> torch.Tensor:
    """ΔW (out, in) built by hand: s·B_q A_q at rows [0, q), zeros for k, s·B_v A_v at rows [q+k, q+k+v)."""
    q, k, v = sizes
    s = layer.scaling
    delta = torch.zeros(q + k + v, layer.lora_A[0].shape[1])
    delta[:q] = s * layer.lora_B[0] @ layer.lora_A[0]
    delta[q + k :] = s * layer.lora_B[1] @ layer.lora_A[1]
    return delta


@pytest.mark.parametrize("model_type", list(FUSED))
def test_default_targets_from_a_recipe_are_the_q_and_v_slices(model_type: str) -> None:
    from lorakit.models import apply_lora
    from lorakit.recipe import recipe_from_dict
    from lorakit.tasks import get_task

    model = tiny(model_type, "seq_cls")
    recipe = recipe_from_dict({"model": {"name_or_path": "tiny"}, "task": {"name": "sst2"}}, source="r.yaml")
    config, adapted = apply_lora(recipe, model, get_task("sst2"))
    path, sizes = FUSED[model_type]
    assert sorted(adapted) == [path.format(i=i) for i in range(2)]
    assert list(config.modules_to_save) == HEADS[model_type]
    for name, layer in lora_modules(model):
        assert isinstance(layer, LoraFusedLinear), name
        assert layer.slice_names == ("q", "k", "v") and layer.slice_sizes == sizes
        assert layer.adapted == ("q", "v")
        assert [b.shape[0] for b in layer.lora_B] == [sizes[0], sizes[2]]  # no parameters for k


@pytest.mark.parametrize("model_type", ["phi3", "gpt_bigcode"])
def test_each_slice_update_lands_on_its_own_rows(model_type: str) -> None:
    """ΔW, the merged weight and the forward pass all put B_q A_q on q's rows and B_v A_v on v's rows,
    with k's rows untouched; one row off anywhere fails (the last check shows the data would catch it)."""
    model = tiny(model_type, "lm")
    inject_lora(model, lora_config(model, "lm"))
    randomize_lora(model)
    path, sizes = FUSED[model_type]
    q, k, _ = sizes
    layer = model.get_submodule(path.format(i=1))
    expected = expected_delta(layer, sizes)
    with torch.no_grad():
        delta = layer.delta_weight()
        assert delta.shape == expected.shape
        assert torch.count_nonzero(delta[q : q + k]) == 0  # W_k is not adapted
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-6)
        x = torch.randn(2, 5, expected.shape[1])
        base = layer.base_layer(x)
        torch.testing.assert_close(layer(x) - base, x @ expected.T, rtol=0, atol=1e-5)  # the fused forward
        w0 = layer.base_layer.weight.clone()
        layer.merge()
        torch.testing.assert_close(layer.base_layer.weight - w0, expected, rtol=0, atol=1e-6)
        layer.unmerge()
        # A construction shifted by one row differs by far more than the tolerance: the checks can fail.
        shifted = torch.roll(expected, 1, dims=0)
        assert max_diff(delta, shifted) > 1e-3


@pytest.mark.parametrize(("model_type", "kind"), KINDS)
def test_peft_loads_the_block_structured_file_and_merge_keeps_the_logits(
    model_type: str, kind: str, tmp_path: Path, token_batch
) -> None:
    base = tiny(model_type, kind)
    model = copy.deepcopy(base)
    config = lora_config(model, kind)
    inject_lora(model, config)
    mark_trainable(model, config.bias, config.modules_to_save)
    randomize_lora(model)
    perturb(model, list(config.modules_to_save))
    with torch.no_grad():
        ours = model(**token_batch).logits
        with activated(model, None):
            assert max_diff(ours, model(**token_batch).logits) > 1e-4  # the update counts

    task_type = "SEQ_CLS" if kind == "seq_cls" else ("CAUSAL_LM" if model_type != "modernbert" else None)
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny", task_type=task_type)
    path, (q, k, v) = FUSED[model_type]
    b = load_file(tmp_path / "adapter_model.safetensors")[
        f"base_model.model.{path.format(i=0)}.lora_B.weight"
    ]
    assert b.shape == (q + k + v, 8)  # one rank-2r pair over the whole fused output
    assert torch.count_nonzero(b[q : q + k]) == 0  # k's rows
    assert torch.count_nonzero(b[:q, 4:]) == 0 and torch.count_nonzero(b[q + k :, :4]) == 0
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        layout = json.loads(f.metadata()["lorakit.fused_slices"])[path.format(i=0)]
    assert layout == {"slices": ["q", "k", "v"], "sizes": [q, k, v], "adapted": ["q", "v"], "r": 4}

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    fresh = copy.deepcopy(base)
    loaded = load_adapter(fresh, tmp_path)  # lorakit reads its own file back, slices and all
    assert dict(loaded.fused_slices) == {path.format(i=i): (("q", q), ("k", k), ("v", v)) for i in range(2)}
    with torch.no_grad():
        assert max_diff(ours, theirs(**token_batch).logits) <= 1e-5
        assert max_diff(ours, fresh(**token_batch).logits) == 0.0
        merged = unload_lora(model, merge=True)
        assert not list(lora_modules(merged))
        assert max_diff(ours, merged(**token_batch).logits) <= 1e-5


def test_a_mixed_batch_of_two_slice_adapters_equals_each_alone(token_batch) -> None:
    """Phi-3's q|v adapter beside a k-only one: each row's logits are those of its own adapter."""
    model = tiny("phi3", "seq_cls")
    add_adapter(model, "qv", lora_config(model, "seq_cls"))
    add_adapter(model, "k", lora_config(model, "seq_cls", target_modules=["qkv_proj[k]"]))
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


def test_an_old_gpt2_file_with_slice_names_only_still_loads_as_equal_thirds(
    tmp_path: Path, token_batch
) -> None:
    """Files written before slices had sizes record ``{"slices", "adapted", "r"}`` (lorakit's writer until
    this change): they mean equal slices, for lorakit.lora and for the analysis alike."""
    from lorakit.analysis.updates import open_adapter

    model = tiny_gpt2()
    fresh = copy.deepcopy(model)
    config = families.lora_defaults(model, LoraConfig(r=4, alpha=32))  # GPT-2's: c_attn[q,v], equal thirds
    inject_lora(model, config)
    randomize_lora(model)
    save_adapter(model, tmp_path, config, task_type="CAUSAL_LM")
    weights = tmp_path / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    layouts = json.loads(meta["lorakit.fused_slices"])
    assert all(layout["sizes"] == [32, 32, 32] for layout in layouts.values())
    old = {p: {"slices": ["q", "k", "v"], "adapted": ["q", "v"], "r": 4} for p in layouts}
    save_file(load_file(weights), weights, metadata={**meta, "lorakit.fused_slices": json.dumps(old)})

    loaded = load_adapter(fresh, tmp_path)
    assert all(v == ("q", "k", "v") for v in loaded.fused_slices.values())
    layers = dict(lora_modules(fresh))
    assert all(m.slice_sizes == (32, 32, 32) and m.adapted == ("q", "v") for m in layers.values())
    with torch.no_grad():
        assert max_diff(model(**token_batch).logits, fresh(**token_batch).logits) == 0.0
    updates = {u.name: u for u in open_adapter(tmp_path).updates}
    assert updates["transformer.h.0.attn.c_attn[v]"].rows == slice(64, 96)


def test_analysis_splits_phi3_updates_at_the_slice_rows(tmp_path: Path) -> None:
    """``lorakit analyze``/``resize`` read each slice's ΔW and W0 rows: q at [0, 32), v at [48, 64)."""
    from lorakit.analysis.updates import base_weights, open_adapter

    base = tiny("phi3", "seq_cls", num_labels=2)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    config = lora_config(model, "seq_cls")
    inject_lora(model, config)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", config, str(tmp_path / "base"), task_type="SEQ_CLS")

    source = open_adapter(tmp_path / "adapter")
    path = FUSED["phi3"][0].format(i=1)
    updates = {u.name: u for u in source.updates}
    assert sorted(updates) == sorted(f"{FUSED['phi3'][0].format(i=i)}[{s}]" for i in range(2) for s in "qv")
    expected = expected_delta(model.get_submodule(path), FUSED["phi3"][1]).double()
    q_update, v_update = updates[f"{path}[q]"], updates[f"{path}[v]"]
    assert (q_update.rows, v_update.rows) == (slice(0, 32), slice(48, 64))
    torch.testing.assert_close(q_update.delta(), expected[:32], rtol=0, atol=1e-6)
    torch.testing.assert_close(v_update.delta(), expected[48:], rtol=0, atol=1e-6)
    w0 = base_weights(source)
    weight = base.get_submodule(path).weight.detach()
    assert torch.equal(w0[f"{path}[q]"], weight[:32]) and torch.equal(w0[f"{path}[v]"], weight[48:])


def test_resize_writes_each_slice_back_on_its_own_rows(tmp_path: Path, token_batch) -> None:
    """A lossless ``lorakit resize`` (the stored rank) of a Phi-3 adapter on the unequal k and v slices gives
    the same logits: every slice's B lands back on its rows (k at [32, 48), v at [48, 64))."""
    from lorakit.analysis.resize import resize

    base = tiny("phi3", "seq_cls", num_labels=2)
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    path = FUSED["phi3"][0].format(i=0)
    config = lora_config(model, "seq_cls", target_modules=["qkv_proj[k,v]"])
    inject_lora(model, config)
    mark_trainable(model, config.bias, config.modules_to_save)
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", config, str(tmp_path / "base"), task_type="SEQ_CLS")
    resize(tmp_path / "adapter", rank=4, out=tmp_path / "resized")
    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path / "resized")
    with torch.no_grad():
        ours, theirs = model(**token_batch).logits, reloaded(**token_batch).logits
        delta = reloaded.get_submodule(path).delta_weight()
    assert max_diff(ours, theirs) <= 1e-5
    assert delta[:32].abs().max() == 0 and delta[32:].abs().max() > 0  # q's rows untouched


@pytest.mark.parametrize(
    ("model_type", "overrides", "groups"),
    [
        ("gpt_neox", {}, 4),
        ("bloom", {"n_layer": 2, "n_head": 4}, 4),
        ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, 2),
        ("gpt_bigcode", {"multi_query": False}, 4),
    ],
)
def test_per_head_layouts_get_their_q_and_v_slices_and_a_contiguous_declaration_is_refused(
    model_type: str, overrides: dict, groups: int
) -> None:
    """GPT-NeoX, BLOOM, Falcon and GPT-BigCode without multi-query lay q, k, v out per head (per key/value
    group for Falcon's new architecture): the recipe's defaults adapt q and v in every group
    (tests/test_interleaved_families.py checks the rows), and slices declared as contiguous blocks are
    refused by lorakit.families (the core adapts the rows it is told)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from lorakit.models import apply_lora
    from lorakit.recipe import recipe_from_dict
    from lorakit.tasks import get_task

    settings = {**TINY, **overrides} if model_type != "gpt_bigcode" else {**CONFIGS[model_type], **overrides}
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **settings))
    module = "c_attn" if model_type == "gpt_bigcode" else "query_key_value"
    (layout,) = families.fused_slices(model.config).values()
    assert layout.groups == groups and layout.names == ("q", "k", "v")
    with pytest.raises(TargetNotFoundError, match="has no slices"):  # the core: no slices declared
        inject_lora(model, LoraConfig(target_modules=[f"{module}[q,v]"]))
    with pytest.raises(TargetNotFoundError, match="groups of q .*not as declared"):
        declared = {module: ("q", "k", "v")}  # contiguous thirds, declared by hand
        families.lora_defaults(model, LoraConfig(target_modules=[f"{module}[q,v]"], fused_slices=declared))
    recipe = recipe_from_dict({"model": {"name_or_path": "tiny"}, "task": {"name": "sst2"}}, source="r.yaml")
    config, adapted = apply_lora(recipe, model, get_task("sst2"))
    assert list(config.target_modules) == [f"{module}[q,v]"] and len(adapted) == 2
    for _, layer in lora_modules(model):
        assert isinstance(layer, LoraFusedLinear) and layer.groups == groups and layer.adapted == ("q", "v")


def test_phi3_slices_are_refused_without_sizes_or_with_sizes_of_another_model() -> None:
    """Names alone would read as equal thirds and cut Phi-3's grouped-query q|k|v at the wrong rows."""
    model = tiny("phi3", "lm")
    qv = ["qkv_proj[q,v]"]
    with pytest.raises(TargetNotFoundError, match=r"laid out as q 32 \| k 16 \| v 16, not as declared"):
        families.lora_defaults(model, LoraConfig(fused_slices={"qkv_proj": ("q", "k", "v")}))
    with pytest.raises(TargetNotFoundError, match="has no slices"):  # the core, told no layout
        inject_lora(model, LoraConfig(target_modules=qv))
    other = {"qkv_proj": (("q", 32), ("k", 32), ("v", 32))}  # another model's sizes
    with pytest.raises(TargetNotFoundError, match="not as declared .slices that do not cover its rows"):
        families.lora_defaults(model, LoraConfig(fused_slices=other))
    with pytest.raises(ValueError, match="cover 96 rows; the projection has 64"):  # the core, told them
        inject_lora(model, LoraConfig(target_modules=qv, fused_slices=other))
    assert not list(lora_modules(model))


@pytest.mark.parametrize("whole_first", [False, True], ids=["slices-first", "whole-first"])
def test_a_whole_module_adapter_and_a_slice_adapter_share_a_fused_projection(
    whole_first: bool, tmp_path: Path, token_batch
) -> None:
    """``lorakit predict``/``serve`` of a q|v run beside an all-linear run (GPT-BigCode): c_attn carries
    both, in either order; each row of a mixed batch gets its own adapter's logits; PEFT reads each file."""
    base = tiny("gpt_bigcode", "seq_cls")
    model = copy.deepcopy(base)
    qv = lora_config(model, "seq_cls")
    every = lora_config(model, "seq_cls", target_modules=["c_attn", "c_proj", "c_fc"])
    for name, config in [("every", every), ("qv", qv)] if whole_first else [("qv", qv), ("every", every)]:
        add_adapter(model, name, config)
    randomize_lora(model)
    layer = model.get_submodule(FUSED["gpt_bigcode"][0].format(i=0))
    assert isinstance(layer, LoraFusedLinear)
    assert {n: a.adapted for n, a in layer.lora_adapters.items()} == {"qv": ("q", "v"), "every": ()}
    rows = ["qv", "every", None]
    with torch.no_grad():
        alone = {}
        for name in ("qv", "every", None):
            with activated(model, name):
                alone[name] = model(**token_batch).logits
        assert max_diff(alone["qv"], alone["every"]) > 1e-4
        mixed, _ = mixed_logits(model, rows, **token_batch)
    for i, name in enumerate(rows):
        assert max_diff(mixed[i], alone[name][i]) <= 1e-5, (i, name)
    for name, config in (("qv", qv), ("every", every)):
        save_adapter(model, tmp_path / name, config, "tiny", task_type="SEQ_CLS", adapter=name)
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        with torch.no_grad():
            assert max_diff(alone[name], theirs(**token_batch).logits) <= 1e-5, name
