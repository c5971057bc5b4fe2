"""A trained run outlives its data: merging needs none, and eval names task.data_dir in one line when the
data has moved, then runs with ``--set task.data_dir=<new place>``. Training-only paths (init_from) that
have moved stop neither."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import train_glue_run

from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.recipe import load_trained_recipe


def _sst2_copy(shared_data: Path, out: Path, rows: int = 40) -> Path:
    """A data_dir with the first ``rows`` rows of SST-2's train and dev files, in GLUE's layout."""
    out.mkdir(parents=True)
    for name in ("train.tsv", "dev.tsv"):
        lines = (shared_data / "glue" / "SST-2" / name).read_text(encoding="utf-8").splitlines(keepends=True)
        (out / name).write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return out


def test_merge_needs_no_data_and_eval_takes_the_new_place(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _sst2_copy(shared_data, tmp_path / "data" / "SST-2")
    run = train_glue_run(tmp_path / "run", tiny_roberta_dir, "sst2", data, lora={}, eval_rows=16, steps=2)
    moved = tmp_path / "moved"
    shutil.move(data, moved)
    capsys.readouterr()

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0, capsys.readouterr().err
    assert (merged / "config.json").is_file() and (merged / "lorakit_merge.json").is_file()
    capsys.readouterr()

    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "task.data_dir" in err and "not found" in err and str(run / "recipe.yaml") in err

    assert main(["eval", str(run), "--set", f"task.data_dir={moved}"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "accuracy" in json.loads(out[out.index("{") :])
    assert (run / "eval" / "predictions-validation.jsonl").is_file()


def test_trained_recipes_drop_training_paths_and_take_overrides_after(tmp_path: Path) -> None:
    data, new_data, init = tmp_path / "data", tmp_path / "new-data", tmp_path / "init"
    for folder in (data, new_data, init):
        folder.mkdir()
    path = tmp_path / "recipe.yaml"
    recipe = {"task": {"name": "sst2", "data_dir": str(data)}, "lora": {"init_from": str(init)}}
    path.write_text(yaml.safe_dump(recipe))
    shutil.rmtree(init)  # the adapter it started from has gone since training

    assert load_trained_recipe(path).task.data_dir is None  # merge, predict, generate: no data
    kept = load_trained_recipe(path, keep_data=True)
    assert kept.task.data_dir == str(data) and kept.lora.init_from is None
    data.rmdir()
    with pytest.raises(UserError, match="directory not found") as caught:
        load_trained_recipe(path, keep_data=True)
    assert caught.value.where == f"{path}: task.data_dir"
    moved = load_trained_recipe(path, [f"task.data_dir={new_data}"], keep_data=True)
    assert moved.task.data_dir == str(new_data)
    with pytest.raises(UserError) as caught:
        load_trained_recipe(path, [f"task.data_dir={tmp_path / 'nowhere'}"], keep_data=True)
    assert caught.value.where == "--set task.data_dir"  # the user's own --set, named as such
