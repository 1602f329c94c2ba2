"""``kernels/gpu_check.sh``: valid bash, and its CPU dry run (Triton interpreter) checks every kernel."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "kernels" / "gpu_check.sh"


def test_gpu_check_is_valid_bash():
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.json"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu-interpreter" and result["all_correct"] and result["complete"]
    for key in ("torch", "triton", "python", "date", "gpu", "driver"):
        assert key in result
    kernels = {row["kernel"] for row in result["correctness"]}
    assert {"bitmask-fp16", "bitmask-bf16", "bitmask-int8", "bitmask-int4", "nm2:4-fp16", "nm4:8-fp16",
            "nm16:32-fp16", "nm2:4-int8", "nm2:4-int4"} <= kernels
    assert all(row["ok"] and row["max_rel_err"] < row["tol"] for row in result["correctness"])
    assert len(result["configs"]) >= 2 * 10 and all(row["ok"] for row in result["configs"])
    methods = {row["method"] for row in result["timings"]}
    assert {"dense-fp16", "dense-bf16", "triton-nm2:4-fp16", "triton-nm2:4-int4"} <= methods
    assert all(row["max_rel_err"] < 2e-2 for row in result["timings"] if row["method"].startswith("triton"))


def test_missing_api_names_what_is_lacking():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "kernels" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.missing_api({"math": ("sqrt", "no_such_function")}) == ["math.no_such_function"]
    assert gpu_check.n_copies(10, 100) == 20 and gpu_check.n_copies(10**9, 100) == 1


def test_kernels_compile_for_hopper_without_a_gpu():
    """Triton's real GPU path (front end, LLVM, ptxas) on the two kernels, the dot and the FMA branch."""
    from sparsekit.kernels.triton_launch import _config
    from sparsekit.kernels.triton_testing import compile_for_gpu

    for kernel, config, bits in (("bitmask", _config(16, 64, 2, 4, 3), 4),
                                 ("nm", _config(1, 32, 4, 4, 2, block_k=128), 16)):
        compiled = compile_for_gpu(kernel, 90, config, bits=bits)
        assert "ptx" in compiled.asm and "cubin" in compiled.asm
