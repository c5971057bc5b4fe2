"""``evaluate`` scores a model on real rows and leaves it in the mode its caller had it in."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate import Accelerator

from lorakit.data.loaders import eval_sets
from lorakit.evaluation import evaluate
from lorakit.models import prepare_model
from lorakit.recipe import recipe_from_dict
from lorakit.tasks import get_task


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_restores_the_callers_mode(
    training: bool, tiny_roberta_dir: Path, shared_data: Path
) -> None:
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(tiny_roberta_dir)},
            "task": {"name": "sst2", "data_dir": str(shared_data / "glue" / "SST-2"), "max_eval_samples": 24},
            "lora": {"r": 2, "alpha": 4},
        }
    )
    task = get_task("sst2", recipe.task.data_dir)
    prepared = prepare_model(recipe, task)
    model = prepared.model.train(training)
    metrics, predictions = evaluate(model, eval_sets(recipe, task, prepared.tokenizer), task, Accelerator())
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    assert len(predictions["validation"]) == 24 and 0.0 <= metrics["accuracy"] <= 100.0


def test_predictions_come_back_in_row_order_though_batches_run_longest_first(
    tiny_roberta_dir: Path, shared_data: Path
) -> None:
    """A model that predicts each row's token count parity shows where every prediction went."""
    import torch

    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": str(tiny_roberta_dir)},
            "task": {"name": "sst2", "data_dir": str(shared_data / "glue" / "SST-2"), "max_eval_samples": 50},
            "train": {"eval_batch_size": 8},
        }
    )
    task = get_task("sst2", recipe.task.data_dir)
    prepared = prepare_model(recipe, task)
    (es,) = eval_sets(recipe, task, prepared.tokenizer)
    assert es.order is not None and es.order != sorted(es.order)

    class Parity(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **_: object):
            odd = (attention_mask.sum(-1) % 2).float()
            return type("Out", (), {"logits": torch.stack([1 - odd, odd], -1)})()

    _, predictions = evaluate(Parity(), [es], task, Accelerator())
    lengths = [len(prepared.tokenizer(text)["input_ids"]) for text in es.rows["text_a"]]
    assert predictions["validation"] == [n % 2 for n in lengths]
