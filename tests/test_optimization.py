"""What the loop minimises and with what: the task losses against their textbook forms, and AdamW's
groups and kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import tiny_roberta

from lorakit.data import IGNORE_INDEX
from lorakit.training.optimization import build_optimizer, task_loss


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
