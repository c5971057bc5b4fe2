"""Own generation rows (prompt/completion pairs, chat conversations) encoded with the real GPT-2 tokenizer,
and the text metrics of generated outputs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lorakit.data.completions import (
    IGNORE_INDEX,
    RowError,
    chat_prompt_and_reference,
    encode_chat,
    encode_prompt_completion,
)
from lorakit.scoring.text import text_metrics

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You describe restaurants."},
    {"role": "user", "content": "name[Alimentum], area[city centre]"},
    {"role": "assistant", "content": "Alimentum is in the city centre."},
    {"role": "user", "content": "Is it family-friendly?"},
    {"role": "assistant", "content": "No, Alimentum is not family-friendly."},
]


def _gpt2(shared_data: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    tokenizer.pad_token = tokenizer.eos_token  # as lorakit does for GPT-2
    return tokenizer


@pytest.fixture(scope="module")
def gpt2(shared_data: Path):
    return _gpt2(shared_data)


@pytest.fixture(scope="module")
def chatml(shared_data: Path):
    tokenizer = _gpt2(shared_data)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def e2e_rows(shared_data: Path) -> tuple[list[str], list[str]]:
    with open(shared_data / "e2e" / "devset.csv", newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(4), csv.DictReader(f), strict=False)]
    return [r["mr"] for r in rows], [" " + r["ref"] for r in rows]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- prompt / completion


def test_prompt_completion_ids_and_labels(gpt2, e2e_rows):
    prompts, completions = e2e_rows
    out = encode_prompt_completion(prompts, completions, [0, 1, 2, 3], gpt2, max_length=512)
    eos = gpt2.eos_token_id
    assert gpt2.pad_token_id == eos  # the EOS label must survive even though it is also the pad id
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        p, c = _ids(gpt2, prompt), _ids(gpt2, completion)
        assert out["input_ids"][row] == p + c + [eos]
        assert out["labels"][row] == [IGNORE_INDEX] * len(p) + c + [eos]
        assert out["labels"][row][-1] == eos
        assert out["attention_mask"][row] == [1] * (len(p) + len(c) + 1)
        assert out["length"][row] == len(p) + len(c) + 1
        assert out["truncated"][row] is False


def test_prompt_completion_empty_sides(gpt2):
    eos = gpt2.eos_token_id
    out = encode_prompt_completion(["Hello", ""], ["", " world"], [0, 1], gpt2, max_length=16)
    assert out["input_ids"][0] == _ids(gpt2, "Hello") + [eos]
    assert out["labels"][0] == [IGNORE_INDEX] * len(_ids(gpt2, "Hello")) + [eos]
    assert out["input_ids"][1] == out["labels"][1] == _ids(gpt2, " world") + [eos]


def test_prompt_completion_truncation_keeps_start(gpt2, e2e_rows):
    prompts, completions = e2e_rows
    p, c = _ids(gpt2, prompts[0]), _ids(gpt2, completions[0])
    limit = len(p) + 3
    out = encode_prompt_completion(prompts[:1], completions[:1], [0], gpt2, max_length=limit)
    assert out["input_ids"][0] == (p + c)[:limit]
    assert out["labels"][0] == [IGNORE_INDEX] * len(p) + c[:3]
    assert out["length"][0] == limit and out["truncated"][0] is True


def test_prompt_completion_refuses_prompt_that_fills_max_length(gpt2, e2e_rows):
    prompts, completions = e2e_rows
    n = len(_ids(gpt2, prompts[1]))
    with pytest.raises(RowError) as err:
        # Row 10 (a short prompt) fits; row 11's prompt leaves no room for a single completion token.
        encode_prompt_completion(["Short:", prompts[1]], completions[:2], [10, 11], gpt2, max_length=n)
    assert err.value.index == 11
    assert f"prompt alone takes {n} tokens, max_length is {n}" in str(err.value)
    assert "task.max_length" in str(err.value)


def test_prompt_completion_needs_eos(gpt2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2.name_or_path)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no eos token") as err:
        encode_prompt_completion(["a"], ["b"], [0], tokenizer, max_length=8)
    assert not isinstance(err.value, RowError)


def test_prompt_completion_maps_over_a_dataset(gpt2, e2e_rows):
    import datasets

    prompts, completions = e2e_rows
    rows = datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})
    mapped = rows.map(
        lambda b, idx: encode_prompt_completion(b["prompt"], b["completion"], idx, gpt2, 512),
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
    )
    assert (
        mapped["input_ids"]
        == encode_prompt_completion(prompts, completions, [0, 1, 2, 3], gpt2, 512)["input_ids"]
    )


# ---------------------------------------------------------------- chat


def test_chat_loss_on_assistant_turns_token_by_token(chatml):
    out = encode_chat([CONVERSATION], [0], chatml, max_length=512)
    ids, labels = out["input_ids"][0], out["labels"][0]
    rendering = chatml.apply_chat_template(CONVERSATION, tokenize=False)
    assert chatml.decode(ids) == rendering
    assert out["length"][0] == len(ids) == len(labels) and out["truncated"][0] is False
    # Every learned position carries its own id; the others are all ignored.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    # The learned positions form exactly two runs, one per assistant turn, each ending its turn.
    runs: list[list[int]] = []
    for k, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if k and labels[k - 1] != IGNORE_INDEX:
            runs[-1].append(label)
        else:
            runs.append([label])
    assert [chatml.decode(run) for run in runs] == [
        "Alimentum is in the city centre.<|im_end|>\n",
        "No, Alimentum is not family-friendly.<|im_end|>\n",
    ]
    im_start = chatml.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(im_start) == 5 and ids[0] == im_start  # specials are single tokens, never split
    assert chatml.eos_token_id not in ids  # the template ends turns; no eos is appended


def test_chat_segments_match_prefix_rendering(chatml):
    # The ignored part before the first assistant token is exactly the generation prompt's tokens.
    out = encode_chat([CONVERSATION], [0], chatml, max_length=512)
    prompt = chatml.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    first = next(k for k, label in enumerate(out["labels"][0]) if label != IGNORE_INDEX)
    assert out["input_ids"][0][:first] == _ids(chatml, prompt)


def test_chat_truncation_keeps_start(chatml):
    full = encode_chat([CONVERSATION], [0], chatml, max_length=512)
    first = next(k for k, label in enumerate(full["labels"][0]) if label != IGNORE_INDEX)
    out = encode_chat([CONVERSATION], [0], chatml, max_length=first + 2)
    assert out["input_ids"][0] == full["input_ids"][0][: first + 2]
    assert out["labels"][0] == full["labels"][0][: first + 2]
    assert out["truncated"][0] is True and out["length"][0] == first + 2


def test_chat_refuses_when_no_assistant_token_survives(chatml):
    full = encode_chat([CONVERSATION], [0], chatml, max_length=512)
    first = next(k for k, label in enumerate(full["labels"][0]) if label != IGNORE_INDEX)
    with pytest.raises(RowError, match=f"after {first} tokens, max_length is {first}") as err:
        encode_chat([CONVERSATION, CONVERSATION], [3, 4], chatml, max_length=first)
    assert err.value.index == 3


def test_chat_unknown_role(chatml):
    bad = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    with pytest.raises(
        RowError, match=r"unknown role 'bot' in message 1; expected one of system, user"
    ) as err:
        encode_chat([CONVERSATION, bad], [0, 7], chatml, max_length=64)
    assert err.value.index == 7


@pytest.mark.parametrize(
    "conversation",
    [[], "hello", [{"role": "user"}], [{"role": "user", "content": 3}], ["user: hi"]],
)
def test_chat_malformed_rows(chatml, conversation):
    with pytest.raises(RowError) as err:
        encode_chat([conversation], [2], chatml, max_length=64)
    assert err.value.index == 2


def test_chat_without_assistant_message(chatml):
    with pytest.raises(RowError, match="no assistant turn to learn from") as err:
        encode_chat([CONVERSATION[:2]], [5], chatml, max_length=64)
    assert err.value.index == 5
    with pytest.raises(RowError, match="no assistant turn"):
        chat_prompt_and_reference(CONVERSATION[:2], 5, chatml)


def test_chat_assistant_turns_without_tokens(chatml):
    chatml_bare = _with_template(chatml, "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    with pytest.raises(RowError, match="no assistant turn to learn from"):
        encode_chat([convo], [0], chatml_bare, max_length=64)


def test_chat_template_that_rewrites_earlier_turns(chatml):
    # A template that marks the last message differently renders earlier turns differently as it grows.
    rewriting = _with_template(
        chatml, "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}{% endfor %}"
    )
    with pytest.raises(RowError, match="does not render conversations incrementally"):
        encode_chat([CONVERSATION], [0], rewriting, max_length=512)


def test_chat_needs_a_template(gpt2):
    assert not gpt2.chat_template
    with pytest.raises(ValueError, match="has no chat template; set one or use prompt_column") as err:
        encode_chat([CONVERSATION], [0], gpt2, max_length=64)
    assert not isinstance(err.value, RowError)
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt_and_reference(CONVERSATION, 0, gpt2)


def test_chat_prompt_and_reference(chatml):
    prompt, reference = chat_prompt_and_reference(CONVERSATION, 0, chatml)
    assert reference == "No, Alimentum is not family-friendly."
    assert prompt == chatml.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Is it family-friendly?<|im_end|>\n<|im_start|>assistant\n")
    # Messages after the last assistant turn are not part of its prompt.
    prompt2, reference2 = chat_prompt_and_reference([*CONVERSATION, CONVERSATION[3]], 0, chatml)
    assert (prompt2, reference2) == (prompt, reference)


def test_chat_drops_extra_message_keys(chatml):
    # Only the validated role and content reach the template: a template reading other keys (which rows
    # read through Arrow carry for every message, from any row of the file) must not see them.
    named = _with_template(
        chatml,
        CHATML.replace("{{ m['role'] }}", "{{ m['role'] }}{{ ' (%s)' % m.name if m.name is defined }}"),
    )
    extra = [{**m, "name": "Chef"} for m in CONVERSATION]
    assert encode_chat([extra], [0], named, 512) == encode_chat([CONVERSATION], [0], chatml, 512)


def _with_template(tokenizer, template: str):
    import copy

    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone


# ---------------------------------------------------------------- text metrics


def test_text_metrics_identical():
    refs = ["There is a place in the city centre, Alimentum.", "Alimentum is not family-friendly."]
    assert text_metrics(refs, refs) == pytest.approx({"exact_match": 100.0, "bleu": 100.0, "rouge_l": 100.0})


def test_text_metrics_by_hand():
    import sacrebleu

    predictions = ["The cat sat down", "  Alimentum is cheap. ", "red"]
    references = ["the dog SAT", "Alimentum is cheap.", "blue"]
    metrics = text_metrics(predictions, references)
    # Row 1: LCS(the cat sat down, the dog sat) = "the sat" = 2, P = 2/4, R = 2/3, F1 = 4/7.
    # Row 2: identical tokens, F1 = 1. Row 3: nothing shared, F1 = 0.
    assert metrics["rouge_l"] == pytest.approx(100 * (4 / 7 + 1 + 0) / 3)
    assert metrics["exact_match"] == pytest.approx(100 / 3)  # row 2 only: equal once stripped
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert metrics["bleu"] == pytest.approx(expected)
    assert 0 < metrics["bleu"] < 100


def test_text_metrics_empty_and_mismatched():
    assert text_metrics([], []) == {"exact_match": 0.0, "bleu": 0.0, "rouge_l": 0.0}
    assert text_metrics([""], ["a"])["rouge_l"] == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])
