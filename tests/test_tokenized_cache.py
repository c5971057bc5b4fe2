"""The tokenized-rows cache: a second tokenization of the same rows with the same tokenizer is read back,
equal to tokenizing again; anything the ids depend on makes another entry; a broken entry is replaced."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import pytest
from conftest import train_glue_run
from safetensors.torch import load_file
from transformers import AutoTokenizer

from lorakit.data import tokenize_causal_lm, tokenize_classification
from lorakit.data.cache import cache_dir
from lorakit.tasks import get_task


@pytest.fixture
def rows(shared_data: Path) -> datasets.Dataset:
    task = get_task("mrpc", shared_data / "glue" / "MRPC")
    return task.load(task.train_split).select(range(200))


@pytest.fixture
def roberta(shared_data: Path):
    return AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "roberta-base")


def entries() -> list[Path]:
    # The test's own LORAKIT_HOME (conftest), read directly: cache_dir() is None while the cache is off.
    root = Path(os.environ["LORAKIT_HOME"]) / "cache" / "tokenized"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_a_second_tokenization_is_read_back_and_equals_tokenizing_again(rows, roberta) -> None:
    first = tokenize_classification(rows, roberta, 64, cache=True)
    assert len(entries()) == 1
    second = tokenize_classification(rows, roberta, 64, cache=True)
    assert len(entries()) == 1
    # Read from the cache's Arrow file, not tokenized in memory again.
    assert second.cache_files and Path(second.cache_files[0]["filename"]).parent == entries()[0]
    assert cache_dir() == entries()[0].parent
    plain = tokenize_classification(rows, roberta, 64)
    assert second.features == plain.features == first.features
    assert second[:] == plain[:] == first[:]
    assert max(second["length"]) == 64 and min(second["length"]) < 64  # real pairs, really cut


def test_whatever_the_ids_depend_on_makes_another_entry(rows, roberta, shared_data: Path) -> None:
    tokenize_classification(rows, roberta, 64, cache=True)
    tokenize_classification(rows, roberta, 32, cache=True)  # max_length
    edited = rows.map(lambda r, i: {"text_a": r["text_a"] + (" !" if i == 7 else "")}, with_indices=True)
    tokenize_classification(edited, roberta, 64, cache=True)  # one row's text
    tokenize_classification(rows.select(range(199)), roberta, 64, cache=True)  # the selection
    gpt2 = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    gpt2.pad_token = gpt2.eos_token
    tokenize_classification(rows, gpt2, 64, cache=True)  # another tokenizer
    roberta.add_tokens(["<extra-token>"])
    tokenize_classification(rows, roberta, 64, cache=True)  # the same one with an added token
    tokenize_causal_lm(
        datasets.Dataset.from_dict({"prompt": ["a b"], "target": ["c"]}), gpt2, 64, cache=True
    )  # another encoding
    assert len(entries()) == 7
    # And the edited rows' cached ids are the edited ones.
    fresh = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "roberta-base")
    again = tokenize_classification(edited, fresh, 64, cache=True)
    assert (
        len(entries()) == 7
        and again[7]["input_ids"] != tokenize_classification(rows, fresh, 64)[7]["input_ids"]
    )


def test_off_by_environment_and_uncached_by_default(rows, roberta, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenize_classification(rows, roberta, 64)  # prompts of predict and serve: no entry left behind
    assert entries() == []
    monkeypatch.setenv("LORAKIT_TOKENIZED_CACHE", "0")
    assert cache_dir() is None
    cached, plain = (tokenize_classification(rows, roberta, 64, cache=c) for c in (True, False))
    assert entries() == [] and cached[:] == plain[:]


def test_a_broken_entry_is_told_and_replaced(rows, roberta, caplog: pytest.LogCaptureFixture) -> None:
    good = tokenize_classification(rows, roberta, 64, cache=True)[:]
    (entry,) = entries()
    for arrow in entry.glob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="lorakit.data.cache"):
        again = tokenize_classification(rows, roberta, 64, cache=True)
    assert again[:] == good
    assert "unreadable cached tokenization" in caplog.text and str(entry) in caplog.text
    assert tokenize_classification(rows, roberta, 64, cache=True)[:] == good  # the replaced entry reads


def test_a_rerun_reads_its_rows_back_and_trains_the_same_adapter(
    tmp_path: Path, tiny_roberta_dir: Path, shared_data: Path
) -> None:
    lora = {"r": 4, "target_modules": ["query", "value"]}
    data = shared_data / "glue" / "SST-2"
    one = train_glue_run(tmp_path / "one", tiny_roberta_dir, "sst2", data, lora)
    cached = entries()
    assert len(cached) == 2  # the training rows and the dev rows
    stamps = [p.stat().st_mtime_ns for p in cached]
    two = train_glue_run(tmp_path / "two", tiny_roberta_dir, "sst2", data, lora)
    assert entries() == cached and [p.stat().st_mtime_ns for p in cached] == stamps
    a, b = (load_file(run / "adapter_model.safetensors") for run in (one, two))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_tokenizer_digest_ignores_the_last_calls_truncation_and_leaves_it_alone(roberta) -> None:
    from lorakit.data.cache import tokenizer_digest

    before = tokenizer_digest(roberta)
    roberta(["a b c d"], truncation=True, max_length=3)
    backend = roberta.backend_tokenizer
    backend.enable_padding(length=9, pad_id=1)
    state = (backend.truncation, backend.padding)
    assert state[0] is not None and state[0]["max_length"] == 3
    assert tokenizer_digest(roberta) == before
    assert (backend.truncation, backend.padding) == state


def test_own_data_encodings_are_cached_and_a_chat_template_set_in_code_makes_another_entry(
    shared_data: Path,
) -> None:
    from lorakit.data import tokenize_chat, tokenize_completions

    gpt2 = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    gpt2.pad_token = gpt2.eos_token
    pairs = datasets.Dataset.from_dict(
        {
            "prompt": ["name : Aromi ||", "name : Wildwood ||"],
            "target": [" A pub.", " A cafe."],
            "row": [0, 1],
        }
    )
    first = tokenize_completions(pairs, gpt2, 32, cache=True)
    second = tokenize_completions(pairs, gpt2, 32, cache=True)
    assert len(entries()) == 1 and second[:] == first[:]
    assert Path(second.cache_files[0]["filename"]).parent == entries()[0]
    chats = datasets.Dataset.from_dict(
        {
            "messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]],
            "row": [0],
        }
    )
    gpt2.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenize_chat(chats, gpt2, 32, cache=True)
    assert len(entries()) == 2
    # Set in code after loading, a template is not in the tokenizer's serialized form; the key still sees it.
    gpt2.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    other = tokenize_chat(chats, gpt2, 32, cache=True)
    assert len(entries()) == 3
    assert gpt2.decode(other[0]["input_ids"]).startswith("[user] hi")


def test_a_tokenizer_copied_to_another_folder_reads_the_same_entry(rows, roberta, tmp_path: Path) -> None:
    """Where a tokenizer was read from is not what it is: a ``save_pretrained`` copy (each tiny test model
    saves one beside it) shares the entry, while ``add_prefix_space``, which changes the ids, does not."""
    first = tokenize_classification(rows, roberta, 64, cache=True)
    roberta.save_pretrained(tmp_path / "copy")
    copy = AutoTokenizer.from_pretrained(tmp_path / "copy")
    again = tokenize_classification(rows, copy, 64, cache=True)
    assert len(entries()) == 1 and again["input_ids"] == first["input_ids"]
    prefixed = AutoTokenizer.from_pretrained(tmp_path / "copy", add_prefix_space=True)
    tokenize_classification(rows, prefixed, 64, cache=True)
    assert len(entries()) == 2
