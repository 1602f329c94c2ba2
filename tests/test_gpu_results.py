"""Reading and plotting recorded GPU results (``kernels/results/gpu-*.json``) on synthetic files."""

import json

import matplotlib.pyplot as plt
import pytest

from sparsekit.kernels.gpu_results import (
    goal_frame,
    load_gpu_results,
    plot_result,
    result_label,
    timing_frame,
)


def _timing(shape, batch, method, us, sparsity=0.0, pattern="dense"):
    return {"shape": list(shape), "batch": batch, "method": method, "pattern": pattern, "sparsity": sparsity,
            "bits": 16, "dtype": "float16", "us": us, "bytes": 1, "gbs": 1.0, "bw_frac": 0.5, "timer": "test",
            "max_rel_err": 0.0, "speedup_vs_dense_fp16": None}


def _result(device="cuda", with_torch_24=True):
    """A synthetic result in gpu_check.py's schema (made-up times: for testing the code only)."""
    timings = []
    for shape in ((11008, 4096), (4096, 4096)):
        for batch in (1, 4):
            timings += [_timing(shape, batch, "dense-fp16", 100.0),
                        _timing(shape, batch, "dense-bf16", 110.0),
                        _timing(shape, batch, "triton-bitmask-fp16-70%", 50.0, 0.7, "unstructured"),
                        _timing(shape, batch, "triton-bitmask-fp16-90%", 25.0, 0.9, "unstructured"),
                        _timing(shape, batch, "triton-nm2:4-fp16", 80.0, 0.5, "2:4")]
            if with_torch_24:
                timings.append(_timing(shape, batch, "torch-2:4", 160.0, 0.5, "2:4"))
    return {"device": device, "gpu": "Test GPU", "driver": "1.0", "torch": "2.11", "triton": "3.6",
            "date": "2026-01-02T03:04:05Z", "timings": timings,
            "goals": [{"goal": "g", "target": ">= 1.5x", "measured": 2.0, "met": True}]}


def test_load_keeps_only_gpu_measurements(tmp_path):
    (tmp_path / "gpu-Test-GPU.json").write_text(json.dumps(_result()))
    (tmp_path / "gpu-cpu.json").write_text(json.dumps(_result(device="cpu-interpreter")))
    (tmp_path / "dry-run.json").write_text(json.dumps(_result()))
    results = load_gpu_results(tmp_path)
    assert [r["file"] for r in results] == ["gpu-Test-GPU.json"]
    assert load_gpu_results(tmp_path / "absent") == []
    assert result_label(results[0]) == "Test GPU · driver 1.0 · torch 2.11 · Triton 3.6 · 2026-01-02"


def test_timing_frame_speedups():
    frame = timing_frame(_result()).set_index(["shape", "batch", "method"])
    row = frame.loc[("11008x4096", 1, "triton-bitmask-fp16-70%")]
    assert row.speedup_vs_dense_fp16 == pytest.approx(2.0)
    assert row.speedup_vs_dense_bf16 == pytest.approx(2.2)
    assert row.speedup_vs_torch_24 == pytest.approx(3.2)
    assert timing_frame(_result(with_torch_24=False)).speedup_vs_torch_24.isna().all()
    assert goal_frame(_result()).met.tolist() == [True]


@pytest.mark.parametrize("with_torch_24", [True, False])
def test_plot_result(with_torch_24):
    figures = plot_result(_result(with_torch_24=with_torch_24))
    assert len(figures) == (2 if with_torch_24 else 1)
    for ax in figures[0].axes:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert "Test GPU" in figures[0]._suptitle.get_text()
    plt.close("all")
    assert plot_result({"timings": []}) == []
