"""The user's own labelled data (task.type classification | regression | multilabel): real GLUE and E2E rows
rewritten by the tests into the formats users bring, trained through `lorakit train`, read back by eval,
merge and predict; and every kind of bad data as one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA

from lorakit.cli import main


def _sst2(split: str, n: int) -> list[tuple[str, int]]:
    """The first ``n`` (sentence, label) rows of a GLUE SST-2 file."""
    lines = (SHARED_DATA / "glue" / "SST-2" / f"{'dev' if split == 'dev' else 'train'}.tsv").read_text()
    rows = [line.split("\t") for line in lines.splitlines()[1 : n + 1]]
    return [(sentence, int(label)) for sentence, label in rows]


def _stsb(split: str, n: int) -> list[dict]:
    lines = (SHARED_DATA / "glue" / "STS-B" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [dict(zip(header, line.split("\t"), strict=False)) for line in lines[1 : n + 1]]
    return [{"first": r["sentence1"], "second": r["sentence2"], "score": float(r["score"])} for r in rows]


def _e2e_multilabel(name: str, n: int) -> list[dict]:
    """E2E references labelled with the slots their meaning representation holds: a real multilabel set."""
    out = []
    with open(SHARED_DATA / "e2e" / name, encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i >= n:
                break
            slots = [part.split("[")[0].strip() for part in row["mr"].split("],") if "[" in part]
            out.append({"text": row["ref"], "slots": slots})
    return out


def _write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _recipe(tmp_path: Path, model: Path, task: dict, name: str = "own", **train: object) -> Path:
    recipe = {
        "model": {"name_or_path": str(model)},
        "task": {"max_length": 48, **task},
        "lora": {"r": 4, "alpha": 8},
        "train": {
            "max_steps": 3,
            "batch_size": 8,
            "eval_batch_size": 16,
            "lr": 5e-3,
            "log_every": 1,
            **train,
        },
        "output_dir": str(tmp_path / "runs" / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(recipe: Path) -> Path:
    assert main(["train", str(recipe)]) == 0
    return Path(yaml.safe_load(recipe.read_text())["output_dir"])


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture
def sst2_csv(tmp_path: Path) -> tuple[Path, Path]:
    """SST-2 rows as a user's CSV: their own column names, labels as words."""
    names = ("negative", "positive")
    train = _write_csv(
        tmp_path / "train.csv", ["review", "sentiment"], [[s, names[y]] for s, y in _sst2("train", 64)]
    )
    dev = _write_csv(
        tmp_path / "dev.csv", ["review", "sentiment"], [[s, names[y]] for s, y in _sst2("dev", 24)]
    )
    return train, dev


def test_a_csv_with_its_own_columns_and_word_labels_trains_and_every_command_prints_the_names(
    tmp_path: Path, tiny_roberta_dir: Path, sst2_csv: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train, dev = sst2_csv
    task = {
        "type": "classification",
        "train_file": str(train),
        "validation_file": str(dev),
        "text_column": "review",
        "label_column": "sentiment",
        "metric": "macro_f1",
    }
    run = _train(_recipe(tmp_path, tiny_roberta_dir, task))
    metrics = _metrics(run)
    assert metrics["main_metric"] == "macro_f1"
    assert set(metrics["final"]) >= {"accuracy", "macro_f1", "mcc"}
    assert metrics["data"]["rows"] == {"train": 64, "validation": 24}
    saved = yaml.safe_load((run / "recipe.yaml").read_text())["task"]
    assert saved["labels"] == ["negative", "positive"]  # read from train, written for eval/merge/predict
    assert "name" not in saved and Path(saved["train_file"]).is_absolute()
    predictions = [json.loads(line) for line in (run / "eval" / "predictions-validation.jsonl").open()]
    assert {p["readable"] for p in predictions} <= {"negative", "positive"}
    assert [p["label"] for p in predictions] == [y for _, y in _sst2("dev", 24)]

    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    rows = _write_jsonl(tmp_path / "in.jsonl", [{"adapter": "mine", "text": "a gorgeous, witty movie"}])
    capsys.readouterr()
    assert main(["predict", "--adapter", f"mine={run}", "--input", str(rows)]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert out["readable"] == ["negative", "positive"][out["prediction"]]


def test_user_sst2_rows_train_the_same_adapter_as_the_built_in_task(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path
) -> None:
    """The same rows, labels in the same order: identical tokens, batches and steps, so identical adapters."""
    from lorakit.data import subsample
    from lorakit.tasks import get_task

    task = get_task("sst2", str(shared_data / "glue" / "SST-2"))
    train_rows = subsample(task.load("train"), 96, 0)
    dev_rows = subsample(task.load("validation"), 32, 0)
    names = ("negative", "positive")
    for split, rows in (("train", train_rows), ("dev", dev_rows)):
        _write_csv(
            tmp_path / f"{split}.csv", ["sentence", "label"], [[r["text_a"], names[r["label"]]] for r in rows]
        )
    builtin = _train(
        _recipe(
            tmp_path,
            tiny_roberta_dir,
            {
                "name": "sst2",
                "data_dir": str(shared_data / "glue" / "SST-2"),
                "max_train_samples": 96,
                "max_eval_samples": 32,
            },
            name="builtin",
        )
    )
    own = _train(
        _recipe(
            tmp_path,
            tiny_roberta_dir,
            {
                "type": "classification",
                "train_file": str(tmp_path / "train.csv"),
                "validation_file": str(tmp_path / "dev.csv"),
                "text_column": "sentence",
            },
            name="own",
        )
    )
    from safetensors.torch import load_file

    a, b = load_file(builtin / "adapter_model.safetensors"), load_file(own / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(builtin)["best"]["accuracy"] == _metrics(own)["best"]["accuracy"]


def test_tsv_and_jsonl_pairs_and_a_held_out_validation(tmp_path: Path, tiny_roberta_dir: Path) -> None:
    tsv = _write_csv(tmp_path / "train.tsv", ["text", "label"], [[s, y] for s, y in _sst2("train", 50)], "\t")
    run = _train(
        _recipe(tmp_path, tiny_roberta_dir, {"type": "classification", "train_file": str(tsv)}, "tsv")
    )
    metrics = _metrics(run)
    assert metrics["data"]["rows"] == {"train": 45, "validation": 5}  # 10% held out, seeded
    assert yaml.safe_load((run / "recipe.yaml").read_text())["task"]["labels"] == ["0", "1"]

    # MRPC pairs as JSON lines: text and text_pair encoded as a pair, never joined.
    lines = (SHARED_DATA / "glue" / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:41]
    pairs = [line.split("\t") for line in lines]
    rows = [{"a": p[3], "b": p[4], "same": ["no", "yes"][int(p[0])]} for p in pairs]
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    task = {
        "type": "classification",
        "train_file": str(data),
        "text_column": "a",
        "text_pair_column": "b",
        "label_column": "same",
    }
    recipe = _recipe(tmp_path, tiny_roberta_dir, task, "pairs")
    from lorakit.data.loaders import train_loader
    from lorakit.models import load_tokenizer
    from lorakit.recipe import load_recipe
    from lorakit.tasks import build_task

    loaded = load_recipe(recipe)
    tokenizer = load_tokenizer(loaded)
    loader = train_loader(loaded, build_task(loaded.task), tokenizer)
    held = build_task(loaded.task).load("train")  # the rows left after the held-out tenth, in file order
    expected = tokenizer(held[0]["text_a"], held[0]["text_b"], truncation="longest_first", max_length=48)
    assert loader.dataset[0]["input_ids"] == expected["input_ids"]
    assert held[0]["label"] == ["no", "yes"].index(
        next(r["same"] for r in rows if r["a"] == held[0]["text_a"])
    )
    run = _train(recipe)
    assert yaml.safe_load((run / "recipe.yaml").read_text())["task"]["labels"] == ["no", "yes"]


def test_parquet_regression_reports_pearson_spearman_mse(tmp_path: Path, tiny_roberta_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, n in (("train", 48), ("dev", 24)):
        pq.write_table(pa.Table.from_pylist(_stsb(split, n)), tmp_path / f"{split}.parquet")
    task = {
        "type": "regression",
        "train_file": str(tmp_path / "train.parquet"),
        "validation_file": str(tmp_path / "dev.parquet"),
        "text_column": "first",
        "text_pair_column": "second",
        "label_column": "score",
    }
    run = _train(_recipe(tmp_path, tiny_roberta_dir, task, "reg"))
    metrics = _metrics(run)
    assert metrics["main_metric"] == "pearson"
    assert set(metrics["final"]) >= {"pearson", "spearman", "mse"}
    refs = [r["score"] for r in _stsb("dev", 24)]
    preds = [
        json.loads(line)["prediction"] for line in (run / "eval" / "predictions-validation.jsonl").open()
    ]
    mse = sum((p - r) ** 2 for p, r in zip(preds, refs, strict=True)) / len(refs)
    assert metrics["final"]["mse"] == pytest.approx(mse, rel=1e-4)


def test_multilabel_from_lists_and_from_separated_text(
    tmp_path: Path, tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train = _write_jsonl(tmp_path / "train.jsonl", _e2e_multilabel("trainset.csv", 48))
    dev_rows = _e2e_multilabel("devset.csv", 16)
    dev = _write_csv(
        tmp_path / "dev.csv", ["text", "slots"], [[r["text"], ";".join(r["slots"])] for r in dev_rows]
    )
    # The CSV's cells separate names with ";": set for the JSONL's lists too, which ignore it.
    task = {
        "type": "multilabel",
        "train_file": str(train),
        "validation_file": str(dev),
        "label_column": "slots",
        "label_separator": ";",
    }
    run = _train(_recipe(tmp_path, tiny_roberta_dir, task, "multi"))
    metrics = _metrics(run)
    labels = yaml.safe_load((run / "recipe.yaml").read_text())["task"]["labels"]
    assert labels == sorted({s for r in _e2e_multilabel("trainset.csv", 48) for s in r["slots"]})
    assert set(metrics["final"]) >= {"micro_f1", "macro_f1", "exact_match"}
    predictions = [json.loads(line) for line in (run / "eval" / "predictions-validation.jsonl").open()]
    for p, row in zip(predictions, dev_rows, strict=True):
        assert len(p["prediction"]) == len(labels)  # multi-hot
        assert p["readable"] == [name for name, on in zip(labels, p["prediction"], strict=True) if on]
        assert p["label"] == [float(name in row["slots"]) for name in labels]
    # A classifier of the user's beside it on the same base: one mixed batch, each row its own head.
    sst2 = _write_csv(tmp_path / "sst2.csv", ["text", "label"], [[s, y] for s, y in _sst2("train", 20)])
    other = _train(
        _recipe(tmp_path, tiny_roberta_dir, {"type": "classification", "train_file": str(sst2)}, "c")
    )
    texts = [r["text"] for r in dev_rows[:3]]
    rows = _write_jsonl(tmp_path / "in.jsonl", [{"adapter": a, "text": t} for t in texts for a in ("m", "c")])
    capsys.readouterr()
    assert main(["predict", "--adapter", f"m={run}", "--adapter", f"c={other}", "--input", str(rows)]) == 0
    outs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [o["adapter"] for o in outs] == ["m", "c"] * 3
    for out in outs[::2]:
        assert out["readable"] == [n for n, s in zip(labels, out["scores"], strict=True) if s > 0]
    for out in outs[1::2]:
        assert len(out["scores"]) == 2 and out["readable"] == ["0", "1"][out["prediction"]]
    # The same rows over HTTP: `lorakit serve`'s app answers with predict's rows.
    from fastapi.testclient import TestClient

    from lorakit.predict import Predictor, read_sources
    from lorakit.serve.app import Service, create_app
    from lorakit.serve.batcher import Batcher

    predictor = Predictor(list(read_sources([f"m={run}", f"c={other}"], None, None).values()))
    with TestClient(create_app(Service(predictor, Batcher(predictor, 64, 5.0, 60.0)))) as client:
        for name, expected in (("m", outs[0::2]), ("c", outs[1::2])):
            reply = client.post("/v1/predict", json={"adapter": name, "inputs": [{"text": t} for t in texts]})
            assert reply.status_code == 200, reply.text
            got = reply.json()["outputs"]
            assert [o["readable"] for o in got] == [o["readable"] for o in expected]
            assert [o["prediction"] for o in got] == [o["prediction"] for o in expected]


def test_a_local_dataset_folder_and_its_split_names(tmp_path: Path, tiny_roberta_dir: Path) -> None:
    import datasets

    rows = _sst2("train", 60)
    folder = tmp_path / "my-dataset"
    # The hub's convention: labels as a ClassLabel, ids in the column and names in the features.
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )

    def part(chunk: list[tuple[str, int]]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"text": [s for s, _ in chunk], "label": [y for _, y in chunk]}, features
        )

    datasets.DatasetDict({"learn": part(rows[:40]), "check": part(rows[40:])}).save_to_disk(str(folder))
    task = {
        "type": "classification",
        "dataset": str(folder),
        "splits": {"train": "learn", "validation": "check"},
    }
    run = _train(_recipe(tmp_path, tiny_roberta_dir, task, "folder"))
    assert _metrics(run)["data"]["rows"] == {"train": 40, "validation": 20}
    assert yaml.safe_load((run / "recipe.yaml").read_text())["task"]["labels"] == ["neg", "pos"]
    predictions = [json.loads(line) for line in (run / "eval" / "predictions-validation.jsonl").open()]
    assert [p["label"] for p in predictions] == [y for _, y in rows[40:]]
    assert all(p["readable"] == ["neg", "pos"][p["prediction"]] for p in predictions)
    # A folder of data files, loaded by datasets' own builders (train.csv, validation.csv by their names).
    files = tmp_path / "csv-dataset"
    files.mkdir()
    _write_csv(files / "train.csv", ["text", "label"], [[s, y] for s, y in rows[:40]])
    _write_csv(files / "validation.csv", ["text", "label"], [[s, y] for s, y in rows[40:]])
    run = _train(
        _recipe(tmp_path, tiny_roberta_dir, {"type": "classification", "dataset": str(files)}, "files")
    )
    assert _metrics(run)["data"]["rows"] == {"train": 40, "validation": 20}


def test_eval_on_a_test_file_and_after_the_data_moved(
    tmp_path: Path, tiny_roberta_dir: Path, sst2_csv: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    train, dev = sst2_csv
    task = {
        "type": "classification",
        "train_file": str(train),
        "validation_file": str(dev),
        "test_file": str(dev),
        "text_column": "review",
        "label_column": "sentiment",
    }
    run = _train(_recipe(tmp_path, tiny_roberta_dir, task, "withtest"))
    assert main(["eval", str(run), "--split", "test"]) == 0
    tested = json.loads((run / "eval" / "metrics-test.json").read_text())
    assert tested["accuracy"] == _metrics(run)["best"]["accuracy"]  # the same rows as validation
    # The data moves: merging needs none of it; eval says which file is missing, and --set finds it.
    moved = dev.rename(dev.with_name("moved.csv"))
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "task.validation_file" in err and str(dev) in err and len(err.splitlines()) == 1
    assert main(["eval", str(run), "--set", f"task.validation_file={moved}"]) == 0
    again = json.loads((run / "eval" / "metrics-validation.json").read_text())
    assert again["accuracy"] == _metrics(run)["best"]["accuracy"]


def _bad(tmp_path: Path, model: Path, task: dict, capsys: pytest.CaptureFixture[str], name: str) -> str:
    recipe = _recipe(tmp_path, model, task, name)
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs" / name).exists()  # nothing written
    return err


def test_bad_data_is_one_line_exit_2_and_nothing_written(
    tmp_path: Path, tiny_roberta_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write_csv(tmp_path / "good.csv", ["text", "label"], [[s, y] for s, y in _sst2("train", 20)])
    cls = {"type": "classification"}
    err = _bad(
        tmp_path, tiny_roberta_dir, {**cls, "train_file": str(tmp_path / "nope.csv")}, capsys, "missing"
    )
    assert "task.train_file" in err and "file not found" in err
    xlsx = tmp_path / "data.xlsx"
    xlsx.write_text("x")
    err = _bad(tmp_path, tiny_roberta_dir, {**cls, "train_file": str(xlsx)}, capsys, "extension")
    assert "task.train_file" in err and ".xlsx" in err
    err = _bad(
        tmp_path, tiny_roberta_dir, {**cls, "train_file": str(good), "text_column": "review"}, capsys, "col"
    )
    assert "'review'" in err and "task.text_column" in err and "text, label" in err
    header_only = _write_csv(tmp_path / "empty.csv", ["text", "label"], [])
    err = _bad(
        tmp_path,
        tiny_roberta_dir,
        {**cls, "train_file": str(good), "validation_file": str(header_only)},
        capsys,
        "empty",
    )
    assert "no rows" in err and "empty.csv" in err
    unseen = _write_csv(tmp_path / "unseen.csv", ["text", "label"], [["fine", 0], ["odd", 7]])
    err = _bad(
        tmp_path,
        tiny_roberta_dir,
        {**cls, "train_file": str(good), "validation_file": str(unseen)},
        capsys,
        "unseen",
    )
    assert f"{unseen}:3" in err and "'7'" in err and "never occurs in the train data" in err
    err = _bad(
        tmp_path, tiny_roberta_dir, {**cls, "train_file": str(good), "labels": ["0"]}, capsys, "outside"
    )
    assert "'1'" in err and "task.labels" in err and "good.csv:" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": 0}\n{"text": "oops", "label": \n')
    err = _bad(tmp_path, tiny_roberta_dir, {**cls, "train_file": str(broken)}, capsys, "json")
    assert f"{broken}:2" in err and "invalid JSON" in err
    words = _write_csv(tmp_path / "words.csv", ["text", "label"], [["a", "1.5"], ["b", "high"]])
    err = _bad(
        tmp_path, tiny_roberta_dir, {"type": "regression", "train_file": str(words)}, capsys, "regress"
    )
    assert f"{words}:3" in err and "'high'" in err and "not a number" in err


@pytest.mark.parametrize(
    ("task", "key", "message"),
    [
        ({"type": "classification"}, "task.train_file", "train_file or dataset"),
        (
            {"type": "classification", "train_file": "a.csv", "name": "sst2"},
            "task.name",
            "leave task.name out",
        ),
        ({"name": "sst2", "text_column": "review"}, "task.text_column", "set task.type"),
        ({"type": "regression", "train_file": "a.csv", "labels": ["x"]}, "task.labels", "no classes"),
        (
            {"type": "generation", "train_file": "a.jsonl", "label_column": "y"},
            "task.label_column",
            "not used",
        ),
        ({"type": "classification", "train_file": "a.csv", "labels": ["x", "x"]}, "task.labels", "twice"),
        ({"type": "nonsense", "train_file": "a.csv"}, "task.type", "must be one of"),
    ],
)
def test_recipe_keys_of_own_data_are_checked_where_they_are_written(
    tmp_path: Path, task: dict, key: str, message: str
) -> None:
    from lorakit.errors import UserError
    from lorakit.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"task": task}))
    with pytest.raises(UserError) as raised:
        load_recipe(path)
    assert f"{path}: {key}" in str(raised.value) and message in str(raised.value)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "configs" / "examples").glob("*.yaml"))
)
def test_every_example_recipe_reads_its_shipped_rows(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples' data ships in the repository: each recipe's rows load with their labels, offline."""
    from lorakit.recipe import load_recipe
    from lorakit.tasks import build_task

    monkeypatch.chdir(path.parents[2])  # recipes name their data relative to the repository root
    recipe = load_recipe(path)
    assert recipe.task.is_own_data
    task = build_task(recipe.task)
    for split in ("train", "validation"):
        assert len(task.load(split)) > 0
    if task.kind in ("classification", "multilabel"):
        assert task.label_names and task.num_labels == len(task.label_names)
