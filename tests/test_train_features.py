"""The lean device path: LoRA weights on the model's device and in float32 under bf16/fp16 autocast,
gradient checkpointing that still trains LoRA weights, a clear error for fp16 on the CPU, and the peak
memory that metrics.json reports. CUDA-marked cases run with `pytest -m cuda` (scripts/gpu_check.sh)."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_lora, tiny_roberta, write_recipe
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.models import apply_lora
from lorakit.recipe import recipe_from_dict
from lorakit.tasks import get_task
from lorakit.training.execution import enable_gradient_checkpointing
from lorakit.training.optimization import build_optimizer, float32_trainables, task_loss

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = [pytest.mark.cuda, NO_CUDA]
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _lora_roberta(
    dtype: torch.dtype = torch.float32, device: str = "cpu", bias: str = "none"
) -> torch.nn.Module:
    model = tiny_roberta(**NO_DROPOUT).to(device=device, dtype=dtype)
    apply_lora(recipe_from_dict({"task": {"name": "sst2"}, "lora": {"bias": bias}}), model, get_task("sst2"))
    return model


def _lora(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_lora_weights_are_created_on_the_models_device_in_float32(device: str) -> None:
    model = _lora_roberta(torch.bfloat16, device)
    lora = _lora(model)
    assert lora and all(p.device.type == device and p.dtype == torch.float32 for p in lora.values())
    assert model.roberta.embeddings.word_embeddings.weight.dtype == torch.bfloat16  # the base stays bf16


@pytest.mark.parametrize(
    ("device", "precision"),
    [("cpu", "bf16"), pytest.param("cuda", "bf16", marks=CUDA), pytest.param("cuda", "fp16", marks=CUDA)],
)
def test_a_mixed_precision_step_on_a_half_base_keeps_trainable_weights_float32(
    device: str, precision: str
) -> None:
    from accelerate import Accelerator

    half = torch.bfloat16 if precision == "bf16" else torch.float16
    model = _lora_roberta(half, device, bias="all")  # bias "all": trainable biases in half-precision norms
    float32_trainables(model)
    acc = Accelerator(mixed_precision=precision, cpu=device == "cpu")
    model, optimizer = acc.prepare(model, build_optimizer(model, 1e-2, 0.0))
    assert (acc.scaler is not None) == (precision == "fp16")  # fp16 trains with loss scaling
    before = {n: p.detach().clone() for n, p in _lora(model).items()}
    ids = torch.randint(3, 120, (4, 12), generator=torch.Generator().manual_seed(0)).to(acc.device)
    head = []  # Accelerate returns float32 logits; the head's own output shows the autocast dtype
    acc.unwrap_model(model).classifier.dense.register_forward_hook(lambda m, i, out: head.append(out.dtype))
    logits = model(input_ids=ids).logits
    assert head == [half]  # a float32 head on half activations: only autocast makes that one dtype
    acc.backward(task_loss(logits, torch.tensor([0, 1, 1, 0], device=acc.device), "classification", 0.0))
    optimizer.step()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainable.values())
    assert all(p.device.type == device for p in trainable.values())
    # Adam's moments too: one per trainable tensor, float32 like the weights they update.
    moments = [optimizer.state[p][k] for p in trainable.values() for k in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(trainable) and {m.dtype for m in moments} == {torch.float32}
    moved = [n for n, p in _lora(model).items() if "lora_B" in n and not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in trainable.values())


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    model.train()
    model(input_ids=ids).logits.square().sum().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in _lora(model).items()}


def test_gradient_checkpointing_recomputes_blocks_and_still_trains_lora_weights() -> None:
    model = _lora_roberta()
    randomize_lora(model)  # B = 0 would leave A without a gradient either way
    ids = torch.randint(3, 120, (3, 10), generator=torch.Generator().manual_seed(0))
    calls = []
    query = model.roberta.encoder.layer[0].attention.self.query
    query.register_forward_hook(lambda *_: calls.append(1))
    plain = _grads(model, ids)
    assert len(calls) == 1
    enable_gradient_checkpointing(model)
    calls.clear()
    checkpointed = _grads(model, ids)
    assert len(calls) == 2  # forward, then again in the backward pass: the activations were not kept
    for name, grad in plain.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def _recipe(tmp_path: Path, model_dir: Path, shared_data: Path, **train) -> Path:
    path = tmp_path / "r.yaml"
    recipe = {
        "model": {"name_or_path": str(model_dir), "dtype": "bfloat16"},
        "task": {
            "name": "sst2",
            "data_dir": str(shared_data / "glue" / "SST-2"),
            "max_length": 64,
            "max_train_samples": 32,
            "max_eval_samples": 16,
        },
        "lora": {"r": 4, "alpha": 8, "bias": "all"},
        "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-2, "log_every": 1, **train},
        "output_dir": str(tmp_path / "run"),
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bf16_training_on_a_bf16_base_with_gradient_checkpointing(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    recipe = _recipe(
        tmp_path,
        tiny_roberta_dir,
        shared_data,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        save_every=2,
    )
    assert main(["train", str(recipe)]) == 0, capsys.readouterr().err
    adapter = load_file(tmp_path / "run" / "final" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.dtype == torch.float32 for v in lora_b)
    # What the optimizer holds stays float32 under bf16 autocast on a bf16 base: the weights it updates
    # and Adam's moments (as the checkpoint stores them).
    checkpoint = tmp_path / "run" / "checkpoints" / "step-2"
    weights = load_file(checkpoint / "trainable.safetensors")
    assert weights and {v.dtype for v in weights.values()} == {torch.float32}
    moments = {k: v for k, v in load_file(checkpoint / "state.safetensors").items() if "exp_avg" in k}
    assert len(moments) == 2 * len(weights) and {v.dtype for v in moments.values()} == {torch.float32}
    assert max(v.abs().max().item() for v in lora_b) > 0  # gradients reached LoRA through checkpointing
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if torch.cuda.is_available():
        assert metrics["peak_memory_kind"] == "cuda_max_allocated" and metrics["peak_memory_bytes"] > 0
    else:  # the process's max resident set: at least what it held before, at most what it holds now
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        assert metrics["peak_memory_kind"] == "cpu_max_rss"
        assert rss_before <= metrics["peak_memory_bytes"] <= rss_after


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is fine on a GPU")
def test_fp16_without_a_gpu_is_a_recipe_error(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tmp_path, tiny_roberta_dir, shared_data, mixed_precision="fp16")
    for extra in ([], ["--num-processes", "2"]):  # refused before any process is launched, too
        assert main(["train", str(recipe), *extra]) == 2
        err = capsys.readouterr().err
        assert "train.mixed_precision" in err and "fp16" in err and "Traceback" not in err
        assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.cuda
@NO_CUDA
def test_peak_memory_on_cuda_is_this_runs_max_allocated(
    tiny_roberta_dir: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # an earlier peak of 256 MiB
    del earlier
    torch.cuda.empty_cache()
    recipe = _recipe(tmp_path, tiny_roberta_dir, shared_data, mixed_precision="bf16")
    assert main(["train", str(recipe)]) == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["peak_memory_kind"] == "cuda_max_allocated"
    assert (
        0 < metrics["peak_memory_bytes"] < 256 * 2**20
    )  # reset at the start: the earlier peak is not counted


@pytest.mark.slow  # Inductor compiles the model's graphs first: over a minute on 2 CPU cores
def test_train_compile_gives_the_eager_adapter_and_reports_no_graph_break_in_lora(
    no_dropout_roberta: Path, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapters = {}
    for compiled in (False, True):
        out = tmp_path / ("compiled" if compiled else "eager")
        recipe = write_recipe(
            tmp_path / f"{out.name}.yaml",
            no_dropout_roberta,  # compiled dropout draws its masks from other random streams
            "sst2",
            shared_data / "glue" / "SST-2",
            out,
            task={"max_length": 64, "max_train_samples": 32, "max_eval_samples": 16},
            lora={"r": 4, "alpha": 8, "dropout": 0.0},
            train={"max_steps": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1, "compile": compiled},
        )
        assert main(["train", str(recipe)]) == 0, capsys.readouterr().err
        adapters[compiled] = load_file(out / "final" / "adapter_model.safetensors")
        metrics = json.loads((out / "metrics.json").read_text())
        assert ("compile" in metrics) == compiled
    report = metrics["compile"]
    # LoRA's own autograd op and the per-adapter heads are captured whole: Dynamo breaks nowhere.
    assert report["graph_breaks"] == 0, report["break_reasons"]
    assert report["unique_graphs"] >= 1
    eager, compiled_adapter = adapters[False], adapters[True]
    assert eager.keys() == compiled_adapter.keys()
    assert max((eager[k] - compiled_adapter[k]).abs().max().item() for k in eager) <= 1e-5
