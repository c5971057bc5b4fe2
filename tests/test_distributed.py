"""Several processes on the CPU (gloo), launched as users launch them: ``lorakit train --num-processes 2``.

The central claim: with the same seed, N processes with batch b train the same adapter as one process
with batch N·b (to float tolerance), evaluate every example once, and a checkpoint written by either
resumes on the other. Shown on a tiny RoBERTa without dropout and 60 real SST-2 rows (the last global
batch of each epoch is a partial one).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from processes import (
    BATCH,
    FIRST,
    REPO,
    TOLERANCE,
    TOTAL,
    max_difference,
    one_process,
    run_outputs,
    two_processes,
    write_process_recipe,
)

from lorakit.recipe import recipe_from_dict
from lorakit.training.launch import launch_arguments, needs_launch
from lorakit.training.optimization import global_mean_loss, task_loss
from lorakit.training.preflight import _LAUNCHER_VARIABLES
from lorakit.training.sharding import ProcessSlices

# ---------------------------------------------------------------------------------------------------------
# Slicing global batches


def _orders(slices: ProcessSlices) -> list[list[list[int]]]:
    """Per process, the batches Accelerate's default sharding (batch k goes to process k % N) hands it."""
    batches = list(slices)
    n = slices.num_processes
    return [batches[i::n] for i in range(n)]


@pytest.mark.parametrize(("rows", "g", "n"), [(60, 8, 2), (64, 8, 4), (61, 8, 2), (9, 6, 3)])
def test_each_step_of_n_processes_holds_one_global_batch_in_equal_slices(rows: int, g: int, n: int) -> None:
    order = list(torch.randperm(rows, generator=torch.Generator().manual_seed(rows)).tolist())
    slices = ProcessSlices(order, global_batch_size=g, num_processes=n)
    per_process = _orders(slices)
    steps = list(zip(*per_process, strict=True))
    assert len(steps) == slices.num_global_batches() == len(slices) // n
    globals_ = list(slices.global_batches())
    for step, global_batch in zip(steps, globals_, strict=True):
        assert len({len(part) for part in step}) == 1  # equal slices: DDP's mean of means is the global mean
        assert [i for part in step for i in part] == global_batch
    used = [i for batch in globals_ for i in batch]
    # Full global batches are whole; only a partial last batch loses its remainder modulo n.
    assert used == order[: len(used)] and len(order) - len(used) == (rows % g) % n


def test_one_process_gets_the_global_batches_unsliced() -> None:
    slices = ProcessSlices(list(range(10)), global_batch_size=4, num_processes=1)
    assert list(slices) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_set_epoch_reaches_the_index_sampler() -> None:
    from lorakit.data import EpochShuffleSampler

    sampler = EpochShuffleSampler(12, seed=3)
    slices = ProcessSlices(sampler, global_batch_size=4, num_processes=2)
    first = list(slices)
    slices.set_epoch(1)
    assert list(slices) != first and sampler.epoch == 1


# ---------------------------------------------------------------------------------------------------------
# The loss each process contributes


def test_token_losses_are_weighted_alike_across_processes_with_unequal_token_counts() -> None:
    """Two processes' next-token losses, averaged as DDP averages gradients, give the gradient of the
    one-process loss over both halves; the per-process token means (what a plain mean does) do not."""
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (4, 7))
    labels[0, :5] = -100  # the first half holds far fewer target tokens than the second
    labels[1, :6] = -100
    whole = torch.autograd.grad(task_loss(logits, labels, "generation", 0.1), logits)[0]
    tokens = float((labels[:, 1:] != -100).sum())
    fake = SimpleNamespace(num_processes=2, reduce=lambda t, how: torch.tensor(tokens))
    halves = [
        global_mean_loss(logits[s], labels[s], "generation", 0.1, fake) for s in (slice(0, 2), slice(2, 4))
    ]
    ddp = sum(torch.autograd.grad(h, logits)[0] for h in halves) / 2
    torch.testing.assert_close(ddp, whole, rtol=1e-5, atol=1e-7)
    plain = [task_loss(logits[s], labels[s], "generation", 0.1) for s in (slice(0, 2), slice(2, 4))]
    naive = sum(torch.autograd.grad(h, logits)[0] for h in plain) / 2
    assert (naive - whole).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# DDP's requirement: every trainable parameter gets a gradient


def _gpt2_classifier():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    cfg = GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=80, pad_token_id=0)
    return GPT2ForSequenceClassification(cfg)


@pytest.mark.parametrize("arch", ["roberta", "bert", "deberta", "gpt2-classifier", "gpt2-lm"])
def test_every_trainable_parameter_gets_a_gradient(arch: str) -> None:
    """DDP (find_unused_parameters=False, Accelerate's default) fails on a trainable parameter left without
    a gradient: the task heads, BERT's and DeBERTa's trained poolers, and biases with ``bias: all`` all
    take part."""
    from conftest import tiny_bert, tiny_deberta, tiny_gpt2, tiny_roberta

    from lorakit.models import apply_lora
    from lorakit.tasks import get_task

    make = {
        "roberta": tiny_roberta,
        "bert": tiny_bert,
        "deberta": tiny_deberta,
        "gpt2-classifier": _gpt2_classifier,
        "gpt2-lm": tiny_gpt2,
    }[arch]
    task = "e2e" if arch == "gpt2-lm" else "sst2"
    model = make()
    apply_lora(recipe_from_dict({"task": {"name": task}, "lora": {"bias": "all"}}), model, get_task(task))
    model.train()
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().square().mean().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("pooler.dense.weight") for n in trainable) == (arch in ("bert", "deberta"))
    assert [n for n, p in trainable.items() if p.grad is None] == []


# ---------------------------------------------------------------------------------------------------------
# Launching


def _recipe(tmp_path: Path, **train) -> object:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    from lorakit.recipe import load_recipe

    return load_recipe(path)


def test_launch_runs_accelerate_launch_with_the_same_train_arguments(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, num_processes=3, mixed_precision="bf16")
    args, env = launch_arguments(recipe, ["train", "r.yaml", "--set", "train.lr=0.1"])
    assert args[:3] == ["--multi_gpu", "--num_processes", "3"]
    assert args[args.index("--mixed_precision") + 1] == "bf16"
    assert args[-6:] == ["-m", "lorakit", "train", "r.yaml", "--set", "train.lr=0.1"]
    # Without a GPU the processes are CPU processes that talk over gloo.
    assert (env.get("ACCELERATE_USE_CPU") == "true") == (not torch.cuda.is_available())

    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\n")
    args, env = launch_arguments(_recipe(tmp_path, distributed=str(config)), ["train", "r.yaml"])
    assert args[:2] == ["--config_file", str(config)] and "--multi_gpu" not in args
    assert "--num_processes" not in args and env == {}  # the file decides


def test_a_launched_process_never_launches_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    recipe = _recipe(tmp_path, num_processes=2)
    assert needs_launch(recipe) and not needs_launch(_recipe(tmp_path, num_processes=1))
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not needs_launch(recipe)


def test_processes_that_accelerate_does_not_join_up_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun without ACCELERATE_USE_CPU on a machine without a GPU: every process would train alone."""
    from lorakit.errors import UserError
    from lorakit.training.preflight import check_process_count

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU"):
        check_process_count(_recipe(tmp_path), 1)
    check_process_count(_recipe(tmp_path), 2)  # joined up: fine


# ---------------------------------------------------------------------------------------------------------
# End to end: 2 processes against 1 with the doubled batch, and resuming across process counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, no_dropout_roberta: Path, shared_data: Path) -> dict:
    """Five runs: one and two processes for FIRST steps, one process straight to TOTAL steps, and each
    FIRST-step run resumed to TOTAL steps on the other number of processes."""
    root = tmp_path_factory.mktemp("distributed")
    data = shared_data / "glue" / "SST-2"
    out: dict = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        for name, processes, steps in (("one", 1, FIRST), ("two", 2, FIRST), ("straight", 1, TOTAL)):
            recipe = write_process_recipe(
                root / f"{name}.yaml", no_dropout_roberta, data, root / name, processes, steps
            )
            if processes == 2:
                done = two_processes(str(recipe))
                assert done.returncode == 0, done.stderr[-3000:]
                out["launch_line"] = next(
                    line for line in done.stderr.splitlines() if "accelerate launch" in line
                )
            else:
                one_process(str(recipe))
            out[name] = run_outputs(root / name)
        # Resume a copy of each 4-step run on the other number of processes (keeping the global batch).
        for name, other in (("two", "one"), ("one", "two")):
            shutil.copytree(root / name, root / f"{name}-resumed")
            args = [
                str(root / f"{name}.yaml"),
                "--resume",
                "--output-dir",
                str(root / f"{name}-resumed"),
                "--set",
                f"train.max_steps={TOTAL}",
                "--set",
                f"train.batch_size={BATCH * (2 if other == 'one' else 1)}",
            ]
            if other == "two":
                done = two_processes(*args)
                assert done.returncode == 0, done.stderr[-3000:]
            else:
                one_process(*args, "--set", "train.num_processes=1")
            out[f"{name}-resumed"] = run_outputs(root / f"{name}-resumed")
    return out


def test_two_processes_with_batch_b_train_the_adapter_of_one_process_with_batch_2b(runs: dict) -> None:
    assert "--multi_gpu --num_processes 2" in runs["launch_line"]
    one, two = runs["one"], runs["two"]
    assert two["metrics"]["num_processes"] == 2 and one["metrics"]["num_processes"] == 1
    # Trained at all (LoRA B starts at zero), and trained alike.
    assert max(v.abs().max().item() for k, v in one["adapter"].items() if "lora_B" in k) > 1e-3
    assert max_difference(one["adapter"], two["adapter"]) <= TOLERANCE
    # Every process saw its own share: 7 global batches of 8 rows, 1 of 4, then 2 of 8; not 8 rows each.
    assert one["metrics"]["train_samples"] == two["metrics"]["train_samples"] == 7 * 8 + 4 + 2 * 8
    for key in ("final", "best", "eval_examples", "global_batch_size"):
        assert one["metrics"][key] == two["metrics"][key], key
    assert two["metrics"]["eval_examples"] == {"validation": 37}
    losses = [[h["loss"] for h in run["metrics"]["history"] if "loss" in h] for run in (one, two)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.parametrize("written_by", ["two", "one"])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs: dict, written_by: str) -> None:
    resumed, straight = runs[f"{written_by}-resumed"], runs["straight"]
    assert resumed["metrics"]["num_processes"] == (1 if written_by == "two" else 2)
    assert max_difference(resumed["adapter"], straight["adapter"]) <= TOLERANCE
    # The resumed run took up where it stopped: two more global batches of the second epoch.
    assert resumed["metrics"]["train_samples"] == straight["metrics"]["train_samples"] == 60 + 4 * 8
    assert resumed["metrics"]["final"] == straight["metrics"]["final"]
    # Not vacuous: the last two steps moved the adapter.
    assert max_difference(runs[written_by]["adapter"], straight["adapter"]) > 100 * TOLERANCE


def test_a_failed_process_gives_its_exit_status(
    tmp_path: Path, no_dropout_roberta: Path, shared_data: Path
) -> None:
    """A model directory without a tokenizer: a recipe error that only the launched processes meet."""
    broken = tmp_path / "model"
    broken.mkdir()
    shutil.copy(no_dropout_roberta / "config.json", broken / "config.json")
    recipe = write_process_recipe(
        tmp_path / "r.yaml", broken, shared_data / "glue" / "SST-2", tmp_path / "run", 2, 2
    )
    done = two_processes(str(recipe))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.name_or_path" in done.stderr


def test_sigterm_stops_every_process_after_the_same_step_and_the_run_resumes_exactly(
    tmp_path: Path, no_dropout_roberta: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a scheduler does: SIGTERM to the `lorakit train` it started. Every process finishes the step,
    they agree on where to stop, one checkpoint is written, one message shown, the status is 143; the
    run then resumes (here on one process with the same global batch) to the uninterrupted adapter."""
    monkeypatch.setenv("LORAKIT_HOME", str(tmp_path / "home"))
    data, steps = shared_data / "glue" / "SST-2", 60
    train = {"save_every": None, "eval_every": steps, "log_every": 5}
    recipe = write_process_recipe(
        tmp_path / "r.yaml", no_dropout_roberta, data, tmp_path / "run", 2, steps, **train
    )
    env = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_VARIABLES, "RANK")}
    process = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", str(recipe)],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log, deadline = tmp_path / "run" / "logs" / "train.jsonl", time.monotonic() + 180
    while not (log.is_file() and '"step": 10,' in log.read_text()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 143, err[-3000:]
    told = [line for line in err.splitlines() if "stopped by SIGTERM after step" in line]
    assert len(told) == 1, err[-3000:]
    step = int(told[0].split("after step ")[1].split()[0])
    assert 10 <= step < steps and step % 5 == 0  # processes compare notes once per log interval
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [f"step-{step}"]

    one = ["--set", "train.num_processes=1", "--set", f"train.batch_size={2 * BATCH}"]
    one_process(str(recipe), "--resume", *one)
    one_process(str(recipe), "--output-dir", str(tmp_path / "straight"), *one)
    resumed, straight = run_outputs(tmp_path / "run"), run_outputs(tmp_path / "straight")
    assert max_difference(resumed["adapter"], straight["adapter"]) <= TOLERANCE
