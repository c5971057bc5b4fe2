"""`train.report_to`: one real run reports to TensorBoard, MLflow (a local file store) and W&B (offline) at
once, and each is read back with its own reader; a tracker whose package is missing is one line, exit 2."""

from __future__ import annotations

import glob
import struct
from pathlib import Path

import pytest
from conftest import SHARED_DATA, write_recipe


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path) -> tuple[Path, str]:
    """A 4-step run reporting to all three trackers; returns the run directory and MLflow's store URI."""
    from accelerate.state import AcceleratorState, PartialState

    from lorakit.cli import main

    root = tmp_path_factory.mktemp("tracked")
    base = tiny_roberta_dir
    run = root / "run"
    store = f"file://{root / 'mlruns'}"
    recipe = write_recipe(
        root / "recipe.yaml",
        base,
        "sst2",
        SHARED_DATA / "glue" / "SST-2",
        run,
        task={"max_length": 48, "max_train_samples": 32, "max_eval_samples": 16},
        train={"max_steps": 4, "eval_every": 4, "report_to": ["tensorboard", "mlflow", "wandb"]},
    )
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a file store without it
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_CONSOLE", "off")  # leave pytest's captured streams alone
        assert main(["train", str(recipe)]) == 0
    return run, store


def test_mlflow_run_has_the_recipe_and_every_metric(tracked_run: tuple[Path, str]) -> None:
    from mlflow import MlflowClient

    run_dir, store = tracked_run
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("lorakit")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    params = found.data.params
    assert params["train.lr"] == "0.001" and params["task.name"] == "sst2"
    assert params["train.report_to"] == '["tensorboard", "mlflow", "wandb"]'
    losses = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in losses] == [2, 4]
    import json

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert found.data.metrics["final/accuracy"] == pytest.approx(metrics["final"]["accuracy"])
    assert found.data.metrics["best/accuracy"] == pytest.approx(metrics["best"]["accuracy"])
    assert "eval/accuracy" in found.data.metrics and "train/samples_per_second" in found.data.metrics


def _wandb_records(path: str):
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of CRC, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_folder_has_the_recipe_and_every_metric(tracked_run: tuple[Path, str]) -> None:
    run_dir, _ = tracked_run
    (run_file,) = glob.glob(str(run_dir / "logs" / "wandb" / "offline-run-*" / "run-*.wandb"))
    config, history, summary, name = {}, [], {}, None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            name, project = record.run.display_name, record.run.project
            config.update({_key(item): item.value_json for item in record.run.config.update})
        elif kind == "config":
            config.update({_key(item): item.value_json for item in record.config.update})
        elif kind == "history":
            history.append({_key(item): item.value_json for item in record.history.item})
        elif kind == "summary":
            summary.update({_key(item): item.value_json for item in record.summary.update})
    assert name == "run" and project == "lorakit"
    assert config["train.lr"] == "0.001" and config["task.name"] == '"sst2"'
    assert [h["_step"] for h in history if "train/loss" in h] == ["2", "4"]
    assert any("eval/accuracy" in h for h in history)
    assert "final/accuracy" in summary and "best/accuracy" in summary


def test_tensorboard_events_have_every_metric(tracked_run: tuple[Path, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tracked_run
    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/accuracy", "final/accuracy", "best/accuracy"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]


def test_a_missing_tracker_is_one_line_naming_the_extra(
    tmp_path: Path, tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from accelerate.utils.imports import is_comet_ml_available

    from lorakit.cli import main

    if is_comet_ml_available():
        pytest.skip("comet_ml is installed here")
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_roberta_dir, "sst2", SHARED_DATA / "glue" / "SST-2", out)
    assert main(["train", str(recipe), "--set", "train.report_to=[tensorboard, comet_ml]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train.report_to" in err and "pip install 'lorakit[comet_ml]'" in err
    assert not out.exists()  # before anything was written or loaded


@pytest.mark.parametrize(
    ("value", "expected"),
    [("none", []), ("wandb", ["wandb"]), ("[MLflow, tensorboard]", ["mlflow", "tensorboard"])],
)
def test_report_to_values(value: str, expected: list[str]) -> None:
    import yaml

    from lorakit.recipe import recipe_from_dict

    assert recipe_from_dict({"train": {"report_to": yaml.safe_load(value)}}).train.report_to == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [("[none, wandb]", "cannot be combined"), ("neptune", "unknown tracker 'neptune'")],
)
def test_bad_report_to_is_a_recipe_error(value: str, message: str) -> None:
    import yaml

    from lorakit.errors import UserError
    from lorakit.recipe import recipe_from_dict

    with pytest.raises(UserError, match=message) as caught:
        recipe_from_dict({"train": {"report_to": yaml.safe_load(value)}})
    assert "train.report_to" in str(caught.value)


def test_the_config_is_flat_and_plain() -> None:
    from lorakit.recipe import recipe_from_dict
    from lorakit.training.trackers import flat_config

    flat = flat_config(recipe_from_dict({"lora": {"target_modules": ["query", "value"]}}))
    assert flat["lora.target_modules"] == '["query", "value"]' and flat["train.lr"] == 0.0005
    assert flat["train.max_steps"] == "null"
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
