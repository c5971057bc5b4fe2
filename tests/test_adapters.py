"""Many adapters on one base: three adapters (different ranks, targets, head sizes, one written by PEFT)
loaded by name onto one tiny RoBERTa, BERT, DeBERTa-v2 and GPT-2; a shuffled mixed batch equals each
adapter alone, row for row; activate / delete / reload round trips; merging refused with several."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomize_lora, tiny_bert, tiny_deberta, tiny_gpt2, tiny_roberta

from lorakit.families import seq_cls_heads
from lorakit.lora import (
    LoraConfig,
    inject_lora,
    load_adapter,
    mark_trainable,
    merge_lora,
    save_adapter,
)
from lorakit.lora.adapters import (
    adapted_modules,
    adapter_bytes,
    delete_adapter,
    load_named_adapter,
    mixed_batch,
    mixed_logits,
)
from lorakit.lora.inject import active_adapter, adapter_names, set_active_adapter
from lorakit.lora.layers import SharedInputError

BUILDERS = {"roberta": tiny_roberta, "bert": tiny_bert, "deberta-v2": tiny_deberta}
ENCODER = r".*encoder\.layer\.\d+\..*(query|key|value|dense|query_proj|key_proj|value_proj)"


def _with_head(arch: str, base: torch.nn.Module, num_labels: int) -> torch.nn.Module:
    """A model of ``num_labels`` outputs whose every weight outside the head is ``base``'s."""
    model = BUILDERS[arch](num_labels=num_labels)
    heads = seq_cls_heads(arch)
    own = {k: v for k, v in base.state_dict().items() if not any(k.startswith(h + ".") for h in heads)}
    model.load_state_dict(own, strict=False)
    gen = torch.Generator().manual_seed(num_labels)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(name.startswith(h + ".") for h in heads):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _write_adapters(arch: str, base: torch.nn.Module, root: Path) -> dict[str, Path]:
    """sst2-like (2 labels, q/v r=4, lorakit), mnli-like (3 labels, every encoder linear map r=8 with
    rsLoRA, written by PEFT), stsb-like (1 output, value only r=2, alpha 8, lorakit)."""
    heads = seq_cls_heads(arch)
    value = "value_proj" if arch == "deberta-v2" else "value"
    query = "query_proj" if arch == "deberta-v2" else "query"
    out = {}
    for name, labels, targets, r, alpha in (("two", 2, [query, value], 4, 8), ("one", 1, [value], 2, 8)):
        model = _with_head(arch, base, labels)
        config = LoraConfig(r=r, alpha=alpha, target_modules=targets, modules_to_save=heads)
        inject_lora(model, config)
        mark_trainable(model, "none", heads)
        randomize_lora(model, seed=labels)
        out[name] = save_adapter(model, root / name, config, task_type="SEQ_CLS")
    model = _with_head(arch, base, 3)
    peft_config = peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=ENCODER, modules_to_save=list(heads), use_rslora=True
    )
    wrapped = peft.get_peft_model(model, peft_config)
    randomize_lora(wrapped, seed=3)
    wrapped.save_pretrained(root / "three")
    out["three"] = root / "three"
    return out


LABELS = {"two": 2, "one": 1, "three": 3}


def _alone(arch: str, base: torch.nn.Module, adapter_dir: Path, batch: dict) -> torch.Tensor:
    """The adapter alone: on a model of its own head size, through the single-adapter path."""
    model = copy.deepcopy(base) if arch == "gpt2" else _with_head(arch, base, LABELS[adapter_dir.name])
    load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("layout", ["shuffled", "grouped", "grouped-autograd"])
@pytest.mark.parametrize("arch", BUILDERS)
def test_a_mixed_batch_equals_each_adapter_alone(arch: str, layout: str, tmp_path: Path, token_batch) -> None:
    """Shuffled rows are gathered and scattered by index; grouped rows (each adapter's together, as
    ``lorakit predict`` orders them) run on views of the batch, in place, or out of place with autograd."""
    torch.manual_seed(0)
    base = BUILDERS[arch](num_labels=2).eval()
    dirs = _write_adapters(arch, base, tmp_path)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 120, (12, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0
    mask[7, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    alone = {name: _alone(arch, base, path, batch) for name, path in dirs.items()}
    alone[None] = base(**batch).logits.detach()

    served = copy.deepcopy(base)
    for name, path in dirs.items():
        load_named_adapter(served, path, name)
    assert sorted(adapter_names(served)) == ["one", "three", "two"]
    assert active_adapter(served) == "two"  # the first one loaded; later loads leave it active
    assert len(adapted_modules(served)["three"]) > len(adapted_modules(served)["two"]) > 0
    rows = ["three", "two", None, "one", "two", "three", "one", None, "three", "two", "one", "two"]
    if layout.startswith("grouped"):
        rows = sorted(rows, key=lambda n: ("three", "two", None, "one").index(n))
    with torch.set_grad_enabled(layout == "grouped-autograd"):
        mixed, widths = mixed_logits(served, rows, **batch)
        mixed = mixed.detach()
        if arch != "deberta-v2":  # one pass over the whole batch; DeBERTa's shared positions: per group
            with mixed_batch(served, rows) as one_pass_widths:
                assert torch.equal(served(**batch).logits.isnan(), mixed.isnan())
            assert one_pass_widths == widths
        else:
            with pytest.raises(SharedInputError), mixed_batch(served, rows):
                served(**batch)
    assert widths == {"three": 3, "two": 2, None: 2, "one": 1}
    for i, name in enumerate(rows):
        expected = alone[name][i]
        got = mixed[i, : widths[name]]
        assert (got - expected).abs().max().item() <= 1e-5, (arch, i, name)
        assert torch.isnan(mixed[i, widths[name] :]).all()

    # One adapter at a time, by a pointer switch: each equals itself alone.
    for name in (*dirs, None):
        set_active_adapter(served, name)
        with torch.no_grad():
            got = served(**batch).logits
        assert (got - alone[name]).abs().max().item() <= 1e-5, (arch, name)


def test_activate_delete_reload_round_trip_and_merge_refusal(tmp_path: Path, token_batch) -> None:
    torch.manual_seed(0)
    base = tiny_roberta(num_labels=2).eval()
    dirs = _write_adapters("roberta", base, tmp_path)
    served = copy.deepcopy(base)
    for name, path in dirs.items():
        load_named_adapter(served, path, name)
    set_active_adapter(served, "three")
    with torch.no_grad():
        before = served(**token_batch).logits
    size = adapter_bytes(served, "three")
    params_before = sum(p.numel() for p in served.parameters())
    with pytest.raises(ValueError, match="3 adapters"):
        merge_lora(served)

    delete_adapter(served, "three")
    assert sorted(adapter_names(served)) == ["one", "two"] and active_adapter(served) is None
    assert sum(p.numel() * p.element_size() for p in served.parameters()) < params_before * 4 - size + 1
    with pytest.raises(KeyError, match="no adapter 'three'"):
        set_active_adapter(served, "three")
    with pytest.raises(KeyError, match="'nope'"), mixed_batch(served, ["two", "nope"]):
        pass

    load_named_adapter(served, dirs["three"], "three")
    set_active_adapter(served, "three")
    with torch.no_grad():
        after = served(**token_batch).logits
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="already holds"):
        load_named_adapter(served, dirs["two"], "two")

    for name in ("two", "one"):
        delete_adapter(served, name)
    merge_lora(served)  # one adapter left: merging is exact again
    with torch.no_grad():
        merged = served(**token_batch).logits
    assert (merged - before).abs().max().item() <= 1e-5


def test_gpt2_adapters_on_different_slices_mix_in_one_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = tiny_gpt2()
    dirs = {}
    for name, targets, r in (("qv", ["c_attn[q,v]"], 4), ("qkv", ["c_attn[q,k,v]", "c_proj"], 2)):
        model = copy.deepcopy(base)
        config = LoraConfig(r=r, alpha=8, target_modules=targets, fused_slices={"c_attn": ("q", "k", "v")})
        inject_lora(model, config)
        randomize_lora(model, seed=r)
        dirs[name] = save_adapter(model, tmp_path / name, config, task_type="CAUSAL_LM")
    ids = torch.randint(3, 120, (5, 7), generator=torch.Generator().manual_seed(1))
    alone = {name: _alone("gpt2", base, path, {"input_ids": ids}) for name, path in dirs.items()}
    served = copy.deepcopy(base)
    for name, path in dirs.items():
        load_named_adapter(served, path, name)
    rows = ["qkv", "qv", "qv", "qkv", "qv"]
    with torch.no_grad(), mixed_batch(served, rows):
        mixed = served(input_ids=ids).logits
    for i, name in enumerate(rows):
        assert (mixed[i] - alone[name][i]).abs().max().item() <= 1e-5, (i, name)
