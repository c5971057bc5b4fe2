"""E2E NLG data: the original CSVs and the LoRA repo's text files, on the real files in shared/data/e2e."""

from __future__ import annotations

import csv
import re
import sys
import types
from pathlib import Path

import datasets
import pytest
from conftest import SHARED_DATA

from lorakit.errors import UserError
from lorakit.tasks import get_task
from lorakit.tasks.e2e import HUB_ID, E2ETask, prompt_from_csv_mr, prompt_from_txt_mr

E2E_DIR = SHARED_DATA / "e2e"  # real files; missing data fails the tests (never a skip)

# split -> (CSV, LoRA text file, MR-reference pairs, distinct MRs), counts from shared/data/README.md.
SPLITS = {
    "validation": ("devset.csv", "valid.txt", 4672, 547),
    "test": ("testset_w_refs.csv", "test.txt", 4693, 630),
}


def _only(tmp_path: Path, *names: str) -> Path:
    """A folder holding only ``names`` (links to the real files), to force one source."""
    for name in names:
        (tmp_path / name).symlink_to(E2E_DIR / name)
    return tmp_path


def _no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.fixture(scope="module")
def csv_splits() -> dict[str, datasets.Dataset]:
    task = E2ETask(str(E2E_DIR))  # CSVs and text files both there: the CSVs win
    return {split: task.load(split) for split in SPLITS}


@pytest.fixture(scope="module")
def txt_splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, datasets.Dataset]:
    folder = _only(tmp_path_factory.mktemp("lora_txt"), "valid.txt", "test.txt")
    task = E2ETask(str(folder))
    return {split: task.load(split) for split in SPLITS}


def test_registry_and_contract() -> None:
    task = get_task("e2e", str(E2E_DIR))
    assert isinstance(task, E2ETask)
    assert (task.kind, task.num_labels, task.main_metric) == ("generation", 0, "BLEU")
    assert task.eval_splits == {"": "validation"} and task.train_split == "train"
    assert task.splits == ["train", "validation", "test"]


@pytest.mark.parametrize("split", list(SPLITS))
def test_csv_counts(csv_splits: dict[str, datasets.Dataset], split: str) -> None:
    _, _, pairs, mrs = SPLITS[split]
    ds = csv_splits[split]
    assert ds.column_names == ["prompt", "target", "references"]
    assert len(ds) == mrs
    assert sum(len(refs) for refs in ds["references"]) == pairs
    assert len(set(ds["prompt"])) == mrs


def test_train_csv_one_row_per_pair() -> None:
    ds = E2ETask(str(E2E_DIR)).load("train")
    assert ds.column_names == ["prompt", "target"]
    assert len(ds) == 42061
    assert len(set(ds["prompt"])) == 4862
    assert all(t.startswith(" ") and not t.startswith("  ") for t in ds["target"])


@pytest.mark.parametrize("split", list(SPLITS))
def test_txt_counts(txt_splits: dict[str, datasets.Dataset], split: str) -> None:
    _, _, pairs, mrs = SPLITS[split]
    ds = txt_splits[split]
    assert len(ds) == mrs
    assert sum(len(refs) for refs in ds["references"]) == pairs


@pytest.mark.parametrize("split", list(SPLITS))
def test_csv_and_txt_agree(
    csv_splits: dict[str, datasets.Dataset], txt_splits: dict[str, datasets.Dataset], split: str
) -> None:
    from_csv, from_txt = csv_splits[split], txt_splits[split]
    assert from_csv["prompt"] == from_txt["prompt"]
    # The LoRA files hold tokenised references ("is n't family - friendly ."); the text is the same.
    for refs_csv, refs_txt in zip(from_csv["references"], from_txt["references"], strict=True):
        assert [_no_space(r) for r in refs_csv] == [_no_space(r) for r in refs_txt]


def test_references_grouped_in_file_order(csv_splits: dict[str, datasets.Dataset]) -> None:
    with open(E2E_DIR / "devset.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    first_seen: dict[str, int] = {}
    for row in rows:
        first_seen.setdefault(row["mr"], len(first_seen))
    # A stable sort by each MR's first appearance lists the references as grouping should.
    expected = [" ".join(r["ref"].split()) for r in sorted(rows, key=lambda r: first_seen[r["mr"]])]
    ds = csv_splits["validation"]
    assert [ref for refs in ds["references"] for ref in refs] == expected
    first = ds[0]
    assert first["prompt"] == "name : Alimentum | area : city centre | family friendly : no ||"
    assert first["references"][:3] == [
        "There is a place in the city centre, Alimentum, that is not family-friendly.",
        "In the city centre there is a venue name Alimentum, this is not a family-friendly venue.",
        "Alimentum is not a family-friendly place, located in city centre.",
    ]
    assert first["target"] == " " + first["references"][0]


def test_prompt_is_the_lora_mr_form() -> None:
    with open(E2E_DIR / "valid.txt", encoding="utf-8") as f:
        mrs = [line.split("||", 1)[0] for line in f if line.strip()]
    assert all(prompt_from_txt_mr(mr) == mr + " ||" for mr in mrs)
    expected = "name : Cocum | Type : coffee shop | price : £ 20 - 25 | family friendly : no ||"
    mr = "name[Cocum], eatType[coffee shop], priceRange[£20-25], familyFriendly[no]"
    assert prompt_from_csv_mr(mr) == expected
    # Slot order is E2E's, whatever order a source lists the slots in.
    assert prompt_from_csv_mr(", ".join(reversed(mr.split(", ")))) == expected


def test_crlf_and_pound(csv_splits: dict[str, datasets.Dataset], tmp_path: Path) -> None:
    assert b"\r\n" in (E2E_DIR / "devset.csv").read_bytes()[:200]
    for ds in csv_splits.values():
        texts = list(ds["prompt"]) + [r for refs in ds["references"] for r in refs]
        assert not any("\r" in t for t in texts)
        assert any("£" in t for t in texts)
    # A re-saved copy: byte-order mark, CRLF, a quoted field with a comma, a pound sign.
    (tmp_path / "devset.csv").write_bytes(
        '\ufeffmr,ref\r\n"name[Zizzi], priceRange[less than £20]","Zizzi, cheap: under £20."\r\n'.encode()
    )
    row = E2ETask(str(tmp_path)).load("validation")[0]
    assert row["prompt"] == "name : Zizzi | price : less than £ 20 ||"
    assert row["references"] == ["Zizzi, cheap: under £20."]


def test_train_falls_back_to_txt(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text(
        "name : Aromi | area : riverside||Aromi is by the river . \n"
        "name : Aromi | area : riverside||Aromi . \n",
        encoding="utf-8",
    )
    ds = E2ETask(str(tmp_path)).load("train")
    assert ds["prompt"] == ["name : Aromi | area : riverside ||"] * 2
    assert ds["target"] == [" Aromi is by the river .", " Aromi ."]


def test_missing_file_and_bad_split(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="devset.csv"):
        E2ETask(str(tmp_path)).load("validation")
    with pytest.raises(UserError, match="unknown split"):
        E2ETask(str(E2E_DIR)).load("dev")


def test_hub_rows_match_csv(monkeypatch: pytest.MonkeyPatch, csv_splits: dict[str, datasets.Dataset]) -> None:
    with open(E2E_DIR / "devset.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    calls = []

    def fake_load_dataset(path: str, **kwargs: object) -> datasets.Dataset:
        calls.append((path, kwargs))
        return datasets.Dataset.from_dict(
            {"meaning_representation": [r["mr"] for r in rows], "human_reference": [r["ref"] for r in rows]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = E2ETask(None).load("validation")
    assert calls[0][0] == HUB_ID and calls[0][1]["split"] == "validation"
    assert ds.to_dict() == csv_splits["validation"].to_dict()


def test_compute_metrics_calls_the_scorer(
    monkeypatch: pytest.MonkeyPatch, csv_splits: dict[str, datasets.Dataset]
) -> None:
    seen = {}

    def score_e2e(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        seen["args"] = (predictions, references)
        return {"BLEU": 0.25, "NIST": 8.5, "METEOR": 0.5, "ROUGE_L": 0.75, "CIDEr": 2.5}

    # The scorer is another module's work; a stand-in checks what the task hands it.
    fake = types.ModuleType("lorakit.scoring.e2e")
    fake.score_e2e = score_e2e  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lorakit.scoring.e2e", fake)

    examples = csv_splits["validation"].select(range(3))
    result = E2ETask(str(E2E_DIR)).compute_metrics([" a ", "b", "c\n"], examples)
    # The paper's scales: BLEU, METEOR, ROUGE-L in percent; NIST and CIDEr as scored.
    assert result == {"BLEU": 25.0, "NIST": 8.5, "METEOR": 50.0, "ROUGE_L": 75.0, "CIDEr": 2.5}
    assert seen["args"] == (["a", "b", "c"], list(examples["references"]))
    with pytest.raises(ValueError, match="2 predictions for 3"):
        E2ETask(str(E2E_DIR)).compute_metrics(["a", "b"], examples)
