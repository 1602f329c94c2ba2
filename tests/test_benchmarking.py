"""The benchmark harness's table-making functions (on made-up timings) and a tiny end-to-end run."""

import json

import pytest
import torch

from sparsekit import benchmarking as bench
from sparsekit.kernels import dispatch


def candidates(**nbytes):
    return {name: bench.Candidate("dense" if "dense" in name else "bitmask", size, torch.float32, [None],
                                  None) for name, size in nbytes.items()}


def test_linear_rows_are_ratios_of_minimum_times_and_the_bandwidth_limit():
    cands = candidates(**{"torch dense fp32": 400, "torch dense bf16": 200, "sparsekit bitmask": 100,
                          "sparsekit dense bf16": 200})
    times = {"torch dense fp32": [4.0, 5.0], "torch dense bf16": [3.0, 2.0], "sparsekit bitmask": [1.0, 0.5],
             "sparsekit dense bf16": [2.5, 2.5]}
    rows = {r["kernel"]: r for r in bench.linear_rows(cands, times, bandwidth=100.0, shape="2x2", batch=1)}
    sparse = rows["sparsekit bitmask"]
    assert sparse["min_ms"] == 500.0 and sparse["median_ms"] == 1000.0
    assert sparse["limit_ms"] == 1000.0 and sparse["frac_of_limit"] == 2.0
    assert sparse["speedup_vs_fp32"] == 8.0 and sparse["speedup_vs_bf16"] == 4.0
    assert sparse["speedup_vs_best_dense"] == 4.0 and sparse["speedup_vs_own_dense_bf16"] == 5.0
    assert rows["torch dense fp32"]["speedup_vs_best_dense"] == 0.5
    assert sparse["shape"] == "2x2" and sparse["batch"] == 1


def goal_rows(measured):
    rows = []
    for (kernel, pattern), (best, fp32, bf16, frac) in measured.items():
        rows.append({"kernel": kernel, "pattern": pattern, "shape": "8x8", "batch": 1,
                     "speedup_vs_best_dense": best, "speedup_vs_fp32": fp32, "speedup_vs_bf16": bf16,
                     "frac_of_limit": frac})
    return rows


def test_goal_table_reports_each_goal_with_the_best_allowed_kernel():
    rows = goal_rows({
        ("sparsekit bitmask", "70%"): (2.6, 5.0, 2.6, 0.5),
        ("sparsekit bitmask int8", "70%"): (3.0, 4.0, 1.9, 0.4),
        ("sparsekit nm int4", "2:4"): (3.5, 6.0, 3.5, 0.5),
        ("sparsekit bitmask int4", "2:4"): (2.0, 3.0, 2.0, 0.5),
        ("sparsekit csr", "90%"): (3.1, 5.0, 3.1, 0.4),
        ("sparsekit bitmask", "90%"): (3.3, 5.0, 3.3, 0.4),
    })
    rows.append({**rows[0], "batch": 4, "speedup_vs_best_dense": 99.0})  # other batches do not count
    decode = {"rows": [{"model": "sparse 70%", "batch": 1, "speedup_vs_best_dense": 1.9},
                       {"model": "sparse 70%", "batch": 8, "speedup_vs_best_dense": 0.1}]}
    table = {g["goal"]: g for g in bench.goal_table({"rows": rows}, decode)}
    assert table["8x8 batch 1, 70%: speedup over the best torch dense >= 2.5"]["measured"] == 2.6
    assert not table["8x8 batch 1, 70%: fraction of the bandwidth limit >= 0.55"]["met"]
    assert table["8x8 batch 1, 70%: speedup over torch dense fp32 >= 3.5"]["met"]
    assert not table["8x8 batch 1, 70%: speedup over torch dense bf16 >= 2.0"]["met"]
    int4 = table["8x8 batch 1, 2:4: speedup over torch dense bf16 >= 3.0"]
    assert int4["kernel"] == "sparsekit nm int4" and int4["met"]
    best90 = table["8x8 batch 1, 90%: speedup over the best torch dense >= 3.0"]
    assert best90["kernel"] == "sparsekit bitmask"
    assert table["decode batch 1, sparse 70%: tokens/s speedup over the best torch dense >= 1.8"]["met"]
    assert len(table) == 7  # the 2:4 float goal has no row: no float kernel was measured at 2:4


def test_rules_from_rows_take_the_largest_batch_up_to_which_sparse_wins():
    rows = [{"kernel": "sparsekit bitmask", "sparsity": 0.7, "batch": b, "speedup_vs_best_dense": s}
            for b, s in [(1, 2.0), (2, 1.5), (4, 1.1), (8, 0.9), (16, 1.2)]]
    rows += [{"kernel": "sparsekit csr", "sparsity": 0.9, "batch": b, "speedup_vs_best_dense": s}
             for b, s in [(1, 0.8), (2, 3.0)]]
    rows += [{"kernel": "torch dense fp32", "sparsity": 0.7, "batch": 1, "speedup_vs_best_dense": 1.0}]
    rules = bench.rules_from_rows(rows)
    assert rules == {"expand": [[0.7, 4]], "csr": [[0.9, 0]]}  # a loss at batch 8 stops it even if 16 wins
    assert dispatch.check_rules(rules)["expand"] == [(0.7, 4)]


def test_dispatch_rules_pick_the_first_matching_sparsity_and_reject_bad_files(tmp_path, monkeypatch):
    checked = dispatch.check_rules({"expand": [[0.5, 8], [0.9, 32], [0.7, 16]]})
    assert checked["expand"] == [(0.9, 32), (0.7, 16), (0.5, 8)]
    with pytest.raises(ValueError, match="calibration kind must be one of"):
        dispatch.check_rules({"expnad": [[0.5, 8]]})
    with pytest.raises(ValueError, match=r"must be \[min_sparsity in \[0, 1\]"):
        dispatch.check_rules({"expand": [[1.5, 8]]})
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"machine_key": dispatch.machine_key(), "rules": {"csr": [[0.8, 64]]}}))
    monkeypatch.setenv("SPARSEKIT_CALIBRATION", str(path))
    try:
        dispatch.reload_rules()
        assert dispatch.max_batch("csr", 0.85) == 64 and dispatch.max_batch("csr", 0.7) == 0
        path.write_text(json.dumps({"machine_key": {"cpu": "another"}, "rules": {"csr": [[0.8, 64]]}}))
        with pytest.warns(RuntimeWarning, match="not this machine"):
            dispatch.reload_rules()
        default = dispatch.check_rules(dispatch.DEFAULT_RULES)["csr"]
        assert dispatch.max_batch("csr", 0.85) == next(limit for s, limit in default if 0.85 >= s)
    finally:
        monkeypatch.delenv("SPARSEKIT_CALIBRATION")
        dispatch.reload_rules()


def test_interleaved_times_rotate_the_order_and_check_the_timer():
    calls = []
    runs = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    times = bench.interleaved_times(runs, repeats=2, warmup=1)
    assert [c[0] for c in calls] == ["a", "b", "a", "b", "b", "a"]
    assert set(times) == {"a", "b"} and all(len(t) == 2 for t in times.values())
    with pytest.raises(ValueError, match="timer must be one of"):
        bench.interleaved_times({"a": lambda i: None}, 1, timer="gpu")


def test_roofline_helpers_and_pattern_parsing():
    assert bench.parse_pattern("70%") == {"sparsity": 0.7} and bench.parse_pattern("2:4") == {"nm": (2, 4)}
    with pytest.raises(ValueError, match="pattern must look like"):
        bench.parse_pattern("70")
    assert bench.arithmetic_intensity(4, 2.0, density=0.5) == 2.0
    assert bench.arithmetic_intensity(4, 2.0, density=0.5, counts_all_positions=True) == 4.0
    assert bench.attainable_gflops([1.0, 100.0], bandwidth_GBps=10.0, peak_gflops=50.0) == [10.0, 50.0]
    row = {"shape": "10x20", "batch": 2, "sparsity": 0.75, "format": "bitmask", "nbytes": 100, "min_ms": 1.0}
    point = bench.achieved_points({"rows": [row]})[0]
    assert point["intensity"] == 2 * 2 * 200 * 0.25 / 100 and point["gflops"] == 2 * 2 * 200 * 0.25 / 1e6


def test_decode_rows_are_rates_against_both_dense_dtypes():
    models = {name: torch.nn.Linear(2, 2) for name in ("dense fp32", "dense bf16", "sparse 70%")}
    times = {"dense fp32": [2.0], "dense bf16": [1.0], "sparse 70%": [0.5]}
    rows = {r["model"]: r for r in bench.decode_rows(models, times, tokens=10, batch=1)}
    assert rows["sparse 70%"]["tokens_per_s"] == 20.0 and rows["sparse 70%"]["pattern"] == "70%"
    assert rows["sparse 70%"]["speedup_vs_fp32"] == 4.0 and rows["sparse 70%"]["speedup_vs_best_dense"] == 2.0
    assert rows["dense fp32"]["weight_bytes"] == 6 * 4


def test_quantized_parts_follow_the_spec_and_a_tiny_bench_runs_labelled(tmp_path):
    W = bench.prune_weight(torch.randn(16, 64), "2:4")
    parts = bench.quantize_rtn_parts(W, 4, 32, nm=(2, 4))
    assert parts["values"].dtype == torch.uint8 and tuple(parts["values"].shape) == (16, 16)
    assert parts["scales"].dtype == torch.float16 and tuple(parts["scales"].shape) == (16, 2)
    result = bench.bench_linear(shapes=[(64, 128)], patterns=["70%", "2:4"], batches=[1, 3], repeats=1,
                                progress=False, rotate_bytes=0, probe_bytes=1 << 20, group_size=64)
    machine = result["machine"]
    assert machine["isa_path"] in ("avx512", "avx2", "scalar", "torch") and machine["bandwidth_GBps"] > 0
    kernels = {r["kernel"] for r in result["rows"]}
    assert {"torch dense fp16", "torch int8 dynamic", "sparsekit dense bf16", "sparsekit dense int8",
            "sparsekit bitmask int8", "sparsekit nm int4"} <= kernels
    path = bench.write_json(result, tmp_path / "out.json")
    assert json.loads(path.read_text())["machine"]["cpu"] == machine["cpu"]


def test_rules_prefer_the_measured_fallback_and_tolerate_a_hair_under_the_sparsity():
    rows = []
    measured = [(1, 1.0, 9.0, 2.0), (8, 4.0, 9.0, 0.5), (64, 20.0, 10.0, 0.1)]
    for batch, kernel_ms, fallback_ms, dense_speedup in measured:
        rows.append({"kernel": "sparsekit bitmask", "pattern": "90%", "sparsity": 0.8999, "batch": batch,
                     "min_ms": kernel_ms, "speedup_vs_best_dense": dense_speedup})
        rows.append({"kernel": "sparsekit bitmask fallback", "pattern": "90%", "sparsity": 0.8999,
                     "batch": batch, "min_ms": fallback_ms, "speedup_vs_best_dense": 0.1})
    rules = bench.rules_from_rows(rows)
    assert rules == {"expand": [[0.9, 8]]}  # beats the fallback up to 8, though torch dense wins at 8
    dispatch._RULES.clear()
    dispatch._RULES.update(dispatch.check_rules(rules))
    try:
        assert dispatch.max_batch("expand", 0.8999) == 8 and dispatch.max_batch("expand", 0.8) == 0
    finally:
        dispatch.reload_rules()
