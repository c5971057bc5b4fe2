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
