"""Family knowledge in one place (issue 24): ``lorakit.families`` holds one ``FamilySpec`` a Hugging Face
``model_type``; the LoRA core reads none of it, and refuses to guess targets it is not given."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_roberta

from lorakit import families
from lorakit.families import FAMILIES, FamilySpec, lora_defaults
from lorakit.lora import FusedLayout, LoraConfig, TargetNotFoundError, find_targets, inject_lora, split_target

PACKAGE = Path(families.__file__).parent
# Modules outside the core that it must never load: the families, the recipe layer, transformers.
OUTSIDE = ("lorakit.families", "lorakit.recipe", "lorakit.models", "lorakit.tasks", "transformers")


def test_the_core_imports_nothing_outside_itself() -> None:
    """``import lorakit.lora`` in a fresh interpreter loads no family table, recipe code or transformers:
    the core can be lifted out and used on any torch model."""
    code = (
        "import sys, lorakit.lora\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({OUTSIDE!r}))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_core_source_names_no_other_lorakit_package() -> None:
    core = PACKAGE.parent / "lora"
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("lorakit.") or node.module.startswith("lorakit.lora"), path
                assert not node.module.startswith("transformers"), path
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith(("transformers", "lorakit.")) for a in node.names), path


def test_the_table_is_plain_data_without_torch_or_transformers() -> None:
    tree = ast.parse((PACKAGE / "spec.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "collections.abc", "dataclasses", "types", "typing"}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_spec_is_consistent_with_itself(model_type: str) -> None:
    """Every slice target names a declared fused projection and only its slices, and every fused projection
    has a rule that sizes its slices from a config."""
    spec = FAMILIES[model_type]
    assert isinstance(spec, FamilySpec)
    assert spec.seq_cls_heads and all(isinstance(h, str) and h for h in spec.seq_cls_heads)
    assert spec.head_output
    for target in spec.paper_targets or ():
        module, slices = split_target(target)
        if slices is not None:
            assert module in spec.fused_slices, target
            assert set(slices) <= set(spec.fused_slices[module]), target
    for module, names in spec.fused_slices.items():
        assert len(set(names)) == len(names) >= 2, module
        assert spec.slice_rows is not None, module  # the sizes come from somewhere


def test_the_table_cannot_be_changed_through_what_it_hands_out() -> None:
    with pytest.raises(TypeError):
        FAMILIES["gpt2"].fused_slices["c_attn"] = ("q",)  # type: ignore[index]
    targets = families.paper_targets("roberta")
    targets.append("key")
    assert families.paper_targets("roberta") == ["query", "value"]


def test_head_outputs_are_every_familys_in_the_order_predict_read_them() -> None:
    assert families.head_outputs() == ("out_proj.weight", "classifier.weight", "score.weight")
    assert families.seq_cls_heads("not-a-family") == ["classifier", "score"]


def test_null_targets_in_the_core_say_to_give_them() -> None:
    model = tiny_roberta()
    for call in (inject_lora, find_targets):
        with pytest.raises(TargetNotFoundError) as err:
            call(model, LoraConfig())
        message = str(err.value)
        assert "\n" not in message and message.startswith("target_modules is null: give the modules")
        assert "lorakit.families.lora_defaults" in message
    # Not even on a plain torch model: the core has nothing to pick from.
    with pytest.raises(TargetNotFoundError, match="target_modules is null"):
        inject_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig())


def _tiny(model_type: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    sizes = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    config = AutoConfig.for_model(
        model_type, intermediate_size=64, num_key_value_heads=2, pad_token_id=0, **sizes
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("build", "targets", "fused"),
    [
        (tiny_roberta, ["query", "value"], {}),
        (tiny_bert, ["query", "value"], {}),
        (tiny_gpt2, ["c_attn[q,v]"], {"c_attn": FusedLayout((("q", 32), ("k", 32), ("v", 32)))}),
        (lambda: _tiny("llama"), ["q_proj", "v_proj"], {}),
        # Grouped-query attention: k and v half as wide as q (2 key/value heads for 4 query heads).
        (
            lambda: _tiny("phi3"),
            ["qkv_proj[q,v]"],
            {"qkv_proj": FusedLayout((("q", 32), ("k", 16), ("v", 16)))},
        ),
    ],
    ids=["roberta", "bert", "gpt2", "llama", "phi3"],
)
def test_the_helper_gives_the_papers_targets_as_before(build, targets: list[str], fused: dict) -> None:
    model = build()
    config = lora_defaults(model, LoraConfig(r=4, alpha=8, modules_to_save=("x",)))
    assert list(config.target_modules) == targets and dict(config.fused_slices) == fused
    assert (config.r, config.alpha, tuple(config.modules_to_save)) == (4, 8, ("x",))  # the rest kept
    given = LoraConfig(target_modules="all-linear", fused_slices={"c": ("a", "b")})
    assert lora_defaults(model, given) == given  # what the caller gave wins
    inject_lora(model, config)  # and the core takes it as it is


def test_the_helper_says_what_a_model_without_a_family_needs() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(TargetNotFoundError, match="no config.model_type to pick defaults"):
        lora_defaults(model, LoraConfig())
    assert lora_defaults(model, LoraConfig(target_modules=["0"])).target_modules == ["0"]


@pytest.mark.parametrize(
    ("model_type", "config", "limit"),
    [
        ("roberta", {"max_position_embeddings": 514, "pad_token_id": 1}, 512),  # positions past the pad id
        ("bert", {"max_position_embeddings": 512, "pad_token_id": 0}, 512),
        ("deberta-v2", {"max_position_embeddings": 512, "position_biased_input": False}, None),
        ("deberta-v2", {"max_position_embeddings": 512, "position_biased_input": True}, 512),
        ("gpt2", {"n_positions": 1024}, 1024),
    ],
)
def test_position_limits_follow_each_familys_rules(model_type: str, config: dict, limit: int | None) -> None:
    from types import SimpleNamespace

    assert families.position_limit(SimpleNamespace(model_type=model_type, **config)) == limit
