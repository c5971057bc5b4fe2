"""Generation tasks end to end on a tiny GPT-2 with the real GPT-2 tokenizer and real rows.

E2E: LoRA learns four real MR → reference pairs until greedy or beam decoding reproduces them (BLEU near
100); ``lorakit eval`` writes the official scorer's files and ``lorakit score e2e`` on them prints the same
BLEU; ``lorakit generate`` gives the same text from the run (unmerged) and from its merged model. WikiSQL:
a short run on real dev questions over a database in WikiSQL's layout reports both accuracies.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lorakit.cli import main
from lorakit.errors import UserError
from lorakit.evaluation import _GeneratedNoRepeatNGram
from lorakit.generate import read_inputs
from lorakit.tasks.e2e import E2ETask
from lorakit.tasks.wikisql import WikiSQLTask, build_prompt
from lorakit.tasks.wikisql_sql import sql_to_text

# Random base weights give LoRA on the q/v slices alone too little grip to memorise text in a few dozen
# steps, so the test adapts the MLP and output projections too (the fused-slice path stays covered).
TARGETS = ["c_attn[q,v]", "c_proj", "c_fc"]
STEPS = 60  # the loss reaches 100% token accuracy near step 50 at lr 1e-2 (seed 0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # A width-64 model gains nothing from a second thread, and on a machine whose cores are busy with
    # other work two threads wait on each other: a training step took 1.1 s with two, 0.13 s with one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """A tiny GPT-2 (2 layers, width 64, the full 50257-token vocabulary) with the real tokenizer beside it.

    initializer_range 0.1 (not 0.02): embeddings of that scale let logits of a width-64 model separate
    one token from 50k, so a few dozen steps suffice.
    """
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257, n_embd=64, n_layer=2, n_head=4, n_positions=128, initializer_range=0.1
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2").save_pretrained(out)
    return out


def _short_e2e_rows(shared_data: Path, n: int = 4, max_words: int = 12) -> list[dict[str, str]]:
    """The first ``n`` distinct MRs of the real training set whose reference has at most ``max_words``."""
    rows: list[dict[str, str]] = []
    with open(shared_data / "e2e" / "trainset.csv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if len(row["ref"].split()) <= max_words and all(row["mr"] != r["mr"] for r in rows):
                rows.append({"mr": row["mr"], "ref": row["ref"]})
            if len(rows) == n:
                break
    return rows


def _write_recipe(path: Path, model_dir: Path, task: str, data_dir: Path, out: Path, **train: Any) -> Path:
    recipe = {
        "model": {"name_or_path": str(model_dir)},
        "task": {"name": task, "data_dir": str(data_dir), "max_length": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS},
        "train": {
            "max_steps": STEPS,
            "eval_every": STEPS,  # one evaluation, at the end: each E2E scoring starts Java
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 0,
            "scheduler": "constant",
            "weight_decay": 0.0,
            "label_smoothing": 0.0,
            "log_every": 20,
            **train,
        },
        "generation": {
            "num_beams": 2,
            "length_penalty": 0.9,
            "no_repeat_ngram_size": 4,
            "max_new_tokens": 40,
        },
        "output_dir": str(out),
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path, shared_data: Path) -> Iterator[dict]:
    """Train on four real E2E pairs, evaluate with ``lorakit eval`` and merge; once for the module."""
    from accelerate.state import AcceleratorState, PartialState

    root = tmp_path_factory.mktemp("e2e")
    rows = _short_e2e_rows(shared_data)
    data = root / "data"
    data.mkdir()
    for name in ("trainset.csv", "devset.csv"):  # one reference per MR: the target is learnable
        with open(data / name, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, ["mr", "ref"])
            writer.writeheader()
            writer.writerows(rows)
    run, merged = root / "run", root / "merged"
    recipe = _write_recipe(root / "e2e.yaml", gpt2_dir, "e2e", data, run)
    # Module scope runs before conftest's per-test reset, so the fixture resets and isolates itself.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAKIT_HOME", str(root / "home"))
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        assert main(["train", str(recipe)]) == 0
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        assert main(["eval", str(run)]) == 0
        assert main(["merge", str(run), "--out", str(merged)]) == 0
        yield {"run": run, "merged": merged, "rows": rows, "data": data}


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_lora_learns_the_rows(e2e_run: dict) -> None:
    metrics = json.loads((e2e_run["run"] / "metrics.json").read_text())
    assert metrics["task"] == "e2e" and metrics["main_metric"] == "BLEU"
    assert metrics["best"]["BLEU"] >= 90.0, metrics["best"]
    evaluated = json.loads((e2e_run["run"] / "eval" / "metrics-validation.json").read_text())
    assert set(evaluated) >= {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    # lorakit eval decodes with the saved (best) adapter: the same figure as training reported.
    assert evaluated["BLEU"] == pytest.approx(metrics["best"]["BLEU"])


def test_eval_writes_the_official_scorer_files(e2e_run: dict, capsys: pytest.CaptureFixture[str]) -> None:
    out = e2e_run["run"] / "eval"
    records = [json.loads(line) for line in (out / "predictions-validation.jsonl").read_text().splitlines()]
    predictions = (out / "predictions-validation.txt").read_text(encoding="utf-8")
    references = (out / "references-validation.txt").read_text(encoding="utf-8")
    refs = [" ".join(r["ref"].split()) for r in e2e_run["rows"]]
    # One output a line; references one a line, a blank line between MRs (one reference each here).
    assert predictions == "".join(r["prediction"] + "\n" for r in records)
    assert references == "\n".join(ref + "\n" for ref in refs)
    assert [r["references"] for r in records] == [[ref] for ref in refs]

    code, stdout, err = _run(
        ["score", "e2e", str(out / "predictions-validation.txt"), str(out / "references-validation.txt")],
        capsys,
    )
    assert code == 0, err
    scored = json.loads(stdout)
    evaluated = json.loads((out / "metrics-validation.json").read_text())
    assert 100.0 * scored["BLEU"] == pytest.approx(evaluated["BLEU"], abs=1e-9)
    assert scored["NIST"] == pytest.approx(evaluated["NIST"], abs=1e-9)


def test_generate_unmerged_and_merged_agree(
    e2e_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = e2e_run["rows"]
    lora_form = E2ETask(str(e2e_run["data"])).load("validation")["prompt"][0].removesuffix(" ||")
    inputs = tmp_path / "mrs.txt"
    # The CSV form of each MR, a blank line (skipped), and the first MR again in the LoRA files' form.
    inputs.write_text("\n".join([r["mr"] for r in rows] + ["", lora_form]) + "\n", encoding="utf-8")

    code, unmerged, err = _run(["generate", str(e2e_run["run"]), "--input", str(inputs)], capsys)
    assert code == 0, err
    recipe = str(e2e_run["run"] / "recipe.yaml")
    code, merged, err = _run(
        ["generate", str(e2e_run["merged"]), "--recipe", recipe, "--input", str(inputs)], capsys
    )
    assert code == 0, err
    assert merged == unmerged
    outputs = unmerged.splitlines()
    assert outputs == [" ".join(r["ref"].split()) for r in rows] + [outputs[0]]

    # A literal MR, greedy, on the merged model without a recipe: the task named, decoding overridden.
    literal = rows[1]["mr"]
    args = ["generate", str(e2e_run["merged"]), "--task", "e2e", "--greedy", "--input", literal]
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    assert stdout.splitlines() == [outputs[1]]


def test_generate_errors_are_one_line(
    e2e_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = str(e2e_run["run"])
    bad_mr = tmp_path / "bad.txt"
    bad_mr.write_text(
        "name[The Mill], area[riverside]\nthis is not a meaning representation\n", encoding="utf-8"
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("name[Café Rouge]\n".encode("latin-1"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    cases = [
        (["generate", "--input", "x"], "no run yet"),  # no RUN_DIR and no run recorded in this test's home
        (["generate", str(tmp_path / "missing"), "--input", "x"], "not found"),
        (["generate", str(tmp_path), "--input", "x"], "neither a lorakit run"),
        (["generate", run, "--input", str(bad_mr)], f"{bad_mr}:2: not a valid e2e input"),
        (["generate", run, "--input", str(latin1)], "not UTF-8"),
        (["generate", run, "--input", str(blank)], "no inputs"),
        (["generate", run, "--input", str(tmp_path / "inputs.txt")], "input file not found"),
        (["generate", run, "--input", "name[X]", "--greedy", "--num-beams", "3"], "--greedy"),
        (["generate", run, "--input", "name[X]", "--task", "mnli"], "unknown task"),
        (["generate", run, "--input", "name[X]", "--recipe", run + "/recipe.yaml"], "--recipe is for merged"),
    ]
    for args, message in cases:
        code, _, err = _run(args, capsys)
        assert code == 2, (args, err)
        assert message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_e2e_inputs_in_either_form_give_the_task_prompt(shared_data: Path) -> None:
    # The first dev MR as the original CSV and the LoRA files write it: one prompt, the task's own.
    task_prompt = E2ETask(str(shared_data / "e2e")).load("validation")["prompt"][0]
    with open(shared_data / "e2e" / "devset.csv", encoding="utf-8", newline="") as f:
        csv_mr = next(csv.DictReader(f))["mr"]
    lora_line = (shared_data / "e2e" / "valid.txt").read_text(encoding="utf-8").splitlines()[0]
    e2e_prompt = E2ETask().prompt_from_input
    assert e2e_prompt(csv_mr) == e2e_prompt(lora_line) == e2e_prompt(lora_line.split("||")[0]) == task_prompt
    with pytest.raises(ValueError):
        e2e_prompt("a cheap place by the river")


def test_wikisql_input_needs_question_and_header() -> None:
    line = json.dumps({"question": "Who wears  number 3?", "header": ["Player", "No."]})
    wikisql_prompt = WikiSQLTask().prompt_from_input
    assert wikisql_prompt(line) == build_prompt("Who wears number 3?", ["Player", "No."])
    for bad in ("Who wears number 3?", '{"question": "Who?"}', '{"question": "Who?", "header": []}'):
        with pytest.raises(ValueError, match="header"):
            wikisql_prompt(bad)


def test_literal_inputs_and_files(tmp_path: Path) -> None:
    assert [i.text for i in read_inputs("  name : Alimentum ")] == ["name : Alimentum"]
    long_text = json.dumps({"question": "q " * 200, "header": ["a"]})  # too long to be a file name
    assert [i.text for i in read_inputs(long_text)] == [long_text]
    path = tmp_path / "in.jsonl"
    path.write_text('\ufeff{"a": 1}\n\n{"b": 2}\n', encoding="utf-8")
    assert [(i.text, i.where) for i in read_inputs(str(path))] == [
        ('{"a": 1}', f"{path}:1"),
        ('{"b": 2}', f"{path}:3"),
    ]
    with pytest.raises(UserError, match="directory"):
        read_inputs(str(tmp_path))


def test_no_repeat_ngrams_ignore_the_prompt() -> None:
    # The LoRA authors' decoder bans n-grams of the generated text only; transformers' own processor
    # would also ban copying a 4-gram of the prompt (an E2E name, a WikiSQL column).
    ban = _GeneratedNoRepeatNGram(4, prompt_width=4)
    copying = torch.tensor([[5, 6, 7, 8, 5, 6, 7]])  # prompt 5 6 7 8, generated 5 6 7: 8 stays allowed
    assert torch.isfinite(ban(copying, torch.zeros(1, 10))).all()
    repeating = torch.tensor([[9, 9, 9, 9, 1, 2, 3, 4, 1, 2, 3]])  # generated 1 2 3 4 1 2 3: 4 is banned
    scores = ban(repeating, torch.zeros(1, 10))
    assert torch.isinf(scores[0, 4]) and torch.isfinite(scores[0, torch.arange(10) != 4]).all()


# -- WikiSQL -------------------------------------------------------------------------------------------


def _write_wikisql(
    folder: Path, shared_data: Path, n: int = 4
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The first ``n`` real dev questions as both train and dev, with placeholder headers (``col0``...)
    and a ``dev.db`` in WikiSQL's layout (``table_<id>(col0 text, ...)``, text lowercased) holding, for
    each question, a row that its gold query selects. Returns the questions and the headers by table."""
    with open(shared_data / "wikisql" / "dev.jsonl", encoding="utf-8") as f:
        questions = [json.loads(next(f)) for _ in range(n)]
    headers: dict[str, list[str]] = {}
    for q in questions:
        sql = q["sql"]
        width = (
            max([sql["sel"], *(c for c, _, _ in sql["conds"]), len(headers.get(q["table_id"], [])) - 1]) + 1
        )
        headers[q["table_id"]] = [f"col{i}" for i in range(width)]
    tables = [{"id": t, "header": h, "types": ["text"] * len(h)} for t, h in headers.items()]
    for stem in ("train", "dev"):
        (folder / f"{stem}.jsonl").write_text(
            "".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8"
        )
        (folder / f"{stem}.tables.jsonl").write_text(
            "".join(json.dumps(t) + "\n" for t in tables), encoding="utf-8"
        )
    conn = sqlite3.connect(folder / "dev.db")
    for table_id, header in headers.items():
        columns = ", ".join(f"{name} text" for name in header)
        conn.execute(f"CREATE TABLE table_{table_id.replace('-', '_')} ({columns})")
    for i, q in enumerate(questions):
        cells = ["x"] * len(headers[q["table_id"]])
        for col, _, value in q["sql"]["conds"]:
            cells[col] = str(value).lower()
        cells[q["sql"]["sel"]] = f"answer {i}"
        name = "table_" + q["table_id"].replace("-", "_")
        conn.execute(f"INSERT INTO {name} VALUES ({', '.join('?' * len(cells))})", cells)
    conn.commit()
    conn.close()
    return questions, headers


def _wikisql_run(
    gpt2_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], steps: int
) -> tuple[Path, list[dict], dict[str, list[str]]]:
    """A WikiSQL run of ``steps`` steps on two real dev questions; the run, the questions, their headers."""
    data = tmp_path / "wikisql"
    data.mkdir()
    questions, headers = _write_wikisql(data, shared_data, n=2)
    run = tmp_path / "run"
    recipe = _write_recipe(
        tmp_path / "wikisql.yaml", gpt2_dir, "wikisql", data, run, max_steps=steps, eval_every=steps
    )
    code, _, err = _run(["train", str(recipe)], capsys)
    assert code == 0, err
    return run, questions, headers


def test_wikisql_end_to_end(
    gpt2_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two questions: their queries are learnt in 40 steps (four take over 60).
    run, questions, headers = _wikisql_run(gpt2_dir, shared_data, tmp_path, capsys, steps=40)
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert set(final) >= {"logical_form_accuracy", "execution_accuracy", "parse_rate"}
    assert final["logical_form_accuracy"] == 100.0 and final["execution_accuracy"] == 100.0, final

    question = questions[1]
    header = headers[question["table_id"]]
    line = json.dumps({"question": question["question"], "header": header})
    code, stdout, err = _run(["generate", str(run), "--input", line], capsys)
    assert code == 0, err
    assert stdout.splitlines() == [sql_to_text(question["sql"], header)]


def test_predict_serves_an_e2e_and_a_wikisql_adapter_on_one_gpt2(
    e2e_run: dict, gpt2_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, questions, headers = _wikisql_run(gpt2_dir, shared_data, tmp_path, capsys, steps=4)
    sql_inputs = [
        json.dumps({"question": q["question"], "header": headers[q["table_id"]]}) for q in questions
    ]
    mrs = [r["mr"] for r in e2e_run["rows"]]
    expected = {}
    for name, path, texts in (("e2e", e2e_run["run"], mrs), ("sql", run, sql_inputs)):
        listing = tmp_path / f"{name}.txt"
        listing.write_text("\n".join(texts) + "\n")
        code, stdout, err = _run(["generate", str(path), "--input", str(listing)], capsys)
        assert code == 0, err
        expected[name] = stdout.splitlines()

    rows = [("sql", 1), ("e2e", 0), ("e2e", 2), ("sql", 0), ("e2e", 1), ("e2e", 3)]
    source = tmp_path / "in.jsonl"
    texts = {"e2e": mrs, "sql": sql_inputs}
    source.write_text("".join(json.dumps({"adapter": n, "text": texts[n][i]}) + "\n" for n, i in rows))
    args = [
        "predict",
        "--adapter",
        f"e2e={e2e_run['run']}",
        "--adapter",
        f"sql={run}",
        "--input",
        str(source),
    ]
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    results = [json.loads(line) for line in stdout.splitlines()]
    assert [r["adapter"] for r in results] == [n for n, _ in rows]
    assert [r["prediction"] for r in results] == [expected[n][i] for n, i in rows]
    assert expected["e2e"] == [" ".join(r["ref"].split()) for r in e2e_run["rows"]]  # it learnt them

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"adapter": "sql", "text": "no header"}) + "\n")
    code, _, err = _run([*args[:-1], str(bad)], capsys)
    assert code == 2 and f"{bad}:1" in err and "not a valid wikisql input" in err
