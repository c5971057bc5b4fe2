"""The CLI end to end on a tiny RoBERTa with real GLUE rows: train → eval → merge → from_pretrained,
every GLUE task's loader and metric through a short run, resume after an interruption, full
fine-tuning, and each class of bad recipe (exit status 2, one line, no traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_recipe
from safetensors.torch import load_file

from lorakit.cli import main

GLUE_FOLDERS = {
    "cola": "CoLA",
    "sst2": "SST-2",
    "mrpc": "MRPC",
    "stsb": "STS-B",
    "qnli": "QNLI",
    "rte": "RTE",
}


def _head_lines(src: Path, dst: Path, n: int, header: bool = True) -> None:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: n + (1 if header else 0)]), encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dirs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """A data_dir per GLUE task, in GLUE's layout. Tasks whose train split is not in shared/data get
    real dev rows as their train file (QNLI, MNLI), and QQP, absent entirely, gets real MRPC pairs
    written in QQP's own layout."""
    glue = shared_data / "glue"
    dirs = {task: glue / folder for task, folder in GLUE_FOLDERS.items() if task != "qnli"}
    qnli = tmp_path_factory.mktemp("QNLI")
    shutil.copy(glue / "QNLI" / "dev.tsv", qnli / "dev.tsv")
    _head_lines(glue / "QNLI" / "dev.tsv", qnli / "train.tsv", 100)
    dirs["qnli"] = qnli
    mnli = tmp_path_factory.mktemp("MNLI")
    rows = (glue / "MNLI" / "dev_matched.jsonl").read_text().splitlines()
    (mnli / "train.jsonl").write_text("\n".join(rows[:100]) + "\n")
    (mnli / "dev_matched.jsonl").write_text("\n".join(rows[100:140]) + "\n")
    (mnli / "dev_mismatched.jsonl").write_text("\n".join(rows[140:170]) + "\n")
    dirs["mnli"] = mnli
    qqp = tmp_path_factory.mktemp("QQP")
    mrpc = (glue / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:121]
    lines = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
    for i, line in enumerate(mrpc):
        label, id1, id2, s1, s2 = line.split("\t")
        lines.append(f"{i}\t{id1}\t{id2}\t{s1}\t{s2}\t{label}")
    (qqp / "train.tsv").write_text("\n".join(lines[:81]) + "\n")
    (qqp / "dev.tsv").write_text("\n".join([lines[0], *lines[81:]]) + "\n")
    dirs["qqp"] = qqp
    return dirs


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


MAIN_METRICS = {
    "cola": "matthews_correlation",
    "sst2": "accuracy",
    "mrpc": "f1",
    "stsb": "pearson",
    "qqp": "f1",
    "mnli": "mismatched_accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
}


@pytest.mark.parametrize("task", list(MAIN_METRICS))
def test_every_glue_task_trains_and_scores(
    task: str,
    tiny_roberta_dir: Path,
    glue_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_roberta_dir, task, glue_dirs[task], tmp_path / "run", train={"max_steps": 3}
    )
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert MAIN_METRICS[task] in metrics["final"]
    assert all(-100.0 <= v <= 100.0 for k, v in metrics["final"].items() if k != "step")
    expected_eval = {"mnli": {"matched": 32, "mismatched": 30}}.get(task, {"validation": 32})
    assert metrics["eval_examples"] == expected_eval


def test_train_eval_merge_from_pretrained(
    tiny_roberta_dir: Path, glue_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    from lorakit.lora import lora_modules
    from lorakit.models import load_trained
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task
    from lorakit.training.reporting import process_age_seconds

    run = tmp_path / "run"
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_roberta_dir, "sst2", glue_dirs["sst2"], run, train={"epochs": 2}
    )
    age_before_train = process_age_seconds()
    code, out, err = run_cli(["train", str(recipe)], capsys)
    assert code == 0, err
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "metrics.json",
        "curves.png",
        "logs/train.jsonl",
        "final/adapter_model.safetensors",
    ):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-16"]  # only the newest kept
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parameters"]["lora"] == 2 * 2 * (4 * 32 + 32 * 4)
    assert metrics["parameters"]["trainable"] > metrics["parameters"]["lora"]  # the head trains too
    assert metrics["train_samples_per_second"] > 0 and metrics["peak_memory_bytes"] > 0
    assert metrics["adapter_bytes"] == (run / "adapter_model.safetensors").stat().st_size
    assert [h["step"] for h in metrics["history"] if "accuracy" in h] == [8, 16]
    seconds = metrics["seconds"]  # where the run's time went: each phase measured, none counted twice
    assert set(seconds) == {"start-up", "model", "data", "steps", "evaluation", "saving"}
    assert all(v > 0 for v in seconds.values()) and seconds["steps"] == metrics["train_seconds"]
    # In-process here, so start-up is this interpreter's age when train() began.
    assert age_before_train <= seconds["start-up"] <= age_before_train + 60
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_roberta_dir) and config["task_type"] == "SEQ_CLS"

    code, out, err = run_cli(["eval"], capsys)  # no RUN_DIR: the latest run
    assert code == 0, err
    assert json.loads(out[out.index("{") :])["accuracy"] == pytest.approx(metrics["best"]["accuracy"])
    preds = (run / "eval" / "predictions-validation.jsonl").read_text().splitlines()
    assert len(preds) == 32 and json.loads(preds[0])["readable"] in ("negative", "positive")

    merged = tmp_path / "merged"
    code, _, err = run_cli(["merge", str(run), "--out", str(merged)], capsys)
    assert code == 0, err
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert not any(True for _ in lora_modules(plain))
    loaded = load_recipe(run / "recipe.yaml")
    unmerged = load_trained(run, loaded, get_task("sst2", loaded.task.data_dir)).model
    ids = torch.randint(3, 50000, (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max().item() <= 1e-5
    assert (merged / "tokenizer.json").is_file()


def test_resume_after_interruption_ends_with_the_same_adapter(
    tiny_roberta_dir: Path,
    glue_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import lorakit.training.loop as train_mod

    common = {"train": {"max_steps": 6, "save_every": 2, "eval_every": 3, "batch_size": 8}}
    straight = write_recipe(
        tmp_path / "a.yaml", tiny_roberta_dir, "rte", glue_dirs["rte"], tmp_path / "a", **common
    )
    assert run_cli(["train", str(straight)], capsys)[0] == 0

    interrupted = write_recipe(
        tmp_path / "b.yaml", tiny_roberta_dir, "rte", glue_dirs["rte"], tmp_path / "b", **common
    )
    real_save, calls = train_mod.save_checkpoint, []

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        if len(calls) == 2:  # the checkpoint at step 4 is on disk; the process dies right after
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_crash)
    assert run_cli(["train", str(interrupted)], capsys)[0] == 130
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    code, _, err = run_cli(["train", str(interrupted), "--resume"], capsys)
    assert code == 0, err

    a = load_file(tmp_path / "a" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert ma["final"] == mb["final"] and ma["best"] == mb["best"]


def test_full_fine_tuning_runs_through_the_same_loop(
    tiny_roberta_dir: Path, glue_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "full"
    recipe = write_recipe(
        tmp_path / "f.yaml",
        tiny_roberta_dir,
        "mrpc",
        glue_dirs["mrpc"],
        run,
        method="full",
        train={"max_steps": 2},
    )
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parameters"]["trainable"] == metrics["parameters"]["total"]
    assert (run / "model" / "model.safetensors").is_file()
    code, out, err = run_cli(["eval", str(run)], capsys)
    assert code == 0, err
    assert json.loads(out[out.index("{") :])["accuracy"] == pytest.approx(metrics["best"]["accuracy"])


BAD_RECIPES = [
    ("unknown key", {"train": {"lrr": 0.1}}, "train.lrr"),
    ("wrong type", {"train": {"batch_size": "big"}}, "train.batch_size"),
    ("out of range", {"lora": {"r": 0}}, "lora.r"),
    ("dropout range", {"lora": {"dropout": 1.0}}, "lora.dropout"),
    ("unknown task", {"task": {"name": "squad"}}, "task.name"),
    ("missing data dir", {"task": {"data_dir": "/nonexistent/glue"}}, "task.data_dir"),
    ("missing model dir", {"model": {"name_or_path": "/nonexistent/model"}}, "model.name_or_path"),
    ("target not found", {"lora": {"target_modules": ["query", "FAKE"]}}, "lora.target_modules"),
]


@pytest.mark.parametrize(("case", "change", "key"), BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipes_exit_2_with_one_line_naming_file_and_key(
    case: str,
    change: dict,
    key: str,
    tiny_roberta_dir: Path,
    glue_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recipe = write_recipe(
        tmp_path / "bad.yaml", tiny_roberta_dir, "sst2", glue_dirs["sst2"], tmp_path / "run", **change
    )
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(recipe) in lines[0] and key in lines[0]
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_broken_yaml_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  name_or_path: [unclosed\n")
    code, _, err = run_cli(["train", str(broken)], capsys)
    assert code == 2 and str(broken) in err and "line" in err and "Traceback" not in err
    code, _, err = run_cli(["eval"], capsys)  # nothing trained yet
    assert code == 2 and "RUN_DIR" in err
    code, _, err = run_cli(["merge", str(tmp_path), "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "not a lorakit run directory" in err
    assert run_cli(["frobnicate"], capsys)[0] == 2


def test_import_loralib_and_info(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import RobertaConfig

    config_dir = tmp_path / "roberta-base-config"
    RobertaConfig(
        vocab_size=50265,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=514,
        type_vocab_size=1,
    ).save_pretrained(config_dir)
    recipe = tmp_path / "mnli.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(config_dir)},
                "task": {"name": "mnli"},
                "lora": {"r": 8, "alpha": 16},
            }
        )
    )
    code, out, err = run_cli(["info", str(recipe)], capsys)
    assert code == 0, err
    assert "294,912" in out  # the paper's 0.3M for RoBERTa-base

    out_dir = tmp_path / "imported"
    ckpt = shared_data / "checkpoints" / "roberta_base_lora_mnli.bin"
    code, _, err = run_cli(
        ["import-loralib", str(ckpt), "--recipe", str(recipe), "--out", str(out_dir)], capsys
    )
    assert code == 0, err
    assert (out_dir / "adapter_model.safetensors").is_file() and (out_dir / "recipe.yaml").is_file()
    assert json.loads((out_dir / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_the_command_leaves_with_its_status_its_output_whole_and_exit_handlers_run(tmp_path: Path) -> None:
    """`lorakit` (and `python -m lorakit`) skip the interpreter's teardown: what was printed still arrives
    whole, the exit status is the command's, and handlers others registered with atexit still run."""
    import subprocess
    import sys

    marker = tmp_path / "handler-ran"
    code = (
        "import atexit, pathlib, sys\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('yes'))\n"
        "from lorakit.__main__ import run\n"
        "sys.argv = ['lorakit', *sys.argv[1:]]\n"
        "run()\n"
    )
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # The help's last command is listed, so the buffered output was flushed before the process left.
    assert "Usage:" in done.stdout and "sweep" in done.stdout
    assert marker.read_text() == "yes"
    script = Path(sys.executable).parent / "lorakit"
    for argv in ([str(script)], [sys.executable, "-m", "lorakit"]):
        missing = tmp_path / "missing.yaml"
        done = subprocess.run([*argv, "train", str(missing)], capture_output=True, text=True)
        assert done.returncode == 2
        assert f"{missing}: recipe file not found" in done.stderr
