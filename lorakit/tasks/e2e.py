"""E2E NLG Challenge (Novikova et al., 2017): a restaurant's meaning representation (MR) to English text.

Sources, per split (train / validation / test):

* ``data_dir`` with the original release's CSVs (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``;
  columns ``mr``, ``ref``), or, for a split whose CSV is absent, the LoRA repo's preprocessed text files
  (``train.txt``, ``valid.txt``, ``test.txt``; one ``MR||reference`` pair a line);
* the hub (``data_dir`` None): ``tuetschek/e2e_nlg``, the original E2E data (not GEM's cleaned version),
  read from its Parquet export; its columns ``meaning_representation``, ``human_reference`` hold exactly
  the CSVs' ``mr``, ``ref``.

Prompt template. Every source's MR is normalised to one linear form, the LoRA repo's::

    prompt = "{slot} : {value} | {slot} : {value} | ... ||"
    target = " " + reference

e.g. ``"name : Cocum | Type : coffee shop | price : £ 20 - 25 | family friendly : no ||"`` and
``" Cocum is a ... ."``. Slots use the LoRA repo's names (``eatType`` -> ``Type``, ``priceRange`` ->
``price``, ``familyFriendly`` -> ``family friendly``) in E2E's fixed slot order; values are split at
punctuation as in the LoRA files (``£20-25`` -> ``£ 20 - 25``). So the same MR gives the same prompt from
the CSVs, the text files and the hub. The target's leading space lets GPT-2's BPE encode the first word as
it does mid-sentence.

References are kept as each source writes them, whitespace runs collapsed: the LoRA text files hold
tokenised text (``is n't family - friendly .``), the CSVs and the hub the raw crowd-sourced sentences. The
two agree up to whitespace; exact identity is impossible because the LoRA tokenisation is not consistent
(``aren 't`` in one file, ``is n't`` in another) and cannot be redone or undone from either side.

Columns: the train split has one row per MR-reference pair with ``prompt``, ``target``. Validation and test
have one row per distinct MR, in first-appearance order, with ``prompt``, ``target`` (its first reference)
and ``references`` (all of them, in file order).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets

from lorakit.errors import UserError
from lorakit.tasks.base import Task, TaskKind

HUB_ID = "tuetschek/e2e_nlg"
# The hub repo's main branch holds only a loading script, which datasets no longer runs.
HUB_REVISION = "refs/convert/parquet"
SEPARATOR = " ||"
_PERCENT = ("BLEU", "METEOR", "ROUGE_L")  # the scorer's 0-1 scores that the paper reports in percent

# split -> (original CSV, LoRA text file); the CSV wins when both are present.
_FILES: dict[str, tuple[str, str]] = {
    "train": ("trainset.csv", "train.txt"),
    "validation": ("devset.csv", "valid.txt"),
    "test": ("testset_w_refs.csv", "test.txt"),
}

# Original slot name -> the LoRA files' name, in the order every E2E MR lists its slots.
_SLOTS: dict[str, str] = {
    "name": "name",
    "eatType": "Type",
    "food": "food",
    "priceRange": "price",
    "customer rating": "customer rating",
    "area": "area",
    "familyFriendly": "family friendly",
    "near": "near",
}
_ORDER = {canonical: i for i, canonical in enumerate(_SLOTS.values())}
_CSV_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")
_PUNCT = re.compile(r"([^\w\s])")


class E2ETask(Task):
    """The E2E NLG task, for GPT-2 with LoRA as in the paper (Section 5.4 / Table 3)."""

    name = "e2e"
    kind: TaskKind = "generation"
    num_labels = 0
    main_metric = "BLEU"
    eval_splits = {"": "validation"}
    encoding = "causal_lm"

    @property
    def splits(self) -> list[str]:
        """The split names ``load`` accepts."""
        return list(_FILES)

    def load(self, split: str) -> datasets.Dataset:
        """Rows of ``split``: one per MR-reference pair for train, one per MR otherwise (module docstring)."""
        self.check_split(split)
        pairs = list(self._pairs(split))
        if split == self.train_split:
            return datasets.Dataset.from_dict(
                {"prompt": [p for p, _ in pairs], "target": [" " + r for _, r in pairs]}
            )
        grouped: dict[str, list[str]] = {}  # dicts keep first-appearance order
        for prompt, ref in pairs:
            grouped.setdefault(prompt, []).append(ref)
        return datasets.Dataset.from_dict(
            {
                "prompt": list(grouped),
                "target": [" " + refs[0] for refs in grouped.values()],
                "references": list(grouped.values()),
            }
        )

    def compute_metrics(self, predictions: Sequence[Any], examples: datasets.Dataset) -> dict[str, float]:
        """BLEU, NIST, METEOR, ROUGE_L and CIDEr of ``predictions`` (one text per row of ``examples``)
        against each row's ``references``, by ``lorakit.scoring.e2e.score_e2e`` (the official scorer).

        On the paper's scales (LoRA, Table 3): BLEU, METEOR and ROUGE_L in percent (the scorer gives
        0-1), NIST and CIDEr as the scorer gives them."""
        # Imported here so that loading data never pulls in the scorer's dependencies.
        from lorakit.scoring.e2e import score_e2e

        references = [list(refs) for refs in examples["references"]]
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} examples")
        # One line per output, as the predictions file holds it, so that `lorakit score e2e` agrees.
        scores = score_e2e([" ".join(str(p).splitlines()).strip() for p in predictions], references)
        return {key: 100.0 * value if key in _PERCENT else value for key, value in scores.items()}

    def prompt_from_input(self, text: str) -> str:
        """The prompt for an MR in the CSV form (``name[Alimentum], area[city centre]``) or the LoRA files'
        form (``name : Alimentum | area : city centre``; a whole ``MR||reference`` line too). Raises
        ValueError for text that is neither."""
        mr = text.split("||", 1)[0].strip().strip('"')
        # Brackets mark the CSV form (slot[value]); the LoRA form writes slot : value.
        if "[" in mr:
            return prompt_from_csv_mr(mr)
        return prompt_from_txt_mr(mr)

    def write_outputs(self, out_dir: Path, split: str, predictions: Sequence[Any], rows: Any) -> None:
        """The official scorer's files: ``predictions-<split>.txt`` (one output a line) and
        ``references-<split>.txt`` (each MR's references, a blank line between MRs), so that ``lorakit
        score e2e`` on them gives the metrics this evaluation reported."""
        # Imported here: the scorer's module pulls in its Java helpers, which loading data never needs.
        from lorakit.scoring.e2e import write_predictions, write_references

        write_predictions(out_dir / f"predictions-{split}.txt", [str(p) for p in predictions])
        write_references(out_dir / f"references-{split}.txt", [list(refs) for refs in rows["references"]])

    # -- sources -------------------------------------------------------------------------------------

    def _pairs(self, split: str) -> Iterator[tuple[str, str]]:
        """(prompt, reference) for each pair of ``split``, in source order."""
        if self.data_dir is None:
            raw = datasets.load_dataset(HUB_ID, revision=HUB_REVISION, split=split)
            for mr, ref in zip(raw["meaning_representation"], raw["human_reference"], strict=True):
                yield prompt_from_csv_mr(mr), _clean(ref)
            return
        csv_name, txt_name = _FILES[split]
        root = Path(self.data_dir)
        if (root / csv_name).is_file():
            yield from _read_csv(root / csv_name)
        elif (root / txt_name).is_file():
            yield from _read_txt(root / txt_name)
        else:
            raise UserError(
                f"no {split} file for e2e: {root / csv_name} or {root / txt_name} not found",
                where="task.data_dir",
            )


def prompt_from_csv_mr(mr: str) -> str:
    """The prompt for an MR in the original release's form, ``name[Alimentum], area[city centre]``."""
    slots = _CSV_SLOT.findall(mr)
    if not slots:
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return _prompt([(_SLOTS.get(slot, slot), value) for slot, value in slots])


def prompt_from_txt_mr(mr: str) -> str:
    """The prompt for an MR in the LoRA files' form, ``name : Alimentum | area : city centre``."""
    slots = []
    for part in mr.split("|"):
        slot, colon, value = part.partition(":")
        if not colon:
            raise ValueError(f"not a LoRA-style E2E meaning representation: {mr!r}")
        slots.append((slot.strip(), value))
    return _prompt(slots)


def _prompt(slots: list[tuple[str, str]]) -> str:
    # sorted() is stable, so slots outside E2E's eight keep their source order, after the known ones.
    ordered = sorted(slots, key=lambda sv: _ORDER.get(sv[0], len(_ORDER)))
    return " | ".join(f"{slot} : {_split_punct(value)}" for slot, value in ordered) + SEPARATOR


def _split_punct(value: str) -> str:
    # Idempotent, so the LoRA files' already-split values pass through unchanged.
    return " ".join(_PUNCT.sub(r" \1 ", value).split())


def _clean(text: str) -> str:
    return " ".join(text.split())


def _read_csv(path: Path) -> Iterator[tuple[str, str]]:
    # newline="" lets the csv module take the release's CRLF line ends (and any quoted newline) itself;
    # utf-8-sig drops a byte-order mark should a re-saved copy carry one.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
            raise UserError(f"expected an E2E CSV with columns mr, ref; found {reader.fieldnames}", str(path))
        for lineno, row in enumerate(reader, 2):
            try:
                yield prompt_from_csv_mr(row["mr"]), _clean(row["ref"])
            except ValueError as err:
                raise UserError(str(err), f"{path}:{lineno}") from err


def _read_txt(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            mr, sep, ref = line.partition("||")
            if not sep:
                raise UserError("expected 'MR||reference'", f"{path}:{lineno}")
            try:
                yield prompt_from_txt_mr(mr), _clean(ref)
            except ValueError as err:
                raise UserError(str(err), f"{path}:{lineno}") from err
