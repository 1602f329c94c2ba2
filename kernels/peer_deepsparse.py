"""The DeepSparse side of ``kernels/bench_peer.py``; runs inside the peer virtualenv (``make peer``).

It imports neither torch nor sparsekit (DeepSparse needs numpy < 2). It answers one JSON request per
line on stdin with one JSON line on stdout:

* ``{"cmd": "load", "npz": PATH, "batch": B, "threads": T}``: build the ONNX graph
  ``y = relu(x W1ᵀ) W2ᵀ`` from the fp32 weights in ``PATH`` (arrays ``w1 [hidden, d]``, ``w2 [d, hidden]``)
  and compile it with DeepSparse for batch ``B`` on ``T`` cores; replies ``{"ok": true, "version": ...}``;
* ``{"cmd": "run", "seed": S}``: one timed ``engine.run`` on fresh random input; replies ``{"seconds": t}``;
* ``{"cmd": "quit"}``.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_onnx(w1: np.ndarray, w2: np.ndarray, path: Path, batch: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = w1.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1t"], ["h"]), helper.make_node("Relu", ["h"], ["hr"]),
         helper.make_node("MatMul", ["hr", "w2t"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, w2.shape[0]])],
        [numpy_helper.from_array(np.ascontiguousarray(w1.T), "w1t"),
         numpy_helper.from_array(np.ascontiguousarray(w2.T), "w2t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


def main() -> None:
    import deepsparse

    engine, batch, d = None, 1, 0
    workdir = Path(tempfile.mkdtemp(prefix="sparsekit_peer_"))
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "quit":
            break
        if request["cmd"] == "load":
            arrays = np.load(request["npz"])
            w1, w2 = arrays["w1"].astype(np.float32), arrays["w2"].astype(np.float32)
            batch, d = int(request["batch"]), w1.shape[1]
            path = workdir / "mlp.onnx"
            build_onnx(w1, w2, path, batch)
            engine = deepsparse.Engine(model=str(path), batch_size=batch, num_cores=int(request["threads"]))
            reply = {"ok": True, "version": deepsparse.__version__, "numpy": np.__version__}
        else:
            x = np.random.default_rng(int(request["seed"])).standard_normal((batch, d), dtype=np.float32)
            start = time.perf_counter()
            engine.run([x])
            reply = {"seconds": time.perf_counter() - start}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
