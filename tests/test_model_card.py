"""Model cards: every run directory and every merged model gets a README.md in the Hub's convention, its
metadata read back with huggingface_hub's ModelCard; a README.md lorakit did not write is never replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, write_recipe


@pytest.fixture(scope="module")
def card_run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path) -> Path:
    """A 4-step SST-2 run with report_to: none."""
    from accelerate.state import AcceleratorState, PartialState

    from lorakit.cli import main

    root = tmp_path_factory.mktemp("carded")
    base = tiny_roberta_dir
    run = root / "run"
    recipe = write_recipe(
        root / "recipe.yaml",
        base,
        "sst2",
        SHARED_DATA / "glue" / "SST-2",
        run,
        task={"max_length": 48, "max_train_samples": 32, "max_eval_samples": 16},
        train={"max_steps": 4, "eval_every": 4, "report_to": "none"},
    )
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        assert main(["train", str(recipe)]) == 0
    return run


def test_a_run_directory_has_a_hub_model_card(card_run: Path, tiny_roberta_dir: Path) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_run / "README.md")
    metrics = json.loads((card_run / "metrics.json").read_text())
    data = card.data
    assert data.base_model == str(tiny_roberta_dir)
    assert data.library_name == "peft" and data.pipeline_tag == "text-classification"
    assert data.tags == ["lora", "lorakit"] and data.datasets == ["nyu-mll/glue"]
    (result,) = data.eval_results
    assert result.metric_type == "accuracy" and result.dataset_config == "sst2"
    assert result.metric_value == pytest.approx(metrics["best"]["accuracy"])
    assert f"{metrics['parameters']['trainable']:,}" in card.text
    assert "PeftModel.from_pretrained" in card.text and "lorakit eval" in card.text
    assert "train:" in card.text and "report_to: []" in card.text  # the recipe, as recipe.yaml has it
    assert "of optimizer steps" in card.text


def test_report_to_none_writes_no_tracker_files(card_run: Path) -> None:
    assert sorted(p.name for p in (card_run / "logs").iterdir()) == ["train.jsonl"]


def test_a_merged_model_has_its_own_card(card_run: Path, tmp_path: Path, tiny_roberta_dir: Path) -> None:
    from huggingface_hub import ModelCard

    from lorakit.merge import merge_run

    out = merge_run(card_run, tmp_path / "merged")
    data = ModelCard.load(out / "README.md").data
    assert data.base_model == str(tiny_roberta_dir)
    assert data.library_name == "transformers" and "merged" in data.tags
    assert data.eval_results[0].metric_type == "accuracy"
    merge_run(card_run, out)  # an earlier merge (and its card) is replaced


def test_a_readme_lorakit_did_not_write_is_left_alone(card_run: Path, tmp_path: Path) -> None:
    from lorakit.model_card import write_run_card
    from lorakit.recipe import load_trained_recipe

    recipe = load_trained_recipe(card_run / "recipe.yaml")
    metrics = json.loads((card_run / "metrics.json").read_text())
    mine = tmp_path / "README.md"
    mine.write_text("# my notes\n")
    assert write_run_card(tmp_path, recipe, metrics) is None
    assert mine.read_text() == "# my notes\n"
    assert write_run_card(card_run, recipe, metrics) == card_run / "README.md"  # lorakit's own: replaced


def test_generation_and_own_data_metadata(tmp_path: Path) -> None:
    from lorakit.model_card import card_data
    from lorakit.recipe import recipe_from_dict

    e2e = card_data(recipe_from_dict({"task": {"name": "e2e"}}), {"best": {"bleu": 60.1, "step": 9}}, "x")
    assert e2e.pipeline_tag == "text-generation" and e2e.datasets == ["tuetschek/e2e_nlg"]
    assert e2e.eval_results[0].metric_value == 60.1
    data = tmp_path / "train.csv"
    data.write_text("text,label\na,b\n")
    own = card_data(recipe_from_dict({"task": {"type": "classification", "train_file": str(data)}}), {}, "x")
    assert own.datasets is None and own.eval_results is None  # a local file is no hub dataset
