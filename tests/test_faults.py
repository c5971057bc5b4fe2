"""Faults at run time, on real files: each is one clear line naming the file or key, the right exit status,
and nothing lost or half-written. SIGTERM and SIGINT reach a real ``lorakit train`` process mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_recipe
from safetensors.torch import load_file

from lorakit.cli import main


def _recipe(path: Path, base: Path, data: Path, out: Path, **train: object) -> Path:
    return write_recipe(
        path,
        base,
        "sst2",
        data,
        out,
        task={"max_length": 32, "max_train_samples": 256, "max_eval_samples": 16},
        lora={"dropout": 0.0},
        train={"batch_size": 4, "eval_batch_size": 16, "lr": 1e-3, "log_every": 5, **train},
    )


def _step_reached(run: Path, step: int) -> bool:
    log = run / "logs" / "train.jsonl"
    if not log.is_file():
        return False
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()]
    return max(steps, default=0) >= step


TRAIN = {"max_steps": 300, "eval_every": 150}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path
) -> Path:
    """The final adapter of the run trained without interruption."""
    root = tmp_path_factory.mktemp("straight")
    data = shared_data / "glue" / "SST-2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        assert (
            main(["train", str(_recipe(root / "a.yaml", tiny_roberta_dir, data, root / "a", **TRAIN))]) == 0
        )
    return root / "a" / "final" / "adapter_model.safetensors"


# SIGINT takes SIGTERM's path once caught; its run is in `make test-all` (30 s off the default suite).
@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_mid_run_checkpoints_and_resume_ends_with_the_uninterrupted_adapter(
    sig: int,
    uninterrupted: Path,
    tiny_roberta_dir: Path,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, train = shared_data / "glue" / "SST-2", TRAIN
    recipe = _recipe(tmp_path / "b.yaml", tiny_roberta_dir, data, tmp_path / "b", **train)
    env = {**os.environ, "LORAKIT_HOME": str(tmp_path / "home")}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(recipe)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not _step_reached(tmp_path / "b", 5):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"stopped by {name} after step" in err and "--resume" in err and "Traceback" not in err
    step = int(err.split("after step ")[1].split()[0])
    assert 5 <= step < 300  # stopped mid-run, after the step in progress
    assert (tmp_path / "b" / "checkpoints" / f"step-{step}").is_dir()
    assert not (tmp_path / "b" / "metrics.json").exists()

    capsys.readouterr()
    assert main(["train", str(recipe), "--resume"]) == 0
    a = load_file(uninterrupted)
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> Path:
    """A short real run to break copies of."""
    root = tmp_path_factory.mktemp("faults")
    data = shared_data / "glue" / "SST-2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        recipe = _recipe(root / "r.yaml", tiny_roberta_dir, data, root / "run", max_steps=4, save_every=2)
        assert main(["train", str(recipe)]) == 0
    return root / "run"


def _fails(args: list[str], status: int, capsys: pytest.CaptureFixture[str], *words: str) -> str:
    capsys.readouterr()
    assert main(args) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


def test_merge_refuses_an_out_it_did_not_write_and_replaces_its_own_atomically(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    _fails(["merge", str(run), "--out", str(mine)], 2, capsys, "--out", "lorakit did not write")
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    _fails(["merge", str(run), "--out", str(tmp_path / "afile")], 2, capsys, "is a file")

    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    first = load_file(out / "model.safetensors")
    assert json.loads((out / "lorakit_merge.json").read_text())["merged_from"] == str(run)
    assert main(["merge", str(run), "--out", str(out)]) == 0  # an earlier merge: replaced
    second = load_file(out / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "merged", "mine"]  # nothing left beside


def _broken_copy(run: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    import shutil

    copy = tmp_path / "broken"
    shutil.copytree(run, copy)
    (copy / name).write_bytes(content)
    return copy


@pytest.mark.parametrize(
    ("name", "cut", "message"),
    [
        ("adapter_model.safetensors", 0.5, "not a readable safetensors file"),
        ("adapter_config.json", 0.5, "not valid JSON"),
    ],
)
def test_a_broken_adapter_file_is_named_with_exit_1(
    run: Path, tmp_path: Path, name: str, cut: float, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (run / name).read_bytes()
    copy = _broken_copy(run, tmp_path, name, data[: int(len(data) * cut)])
    where = str(copy / name)
    _fails(["eval", str(copy)], 1, capsys, where, message)
    _fails(["merge", str(copy), "--out", str(tmp_path / "m")], 1, capsys, where, message)
    assert not (tmp_path / "m").exists()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"adapter": "a", "text": "fine"}\n')
    _fails(["predict", "--adapter", f"a={copy}", "--input", str(rows)], 1, capsys, where, message)


def test_a_truncated_checkpoint_is_named_on_resume(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["output_dir"] = str(copy)
    recipe["train"]["max_steps"] = 8
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    weights = copy / "checkpoints" / "step-4" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _fails(["train", str(tmp_path / "r.yaml"), "--resume"], 1, capsys, str(weights), "not a readable")


def test_a_training_file_without_rows_is_named_with_exit_2(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "SST-2"
    data.mkdir()
    source = shared_data / "glue" / "SST-2"
    (data / "train.tsv").write_text((source / "train.tsv").read_text().splitlines()[0] + "\n")  # header
    (data / "dev.tsv").write_text((source / "dev.tsv").read_text())
    recipe = _recipe(tmp_path / "r.yaml", tiny_roberta_dir, data, tmp_path / "run", max_steps=2)
    _fails(["train", str(recipe)], 2, capsys, str(data / "train.tsv"), "no rows in the train split")


def test_a_failed_start_does_not_block_the_retry(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shared_data / "glue" / "SST-2"
    out = tmp_path / "run"
    import shutil

    unfinished = shutil.copytree(tiny_roberta_dir, tmp_path / "download-in-progress")
    (unfinished / "model.safetensors").unlink()  # no weights yet: loading fails, as with the hub unreachable
    recipe = _recipe(tmp_path / "r.yaml", unfinished, data, out, max_steps=2)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2  # "cannot load the model", naming the key
    assert not out.exists()  # model and data load before the run directory is made: nothing written
    # A start that failed after writing its recipe and logs (an older lorakit's) does not block either.
    (out / "logs").mkdir(parents=True)
    (out / "recipe.yaml").write_text("# written by the failed start\n")
    recipe = _recipe(tmp_path / "r.yaml", tiny_roberta_dir, data, out, max_steps=2)
    assert main(["train", str(recipe)]) == 0, capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()
    # A directory with anything else in it still needs --resume or another --output-dir.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("mine")
    recipe = _recipe(tmp_path / "r2.yaml", tiny_roberta_dir, data, tmp_path / "other", max_steps=2)
    _fails(["train", str(recipe)], 2, capsys, "already holds a run")
    assert (tmp_path / "other" / "data.csv").read_text() == "mine"
    # Nor is a folder holding only a recipe.yaml of the user's taken for a failed start.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "recipe.yaml").write_text("# the user's own recipe\n")
    recipe = _recipe(tmp_path / "r3.yaml", tiny_roberta_dir, data, tmp_path / "configs", max_steps=2)
    _fails(["train", str(recipe)], 2, capsys, "already holds a run")
    assert (tmp_path / "configs" / "recipe.yaml").read_text() == "# the user's own recipe\n"


def test_the_first_signal_asks_and_a_second_ctrl_c_stops_at_once() -> None:
    from lorakit.training.preemption import StopSignals

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)
        assert signals.received == signal.SIGTERM  # asked, not stopped
        signal.raise_signal(signal.SIGTERM)  # a scheduler repeating itself: still the checkpoint first
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after training


def test_a_max_length_past_the_models_positions_is_refused_before_training(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = shared_data / "glue" / "SST-2"
    recipe = _recipe(tmp_path / "r.yaml", tiny_roberta_dir, data, tmp_path / "run", max_steps=2)
    # The tiny RoBERTa has 130 positions, 128 of them for tokens (its positions start past the pad id).
    args = ["train", str(recipe), "--set", "task.max_length=129"]
    _fails(args, 2, capsys, "task.max_length", "129 tokens, more than the 128 positions")
    assert main(["train", str(recipe), "--set", "task.max_length=128"]) == 0


def _train_with_file_size_limit(recipe: Path, limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``lorakit train`` in a process that may write no file past ``limit`` bytes: the OS fails the write
    (EFBIG) as it fails one on a full disk (ENOSPC), through the same error path."""
    import resource

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer outright
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "lorakit", "train", str(recipe), *args],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("limit", "named", "kept"),
    [
        # r = 64: the adapter is ~72 KB and the checkpoint's Adam state ~150 KB (a 100 KB limit stops
        # the checkpoint only; 50 KB stops the first adapter).
        # The checkpoint case runs in `make test-all` (35 s); the default suite keeps the adapter one.
        pytest.param(
            100_000, "checkpoints/step-2: ", "there is no earlier checkpoint", marks=pytest.mark.slow
        ),
        (50_000, "adapter_model.safetensors: ", "nothing was written"),
    ],
)
def test_a_write_that_fails_names_the_file_leaves_nothing_half_written_and_the_run_resumes(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, limit: int, named: str, kept: str
) -> None:
    data = shared_data / "glue" / "SST-2"
    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_roberta_dir,
        "sst2",
        data,
        run,
        task={"max_length": 32, "max_train_samples": 64, "max_eval_samples": 16},
        lora={"r": 64, "alpha": 64},
        train={"batch_size": 4, "max_steps": 4, "save_every": 2, "eval_every": 2, "log_every": 1},
    )
    done = _train_with_file_size_limit(recipe, limit)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("lorakit")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "could not write" in lines[0] and named in lines[0] and kept in lines[0], lines[0]
    assert "File too large" in lines[0]  # the OS's reason, not a library's wrapper text
    leftovers = [p for p in run.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    assert leftovers == [] and not (run / "checkpoints" / "step-2").exists()
    # With room again, --resume takes the unfinished run on (from step 0: it has no checkpoint).
    done = _train_with_file_size_limit(recipe, 1 << 30, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 4
    assert load_file(run / "final" / "adapter_model.safetensors")


def test_a_signal_during_the_final_evaluation_completes_the_run_and_still_stops(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C after the last step (a sweep's user stopping it): the run finishes writing, and the exit
    status says it was stopped, so a sweep or script does not go on to the next run."""
    import lorakit.training.loop as loop_module

    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    data = shared_data / "glue" / "SST-2"
    recipe = _recipe(tmp_path / "r.yaml", tiny_roberta_dir, data, tmp_path / "run", max_steps=2)
    real_finish = loop_module._finish

    def finish_after_ctrl_c(loop):
        os.kill(os.getpid(), signal.SIGINT)  # a real signal, caught by the run's handler
        return real_finish(loop)

    monkeypatch.setattr(loop_module, "_finish", finish_after_ctrl_c)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert "SIGINT received as the run ended" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_steps"] == 2
    assert load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
