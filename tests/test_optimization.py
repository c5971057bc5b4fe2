"""What the loop minimises and with what: the task losses against their textbook forms, and AdamW's
groups and kernel."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert, tiny_deberta, tiny_gpt2, tiny_roberta
from torch import nn

from lorakit.data import IGNORE_INDEX
from lorakit.families import lora_defaults
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import inject_lora, mark_trainable
from lorakit.training.optimization import build_optimizer, is_norm_module, task_loss

# The rule build_optimizer had before it decided by role: checkpoints of these families name their Adam
# state by the groups it made, so the new rule must make the very same groups for them.
_OLD_NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")


def test_next_token_loss_is_the_shifted_cross_entropy_over_target_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX  # a prompt: no loss on it
    labels[2, 5:] = IGNORE_INDEX  # padding
    for smoothing in (0.0, 0.1):
        ours = task_loss(logits, labels, "generation", smoothing)
        # Position t predicts token t + 1: the textbook form slices the logits.
        ref = F.cross_entropy(
            logits[:, :-1].reshape(-1, 11),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=smoothing,
        )
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        (g_ours,) = torch.autograd.grad(ours, logits)
        (g_ref,) = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-7)
        assert g_ours[:, -1].abs().max() == 0  # the last position predicts nothing
    total = task_loss(logits, labels, "generation", 0.0, reduction="sum")
    targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(total / targets, task_loss(logits, labels, "generation", 0.0))


def test_classification_and_regression_losses() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(
        task_loss(logits, labels, "classification", 0.0), F.cross_entropy(logits, labels)
    )
    scores = torch.tensor([[1.0], [3.0]])
    assert task_loss(scores, torch.tensor([2.0, 2.0]), "regression", 0.0).item() == 1.0


def test_adamw_is_fused_over_the_trainable_parameters_without_decay_on_biases_and_norms() -> None:
    model = tiny_roberta()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(("classifier", "roberta.encoder.layer.0.")))
    optimizer = build_optimizer(model, 1e-3, 0.1)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == trainable
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith((".bias", "LayerNorm.weight")) for p in no_decay["params"])
    assert not any(names[id(p)].endswith(".bias") for p in decay["params"])
    assert all(g["fused"] for g in optimizer.param_groups)


def test_fused_adamw_takes_the_same_steps_as_torchs_default() -> None:
    torch.manual_seed(0)
    ours = torch.nn.Linear(6, 4)
    ref = torch.nn.Linear(6, 4)
    ref.load_state_dict(ours.state_dict())
    opt_ours = build_optimizer(ours, 1e-2, 0.1)
    opt_ref = torch.optim.AdamW(
        [
            {"params": [ref.weight], "weight_decay": 0.1},
            {"params": [ref.bias], "weight_decay": 0.0},
        ],
        lr=1e-2,
        foreach=False,
    )
    for step in range(5):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ours, opt_ours), (ref, opt_ref)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=1e-5, atol=1e-6)


def test_weights_without_a_fused_kernel_get_torchs_default_adamw() -> None:
    model = torch.nn.Linear(3, 3).double()  # float64: no fused kernel for it
    optimizer = build_optimizer(model, 1e-3, 0.0)
    assert not any(g["fused"] for g in optimizer.param_groups)
    model(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()


def _group_names(model: nn.Module, weight_decay: float = 0.1) -> list[list[str]]:
    """The parameter names of each of build_optimizer's groups, in order: what checkpoints record."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        [names[id(p)] for p in g["params"]] for g in build_optimizer(model, 1e-3, weight_decay).param_groups
    ]


def _old_group_names(model: nn.Module) -> list[list[str]]:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        [n for n in trainable if not n.endswith(_OLD_NO_DECAY)],
        [n for n in trainable if n.endswith(_OLD_NO_DECAY)],
    ]
    return [g for g in groups if g]


def _deberta_v3_like() -> nn.Module:
    """DeBERTa-v2 with the extras its real checkpoints switch on: a norm on the relative embeddings
    (v3) and the convolution beside the first layer (v2-xlarge), each with a LayerNorm of its own."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    return DebertaV2ForSequenceClassification(
        DebertaV2Config(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=80,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            max_relative_positions=32,
            norm_rel_ebd="layer_norm",
            conv_kernel_size=3,
        )
    )


def _full(model: nn.Module) -> nn.Module:
    return model


def _lora(model: nn.Module) -> nn.Module:
    head = "score" if hasattr(model, "score") else "classifier" if hasattr(model, "classifier") else "lm_head"
    inject_lora(model, lora_defaults(model, LoraConfig(r=2)))  # each family's paper targets
    mark_trainable(model, bias="all", modules_to_save=[head])
    return model


@pytest.mark.parametrize("setup", [_full, _lora], ids=["full", "lora"])
@pytest.mark.parametrize(
    "build", [tiny_roberta, tiny_bert, tiny_gpt2, tiny_deberta, _deberta_v3_like], ids=lambda f: f.__name__
)
def test_known_families_keep_the_groups_the_name_rule_made(
    build: Callable[[], nn.Module], setup: Callable[[nn.Module], nn.Module]
) -> None:
    model = setup(build())
    old = _old_group_names(model)
    assert len(old) == 2 and len(old[1]) > 0  # both groups are there to compare
    assert _group_names(model) == old  # the same names, in the same order


def test_every_llama_norm_goes_without_decay_and_every_projection_with_it() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=120,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
        )
    )
    decay, no_decay = _group_names(model)
    norms = [n for n, m in model.named_modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * 2 + 1  # input_layernorm and post_attention_layernorm a layer, the final norm
    assert sorted(no_decay) == sorted(f"{n}.weight" for n in norms)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert sorted(n for n in decay if n.split(".")[-2] in projections) == sorted(
        f"{n}.weight" for n, m in model.named_modules() if n.split(".")[-1] in projections
    )
    assert len([n for n in decay if n.split(".")[-2] in projections]) == 2 * len(projections)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(decay)
    # The old name rule decayed all of Llama's norms: what this change is for.
    assert not any(n.endswith(_OLD_NO_DECAY) for n in no_decay)


def test_under_lora_the_low_rank_weights_decay_and_the_heads_bias_does_not() -> None:
    model = tiny_roberta()
    # An adapter named so that its name holds "bias": a rule matching "bias" anywhere in the parameter
    # name (as the Hugging Face Trainer's) would leave its LoRA weights undecayed.
    inject_lora(model, LoraConfig(r=2, target_modules=["query", "value"]), adapter="debias")
    trainable = mark_trainable(model, modules_to_save=["classifier"])
    decay, no_decay = _group_names(model)
    assert sorted(decay + no_decay) == trainable  # the trainable parameters, and only those
    lora = [n for n in trainable if n.split(".")[-1] in ("lora_A", "lora_B")]
    assert len(lora) == 2 * 2 * 2  # A and B on query and value, two layers
    assert set(lora) <= set(decay)
    head_biases = [n for n in trainable if n.startswith("classifier.") and n.endswith(".bias")]
    assert len(head_biases) == 2  # dense and out_proj
    assert sorted(no_decay) == sorted(head_biases)
    assert all(n.endswith(".weight") for n in decay if n.startswith("classifier."))


class _NamedNorm(nn.Module):
    """A custom norm known only by its class name, as transformers' own RMSNorms."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4))


class _AdaptiveNorm(_NamedNorm):
    """An adaptive norm: a scale of its own, and a projection (a weight matrix) inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)


@pytest.mark.parametrize(
    ("class_name", "norm"),
    [
        ("LlamaRMSNorm", True),
        ("T5LayerNorm", True),
        ("MambaRMSNormGated", True),
        ("ConvNextLayerNorm2d", True),
        ("SEWLayerNormConvLayer", False),  # a convolution with a norm module inside it
        ("AdaLayerNormZero", False),
        ("LoraLinear", False),
        ("Normalizer", False),
    ],
)
def test_norm_modules_are_known_by_class_name(class_name: str, norm: bool) -> None:
    assert is_norm_module(type(class_name, (nn.Module,), {})()) is norm


def test_norm_modules_are_known_by_type_and_by_base_class() -> None:
    assert all(is_norm_module(m) for m in (nn.LayerNorm(4), nn.GroupNorm(2, 4), nn.RMSNorm(4)))
    assert is_norm_module(type("Scale", (nn.LayerNorm,), {})(4))  # a subclass under another name
    assert not any(is_norm_module(m) for m in (nn.Linear(4, 4), nn.Embedding(4, 4), nn.Conv1d(4, 4, 1)))


def test_only_a_norms_own_parameters_go_without_decay() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4),
        type("TinyRMSNorm", (_NamedNorm,), {})(),
        type("AdaLayerNorm", (_AdaptiveNorm,), {})(),
    )
    decay, no_decay = _group_names(model)
    # The adaptive norm's projection is a weight matrix like any other: it decays, its bias does not.
    assert decay == ["0.weight", "2.proj.weight"]
    assert no_decay == ["0.bias", "1.weight", "2.weight", "2.proj.bias"]
    assert len(_group_names(model, weight_decay=0.0)) == 2  # the groups stand whatever the decay
