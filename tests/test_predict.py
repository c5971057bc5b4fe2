"""``lorakit predict`` on one tiny RoBERTa base with real GLUE rows: adapters trained here for SST-2 (2
labels), STS-B (regression) and MRPC (other targets and rank), plus one written by PEFT (3 labels), in
one shuffled input file; every row equals what its adapter gives alone (``lorakit eval``'s predictions,
PEFT's own forward pass), and every kind of bad input is one line with exit status 2 and no output."""

from __future__ import annotations

import json
import random
from pathlib import Path

import peft
import pytest
import torch
from conftest import peft_three_label_adapter, train_glue_run
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lorakit.cli import main
from lorakit.data import subsample
from lorakit.tasks import get_task

EVAL_ROWS = 20
SETUPS = {  # task, data folder, LoRA section
    "sst2": ("sst2", "SST-2", {"r": 4, "alpha": 8}),
    "stsb": ("stsb", "STS-B", {"r": 2, "alpha": 8, "target_modules": ["value"]}),
    "mrpc": ("mrpc", "MRPC", {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value"]}),
}


def _train(root: Path, base: Path, name: str, shared_data: Path) -> Path:
    task, folder, lora = SETUPS[name]
    run = train_glue_run(root / name, base, task, shared_data / "glue" / folder, lora, EVAL_ROWS)
    assert main(["eval", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> dict:
    """Three lorakit runs and one PEFT adapter on one tiny RoBERTa, and the dev rows each was evaluated on."""
    from accelerate.state import AcceleratorState, PartialState

    root = tmp_path_factory.mktemp("predict")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        for name in SETUPS:
            AcceleratorState._reset_state(True)
            PartialState._reset_state()
            runs[name] = _train(root, tiny_roberta_dir, name, shared_data)
    rows = {}
    for name, (task_name, folder, _) in SETUPS.items():
        task = get_task(task_name, str(shared_data / "glue" / folder))
        rows[name] = subsample(task.load("validation"), EVAL_ROWS, 0)  # what eval scored, in its order
    return {
        "root": root,
        "runs": runs,
        "rows": rows,
        "peft": peft_three_label_adapter(root / "peft3", tiny_roberta_dir),
    }


def _inputs(served: dict) -> list[dict]:
    lines = []
    for name, rows in served["rows"].items():
        for i, row in enumerate(rows):
            record = {"adapter": name, "text": row["text_a"]}
            if row["text_b"] is not None:
                record["text_pair"] = row["text_b"]
            lines.append((record, i))
    sst2 = served["rows"]["sst2"]
    lines += [({"adapter": "three", "text": sst2[i]["text_a"]}, i) for i in range(6)]
    random.Random(0).shuffle(lines)
    return lines


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _adapter_args(served: dict) -> list[str]:
    args = [arg for name, run in served["runs"].items() for arg in ("--adapter", f"{name}={run}")]
    return [*args, "--adapter", f"three={served['peft']}"]


def test_a_mixed_file_equals_each_adapter_alone(
    served: dict, tiny_roberta_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _inputs(served)
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record, _ in lines))
    out = tmp_path / "out.jsonl"
    args = ["predict", *_adapter_args(served), "--base", str(tiny_roberta_dir), "--input", str(source)]
    code, _, err = _run([*args, "--output", str(out), "--batch-size", "16"], capsys)
    assert code == 0, err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) == len(lines)

    evaluated = {
        name: [
            json.loads(x) for x in (run / "eval" / "predictions-validation.jsonl").read_text().splitlines()
        ]
        for name, run in served["runs"].items()
    }
    peft_model = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(
            tiny_roberta_dir, num_labels=3, ignore_mismatched_sizes=True
        ),
        served["peft"],
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta_dir)
    for (record, i), result in zip(lines, results, strict=True):
        name = record["adapter"]
        assert result["adapter"] == name
        if name == "three":
            with torch.no_grad():
                encoded = tokenizer(record["text"], return_tensors="pt", truncation=True, max_length=128)
                expected = peft_model(**encoded).logits[0]
            assert len(result["scores"]) == 3 and result["readable"] == f"LABEL_{result['prediction']}"
            assert max(abs(a - b) for a, b in zip(result["scores"], expected.tolist(), strict=True)) <= 1e-5
            continue
        alone = evaluated[name][i]
        if name == "stsb":
            assert len(result["scores"]) == 1 and result["readable"] == result["prediction"]
            assert result["prediction"] == pytest.approx(alone["prediction"], abs=1e-5)
        else:
            assert len(result["scores"]) == 2
            assert (result["prediction"], result["readable"]) == (alone["prediction"], alone["readable"])

    # Standard input and output give the same lines.
    monkey = pytest.MonkeyPatch()
    import io

    monkey.setattr("sys.stdin", io.StringIO(source.read_text()))
    code, stdout, err = _run([*args[:-1], "-", "--batch-size", "16"], capsys)
    monkey.undo()
    assert code == 0, err
    assert [json.loads(x)["prediction"] for x in stdout.splitlines()] == [r["prediction"] for r in results]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"adapter": "nope", "text": "x"}', "unknown adapter 'nope'"),
        ("not json", "not JSON"),
        ('{"adapter": "sst2"}', "missing 'text'"),
        ('["sst2", "x"]', "expected a JSON object"),
    ],
)
def test_a_bad_row_names_its_line_and_writes_nothing(
    served: dict, tmp_path: Path, line: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"adapter": "sst2", "text": "fine"}\n\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    args = [
        "predict",
        "--adapter",
        f"sst2={served['runs']['sst2']}",
        "--input",
        str(source),
        "--output",
        str(out),
    ]
    code, _, err = _run(args, capsys)
    assert code == 2
    assert f"{source}:3" in err and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_adapter_of_another_base_is_refused_before_anything_runs(
    served: dict, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import save_tiny_roberta

    other_base = save_tiny_roberta(tmp_path / "wider", shared_data, hidden_size=48, intermediate_size=96)
    other = _train(tmp_path, other_base, "sst2", shared_data)
    source = tmp_path / "in.jsonl"
    source.write_text('{"adapter": "a", "text": "fine"}\n')
    args = [
        "predict",
        "--adapter",
        f"a={served['runs']['sst2']}",
        "--adapter",
        f"b={other}",
        "--input",
        str(source),
    ]
    code, _, err = _run(args, capsys)
    assert code == 2
    assert f"--adapter b={other}" in err and "hidden_size 48 here, 32 there" in err

    code, _, err = _run(["predict", "--adapter", "b", "--input", str(source)], capsys)
    assert code == 2 and "expected NAME=RUN_DIR" in err
    code, _, err = _run(
        [
            "predict",
            "--adapter",
            f"a={served['runs']['sst2']}",
            "--adapter",
            f"a={other}",
            "--input",
            str(source),
        ],
        capsys,
    )
    assert code == 2 and "given twice" in err
