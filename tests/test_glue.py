"""GLUE tasks: local loaders on the real GLUE files in shared/data, hub row mapping, metrics, errors."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import SHARED_DATA

from lorakit.errors import UserError
from lorakit.tasks import get_task
from lorakit.tasks.glue import GlueTask

GLUE = SHARED_DATA / "glue"  # real files; a missing folder fails the tests that read it (never a skip)


# task, folder, split, rows, first text_a, first text_b, first label, label counts (from data/README.md)
REAL_FILES = [
    (
        "cola",
        "CoLA",
        "validation",
        1043,
        "The sailors rode the breeze clear of the rocks.",
        None,
        1,
        {1: 721, 0: 322},
    ),
    (
        "cola",
        "CoLA",
        "train",
        8551,
        "Our friends won't buy this analysis, let alone the next one we propose.",
        None,
        1,
        {1: 6023, 0: 2528},
    ),
    (
        "sst2",
        "SST-2",
        "validation",
        872,
        "it 's a charming and often affecting journey . ",
        None,
        1,
        {1: 444, 0: 428},
    ),
    (
        "sst2",
        "SST-2",
        "train",
        67349,
        "hide new secretions from the parental units ",
        None,
        0,
        {1: 37569, 0: 29780},
    ),
    (
        "mrpc",
        "MRPC",
        "validation",
        408,
        "He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
        '"The foodservice pie business does not fit our long-term growth strategy.',
        1,
        {1: 279, 0: 129},
    ),
    (
        "mrpc",
        "MRPC",
        "train",
        3668,
        'Amrozi accused his brother, whom he called "the witness", of deliberately distorting his evidence.',
        'Referring to him as only "the witness", Amrozi accused his brother of deliberately distorting '
        "his evidence.",
        1,
        {1: 2474, 0: 1194},
    ),
    (
        "stsb",
        "STS-B",
        "validation",
        1500,
        "A man with a hard hat is dancing.",
        "A man wearing a hard hat is dancing.",
        5.0,
        None,
    ),
    ("stsb", "STS-B", "train", 5749, "A plane is taking off.", "An air plane is taking off.", 5.0, None),
    (
        "qnli",
        "QNLI",
        "validation",
        5463,
        "What came into force after the new constitution was herald?",
        "As of that day, the new constitution heralding the Second Republic came into force.",
        0,
        {0: 2702, 1: 2761},
    ),
    (
        "rte",
        "RTE",
        "validation",
        277,
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.",
        "Christopher Reeve had an accident.",
        1,
        {0: 146, 1: 131},
    ),
    (
        "rte",
        "RTE",
        "train",
        2490,
        "No Weapons of Mass Destruction Found in Iraq Yet.",
        "Weapons of Mass Destruction Found in Iraq.",
        1,
        {0: 1249, 1: 1241},
    ),
    (
        "mnli",
        "MNLI",
        "validation_matched",
        9815,
        "The new rights are nice enough",
        "Everyone really likes the newest benefits ",
        1,
        {0: 3479, 1: 3123, 2: 3213},  # entailment, neutral, contradiction in the hub's id order
    ),
]


@pytest.mark.parametrize(
    ("name", "folder", "split", "rows", "text_a", "text_b", "label", "counts"),
    REAL_FILES,
    ids=[f"{r[0]}-{r[2]}" for r in REAL_FILES],
)
def test_real_glue_files(name, folder, split, rows, text_a, text_b, label, counts) -> None:
    ds = GlueTask(name, str(GLUE / folder)).load(split)
    assert len(ds) == rows
    first = ds[0]
    assert (first["text_a"], first["text_b"], first["label"], first["idx"]) == (text_a, text_b, label, 0)
    assert ds["idx"][-1] == rows - 1
    if counts is not None:
        assert Counter(ds["label"]) == counts
    if text_b is None:
        assert set(ds["text_b"]) == {None}


def test_features_are_explicit() -> None:
    cola = GlueTask("cola", str(GLUE / "CoLA")).load("validation")
    assert cola.features["text_b"] == datasets.Value("string")  # typed although every value is None
    assert cola.features["label"] == datasets.Value("int64")
    assert cola.features["idx"] == datasets.Value("int32")
    stsb = GlueTask("stsb", str(GLUE / "STS-B")).load("validation")
    assert stsb.features["label"] == datasets.Value("float32")


def test_file_quirks() -> None:
    mrpc = GlueTask("mrpc", str(GLUE / "MRPC")).load("validation")
    # The BOM is gone (the header was found), and bare quotes stay in the text.
    assert not any("\ufeff" in t for t in [*mrpc["text_a"], *mrpc["text_b"]])
    assert sum(t.count('"') for t in mrpc["text_b"]) > 0
    # CoLA has no header: its first line is a data row.
    cola = GlueTask("cola", str(GLUE / "CoLA")).load("validation")
    assert cola[-1]["text_a"]  # the last row, with no newline after it, is read too
    # STS-B writes scores both as 5.000 and as 2.
    stsb = GlueTask("stsb", str(GLUE / "STS-B")).load("validation")
    labels = np.asarray(stsb["label"])
    assert labels.min() == 0.0 and labels.max() == 5.0
    assert labels.mean() == pytest.approx(2.364, abs=1e-3)


def test_glue_root_as_data_dir() -> None:
    ds = GlueTask("rte", str(GLUE)).load("validation")
    assert len(ds) == 277


def write(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return path


QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"


def test_qqp_official_layout_skips_broken_rows(tmp_path: Path) -> None:
    write(
        tmp_path / "train.tsv",
        [
            QQP_HEADER,
            '201359\t303345\t303346\tWhy are "AI" researchers so optimistic?\tWhy is AI research hard?\t0',
            # One question broken over two lines by an embedded newline, as in GLUE's QQP train.tsv.
            "263843\t69383\t380476\tWas Muhammad a real",
            '"\tWas Muhammad a real historical figure? What is the evidence for his existence?\t0',
            "172974\t266948\t175089\tHow do I learn Python?\tWhat is the best way to learn Python?\t1",
            "172975\t266949\t175090\tA row without a label\tStill no label\t",
        ],
    )
    ds = GlueTask("qqp", str(tmp_path)).load("train")
    assert ds["text_a"] == ['Why are "AI" researchers so optimistic?', "How do I learn Python?"]
    assert ds["text_b"] == ["Why is AI research hard?", "What is the best way to learn Python?"]
    assert ds["label"] == [0, 1]
    assert ds["idx"] == [0, 3]  # numbered by file row, as the hub's loader numbers them


def test_malformed_rows_are_errors_outside_qqp(tmp_path: Path) -> None:
    path = write(tmp_path / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tonly one sentence"])
    with pytest.raises(UserError, match=r"dev\.tsv:2"):
        GlueTask("rte", str(tmp_path)).load("validation")
    write(path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(UserError, match="bad label 'maybe'"):
        GlueTask("rte", str(tmp_path)).load("validation")


MNLI_DEV_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
)
MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
    "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)


def mnli_row(i: int, premise: str, hypothesis: str, labels: list[str]) -> str:
    parses = ["( a b )", "( c d )", "(ROOT (S a b))", "(ROOT (S c d))"]
    return "\t".join([str(i), "31193", f"31193{i}n", "government", *parses, premise, hypothesis, *labels])


def test_mnli_official_tsv_layout(tmp_path: Path) -> None:
    write(
        tmp_path / "dev_mismatched.tsv",
        [
            MNLI_DEV_HEADER,
            mnli_row(0, 'He said "yes".', "He agreed.", ["entailment"] * 5 + ["entailment"]),
            mnli_row(
                1, "It rained.", "It was dry.", ["contradiction", "neutral", "", "", "", "contradiction"]
            ),
            mnli_row(2, "A cat sat.", "A dog sat.", ["neutral"] * 6),
        ],
    )
    write(
        tmp_path / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            mnli_row(0, "Conceptually cream skimming.", "Cream is skimmed.", ["neutral"] * 2),
        ],
    )
    task = GlueTask("mnli", str(tmp_path))
    dev = task.load("validation_mismatched")
    assert dev["text_a"] == ['He said "yes".', "It rained.", "A cat sat."]
    assert dev["text_b"] == ["He agreed.", "It was dry.", "A dog sat."]
    assert dev["label"] == [0, 2, 1]
    train = task.load("train")
    assert (train[0]["text_a"], train[0]["label"]) == ("Conceptually cream skimming.", 1)


def test_mnli_prefers_tsv_and_reads_jsonl(tmp_path: Path) -> None:
    line = '{"premise": "P \\u00e9", "hypothesis": "H ", "label": "contradiction"}'
    write(tmp_path / "dev_matched.jsonl", [line])
    task = GlueTask("mnli", str(tmp_path))
    assert task.load("validation_matched")[0] == {"text_a": "P é", "text_b": "H ", "label": 2, "idx": 0}
    write(tmp_path / "dev_matched.tsv", [MNLI_DEV_HEADER, mnli_row(0, "T", "U", ["neutral"] * 6)])
    assert task.load("validation_matched")["text_a"] == ["T"]


def test_missing_file_names_path_and_key(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        GlueTask("sst2", str(tmp_path)).load("validation")
    assert err.value.where == "task.data_dir"
    assert str(tmp_path / "dev.tsv") in str(err.value)
    with pytest.raises(UserError, match="dev_mismatched"):
        GlueTask("mnli", str(GLUE / "MNLI")).load("validation_mismatched")


def test_unknown_split_and_task() -> None:
    with pytest.raises(UserError, match="train, validation$"):
        GlueTask("rte", str(GLUE / "RTE")).load("test")
    with pytest.raises(UserError, match="validation_matched, validation_mismatched"):
        GlueTask("mnli", None).load("validation")  # rejected before any hub access
    with pytest.raises(UserError, match="unknown GLUE task"):
        GlueTask("wnli")


@pytest.mark.parametrize(
    ("name", "kind", "num_labels", "label_names", "main_metric", "eval_splits"),
    [
        (
            "cola",
            "classification",
            2,
            ["unacceptable", "acceptable"],
            "matthews_correlation",
            {"": "validation"},
        ),
        ("sst2", "classification", 2, ["negative", "positive"], "accuracy", {"": "validation"}),
        ("mrpc", "classification", 2, ["not_equivalent", "equivalent"], "accuracy", {"": "validation"}),
        ("stsb", "regression", 1, None, "pearson", {"": "validation"}),
        ("qqp", "classification", 2, ["not_duplicate", "duplicate"], "accuracy", {"": "validation"}),
        (
            "mnli",
            "classification",
            3,
            ["entailment", "neutral", "contradiction"],
            "matched_accuracy",
            {"matched": "validation_matched", "mismatched": "validation_mismatched"},
        ),
        ("qnli", "classification", 2, ["entailment", "not_entailment"], "accuracy", {"": "validation"}),
        ("rte", "classification", 2, ["entailment", "not_entailment"], "accuracy", {"": "validation"}),
    ],
)
def test_task_attributes(name, kind, num_labels, label_names, main_metric, eval_splits) -> None:
    task = get_task(name)
    assert isinstance(task, GlueTask)
    assert (task.name, task.kind, task.num_labels, task.label_names) == (name, kind, num_labels, label_names)
    assert (task.main_metric, task.eval_splits, task.train_split) == (main_metric, eval_splits, "train")
    assert task.greater_is_better


def test_hub_rows_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, name: str, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        if name == "sst2":
            features = {"sentence": datasets.Value("string")}
            rows = {"sentence": ["good ", "bad "]}
            names = ["negative", "positive"]
        else:
            features = {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string")}
            rows = {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"]}
            names = ["entailment", "neutral", "contradiction"]
        features |= {"label": datasets.ClassLabel(names=names), "idx": datasets.Value("int32")}
        rows |= {"label": [1, 0], "idx": [0, 1]}
        return datasets.Dataset.from_dict(rows, features=datasets.Features(features))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sst2 = GlueTask("sst2").load("train")
    assert sst2[0] == {"text_a": "good ", "text_b": None, "label": 1, "idx": 0}
    assert sst2.features == GlueTask("sst2").features
    mnli = GlueTask("mnli").load("validation_mismatched")
    assert mnli[1] == {"text_a": "p1", "text_b": "h1", "label": 0, "idx": 1}
    assert calls == [("nyu-mll/glue", "sst2", "train"), ("nyu-mll/glue", "mnli", "validation_mismatched")]


# -- metrics ---------------------------------------------------------------------------------------------


def score(name: str, predictions, labels) -> dict[str, float]:
    return GlueTask(name).compute_metrics(predictions, {"label": labels})


def test_accuracy_and_f1() -> None:
    # TP 2, FP 1, FN 1, TN 1: accuracy 3/5; precision = recall = 2/3, so F1 = 2/3.
    result = score("mrpc", [1, 1, 0, 1, 0], [1, 0, 1, 1, 0])
    assert result == pytest.approx({"accuracy": 60.0, "f1": 200 / 3})
    assert score("qqp", np.array([1, 1, 0, 1, 0]), [1, 0, 1, 1, 0]) == pytest.approx(result)
    assert score("mnli", [0, 2, 2, 1], [0, 1, 2, 2]) == {"accuracy": 50.0}
    assert score("sst2", [1, 0], [1, 0]) == {"accuracy": 100.0}
    # No positive predicted or present: F1 is undefined and scored 0.
    assert score("qqp", [0, 0, 0], [0, 0, 0]) == {"accuracy": 100.0, "f1": 0.0}


def test_matthews_correlation() -> None:
    # TP 2, TN 2, FP 1, FN 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
    assert score("cola", [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(
        {"matthews_correlation": 100 / 3}
    )
    assert score("cola", [0, 1], [1, 0]) == pytest.approx({"matthews_correlation": -100.0})
    # One class everywhere (or constant predictions): MCC is undefined, scored 0.
    assert score("cola", [1, 1, 1], [1, 1, 1]) == {"matthews_correlation": 0.0}
    assert score("cola", [1, 1, 1], [1, 0, 1]) == {"matthews_correlation": 0.0}


def test_correlations() -> None:
    # Deviations (-1, 0, 1) and (-4/3, -1/3, 5/3): r = 3 / sqrt(2 * 42/9) = 9 / sqrt(84); ranks agree.
    result = score("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert result == pytest.approx({"pearson": 900 / math.sqrt(84), "spearman": 100.0})
    # Rank differences (0, 1, 1, 0): rho = 1 - 6*2 / (4*15) = 0.8; Pearson is 4/5 too.
    assert score("stsb", [1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx({"pearson": 80.0, "spearman": 80.0})
    # A regression head's (N, 1) output is accepted.
    assert score("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0]) == pytest.approx(result)


def test_degenerate_correlations_are_zero() -> None:
    assert score("stsb", [2.5, 2.5, 2.5], [1.0, 2.0, 4.0]) == {"pearson": 0.0, "spearman": 0.0}
    assert score("stsb", [1.0], [3.0]) == {"pearson": 0.0, "spearman": 0.0}


def test_metrics_on_a_loaded_split() -> None:
    task = GlueTask("rte", str(GLUE / "RTE"))
    dev = task.load("validation")
    assert task.compute_metrics(dev["label"], dev) == {"accuracy": 100.0}
    assert task.compute_metrics([0] * len(dev), dev) == pytest.approx({"accuracy": 100 * 146 / 277})
    with pytest.raises(ValueError, match="predictions"):
        task.compute_metrics([0, 1], dev)
