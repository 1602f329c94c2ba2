"""Every Triton kernel under Triton's CPU interpreter: ``tests/triton_interpreted.py`` in a subprocess.

The interpreter (``TRITON_INTERPRET=1``) must be on before Triton is imported, which this pytest process
may already have done, and it must stay off for the other tests; so the kernel tests run in their own
pytest process. Their output is shown when they fail.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "triton_interpreted.py")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
