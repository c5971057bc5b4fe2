"""`lorakit info` from config.json alone: the paper's LoRA parameter counts, targets, memory estimate."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rich.console import Console

from lorakit.errors import UserError
from lorakit.info import collapse_names, describe, render
from lorakit.paper_models import PAPER_MODELS, save_paper_config
from lorakit.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def paper_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    dirs = {name: save_paper_config(name, root / name) for name in PAPER_MODELS}
    for path in dirs.values():
        assert [p.name for p in path.iterdir()] == ["config.json"]  # no weights to read
    return dirs


def recipe(path: Path, task: str = "mnli", **sections):
    return recipe_from_dict(
        {"model": {"name_or_path": str(path)}, "task": {"name": task}, **sections}, "r.yaml"
    )


@pytest.mark.parametrize(
    ("name", "r", "lora_params"),
    [("roberta-base", 8, 294_912), ("roberta-large", 8, 786_432), ("deberta-v2-xxlarge", 16, 4_718_592)],
)
def test_paper_lora_parameter_counts(paper_dirs, name, r, lora_params):
    start = time.perf_counter()
    report = describe(recipe(paper_dirs[name], lora={"r": r}))
    assert time.perf_counter() - start < 10  # meta device: seconds at most even for 1.5B parameters
    assert report.counts.lora == lora_params
    assert report.num_adapted == 2 * {"roberta-base": 12, "roberta-large": 24}.get(name, 48)
    assert report.counts.trainable > report.counts.lora  # the head trains too
    assert report.memory_lora.total < report.memory_full.total


def test_roberta_base_mnli_matches_the_released_checkpoint(paper_dirs):
    # The paper's roberta_base_lora_mnli.bin holds 887,811 tensors' worth: 294,912 LoRA + the 3-way head.
    report = describe(recipe(paper_dirs["roberta-base"]))
    assert (report.architecture, report.model_type) == ("RobertaForSequenceClassification", "roberta")
    assert report.counts.trainable == 887_811
    assert report.counts.total == 124_647_939 + 294_912  # roberta-base with its 3-way head, plus LoRA
    assert report.saved_bytes == 887_811 * 4
    assert report.targets == ["roberta.encoder.layer.{0..11}.attention.self.{query,value}"]
    assert report.modules_to_save == ["classifier"]


def test_memory_estimate_parts(paper_dirs):
    report = describe(recipe(paper_dirs["roberta-large"]))
    lora, full = report.memory_lora, report.memory_full
    trainable = report.counts.trainable
    assert lora.gradients == trainable * 4 and lora.optimizer == trainable * 8
    base = report.counts.total - report.counts.lora
    assert (full.weights, full.gradients, full.optimizer) == (base * 4, base * 4, base * 8)
    assert lora.weights == full.weights + report.counts.lora * 4


def test_bfloat16_weights_halve_but_lora_stays_float32(paper_dirs):
    path = str(paper_dirs["roberta-base"])
    fp32 = describe(recipe(paper_dirs["roberta-base"]))
    bf16 = describe(recipe_from_dict({"model": {"name_or_path": path, "dtype": "bfloat16"}}, "r.yaml"))
    assert bf16.memory_full.weights * 2 == fp32.memory_full.weights
    head = bf16.counts.trainable - bf16.counts.lora
    assert bf16.saved_bytes == bf16.counts.lora * 4 + head * 2  # LoRA fp32, head at the model dtype
    assert bf16.memory_lora.optimizer == fp32.memory_lora.optimizer  # AdamW moments are fp32 either way


def test_deberta_and_gpt2_targets(paper_dirs):
    deberta = describe(recipe(paper_dirs["deberta-v2-xxlarge"], "stsb", lora={"r": 16}))
    assert deberta.targets == ["deberta.encoder.layer.{0..47}.attention.self.{query_proj,value_proj}"]
    assert deberta.modules_to_save == ["classifier", "pooler"] and deberta.num_labels == 1
    gpt2 = describe(recipe(paper_dirs["gpt2-medium"], "e2e", lora={"r": 4, "alpha": 32}))
    assert gpt2.architecture == "GPT2LMHeadModel"
    assert gpt2.targets == ["transformer.h.{0..23}.attn.c_attn[q,v]"]
    assert gpt2.modules_to_save == [] and gpt2.counts.trainable == gpt2.counts.lora
    assert gpt2.counts.lora == 24 * 2 * 4 * (1024 + 1024)  # q and v slices of c_attn, r = 4


def test_bad_target_errors_as_training_would(paper_dirs):
    with pytest.raises(UserError, match=r"^r\.yaml: lora\.target_modules: .*'query_proj'"):
        describe(recipe(paper_dirs["roberta-base"], lora={"target_modules": ["query_proj"]}))


def test_full_method_counts_everything_and_ignores_lora(paper_dirs):
    report = describe(recipe(paper_dirs["roberta-base"], method="full", lora={"target_modules": ["nope"]}))
    assert report.counts.trainable == report.counts.total == 124_647_939
    assert report.memory_lora is None and "nope" in report.lora_error
    assert report.saved_bytes == report.memory_full.weights


def test_no_hub_access(paper_dirs, monkeypatch):
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError("describe must not load data")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    describe(recipe(paper_dirs["roberta-base"], "sst2"))


def test_render_shows_counts_targets_and_the_activations_caveat(paper_dirs):
    console = Console(record=True, width=160)
    console.print(render(describe(recipe(paper_dirs["gpt2-medium"], "e2e", lora={"r": 4}))))
    text = console.export_text()
    for expected in ("393,216 (0.39M)", "transformer.h.{0..23}.attn.c_attn[q,v]", "AdamW", "activations"):
        assert expected in text


def test_collapse_names():
    names = [f"enc.layer.{i}.attn.{m}" for i in range(12) for m in ("query", "value")]
    assert collapse_names(names) == ["enc.layer.{0..11}.attn.{query,value}"]
    assert collapse_names(["a.1.x", "a.3.x", "a.4.x", "head"]) == ["a.{1,3,4}.x", "head"]
    # Not a full grid over both numbers: listed as they are rather than over-claimed.
    assert collapse_names(["b.0.c.0", "b.1.c.1"]) == ["b.0.c.0", "b.1.c.1"]
    assert collapse_names(["m.0", "m.1", "m.2"]) == ["m.{0..2}"]
    assert collapse_names([]) == []
