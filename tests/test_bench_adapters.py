"""The ``adapters`` benchmark section on a tiny RoBERTa: every figure is there and the mixed batch equals
the merged models row for row. Fields and exactness are checked, never timings."""

from __future__ import annotations

from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_adapters_section_on_a_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_adapters

    result = bench_adapters.adapters_section("roberta-tiny", rows=8, seq=6, ks=(1, 4), reps=2)
    switching = result["switching"]
    assert (
        set(switching["switch_us"]) == {"lorakit", "peft"} and switching["switch_us"]["lorakit"]["reps"] == 2
    )
    assert switching["load_ratio"]["ratio_median"] > 0 and len(switching["load_ratio"]["ratios"]) == 2
    assert [m["adapters"] for m in result["mixed"]] == [1, 4]
    for m in result["mixed"]:
        assert set(m["times"]) == {"one", "mixed", "peft", "merged"}
        assert m["max_abs_diff_vs_merged"] <= 1e-5
        for key in ("mixed_vs_one", "mixed_vs_peft", "mixed_vs_merged"):
            assert m[key]["ratio_median"] > 0 and len(m[key]["ratios"]) == 2
    memory = result["memory"]
    one, merged = memory["one-base"], memory["merged"]
    assert (one["models"], merged["models"]) == (1, 16)
    assert one["adapter_bytes"] > 0 and one["model_bytes"] == merged["model_bytes"]
    assert one["model_rss_bytes"] > 0 and one["rss_bytes"] >= one["model_rss_bytes"]
    assert memory["bound_bytes"] == pytest.approx(1.05 * (one["model_rss_bytes"] + one["adapter_bytes"]))
