"""with_resolved_paths: every local path of a recipe made absolute, hub ids and nulls left as written, the
recipe's source kept; a resolved recipe saved in a run reads back from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.recipe import load_recipe, recipe_from_dict, save_recipe, with_resolved_paths


def _model_dir(path: Path) -> Path:
    # The schema checks only that a local model directory exists; config.json makes it look like one.
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder, the working directory, with a local model, a tokenizer, GLUE-style data, a
    previous run and an Accelerate config, all named relatively in ``recipe.yaml``."""
    root = tmp_path / "project"
    _model_dir(root / "my-model")
    _model_dir(root / "tok")
    (root / "data").mkdir()
    (root / "prev").mkdir()
    (root / "acc.yaml").write_text("{}\n")
    recipe = {
        "model": {"name_or_path": "./my-model", "tokenizer": "tok/../tok/"},
        "task": {"name": "sst2", "data_dir": "./data"},
        "lora": {"init_from": "prev"},
        "train": {"distributed": "./acc.yaml"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(root)
    return root.resolve()


def test_local_paths_become_absolute_and_the_source_stays(project: Path) -> None:
    recipe = load_recipe("recipe.yaml")
    resolved = with_resolved_paths(recipe)
    assert resolved.model.name_or_path == str(project / "my-model")
    assert resolved.model.tokenizer == str(project / "tok")
    assert resolved.task.data_dir == str(project / "data")
    assert resolved.lora.init_from == str(project / "prev")
    assert resolved.train.distributed == str(project / "acc.yaml")
    assert resolved.output_dir == str(project / "runs" / "recipe")  # load_recipe's default, relative
    assert resolved.source == "recipe.yaml"
    # A copy: the recipe it came from is unchanged, and resolving twice changes nothing more.
    assert recipe.model.name_or_path == "./my-model" and recipe.output_dir == "runs/recipe"
    assert with_resolved_paths(resolved) == resolved
    assert resolved.model_dump(exclude={"model", "task", "lora", "train", "output_dir"}) == recipe.model_dump(
        exclude={"model", "task", "lora", "train", "output_dir"}
    )


def test_a_resolved_recipe_saved_in_a_run_reads_back_from_another_folder(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved = with_resolved_paths(load_recipe("recipe.yaml"))
    save_recipe(resolved, project / "runs" / "recipe" / "recipe.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_recipe(project / "runs" / "recipe" / "recipe.yaml") == resolved


@pytest.mark.parametrize("name", ["roberta-base", "org/name"])
def test_hub_ids_and_nulls_stay(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = recipe_from_dict(
        {"model": {"name_or_path": name, "tokenizer": "org/tokenizer"}, "output_dir": "/abs"}
    )
    resolved = with_resolved_paths(recipe)
    assert resolved.model.name_or_path == name and resolved.model.tokenizer == "org/tokenizer"
    assert resolved.task.data_dir is None and resolved.lora.init_from is None
    assert resolved.train.distributed is None and resolved.output_dir == "/abs"
    assert resolved == recipe


def test_a_hub_like_name_that_exists_here_is_the_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # transformers loads a folder of that name when there is one, so the run must record where it was.
    monkeypatch.chdir(tmp_path)
    _model_dir(tmp_path / "roberta-base")
    resolved = with_resolved_paths(recipe_from_dict({"model": {"name_or_path": "roberta-base"}}))
    assert resolved.model.name_or_path == str(tmp_path.resolve() / "roberta-base")


def test_own_data_files_and_a_local_dataset_become_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    files = {"train_file": "d/train.csv", "validation_file": "./d/dev.jsonl", "test_file": "../test.tsv"}
    recipe = recipe_from_dict({"task": {"type": "classification", **files}})
    resolved = with_resolved_paths(recipe).task
    assert resolved.train_file == str(here / "d" / "train.csv")
    assert resolved.validation_file == str(here / "d" / "dev.jsonl")
    assert resolved.test_file == str(here.parent / "test.tsv")

    hub = recipe_from_dict({"task": {"type": "classification", "dataset": "org/reviews"}})
    assert with_resolved_paths(hub).task.dataset == "org/reviews"
    (tmp_path / "reviews").mkdir()
    local = recipe_from_dict({"task": {"type": "classification", "dataset": "reviews"}})
    assert with_resolved_paths(local).task.dataset == str(here / "reviews")
