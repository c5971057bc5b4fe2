"""Model families beyond the paper's: each preset's q/v targets and sequence-classification head, checked on
tiny random models of the installed transformers, and ``all-linear`` resolved as PEFT resolves it. Every
adapter is saved by lorakit and loaded by PEFT, and merging leaves the outputs as they were."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import max_diff, perturb_heads, randomize_lora, train_glue_run

from lorakit.errors import UserError
from lorakit.families import lora_defaults, seq_cls_heads
from lorakit.lora import (
    LoraConfig,
    TargetNotFoundError,
    activated,
    add_adapter,
    inject_lora,
    lora_modules,
    mark_trainable,
    save_adapter,
    unload_lora,
)

VOCAB = 128  # token_batch draws ids below 120
# Sizes shared by every family; GQA (2 key/value heads for 4 query heads) where the family has it.
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
)
GQA = dict(num_key_value_heads=2, head_dim=8)
CONFIGS: dict[str, dict] = {
    "llama": {**TINY, **GQA},
    "mistral": {**TINY, **GQA},
    "qwen2": {**TINY, "num_key_value_heads": 2},
    "qwen3": {**TINY, **GQA},
    "gemma": {**TINY, **GQA},
    "gemma2": {**TINY, **GQA},
    "gemma3_text": {**TINY, **GQA},
    "phi": dict(TINY),  # Phi-1/2: multi-head attention
    "opt": {**TINY, "ffn_dim": 64, "word_embed_proj_dim": 32},
    "distilbert": dict(vocab_size=VOCAB, dim=32, hidden_dim=64, n_heads=4, n_layers=2),
    "xlm-roberta": dict(TINY),
    "camembert": dict(TINY),
    "deberta": dict(TINY),  # v1: q|k|v fused in one in_proj, adapted whole
    "electra": {**TINY, "embedding_size": 16},  # smaller than hidden: an embeddings_project Linear
    # all-linear only: GPT-2's and Phi-3's defaults (q/v slices of a fused projection) are tested in
    # test_adapter_io, test_fused_families and test_interleaved_families (per-head q|k|v).
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4),
    "phi3": {**TINY, "num_key_value_heads": 2},
    "gpt_neox": dict(TINY),
    "bloom": dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    "falcon": {**TINY, "new_decoder_architecture": True, "num_kv_heads": 2},
    # No preset: GPT-J is not among the families lorakit presets (its q_proj/v_proj would need one line).
    "gptj": dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
}
DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "opt")
# Where each family keeps W_q and W_v: written out, not derived from the presets under test.
QV = {
    **{t: "model.layers.{i}.self_attn.{p}" for t in DECODERS},
    "opt": "model.decoder.layers.{i}.self_attn.{p}",
    "distilbert": "distilbert.transformer.layer.{i}.attention.{p}",
    "xlm-roberta": "roberta.encoder.layer.{i}.attention.self.{p}",
    "camembert": "roberta.encoder.layer.{i}.attention.self.{p}",
    "deberta": "deberta.encoder.layer.{i}.attention.self.{p}",
    "electra": "electra.encoder.layer.{i}.attention.self.{p}",
}
QV_NAMES = {
    "distilbert": ("q_lin", "v_lin"),
    "xlm-roberta": ("query", "value"),
    "camembert": ("query", "value"),
    "deberta": ("in_proj",),
    "electra": ("query", "value"),
}
# Encoders: sequence classifiers only (DistilBERT has no causal-LM class; the others' are not LMs).
ENCODERS = ("distilbert", "xlm-roberta", "camembert", "electra", "deberta")
CASES = [
    *[(t, kind, targets) for t in DECODERS for kind in ("seq_cls", "causal") for targets in ("paper", "all")],
    *[(t, "seq_cls", targets) for t in ENCODERS for targets in ("paper", "all")],
    *[
        (t, kind, "all")
        for t in ("gpt2", "phi3", "gpt_neox", "bloom", "falcon")
        for kind in ("seq_cls", "causal")
    ],
]


def tiny(model_type: str, kind: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    # pad_token_id: a decoder classifier reads the last non-pad token and refuses batches without one.
    config = AutoConfig.for_model(model_type, pad_token_id=0, **CONFIGS[model_type])
    auto = AutoModelForSequenceClassification if kind == "seq_cls" else AutoModelForCausalLM
    return auto.from_config(config).eval()


def expected_qv(model_type: str) -> list[str]:
    names = QV_NAMES.get(model_type, ("q_proj", "v_proj"))
    return sorted(QV[model_type].format(i=i, p=p) for i in range(2) for p in names)


def peft_all_linear(base: torch.nn.Module, task_type: str, heads: list[str]) -> set[str]:
    """The modules PEFT itself adapts for ``target_modules="all-linear"``."""
    config = peft.LoraConfig(
        r=4, target_modules="all-linear", task_type=task_type, modules_to_save=list(heads) or None
    )
    return set(peft.get_peft_model(copy.deepcopy(base), config).base_model.targeted_module_names)


@pytest.mark.parametrize(("model_type", "kind", "targets"), CASES, ids=lambda v: str(v))
def test_peft_loads_and_merge_keeps_the_outputs(
    model_type: str, kind: str, targets: str, tmp_path: Path, token_batch
) -> None:
    base = tiny(model_type, kind)
    model = copy.deepcopy(base)
    # Filtered by presence, as lorakit.models does: a family without a preset gets two candidates.
    present = {n for n, _ in base.named_modules()}
    heads = [h for h in seq_cls_heads(model_type) if h in present] if kind == "seq_cls" else []
    task_type = "SEQ_CLS" if kind == "seq_cls" else "CAUSAL_LM"
    config = LoraConfig(
        r=4, alpha=8, target_modules=None if targets == "paper" else "all-linear", modules_to_save=heads
    )
    config = lora_defaults(model, config)  # null targets: the paper's, from the family's spec
    adapted = inject_lora(model, config)
    if targets == "paper":
        assert sorted(adapted) == expected_qv(model_type)
    else:
        assert set(adapted) == peft_all_linear(base, task_type, heads)
        assert not any(n.split(".")[0] in ("lm_head", "score", *heads) for n in adapted)
    mark_trainable(model, config.bias, heads)
    randomize_lora(model)
    perturb_heads(model, heads)

    with torch.no_grad():
        ours = model(**token_batch).logits
        with activated(model, None):
            without_lora = model(**token_batch).logits
    assert max_diff(ours, without_lora) > 1e-4  # the update counts, so the parity below is not vacuous

    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny", task_type=task_type)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(written["target_modules"], list)  # resolved names: PEFT adapts exactly these
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert set(theirs.base_model.targeted_module_names) == set(adapted)
    with torch.no_grad():
        assert max_diff(ours, theirs(**token_batch).logits) <= 1e-5
        merged = unload_lora(model, merge=True)
        assert not list(lora_modules(merged))
        assert max_diff(ours, merged(**token_batch).logits) <= 1e-5


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [*[(t, k) for t in DECODERS for k in ("seq_cls", "causal")], *[(t, "seq_cls") for t in ENCODERS]],
)
def test_a_mixed_batch_of_two_adapters_equals_each_alone(model_type: str, kind: str, token_batch) -> None:
    """Two adapters of one family on one base (the paper's targets at r = 4, all-linear at r = 2), rows of
    both in one batch: each row's logits are those its adapter gives alone."""
    from lorakit.lora import mixed_logits

    model = tiny(model_type, kind)
    present = {n for n, _ in model.named_modules()}
    heads = [h for h in seq_cls_heads(model_type) if h in present] if kind == "seq_cls" else []
    add_adapter(model, "qv", lora_defaults(model, LoraConfig(r=4, alpha=8, modules_to_save=heads)))
    add_adapter(model, "every", LoraConfig(r=2, alpha=4, target_modules="all-linear", modules_to_save=heads))
    randomize_lora(model)
    perturb_heads(model, heads)  # one copy each: the two heads differ once both are moved
    rows = ["qv", "every", "qv"]
    with torch.no_grad():
        alone = {}
        for name in ("qv", "every"):
            with activated(model, name):
                alone[name] = model(**token_batch).logits
        assert max_diff(alone["qv"], alone["every"]) > 1e-4  # two different adapters
        mixed, _ = mixed_logits(model, rows, **token_batch)
    for i, name in enumerate(rows):
        assert max_diff(mixed[i], alone[name][i]) <= 1e-5, (i, name)


@pytest.mark.parametrize("model_type", [*DECODERS, *ENCODERS])
def test_seq_cls_head_is_every_module_outside_the_base_model(model_type: str) -> None:
    """The head to train and save is exactly what a base checkpoint lacks: every parameter of the
    classifier outside its base model, and nothing inside it."""
    model = tiny(model_type, "seq_cls")
    heads = seq_cls_heads(model_type)
    outside = {n for n, _ in model.named_parameters() if not n.startswith(model.base_model_prefix + ".")}
    assert outside
    assert all(any(n.startswith(h + ".") for h in heads) for n in outside)
    assert all(any(n.startswith(h + ".") for n in outside) for h in heads)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "electra"])
def test_all_linear_leaves_the_classifier_out_even_when_it_is_not_saved(model_type: str) -> None:
    """``lora.modules_to_save: []``: PEFT still leaves a classifier's top-level ``score`` / ``classifier``
    out, and with it ELECTRA's dense layer inside its classifier. (Not DistilBERT: PEFT then matches
    pre_classifier as the module to save "classifier" by its name's ending, and refuses.)"""
    base = tiny(model_type, "seq_cls")
    adapted = inject_lora(copy.deepcopy(base), LoraConfig(target_modules="all-linear"))
    assert set(adapted) == peft_all_linear(base, "SEQ_CLS", [])
    assert not any(n.startswith(("score", "classifier")) for n in adapted)


def test_all_linear_adds_a_second_adapter_beside_the_first_and_never_inside_the_head() -> None:
    model = tiny("llama", "seq_cls")
    config = LoraConfig(r=4, alpha=8, target_modules="ALL-LINEAR", modules_to_save=["score"])  # case as PEFT
    first = add_adapter(model, "one", config)
    second = add_adapter(model, "two", config)
    assert first == second and len(first) == 2 * 7  # q, k, v, o, gate, up, down in each layer
    assert not any("score" in n for n, _ in lora_modules(model))


def test_a_family_without_a_preset_says_how_to_choose_targets() -> None:
    from lorakit.models import apply_lora
    from lorakit.recipe import recipe_from_dict
    from lorakit.tasks import get_task

    model = tiny("gptj", "seq_cls")
    message = (
        "no default LoRA targets for model type 'gptj'; set lora.target_modules, "
        "e.g. [q_proj, v_proj] (module names), a regular expression, or all-linear; this model's modules: "
    )
    with pytest.raises(TargetNotFoundError) as err:
        lora_defaults(model, LoraConfig())
    assert str(err.value).startswith(message) and "q_proj" in str(err.value)

    recipe = recipe_from_dict(
        {"model": {"name_or_path": "tiny/gptj"}, "task": {"name": "sst2"}}, source="r.yaml"
    )
    with pytest.raises(UserError, match=r"^r\.yaml: lora\.target_modules: no default LoRA targets .*'gptj'"):
        apply_lora(recipe, model, get_task("sst2"))
    # The same recipe with all-linear goes through: the schema's string is not read as a regex.
    recipe = recipe_from_dict(
        {
            "model": {"name_or_path": "tiny/gptj"},
            "task": {"name": "sst2"},
            "lora": {"target_modules": "all-linear"},
        },
        source="r.yaml",
    )
    config, adapted = apply_lora(recipe, model, get_task("sst2"))
    assert config.modules_to_save == ("score",)
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == [
        "fc_in",
        "fc_out",
        "k_proj",
        "out_proj",
        "q_proj",
        "v_proj",
    ]


def test_train_a_tiny_llama_classifier_on_sst2_and_peft_reloads_it(tmp_path: Path, shared_data: Path) -> None:
    """One real ``lorakit train`` run: default targets on a Llama sequence classifier (GPT-2 tokenizer)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    from lorakit.models import load_trained
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task

    eos = 50256  # GPT-2's; its tokenizer pads with eos, so the model's pad must be eos too
    base_dir = tmp_path / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**TINY, **GQA, "vocab_size": 50257}, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(base_dir)
    AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2").save_pretrained(base_dir)

    run = train_glue_run(
        tmp_path / "run", base_dir, "sst2", shared_data / "glue" / "SST-2", {"r": 4, "alpha": 32}
    )
    written = json.loads((run / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj"] and written["modules_to_save"] == ["score"]

    recipe = load_recipe(run / "recipe.yaml")
    prepared = load_trained(run, recipe, get_task(recipe.task.name, recipe.task.data_dir))
    rows = [
        line.split("\t")[0]
        for line in (shared_data / "glue" / "SST-2" / "dev.tsv").read_text().splitlines()[1:9]
    ]
    batch = prepared.tokenizer(rows, return_tensors="pt", padding=True)
    fresh = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    with torch.no_grad():
        before = fresh(**batch).logits
        theirs = peft.PeftModel.from_pretrained(fresh, run).eval()(**batch).logits
        ours = prepared.model(**batch).logits
    assert max_diff(ours, theirs) <= 1e-5
    assert max_diff(theirs, before) > 1e-4  # the run trained the head and LoRA: the file carries them


def test_bart_classifier_trains_its_classification_head_and_peft_reads_it(tmp_path: Path) -> None:
    """BART (encoder-decoder) pools the last EOS token: every row ends with one EOS. The paper's q/v in the
    encoder, the decoder and its cross-attention; the fresh ``classification_head`` saved with the adapter."""
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, eos_token_id=2, bos_token_id=0,
    )  # fmt: skip
    base = BartForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    ids[:, -1] = 2
    ids[1, 5], ids[1, 6:] = 2, 1  # a shorter row: EOS, then padding
    batch = {"input_ids": ids, "attention_mask": (ids != 1).long()}
    model = copy.deepcopy(base)
    heads = seq_cls_heads("bart")
    assert heads == ["classification_head"]
    config = lora_defaults(model, LoraConfig(r=4, alpha=8, modules_to_save=heads))
    adapted = inject_lora(model, config)
    assert len(adapted) == 2 * 2 + 2 * 2 * 2  # q, v: 2 encoder layers; 2 decoder layers, self and cross
    assert all(n.endswith(("q_proj", "v_proj")) for n in adapted)
    mark_trainable(model, config.bias, heads)
    randomize_lora(model)
    perturb_heads(model, heads)
    with torch.no_grad():
        ours = model(**batch).logits
    save_adapter(model, tmp_path, config, base_model_name_or_path="tiny", task_type="SEQ_CLS")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert max_diff(ours, theirs(**batch).logits) <= 1e-5
        assert max_diff(ours, base(**batch).logits) > 1e-3
        merged = unload_lora(model, merge=True)
        assert max_diff(ours, merged(**batch).logits) <= 1e-5
