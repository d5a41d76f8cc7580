"""The greedy step as a graph of its own, so a greedy decode step leaves only token ids to copy to the host.

    logits [batch, seq, vocab] --Gather(axis 1, index -1)--> [batch, vocab] --ArgMax(axis 1)--> [batch, 1]
        --Cast(INT64)--> token_ids [batch, 1]   (the embed graph's input_ids, bound on the device as is)

It is written next to the engines by `vlmdeploy build` and built like the exported graphs.
"""

from __future__ import annotations

from pathlib import Path

from ..spec import GraphSpec, ModelDims, TensorSpec

GREEDY_OPSET = 13  # Gather, ArgMax, Cast: inside every TensorRT 8.5+ range


def greedy_spec(dims: ModelDims) -> GraphSpec:
    return GraphSpec(
        "greedy",
        inputs=(TensorSpec("logits", dims.dtype, ("batch", "seq", dims.vocab)),),
        outputs=(TensorSpec("token_ids", "int64", ("batch", 1)),),
    )


def write_greedy_onnx(path: Path, dims: ModelDims) -> None:
    import onnx
    from onnx import TensorProto, helper

    float_type = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dims.dtype]
    last = helper.make_tensor("last", TensorProto.INT64, [], [-1])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["logits", "last"], ["last_logits"], axis=1),  # [B, V]
         helper.make_node("ArgMax", ["last_logits"], ["argmax"], axis=1, keepdims=1),  # [B, 1], first max on ties
         helper.make_node("Cast", ["argmax"], ["token_ids"], to=TensorProto.INT64)],  # pins the engine output to INT64
        "greedy",
        [helper.make_tensor_value_info("logits", float_type, ["batch", "seq", dims.vocab])],
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, ["batch", 1])],
        initializer=[last],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", GREEDY_OPSET)])
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
