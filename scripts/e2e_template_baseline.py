"""A rule-based E2E NLG baseline: one template sentence per meaning representation, scored officially.

Reads the E2E test set with references (``testset_w_refs.csv``: columns ``mr``, ``ref``), groups the
references per distinct MR in order of first appearance, writes ``predictions.txt`` and ``references.txt``
in the official scorer's formats to the output folder, and prints the five E2E scores as JSON. It is a
floor for trained systems and an end-to-end check of ``lorakit.scoring``.

    python scripts/e2e_template_baseline.py --out /tmp/e2e_baseline
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

from lorakit.scoring import score_e2e_files, write_predictions, write_references

_REPO = Path(__file__).resolve().parents[1]
# shared/ sits inside the checkout on some machines and beside it (CI, sessions) on others.
_SHARED = next(
    (p for p in (_REPO / "shared", _REPO.parent / "shared") if p.is_dir()), _REPO.parent / "shared"
)
DEFAULT_TEST_CSV = _SHARED / "data" / "e2e" / "testset_w_refs.csv"
_SLOT = re.compile(r"\s*([^,\[\]]+?)\s*\[([^\]]*)\]")


def parse_mr(mr: str) -> dict[str, str]:
    """``"name[X], eatType[pub]"`` -> ``{"name": "X", "eatType": "pub"}``."""
    return {key: value.strip() for key, value in _SLOT.findall(mr)}


def realise(slots: dict[str, str]) -> str:
    """One or two plain sentences naming every attribute of the MR."""
    name = slots.get("name", "It")
    eat_type = slots.get("eatType", "place")
    food = slots.get("food")
    head = f"{name} is a {food} {eat_type}" if food else f"{name} is a {eat_type}"
    if "area" in slots:
        head += f" in the {slots['area']}"
    if "near" in slots:
        head += f" near {slots['near']}"
    details = []
    if "priceRange" in slots:
        price = slots["priceRange"]
        details.append(f"prices {price}" if "£" in price else f"a {price} price range")
    if "customer rating" in slots:
        details.append(f"a {slots['customer rating']} customer rating")
    sentences = [head + "."]
    if details:
        sentences.append("It has " + " and ".join(details) + ".")
    if "familyFriendly" in slots:
        sentences.append(
            "It is family friendly." if slots["familyFriendly"] == "yes" else "It is not family friendly."
        )
    return " ".join(sentences)


def load_test_set(path: Path) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs in order of first appearance and, for each, all of its references."""
    groups: dict[str, list[str]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            groups.setdefault(row["mr"], []).append(row["ref"])
    return list(groups), list(groups.values())


def main(argv: list[str] | None = None) -> int:
    """Write the baseline's predictions and references, score them, print the scores as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-csv", type=Path, default=DEFAULT_TEST_CSV, help="E2E testset_w_refs.csv")
    parser.add_argument("--out", type=Path, required=True, help="folder for predictions.txt, references.txt")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    mrs, references = load_test_set(args.test_csv)
    predictions = [realise(parse_mr(mr)) for mr in mrs]
    args.out.mkdir(parents=True, exist_ok=True)
    predictions_path = args.out / "predictions.txt"
    references_path = args.out / "references.txt"
    write_predictions(predictions_path, predictions)
    write_references(references_path, references)
    scores = score_e2e_files(predictions_path, references_path)
    elapsed = time.perf_counter() - start
    print(json.dumps(scores, indent=2))
    print(
        f"{len(mrs)} MRs, {sum(map(len, references))} references, scored in {elapsed:.1f} s", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
