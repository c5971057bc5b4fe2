"""``lorakit analyze``: the section 7 measurements on constructed matrices with known answers, and every
number of analysis.json against an independent numpy SVD of the saved tensors (a real tiny RoBERTa run
compared with a second run, and a tiny GPT-2 adapter on fused c_attn slices and Conv1D c_proj)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_lora, tiny_gpt2, train_glue_run
from safetensors.numpy import load_file

from lorakit.analysis import spectra
from lorakit.analysis.analyze import RANDOM_DRAWS, TOP, module_stats
from lorakit.analysis.updates import ModuleUpdate
from lorakit.cli import main
from lorakit.lora import LoraConfig, inject_lora, save_adapter, unload_lora

PREFIX = "base_model.model."


def _orthonormal(n: int, r: int, seed: int) -> torch.Tensor:
    return spectra.random_orthonormal(n, r, torch.Generator().manual_seed(seed))


# --- the math, on matrices built so the answer is known ------------------------------------------


def test_identical_subspaces_give_one_everywhere() -> None:
    a = torch.randn(8, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    phi = spectra.subspace_similarity(spectra.row_space_basis(a), spectra.row_space_basis(a))
    np.testing.assert_allclose(phi.numpy(), np.ones((8, 8)), atol=1e-12)
    # The same row space with another ordering of directions agrees once either side has all of it.
    mixed = spectra.row_space_basis(torch.randn(8, 8, dtype=torch.float64) @ a)
    phi = spectra.subspace_similarity(spectra.row_space_basis(a), mixed)
    np.testing.assert_allclose(phi[:, -1].numpy(), np.ones(8), atol=1e-12)
    np.testing.assert_allclose(phi[-1, :].numpy(), np.ones(8), atol=1e-12)


def test_orthogonal_subspaces_give_zero() -> None:
    q = _orthonormal(64, 16, seed=1)  # 16 orthonormal directions: the first 8 for A, the rest for B
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(8, 8, generator=gen, dtype=torch.float64) @ q[:, :8].t()
    b = torch.randn(6, 8, generator=gen, dtype=torch.float64) @ q[:, 8:].t()
    phi = spectra.subspace_similarity(spectra.row_space_basis(a), spectra.row_space_basis(b))
    assert phi.shape == (8, 6)
    assert phi.abs().max() < 1e-12


def test_random_subspaces_give_max_ij_over_n() -> None:
    """E‖U_iᵀU_j‖_F² = i·j/n for independent uniformly random subspaces, so E φ = max(i, j)/n. Averaged
    over 100 seeded draws, each cell must lie within 5 standard errors (its own spread across the draws
    / √100) of that: a fixed seed makes this deterministic, and 5σ leaves no room for a wrong formula —
    the nearest wrong answer, min(i, j)/n, is off by up to 7/64 ≈ 0.11, tens of standard errors."""
    n, draws = 64, 100
    grids = torch.stack([spectra.random_subspace_similarity(n, 8, 12, seed) for seed in range(draws)])
    mean, std = grids.mean(0), grids.std(0)
    i = torch.arange(1, 9, dtype=torch.float64)[:, None]
    j = torch.arange(1, 13, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j) / n
    assert ((mean - expected).abs() <= 5 * std / math.sqrt(draws)).all()


def test_effective_rank_and_energy() -> None:
    assert spectra.effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0])) == pytest.approx(4.0, abs=1e-12)
    assert spectra.effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-12)
    assert spectra.effective_rank(torch.zeros(3)) == 0.0
    np.testing.assert_allclose(spectra.energy(torch.tensor([4.0, 3.0])).numpy(), [16 / 25, 1.0])
    assert spectra.tail_error(torch.tensor([4.0, 3.0]), 1) == pytest.approx(3 / 5)


def test_low_rank_svd_matches_numpy_on_the_dense_product() -> None:
    gen = torch.Generator().manual_seed(3)
    b, a = torch.randn(40, 6, generator=gen), torch.randn(6, 30, generator=gen)
    svd = spectra.low_rank_svd(b, a, 0.5)
    dense = 0.5 * b.double().numpy() @ a.double().numpy()
    np.testing.assert_allclose(svd.s.numpy(), np.linalg.svd(dense, compute_uv=False)[:6], rtol=1e-10)
    rebuilt = svd.u.numpy() @ np.diag(svd.s.numpy()) @ svd.v.numpy().T
    np.testing.assert_allclose(rebuilt, dense, atol=1e-10)


def test_amplification_of_a_constructed_update() -> None:
    """W = U0 diag(w) V0ᵀ with known singular values, and ΔW built on W's 11th and 12th directions:
    ‖UᵀWV‖_F with ΔW's U, V is then sqrt(w₁₀² + w₁₁²), and the amplification is known exactly."""
    out, inp = 48, 32
    u0, v0 = _orthonormal(out, 32, seed=4), _orthonormal(inp, 32, seed=5)
    w_sv = torch.linspace(20.0, 1.0, 32, dtype=torch.float64)
    w = u0 @ torch.diag(w_sv) @ v0.t()
    d = torch.tensor([3.0, 2.0], dtype=torch.float64)
    b = u0[:, 10:12] * d  # ΔW = scale·B·A = u0[:,10:12] diag(d) v0[:,10:12]ᵀ with scale 2 folded below
    a = v0[:, 10:12].t() / 2.0
    update = ModuleUpdate("m", "m", None, 0, 1, "linear", a.float(), b.float(), 2.0)
    stats = module_stats(update, w.float())
    assert stats["delta_fro"] == pytest.approx(math.sqrt(13.0), rel=1e-6)
    assert stats["projection_fro"] == pytest.approx(float(torch.linalg.vector_norm(w_sv[10:12])), rel=1e-5)
    assert stats["w_top_projection_fro"] == pytest.approx(float(torch.linalg.vector_norm(w_sv[:2])), rel=1e-5)
    assert stats["amplification"] == pytest.approx(
        math.sqrt(13.0) / float(torch.linalg.vector_norm(w_sv[10:12])), rel=1e-5
    )
    assert stats["w_fro"] == pytest.approx(float(torch.linalg.vector_norm(w_sv)), rel=1e-6)


def test_random_projection_has_the_expected_size() -> None:
    """E‖UᵀWV‖_F² = (r/out)(r/in)‖W‖_F² for independent uniformly random orthonormal U, V; over 400
    draws the mean must be within 5 standard errors of it."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(40, 24, generator=gen, dtype=torch.float64) * torch.linspace(
        3, 0.1, 24, dtype=torch.float64
    )
    r, draws = 3, 400
    sq = torch.tensor(
        [
            spectra.projection_fro(
                w, spectra.random_orthonormal(40, r, gen), spectra.random_orthonormal(24, r, gen)
            )
            ** 2
            for _ in range(draws)
        ]
    )
    expected = (r / 40) * (r / 24) * float(torch.linalg.matrix_norm(w)) ** 2
    assert abs(float(sq.mean()) - expected) <= 5 * float(sq.std()) / math.sqrt(draws)


# --- analysis.json of real adapters against numpy -------------------------------------------------


def _np_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    u, s, vh = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    return u, s, vh.T


def _check_module(m: dict, delta: np.ndarray, w: np.ndarray, r: int) -> None:
    """Every Table 7 figure of one module against numpy on ΔW (out, in) and W0 (out, in)."""
    u, s, v = _np_svd(delta)
    s = s[:r]
    assert m["rank"] == r
    np.testing.assert_allclose(m["singular_values"], s, rtol=1e-6, atol=1e-9)
    assert m["delta_fro"] == pytest.approx(np.linalg.norm(delta), rel=1e-6)
    np.testing.assert_allclose(m["energy"], np.cumsum(s**2) / np.sum(s**2), rtol=1e-6)
    p = s / s.sum()
    assert m["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-6)
    assert m["w_fro"] == pytest.approx(np.linalg.norm(w), rel=1e-6)
    proj = np.linalg.norm(u[:, :r].T @ w @ v[:, :r])
    assert m["projection_fro"] == pytest.approx(proj, rel=1e-5)
    uw, _, vw = _np_svd(w)
    assert m["w_top_projection_fro"] == pytest.approx(np.linalg.norm(uw[:, :r].T @ w @ vw[:, :r]), rel=1e-6)
    assert m["amplification"] == pytest.approx(np.linalg.norm(delta) / proj, rel=1e-5)
    # Random subspaces: the same seeded draws reproduce it; and it is of the expected size, r‖W‖/√(out·in)
    # on average (10 draws: within a factor of 1.5 for these shapes).
    assert m["random_projection_fro"] == pytest.approx(
        spectra.random_projection_fro(torch.from_numpy(w), r, RANDOM_DRAWS, seed=0), rel=1e-9
    )
    expected = r * np.linalg.norm(w) / math.sqrt(w.shape[0] * w.shape[1])
    assert expected / 1.5 < m["random_projection_fro"] < expected * 1.5


def _phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """φ(i, j) by its definition, one cell at a time."""
    v1, v2 = _np_svd(a1)[2], _np_svd(a2)[2]
    grid = np.zeros((a1.shape[0], a2.shape[0]))
    for i in range(1, a1.shape[0] + 1):
        for j in range(1, a2.shape[0] + 1):
            grid[i - 1, j - 1] = np.linalg.norm(v1[:, :i].T @ v2[:, :j]) ** 2 / min(i, j)
    return grid


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, tiny_roberta_dir: Path, shared_data: Path) -> tuple:
    root = tmp_path_factory.mktemp("analysis-runs")
    sst2 = shared_data / "glue" / "SST-2"
    first = train_glue_run(root / "r4", tiny_roberta_dir, "sst2", sst2, {"r": 4, "alpha": 8})
    second = train_glue_run(root / "r8", tiny_roberta_dir, "sst2", sst2, {"r": 8, "alpha": 8, "dropout": 0.0})
    return first, second


def test_analysis_json_of_a_real_run_matches_numpy(
    two_runs: tuple, tiny_roberta_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = two_runs
    out = tmp_path / "report"
    assert main(["analyze", str(first), "--compare", str(second), "--out", str(out)]) == 0
    assert f"analysis written to {out}" in capsys.readouterr().out
    data = json.loads((out / "analysis.json").read_text())
    assert {p.name for p in out.iterdir()} == {
        "analysis.json",
        "analysis.md",
        "singular_values.png",
        "subspace_similarity.png",
    }
    base = load_file(tiny_roberta_dir / "model.safetensors")
    t1, t2 = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    names = [f"roberta.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")]
    assert sorted(data["modules"]) == sorted(names) == sorted(data["compare_modules"])
    for name in names:
        a1, b1 = t1[f"{PREFIX}{name}.lora_A.weight"], t1[f"{PREFIX}{name}.lora_B.weight"]
        a2, b2 = t2[f"{PREFIX}{name}.lora_A.weight"], t2[f"{PREFIX}{name}.lora_B.weight"]
        w = base[f"{name}.weight"].astype(np.float64)  # nn.Linear: already (out, in)
        m = data["modules"][name]
        _check_module(m, (8 / 4) * b1.astype(np.float64) @ a1, w, 4)
        _check_module(data["compare_modules"][name], (8 / 8) * b2.astype(np.float64) @ a2, w, 8)
        phi = _phi(a1, a2)
        np.testing.assert_allclose(m["subspace_similarity"], phi, atol=1e-9)
        assert m["phi_11"] == pytest.approx(phi[0, 0], abs=1e-9)
        assert m["phi_mean_top"] == pytest.approx(phi[:TOP, :TOP].mean(), abs=1e-9)
        rand = np.array(m["random_subspace_similarity"])
        assert rand.shape == (4, 8) and ((rand >= -1e-12) & (rand <= 1 + 1e-12)).all()
        assert m["random_phi_11"] == rand[0, 0] and m["random_phi_mean_top"] == pytest.approx(rand.mean())
    text = (out / "analysis.md").read_text()
    assert f"`{names[0]}` | 4 | {data['modules'][names[0]]['delta_fro']:.3f}" in text
    # A second analysis replaces the first (its own output); a user's folder is refused.
    assert main(["analyze", str(first), "--out", str(out)]) == 0
    assert "compare_modules" not in json.loads((out / "analysis.json").read_text())
    assert not (out / "subspace_similarity.png").exists()


def _analyzed_gpt2_adapter(
    model: torch.nn.Module, config: LoraConfig, tmp_path: Path, seed: int
) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict]:
    """A random LoRA adapter on ``model`` saved to tmp_path/adapter (base beside it) and analyzed into
    tmp_path/out: (the base model, the merged state dict, analysis.json)."""
    model.save_pretrained(tmp_path / "base")
    base = copy.deepcopy(model)
    inject_lora(model, config)
    randomize_lora(model, seed=seed)
    save_adapter(model, tmp_path / "adapter", config, str(tmp_path / "base"), "CAUSAL_LM")
    merged = unload_lora(copy.deepcopy(model), merge=True).state_dict()
    assert main(["analyze", str(tmp_path / "adapter"), "--out", str(tmp_path / "out")]) == 0
    return base, merged, json.loads((tmp_path / "out" / "analysis.json").read_text())


def test_gpt2_fused_slices_and_conv1d_match_the_merged_update(tmp_path: Path) -> None:
    """A tiny GPT-2 adapter on c_attn[q, v] (fused, Conv1D) and c_proj (Conv1D): each slice is its own
    module, with ΔW and W0 (out, in) exactly as merging applies them (merged weight minus base)."""
    model = tiny_gpt2()
    config = LoraConfig(
        r=3, alpha=6, target_modules=["c_attn[q,v]", "attn.c_proj"], fused_slices={"c_attn": ("q", "k", "v")}
    )
    base, merged, data = _analyzed_gpt2_adapter(model, config, tmp_path, seed=4)
    expected = [f"transformer.h.{i}.attn.{m}" for i in range(2) for m in ("c_attn[q]", "c_attn[v]", "c_proj")]
    assert sorted(data["modules"]) == sorted(expected)
    w_base = base.state_dict()
    for name in expected:
        path, slot = (name[:-3], "qkv".index(name[-2])) if name.endswith("]") else (name, 0)
        rows = slice(32 * slot, 32 * (slot + 1))
        w0 = w_base[path + ".weight"].double().numpy().T[rows]  # Conv1D stores (in, out)
        delta = merged[path + ".weight"].double().numpy().T[rows] - w0
        _check_module(data["modules"][name], delta, w0, 3)
    # k, the slice left alone, has no update at all.
    k_rows = slice(32, 64)
    np.testing.assert_array_equal(
        merged["transformer.h.0.attn.c_attn.weight"].numpy().T[k_rows],
        w_base["transformer.h.0.attn.c_attn.weight"].numpy().T[k_rows],
    )


def test_analyze_errors_are_one_line(
    two_runs: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = two_runs
    cases = [
        ["analyze", str(tmp_path / "missing")],
        ["analyze", str(tmp_path)],  # a directory without an adapter
        ["analyze", str(first), "--compare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
    ]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cases.append(["analyze", str(first), "--out", str(mine)])
    for args in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("lorakit: error:") and "\n" not in err and "Traceback" not in err
    assert (mine / "notes.txt").read_text() == "mine" and sorted(p.name for p in mine.iterdir()) == [
        "notes.txt"
    ]


def test_a_plain_peft_adapter_is_read_with_its_recorded_base(tiny_roberta_dir: Path, tmp_path: Path) -> None:
    """A folder PEFT itself wrote (no recipe): the base comes from base_model_name_or_path."""
    from conftest import peft_three_label_adapter

    adapter = peft_three_label_adapter(tmp_path / "peft", tiny_roberta_dir)
    assert main(["analyze", str(adapter)]) == 0
    data = json.loads((adapter / "analysis" / "analysis.json").read_text())
    tensors, base = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(tiny_roberta_dir / "model.safetensors"),
    )
    name = "roberta.encoder.layer.1.attention.self.value"
    delta = (
        (8 / 4)
        * tensors[f"{PREFIX}{name}.lora_B.weight"].astype(np.float64)
        @ tensors[f"{PREFIX}{name}.lora_A.weight"]
    )
    _check_module(data["modules"][name], delta, base[f"{name}.weight"].astype(np.float64), 4)


def test_an_embedding_pair_is_analyzed_and_resized_as_its_merged_update(tmp_path: Path) -> None:
    """LoRA on GPT-2's token embedding: ΔW laid out (out, in) = (dim, vocabulary), as merging applies it
    transposed into the (vocabulary, dim) table; resize keeps its top directions with the tail error."""
    config = LoraConfig(r=4, alpha=8, target_modules=["wte"])
    base, merged, data = _analyzed_gpt2_adapter(tiny_gpt2(), config, tmp_path, seed=5)
    assert list(data["modules"]) == ["transformer.wte"]
    w0 = base.state_dict()["transformer.wte.weight"].double().numpy().T
    delta = merged["transformer.wte.weight"].double().numpy().T - w0
    _check_module(data["modules"]["transformer.wte"], delta, w0, 4)

    assert main(["resize", str(tmp_path / "adapter"), "--rank", "2", "--out", str(tmp_path / "r2")]) == 0
    report = json.loads((tmp_path / "r2" / "resize.json").read_text())["modules"]["transformer.wte"]
    s = _np_svd(delta)[1]
    assert report["relative_error"] == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s**2).sum()), rel=1e-6)
    tensors = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    assert tensors[f"{PREFIX}transformer.wte.lora_embedding_A"].shape[0] == 2
