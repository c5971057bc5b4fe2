"""The E2E NLG scorer against values worked out by hand from each metric's definition.

Java is required (METEOR and the coco tokenizer): a missing JRE fails these tests rather than skipping them.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import sacrebleu

from lorakit.errors import UserError
from lorakit.scoring import (
    METRICS,
    read_predictions,
    read_references,
    score_e2e,
    score_e2e_files,
    write_predictions,
    write_references,
)
from lorakit.scoring.bleu_nist import corpus_bleu, corpus_nist, nist_length_penalty, tokenize_13a
from lorakit.scoring.java import java_executable, ptb_tokenize
from lorakit.scoring.meteor import Meteor
from lorakit.scoring.rouge_cider import cider_d_segments, corpus_cider_d, lcs_length, rouge_l_segment

LN2 = math.log(2)


@pytest.fixture(scope="module")
def meteor() -> Iterator[Meteor]:
    with Meteor() as scorer:
        yield scorer


# --- BLEU ---------------------------------------------------------------------------------------------


def test_13a_tokens_are_lowercased_and_split_at_punctuation() -> None:
    assert tokenize_13a("The Eagle's £20-25, near Café.") == [
        "the", "eagle's", "£20", "-", "25", ",", "near", "café", ".",
    ]  # fmt: skip
    assert tokenize_13a("") == [""]


def test_bleu_identical_outputs_score_one_and_case_is_ignored() -> None:
    refs = [["The Eagle is a pub near the river."], ["Alimentum serves cheap Indian food."]]
    assert corpus_bleu([r[0] for r in refs], refs) == pytest.approx(1.0)
    shouted = ["THE EAGLE IS A PUB NEAR THE RIVER.", "alimentum SERVES cheap indian FOOD."]
    assert corpus_bleu(shouted, refs) == pytest.approx(1.0)


def test_bleu_clips_against_the_best_reference_for_each_ngram() -> None:
    # Against one reference: precisions 4/5, 3/4, 2/3, 1/2. Each n-gram of the output is in one of the two
    # references, so with both every precision is 1.
    assert corpus_bleu(["a b c d e"], [["a b c d x"]]) == pytest.approx(
        (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    )
    assert corpus_bleu(["a b c d e"], [["a b c d x", "y b c d e"]]) == pytest.approx(1.0)


def test_bleu_brevity_uses_the_closest_reference_and_the_shorter_on_a_tie() -> None:
    assert corpus_bleu(["a b c d"], [["a b c d e f"]]) == pytest.approx(math.exp(1 - 6 / 4))
    # References of 3 and 5 tokens are both 1 away from 4: the shorter one counts, so no penalty.
    assert corpus_bleu(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx(1.0)


def test_bleu_floors_an_order_without_hits_like_the_official_scorer() -> None:
    # Unigrams 5/6 (the x2, cat, on, mat), bigrams 3/5, trigrams 1/4, no 4-gram hit out of 3.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(expected)


def test_bleu_of_an_empty_output_is_one_empty_token() -> None:
    # One empty token: 1 unigram, then 0, -1, -2 n-grams (floored to 1e-9); brevity against 3 tokens.
    expected = math.exp(1 - 3) * (1e-15 * (1e-15 / 1e-9) ** 3) ** 0.25
    assert corpus_bleu([""], [["a b c"]]) == pytest.approx(expected)


def test_bleu_equals_sacrebleu_lowercased_on_an_ordinary_corpus() -> None:
    hyps = [
        "The Eagle is a cheap pub, near Burger King.",
        "Alimentum is a family-friendly place by the river.",
    ]
    refs = [
        ["The Eagle is a cheap pub near Burger King.", "Near Burger King is The Eagle, a low-priced pub."],
        ["By the river, Alimentum is a family-friendly restaurant.", "Alimentum is kid friendly."],
    ]
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    assert corpus_bleu(hyps, refs) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, streams, lowercase=True).score / 100
    )


# --- NIST ---------------------------------------------------------------------------------------------


def test_nist_penalty_is_one_half_at_two_thirds_of_the_reference_length() -> None:
    assert nist_length_penalty(2, 3) == pytest.approx(0.5)
    assert nist_length_penalty(3, 3) == 1.0
    assert nist_length_penalty(0, 3) == 0.0


def test_nist_by_hand_two_segments() -> None:
    # All references together: a:2 b:3 c:1 d:2 (8 tokens), ab:2 bc:1 bd:2, abc:1 abd:1. So
    # info(a)=log2(8/2)=2, info(b)=log2(8/3), info(c)=3, info(d)=2, info(ab)=log2(2/2)=0, info(bc)=log2(3/1),
    # info(abc)=log2(2/1)=1. Segment 1 hits a, b, c, ab, bc, abc; segment 2 ("a d" vs "b d") hits only d.
    # Output n-grams per order: 3+2, 2+1, 1+0. Lengths 5 vs mean references 3+2: no penalty.
    expected = (2 + math.log2(8 / 3) + 3 + 2) / 5 + math.log2(3) / 3 + 1 / 1
    assert corpus_nist(["a b c", "a d"], [["a b c", "a b d"], ["b d"]]) == pytest.approx(expected)
    assert corpus_nist(["A B C", "a D"], [["a b c", "A b d"], ["b d"]]) == pytest.approx(expected)


def test_nist_by_hand_with_brevity_penalty() -> None:
    # Every reference n-gram is unique, so only unigrams carry information: log2(10) each. Output at half
    # the reference length: penalty 0.5 ** ((ln 0.5 / ln 1.5) ** 2).
    expected = math.log2(10) * 0.5 ** ((math.log(0.5) / math.log(1.5)) ** 2)
    assert corpus_nist(["a b c d e"], [["a b c d e f g h i j"]]) == pytest.approx(expected)


# --- ROUGE-L and CIDEr (on coco-tokenized text) ----------------------------------------------------------


def test_lcs_matches_the_quadratic_definition() -> None:
    def lcs_table(a: list[str], b: list[str]) -> int:
        row = [0] * (len(b) + 1)
        for x in a:
            prev_diag, row[0] = 0, 0
            for j, y in enumerate(b, start=1):
                prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
        return row[-1]

    rng = random.Random(7)
    for _ in range(300):
        a = rng.choices("abcd", k=rng.randint(0, 12))
        b = rng.choices("abcde", k=rng.randint(0, 12))
        assert lcs_length(a, b) == lcs_table(a, b), (a, b)


def test_rouge_l_by_hand() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens each way, so P = R = F = 5/6.
    assert rouge_l_segment("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # Precision and recall are maxed over references separately: P = 1 from the long one, R = 1 from the
    # short one, so F = 1 though no reference equals the output.
    assert rouge_l_segment("a b c d", ["a b", "a b c d e f g h"]) == pytest.approx(1.0)
    p, r, beta2 = 1 / 2, 1 / 1, 1.2**2
    assert rouge_l_segment("a b x y", ["a b"]) == pytest.approx((1 + beta2) * p * r / (r + beta2 * p))
    assert rouge_l_segment("", ["a b"]) == 0.0


def test_cider_d_by_hand_two_segments() -> None:
    # Two segments: idf = ln 2 - ln(df). "a" is in both segments' references (idf 0); all else idf ln 2.
    # Segment 1 equals its reference: cosine 1 for unigrams and bigrams, 0 for the missing 3-/4-grams,
    # so 10 * (1 + 1 + 0 + 0) / 4 = 5. Segment 2, "c d" vs "a d": unigram cosine
    # (ln2 * ln2) / (sqrt(2) ln2 * ln2) = 1/sqrt(2), no bigram in common: 10 * (1/sqrt(2)) / 4.
    hyps, refs = ["a b", "c d"], [["a b"], ["a d"]]
    assert cider_d_segments(hyps, refs) == pytest.approx([5.0, 10 / (4 * math.sqrt(2))])
    assert corpus_cider_d(hyps, refs) == pytest.approx((5.0 + 10 / (4 * math.sqrt(2))) / 2)


def test_cider_d_length_penalty_and_clipping_by_hand() -> None:
    # Segment 2 is "d" against "a d": unigram cosine 1, no bigram. coco measures length in bigrams, so
    # delta = 0 - 1 and the penalty is exp(-1 / (2 * 6**2)).
    assert cider_d_segments(["a b", "d"], [["a b"], ["a d"]])[1] == pytest.approx(10 / 4 * math.exp(-1 / 72))
    # "b b" repeats b: its weight 2 ln2 is clipped at the reference's ln2 before the dot product,
    # while its norm keeps the full 2 ln2: cosine (ln2 * ln2) / (2 ln2 * ln2) = 1/2 for unigrams.
    assert cider_d_segments(["b b", "x"], [["a b"], ["a y"]])[0] == pytest.approx(10 * (1 / 2) / 4)


# --- Java: tokenizer, METEOR, the whole scorer -----------------------------------------------------------


def test_java_is_installed() -> None:
    assert shutil.which("java"), "E2E scoring needs a Java runtime: apt-get install default-jre-headless"


def test_missing_java_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="default-jre-headless"):
        java_executable()


def test_coco_tokenization_is_ptb_lowercased_without_punctuation() -> None:
    texts = ["The Eagle (riverside) isn't cheap: £20-25.", "", "...", 'A "quoted" name; OK!']
    assert ptb_tokenize(texts) == [
        "the eagle -lrb- riverside -rrb- is n't cheap # 20-25",
        "",
        "",
        "a quoted name ok",
    ]


def test_meteor_by_hand(meteor: Meteor) -> None:
    # METEOR 1.5 English: alpha .85, beta .2, gamma .6; content words weigh .75, function words .25.
    # "the mill is cheap" vs "mill cheap": P = 1.5/2, R = 1, Fmean = PR/(.85P + .15R) = .75/.7875;
    # 2 chunks over 2 matches: penalty .6 * 1**.2, so the score is .4 * Fmean = 8/21. Against the longer
    # reference it scores less (0.335), so the best reference counts.
    hyps = ["The Eagle is a pub.", "The Mill is cheap."]
    refs = [["the eagle is a pub"], ["The Mill is a cheap restaurant.", "Mill, cheap."]]
    corpus, segments = meteor.score(ptb_tokenize(hyps), [ptb_tokenize(r) for r in refs])
    assert segments == pytest.approx([1.0, 8 / 21])
    # The corpus score pools the statistics: P = 3.75/4.25, R = 1; 7 matches in 2 chunks (a perfect
    # segment adds no chunk), so penalty .6 * (2/7)**.2. It is not the mean of the segments.
    fmean = (15 / 17) / (0.85 * 15 / 17 + 0.15)
    assert corpus == pytest.approx(fmean * (1 - 0.6 * (2 / 7) ** 0.2))
    assert score_e2e(hyps, refs, meteor=meteor)["METEOR"] == pytest.approx(corpus)


def test_identical_outputs_score_perfectly(meteor: Meteor) -> None:
    refs = [["The Eagle is a pub near the river."], ["Alimentum serves cheap Indian food in the city."]]
    scores = score_e2e([r[0] for r in refs], refs, meteor=meteor)
    assert list(scores) == list(METRICS) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["METEOR"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["NIST"] == pytest.approx(corpus_nist([r[0] for r in refs], refs))
    # Identical texts: every order's cosine is 1, so each segment scores 10 (the coco x10 scale).
    assert scores["CIDEr"] == pytest.approx(10.0)


def test_case_differences_are_ignored(meteor: Meteor) -> None:
    refs = [["The Eagle is a pub near the river."], ["Alimentum serves cheap Indian food in the city."]]
    hyps = ["The eagle is a PUB by the river.", "alimentum serves Indian food."]
    assert score_e2e([h.upper() for h in hyps], refs, meteor=meteor) == pytest.approx(
        score_e2e(hyps, refs, meteor=meteor)
    )


def test_empty_output_and_extra_references(meteor: Meteor) -> None:
    refs = [["The Eagle is a pub."], ["Alimentum is cheap."]]
    empty = score_e2e(["The Eagle is a pub.", ""], refs, meteor=meteor)
    # The official BLEU counts the empty output as one token and its n-gram totals as 1, 0, -1, -2, so the
    # corpus totals are 7, 5, 3, 1 against 6, 5, 4, 3 hits; closest reference lengths 6 + 4.
    assert empty["BLEU"] == pytest.approx(math.exp(1 - 10 / 7) * (6 / 7 * 5 / 5 * 4 / 3 * 3 / 1) ** 0.25)
    assert empty["ROUGE_L"] == pytest.approx(0.5)  # 1 for the first segment, 0 for the empty one
    assert 0 < empty["METEOR"] < 1
    # A second reference that the output matches can only help.
    single = score_e2e(["The Eagle is a pub.", "Alimentum is a cheap place."], refs, meteor=meteor)
    several = score_e2e(
        ["The Eagle is a pub.", "Alimentum is a cheap place."],
        [refs[0], [*refs[1], "Alimentum is a cheap place."]],
        meteor=meteor,
    )
    for metric in ("BLEU", "METEOR", "ROUGE_L"):
        assert several[metric] > single[metric]
    assert several["ROUGE_L"] == pytest.approx(1.0)


def test_score_e2e_rejects_mismatched_input(meteor: Meteor) -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score_e2e(["a", "b"], [["a"]], meteor=meteor)
    with pytest.raises(ValueError, match="at least one reference"):
        score_e2e(["a"], [[]], meteor=meteor)


# --- Files in the official formats -------------------------------------------------------------------------


def test_file_round_trip_and_scoring(tmp_path: Path) -> None:
    predictions = ["The Eagle is a pub.", "", "Alimentum is cheap."]
    references = [
        ["The Eagle is a pub.", "A pub, The Eagle."],
        ["Zizzi is a restaurant."],
        ["Alimentum is cheap."],
    ]
    pred_path, ref_path = tmp_path / "pred.txt", tmp_path / "ref.txt"
    write_predictions(pred_path, predictions)
    write_references(ref_path, references)
    assert pred_path.read_text(encoding="utf-8") == "The Eagle is a pub.\n\nAlimentum is cheap.\n"
    assert ref_path.read_text(encoding="utf-8") == (
        "The Eagle is a pub.\nA pub, The Eagle.\n\nZizzi is a restaurant.\n\nAlimentum is cheap.\n"
    )
    assert read_predictions(pred_path) == predictions
    assert read_references(ref_path) == references
    assert not list(tmp_path.glob("*.tmp"))
    # Scored with its own METEOR process, as the CLI does.
    assert score_e2e_files(pred_path, ref_path) == pytest.approx(score_e2e(predictions, references))


def test_references_file_quirks_follow_the_official_reader(tmp_path: Path) -> None:
    path = tmp_path / "ref.txt"
    # No blank line at all: one reference per input. Surrounding whitespace and \r\n are dropped.
    path.write_bytes(b"  first ref \r\nsecond ref\n\n\n")
    assert read_references(path) == [["first ref"], ["second ref"]]
    path.write_text("a\n\n\nb\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty reference group"):
        read_references(path)
    with pytest.raises(ValueError, match="blank reference"):
        write_references(path, [["a", "  "]])


def test_count_mismatch_names_both_files(tmp_path: Path) -> None:
    pred_path, ref_path = tmp_path / "pred.txt", tmp_path / "ref.txt"
    write_predictions(pred_path, ["one", "two"])
    write_references(ref_path, [["one a", "one b"], ["two"], ["three"]])
    with pytest.raises(UserError) as info:
        score_e2e_files(pred_path, ref_path)
    assert str(pred_path) in str(info.value) and str(ref_path) in str(info.value)
    assert "2 predictions" in str(info.value) and "3 reference groups" in str(info.value)
    with pytest.raises(UserError, match="cannot read"):
        read_predictions(tmp_path / "missing.txt")
