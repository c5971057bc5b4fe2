"""The latest run is chosen per project: runs recorded from other folders do not change it, a deleted run
falls back to the newest under ./runs/, then to any project's newest run; a corrupt registry is ignored.

Fake runs are folders holding a recipe.yaml: nothing here trains."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lorakit.errors import UserError
from lorakit.runs import (
    REGISTRY_FILE,
    REGISTRY_SIZE,
    latest_run,
    latest_run_or_error,
    lorakit_home,
    record_latest_run,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("LORAKIT_HOME", str(home))
    return home


def fake_run(path: Path, mtime: float | None = None) -> Path:
    """A run directory as latest_run sees one: a folder with a recipe.yaml (written at ``mtime``)."""
    path.mkdir(parents=True, exist_ok=True)
    recipe = path / "recipe.yaml"
    recipe.write_text("task: {name: sst2}\n")
    if mtime is not None:
        os.utime(recipe, (mtime, mtime))
    return path.resolve()


def train_from(folder: Path, run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Record ``run`` as training does, from ``folder`` as the working directory."""
    folder.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(folder)
    record_latest_run(fake_run(run))
    return run.resolve()


def test_a_run_recorded_from_another_folder_leaves_this_folders_latest(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    demo = train_from(a, a / "runs" / "demo", monkeypatch)
    point = train_from(b, b / "runs" / "sweeps" / "s" / "lr-1e-3", monkeypatch)  # later, elsewhere
    monkeypatch.chdir(a)
    assert latest_run() == demo
    monkeypatch.chdir(b)
    assert latest_run() == point
    # A run that lies under this folder counts as this project's, wherever it was trained from.
    into_a = train_from(tmp_path / "c", a / "runs" / "from-c", monkeypatch)
    monkeypatch.chdir(a)
    assert latest_run() == into_a
    entries = json.loads((home / REGISTRY_FILE).read_text())
    assert [e["run"] for e in entries] == [str(demo), str(point), str(into_a)]
    assert entries[0]["cwd"] == str(a.resolve()) and all(e["time"] > 0 for e in entries)


def test_a_resumed_run_moves_to_the_end_once(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train_from(tmp_path, tmp_path / "runs" / "first", monkeypatch)
    second = train_from(tmp_path, tmp_path / "runs" / "second", monkeypatch)
    assert latest_run() == second
    train_from(tmp_path, first, monkeypatch)  # resumed
    assert latest_run() == first
    assert [e["run"] for e in json.loads((home / REGISTRY_FILE).read_text())] == [str(second), str(first)]


def test_a_deleted_run_falls_back_to_the_newest_under_runs(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    runs = project / "runs"
    fake_run(runs / "old", mtime=1_000)
    demo = fake_run(runs / "demo", mtime=3_000)
    fake_run(runs / "sweeps" / "s" / "point", mtime=2_000)
    # A run's own subfolders are not runs, however new their files.
    fake_run(runs / "old" / "final", mtime=9_000)
    gone = train_from(project, project / "elsewhere" / "new", monkeypatch)
    assert latest_run() == gone
    (gone / "recipe.yaml").unlink()
    assert latest_run() == demo
    # metrics.json alone marks a run too, and its time counts.
    (runs / "sweeps" / "s" / "point" / "metrics.json").write_text("{}")
    assert latest_run() == (runs / "sweeps" / "s" / "point").resolve()


def test_no_run_anywhere_is_an_error(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "empty").mkdir(parents=True)  # a folder without a recipe is no run
    assert latest_run() is None
    with pytest.raises(UserError, match="no run yet") as caught:
        latest_run_or_error()
    assert caught.value.where == "RUN_DIR"


def test_no_run_here_falls_back_to_another_projects_newest(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    older = train_from(tmp_path / "b", tmp_path / "b" / "runs" / "x", monkeypatch)
    newer = train_from(tmp_path / "c", tmp_path / "c" / "runs" / "y", monkeypatch)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert latest_run() == newer
    (newer / "recipe.yaml").unlink()
    assert latest_run() == older


@pytest.mark.parametrize("content", ["{not json", '{"run": "/x"}', "[1, null, {}]", "\udcff"])
def test_a_corrupt_registry_reads_as_empty_and_is_rewritten(
    content: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir()
    (home / REGISTRY_FILE).write_bytes(content.encode("utf-8", "surrogateescape"))
    monkeypatch.chdir(tmp_path)
    assert latest_run() is None
    demo = fake_run(tmp_path / "runs" / "demo")
    assert latest_run() == demo
    run = train_from(tmp_path, tmp_path / "runs" / "next", monkeypatch)
    assert json.loads((home / REGISTRY_FILE).read_text())[-1]["run"] == str(run)
    assert latest_run() == run


def test_the_old_pointer_is_read_last(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = fake_run(tmp_path / "other" / "run")
    home.mkdir()
    (home / "latest_run").write_text(f"{run}\n")  # what lorakit before the registry wrote
    monkeypatch.chdir(tmp_path)
    assert latest_run() == run
    (home / "latest_run").write_text("\n")
    assert latest_run() is None


def test_the_registry_keeps_the_last_entries(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for i in range(REGISTRY_SIZE + 5):
        record_latest_run(tmp_path / f"r{i}")  # the folders need not exist to be recorded
    entries = json.loads((lorakit_home() / REGISTRY_FILE).read_text())
    assert len(entries) == REGISTRY_SIZE
    assert entries[-1]["run"] == str((tmp_path / f"r{REGISTRY_SIZE + 4}").resolve())
