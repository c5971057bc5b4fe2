"""Decoder sequence classifiers pool each row's last real token (``lorakit.pooling``), even where the text
itself ends with the EOS token that pads the batch (GPT-2's real tokenizer, where pad == eos): checked
against the head applied by hand to the body's hidden state at that position, on the plain model, through
two adapters in one mixed batch, after merging, in the gradient, and through ``lorakit train``. Each check
also shows that transformers' own pooling reads another position for the EOS row, so none can pass
without the fix."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, randomize_lora
from test_families import DECODERS, ENCODERS, tiny

from lorakit.data.batching import PaddingCollator
from lorakit.families import lora_defaults
from lorakit.lora import LoraConfig, activated, add_adapter, mixed_logits, unload_lora
from lorakit.models import HeadSpec, apply_lora, build_model, load_trained
from lorakit.pooling import last_real_positions, pool_last_real_token, pools_last_token
from lorakit.recipe import load_trained_recipe, recipe_from_dict
from lorakit.tasks import build_task

GPT2_EOS = 50256
LLAMA_EOS = 2
HEAD = HeadSpec("classification", 3)
# Where each body's last hidden state is made (its final norm), to read the gradient that reaches it.
FINAL_NORM = {"gpt2": "ln_f", "llama": "norm"}


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SHARED_DATA / "tokenizers" / "gpt2")
    assert tokenizer.pad_token is None  # as shipped: lorakit pads GPT-2 with eos
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer) -> dict[str, Path]:
    """Tiny causal-LM checkpoints without a pad id, as GPT-2 and Llama 3 ship: GPT-2 with its full
    vocabulary and real tokenizer beside it, Llama with grouped-query attention."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dirs = {"gpt2": tmp_path_factory.mktemp("tiny-gpt2"), "llama": tmp_path_factory.mktemp("tiny-llama")}
    gpt2 = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=GPT2_EOS)
    GPT2LMHeadModel(gpt2).save_pretrained(dirs["gpt2"])
    gpt2_tokenizer.save_pretrained(dirs["gpt2"])
    llama = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        bos_token_id=1,
        eos_token_id=LLAMA_EOS,
        pad_token_id=None,
    )
    LlamaForCausalLM(llama).save_pretrained(dirs["llama"])
    return dirs


def recipe_for(path: Path):
    return recipe_from_dict({"model": {"name_or_path": str(path)}, "task": {"name": "mnli"}}, source="r.yaml")


def eos_batch(family: str, tokenizer) -> dict[str, torch.Tensor]:
    """Three rows right-padded (with eos) to different lengths; row 0 really ends with eos."""
    if family == "gpt2":
        texts = ["a fine film<|endoftext|>", "dull", "an utterly forgettable , overlong mess"]
        rows = [tokenizer(t) for t in texts]
        assert rows[0]["input_ids"][-1] == GPT2_EOS  # the string is read as the eos token itself
        pad = tokenizer
    else:
        ids = [[1, 17, 40, 9, 23, LLAMA_EOS], [1, 61, 5], [1, 33, 70, 12, 88, 45, 19, 90]]
        rows = [{"input_ids": r, "attention_mask": [1] * len(r)} for r in ids]
        pad = type("Tok", (), {"pad_token_id": LLAMA_EOS, "eos_token_id": LLAMA_EOS})()
    batch = PaddingCollator(pad)(rows)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert len(set(lengths)) == 3
    eos = GPT2_EOS if family == "gpt2" else LLAMA_EOS
    assert set(batch["input_ids"][0, lengths[0] - 1 :].tolist()) == {eos}  # its own eos, then padding
    return batch


def head_by_hand(model: torch.nn.Module, batch: dict[str, torch.Tensor], shift: int = 0) -> torch.Tensor:
    """The head applied to the body's own hidden state (``forward`` called directly, so no hook runs) at
    each right-padded row's last real position, ``shift`` positions earlier."""
    hidden = model.base_model.forward(**batch).last_hidden_state
    last = batch["attention_mask"].sum(-1) - 1 - shift
    return model.score(hidden)[torch.arange(len(last)), last]


def plain_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a fresh transformers classifier: transformers' own pooling, no hook."""
    twin = type(model)(model.config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_built_classifier_pools_the_last_real_token_even_when_it_is_eos(
    family: str, model_dirs: dict[str, Path], gpt2_tokenizer
) -> None:
    model = build_model(recipe_for(model_dirs[family]), HEAD).eval()
    # The pad id is eos on the config, not only on the tokenizer: transformers refuses batches without it.
    assert model.config.pad_token_id == (GPT2_EOS if family == "gpt2" else LLAMA_EOS)
    batch = eos_batch(family, gpt2_tokenizer)
    with torch.no_grad():
        logits = model(**batch).logits
        assert close(logits, head_by_hand(model, batch))
        # Unfixed, transformers takes row 0's final eos for padding and pools the token before it.
        theirs = plain_twin(model)(**batch).logits
        assert close(theirs[0], head_by_hand(model, batch, shift=1)[0])
        assert not close(theirs[0], logits[0])
        assert close(theirs[1:], logits[1:])  # rows without a final eos pool where they always did


@pytest.mark.parametrize("model_type", [*DECODERS, "gpt2", "phi3"])
def test_every_decoder_family_pools_its_last_real_token(model_type: str) -> None:
    """The families with presets (tiny models of their configs; pad id 0): a row ending with the pad id."""
    model = tiny(model_type, "seq_cls")
    twin = copy.deepcopy(model)
    hooks = len(model.base_model._forward_hooks)
    assert pools_last_token(model) and pool_last_real_token(model) and pool_last_real_token(model)
    assert len(model.base_model._forward_hooks) == hooks + 1  # installed once, however often asked
    ids = torch.tensor([[5, 9, 44, 0, 0, 0], [7, 21, 30, 11, 60, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])  # row 0's 4th token is a real 0
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        logits = model(**batch).logits
        assert close(logits, head_by_hand(model, batch))
        assert not close(twin(**batch).logits[0], logits[0])


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoders_keep_their_own_pooling(model_type: str, token_batch: dict[str, torch.Tensor]) -> None:
    model = tiny(model_type, "seq_cls")
    assert not pools_last_token(model) and not pool_last_real_token(model)
    assert not model.base_model._forward_hooks


def test_causal_lms_and_encoders_built_by_lorakit_are_untouched(
    model_dirs: dict[str, Path], tiny_roberta_dir: Path
) -> None:
    lm = build_model(recipe_for(model_dirs["gpt2"]), HeadSpec("generation", 1))
    encoder = build_model(recipe_for(tiny_roberta_dir), HEAD)
    for model in (lm, encoder):
        assert not pools_last_token(model) and not model.base_model._forward_hooks


def test_last_real_positions_read_the_mask_for_either_padding_side() -> None:
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert last_real_positions(mask, 4, 4).tolist() == [3, 2, 0, 3]
    assert last_real_positions(None, 2, 5).tolist() == [4, 4]  # no mask: every token is real
    # With a cache, the mask spans earlier positions too; the hidden state only the last ones.
    assert last_real_positions(torch.tensor([[1, 1, 1, 1, 0]]), 1, 2).tolist() == [0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_adapters_in_one_mixed_batch_each_pool_the_last_real_token(
    family: str, model_dirs: dict[str, Path], gpt2_tokenizer
) -> None:
    """Each adapter's own head copy (lorakit's per-adapter wrapper) sees its rows at their last real token."""
    model = build_model(recipe_for(model_dirs[family]), HEAD).eval()
    for name in ("a", "b"):
        # The paper's targets for the family (GPT-2's q and v slices, Llama's q_proj and v_proj).
        add_adapter(model, name, lora_defaults(model, LoraConfig(r=4, alpha=8, modules_to_save=["score"])))
    randomize_lora(model)
    with torch.no_grad():
        for name in ("a", "b"):
            model.score.copies[name].weight.normal_(std=0.3)
    batch = eos_batch(family, gpt2_tokenizer)
    with torch.no_grad():
        for rows in (["a", "b", "a"], ["b", None, "b"]):
            mixed, _ = mixed_logits(model, rows, **batch)
            for i, name in enumerate(rows):
                with activated(model, name):
                    assert close(mixed[i], head_by_hand(model, batch)[i]), (rows, i)
        with activated(model, "a"):
            alone = model(**batch).logits
            assert not close(alone[0], head_by_hand(model, batch, shift=1)[0])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merged_model_pools_the_last_real_token_where_lorakit_loads_it(
    family: str, model_dirs: dict[str, Path], gpt2_tokenizer, tmp_path: Path
) -> None:
    """After ``unload_lora(merge=True)`` the model still pools the last real token; saved and read back by
    plain transformers it pools by pad id again (as documented), by lorakit's ``build_model`` it does not."""
    from transformers import AutoModelForSequenceClassification

    recipe = recipe_for(model_dirs[family])
    model = build_model(recipe, HEAD).eval()
    apply_lora(recipe, model, build_task(recipe.task))
    randomize_lora(model)
    batch = eos_batch(family, gpt2_tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
        merged = unload_lora(model, merge=True)
        after = merged(**batch).logits
        assert close(after, before) and close(after, head_by_hand(merged, batch))
        merged.save_pretrained(tmp_path)
        plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert close(plain(**batch).logits[0], head_by_hand(merged, batch, shift=1)[0])
        assert not close(plain(**batch).logits[0], after[0])
        again = build_model(recipe_for(tmp_path), HEAD).eval()
        assert close(again(**batch).logits, after)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_only_the_last_real_position_gets_gradient_through_the_head(
    family: str, model_dirs: dict[str, Path], gpt2_tokenizer
) -> None:
    model = build_model(recipe_for(model_dirs[family]), HEAD).eval()  # eval: no dropout, same graph
    states: list[torch.Tensor] = []
    norm = model.base_model.get_submodule(FINAL_NORM[family])
    norm.register_forward_hook(lambda _m, _a, out: states.append(out) or out.retain_grad())
    batch = eos_batch(family, gpt2_tokenizer)
    model(**batch, labels=torch.tensor([0, 1, 2])).loss.backward()
    grad = states[0].grad.abs().sum(-1)  # (rows, positions): how much each position's state moves the loss
    last = batch["attention_mask"].sum(-1) - 1
    for i in range(3):
        assert grad[i, last[i]] > 0, i
        others = torch.ones_like(grad[i], dtype=torch.bool)
        others[last[i]] = False
        assert grad[i, others].max() == 0, i  # row 0's token before eos (transformers' pick) included


def _eos_rows(split: str, n: int, tokenizer) -> list[tuple[str, str]]:
    """Short real SST-2 sentences; every other one ends with the eos string, and its label says so."""
    lines = (SHARED_DATA / "glue" / "SST-2" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0].strip() for line in lines]
    short = [s for s in sentences if 3 <= len(tokenizer(s)["input_ids"]) <= 30][:n]
    assert len(short) == n
    return [(s + "<|endoftext|>", "eos") if i % 2 else (s, "plain") for i, s in enumerate(short)]


def test_lorakit_train_evaluates_a_gpt2_classifier_at_the_last_real_token(
    model_dirs: dict[str, Path], gpt2_tokenizer, tmp_path: Path
) -> None:
    """A tiny GPT-2 learns whether a text ends with eos, which only the last real token can tell: the
    run's eval predictions and accuracy are those of its head at each text's last token, computed here by
    hand, and differ from those at the token transformers would pool."""
    import yaml

    from lorakit.cli import main

    files = {}
    for split, name, n in (("train", "train", 64), ("dev", "dev", 32)):
        files[name] = tmp_path / f"{name}.csv"
        with open(files[name], "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows([("text", "label"), *_eos_rows(split, n, gpt2_tokenizer)])
    run = tmp_path / "run"
    recipe = {
        "model": {"name_or_path": str(model_dirs["gpt2"])},
        "task": {
            "type": "classification",
            "train_file": str(files["train"]),
            "validation_file": str(files["dev"]),
            "labels": ["plain", "eos"],
            "max_length": 48,
        },
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 12, "batch_size": 8, "eval_batch_size": 8, "lr": 2e-2, "log_every": 4},
        "output_dir": str(run),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(tmp_path / "r.yaml")]) == 0

    saved = load_trained_recipe(run / "recipe.yaml")
    model = load_trained(run, saved, build_task(saved.task)).model
    dev = _eos_rows("dev", 32, gpt2_tokenizer)
    ours, theirs = [], []
    with torch.no_grad():
        for text, _ in dev:
            ids = torch.tensor([gpt2_tokenizer(text)["input_ids"]])
            every = model.score(model.base_model.forward(input_ids=ids).last_hidden_state)[0]
            ours.append(int(every[-1].argmax()))
            # transformers' pick: the rightmost token that is not the pad id (eos), one earlier for eos rows
            theirs.append(int(every[int((ids[0] != GPT2_EOS).nonzero().max())].argmax()))
    labels = [["plain", "eos"].index(label) for _, label in dev]
    predictions = [json.loads(line) for line in (run / "eval" / "predictions-validation.jsonl").open()]
    assert [p["prediction"] for p in predictions] == ours
    assert [p["label"] for p in predictions] == labels
    accuracy = sum(p == y for p, y in zip(ours, labels, strict=True)) / len(labels)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["accuracy"] == pytest.approx(100 * accuracy)  # reported in percent
    assert ours != theirs
