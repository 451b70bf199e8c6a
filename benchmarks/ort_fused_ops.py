"""Which of onnxruntime's fused 4-bit MLP/QKV contrib ops have a kernel on this machine's CPU execution provider.

    python benchmarks/ort_fused_ops.py

onnxruntime registers `MatMulNBitsMlp` (norm + gate/up + activation) and `MatMulNBitsQkv` (norm + q/k/v) as
schemas; this builds a one-node graph of each (K=64, N=128, 4 bits, block 32) and tries to run it on
CPUExecutionProvider. Prints one line per op: "runs" or the error onnxruntime gives.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

K, N, BLOCK = 64, 128, 32


def _weights(prefix: str, n: int) -> list:
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 255, (n, K // BLOCK, BLOCK // 2), dtype=np.uint8)
    scales = rng.random(n * K // BLOCK).astype(np.float32)
    return [numpy_helper.from_array(packed, f"{prefix}_B"), numpy_helper.from_array(scales, f"{prefix}_scales")]


def _try(op: str) -> str:
    inits = [numpy_helper.from_array(np.ones(K, np.float32), "norm")]
    if op == "MatMulNBitsMlp":
        inits += _weights("gate", N) + _weights("up", N)
        inputs = ["A", "", "norm", "gate_B", "gate_scales", "", "up_B", "up_scales", ""]
        attrs = dict(N=N, activation="silu")
    else:
        inits += _weights("q", N) + _weights("k", N // 2) + _weights("v", N // 2)
        inputs = ["A", "", "norm", "q_B", "q_scales", "", "k_B", "k_scales", "", "v_B", "v_scales", ""]
        attrs = dict(Nq=N, Nkv=N // 2)
    outputs = ["Y"] if op == "MatMulNBitsMlp" else ["Q", "K", "V"]
    node = helper.make_node(op, inputs, outputs, domain="com.microsoft", K=K, bits=4, block_size=BLOCK,
                            epsilon=1e-5, accuracy_level=4, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"A": np.ones((1, K), np.float32)})
        return "runs"
    except Exception as exc:  # onnxruntime's own message is the result
        return str(exc).splitlines()[0]


if __name__ == "__main__":
    print(f"onnxruntime {ort.__version__}")
    for op in ("MatMulNBitsMlp", "MatMulNBitsQkv"):
        print(f"{op}: {_try(op)}")
