"""`vlmdeploy check --tensorrt`: each rule caught on a small graph made to break it; the real exported graphs pass.

CPU only: no GPU, no TensorRT (the rules read the ONNX and the operator table in runtime/tensorrt).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmdeploy.runtime.check import check_artifact
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec
from vlmdeploy.runtime.tensorrt import static_check
from vlmdeploy.runtime.tensorrt.build import BuildOptions
from vlmdeploy.runtime.tensorrt.ops import TrtTarget
from vlmdeploy.runtime.tensorrt.profiles import DimRange, Profile
from vlmdeploy.runtime.tensorrt.static_check import check_graph

F, I64 = TensorProto.FLOAT, TensorProto.INT64
X_SPEC = GraphSpec("g", inputs=(TensorSpec("x", "float32", ("batch", 4)),), outputs=(TensorSpec("y", "float32", ("batch", 4)),))
BATCH = [Profile("all", {"batch": DimRange(1, 1, 8)})]


def _x(name="x", shape=("batch", 4), elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs=None, outputs=None, inits=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs or [_x()], outputs or [_x("y")], initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _check(tmp_path, model, spec=X_SPEC, target="10", profiles=BATCH, name="g.onnx", **save):
    path = tmp_path / name
    onnx.save(model, str(path), **save)
    return check_graph(path, spec, TrtTarget.parse(target), profiles)


def _found(report, rule, severity="error") -> str:
    """All messages of one rule and severity, joined (empty when none)."""
    return " | ".join(f.message for f in report.findings if f.rule == rule and f.severity == severity)


def _relu():
    return _model([helper.make_node("Relu", ["x"], ["y"])])


def test_a_clean_graph_passes_every_rule(tmp_path):
    report = _check(tmp_path, _relu())
    assert report.passed, report.lines()
    assert {f.rule for f in report.findings if f.severity == "ok"} == {
        "ops", "control", "opset", "rank", "dims", "profiles", "weights"}


# ---- ops ------------------------------------------------------------------------------------

def test_op_the_parser_does_not_import(tmp_path):
    spec = GraphSpec("g", (TensorSpec("x", "float32", ("batch", 4, 4)),), (TensorSpec("y", "float32", ("batch",)),))
    model = _model([helper.make_node("Det", ["x"], ["y"])], [_x(shape=("batch", 4, 4))], [_x("y", ("batch",))])
    report = _check(tmp_path, model, spec)
    assert "Det (1 node(s)" in _found(report, "ops") and "unsupported by the ONNX-TensorRT parser" in _found(report, "ops")


def test_op_added_in_a_later_10x_release(tmp_path):
    """RMSNormalization (opset 23) came with TensorRT 10.15: refused for "10" (any 10.x), accepted for 10.15."""
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    model = _model([helper.make_node("RMSNormalization", ["x", "scale"], ["y"], axis=-1)], inits=[scale], opset=23)
    assert "needs TensorRT >= 10.15" in _found(_check(tmp_path, model, target="10"), "ops")
    assert _check(tmp_path, model, target="10.15").passed


def test_input_type_the_op_does_not_support(tmp_path):
    spec = GraphSpec("g", (TensorSpec("x", "int64", ("batch", 4)),), (TensorSpec("y", "int64", ("batch", 4)),))
    w = numpy_helper.from_array(np.eye(4, dtype=np.int64), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_x(elem=I64)], [_x("y", elem=I64)], [w])
    assert "input type INT64 is not among the supported types FP32, FP16, BF16" in _found(_check(tmp_path, model, spec), "ops")


def test_input_that_must_be_a_constant(tmp_path):
    """ReduceMean's axes (an input since opset 18) must be an initializer for the parser."""
    spec = GraphSpec("g", (TensorSpec("x", "float32", ("batch", 4)), TensorSpec("axes", "int64", (1,))),
                     (TensorSpec("y", "float32", ("batch", 1)),))
    model = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"])],
                   [_x(), _x("axes", (1,), I64)], [_x("y", ("batch", 1))])
    assert "input 1 (axes) must be an initializer or Constant" in _found(_check(tmp_path, model, spec), "ops")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    ok = _model([helper.make_node("ReduceMean", ["x", "axes"], ["y"])], outputs=[_x("y", ("batch", 1))], inits=[axes])
    assert _check(tmp_path, ok, GraphSpec("g", X_SPEC.inputs, (TensorSpec("y", "float32", ("batch", 1)),))).passed


def test_unsupported_extra_outputs(tmp_path):
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    spec = GraphSpec("g", X_SPEC.inputs, (*X_SPEC.outputs, TensorSpec("mean", "float32", ("batch", 1))))
    model = _model([helper.make_node("LayerNormalization", ["x", "scale"], ["y", "mean"])],
                   outputs=[_x("y"), _x("mean", ("batch", 1))], inits=[scale])
    assert "only the first 1 output(s) are supported" in _found(_check(tmp_path, model, spec), "ops")


# ---- control flow, opset, rank ---------------------------------------------------------------

def test_if_loop_scan_are_refused(tmp_path):
    branch = [helper.make_graph([helper.make_node("Relu", ["x"], [f"y{i}"])], f"b{i}", [], [_x(f"y{i}")]) for i in (0, 1)]
    cond = numpy_helper.from_array(np.array(True), "cond")
    model = _model([helper.make_node("If", ["cond"], ["y"], then_branch=branch[0], else_branch=branch[1])], inits=[cond])
    assert "If (1 node(s)" in _found(_check(tmp_path, model), "control")


def test_opset_outside_the_release_range(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], opset=21)
    assert "opset 21, outside TensorRT 10.0's range 9..20" in _found(_check(tmp_path, model), "opset")
    assert _check(tmp_path, model, target="10.15").passed


def test_custom_domain_needs_a_plugin(tmp_path):
    model = _model([helper.make_node("FusedGelu", ["x"], ["y"], domain="com.microsoft")],
                   extra_opsets=[("com.microsoft", 1)])
    assert "domain 'com.microsoft' (ops FusedGelu)" in _found(_check(tmp_path, model), "opset")


def test_dynamic_rank_input(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", F, None)])
    assert "x: dynamic rank" in _found(_check(tmp_path, model), "rank")


# ---- named dims and profiles ------------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ([None, 4], "x axis 0: dynamic but unnamed"),
    ([1, 4], "x axis 0: 1 in the graph but 'batch' in the spec (the export specialized a dynamic axis)"),
    (["n", 4], "x axis 0: 'n' in the graph but 'batch' in the spec"),
])
def test_named_dims_must_match_the_spec(tmp_path, shape, expected):
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_x(shape=shape)])
    assert expected in _found(_check(tmp_path, model), "dims")


def test_output_dim_no_input_determines(tmp_path):
    spec = GraphSpec("g", X_SPEC.inputs, (TensorSpec("y", "float32", ("rows", 4)),))
    model = _model([helper.make_node("Relu", ["x"], ["y"])], outputs=[_x("y", ("rows", 4))])
    assert "output y: dim 'rows' is not an input dim or a sum of input dims" in _found(_check(tmp_path, model, spec), "dims")


def test_graph_io_names_differ_from_spec(tmp_path):
    model = _model([helper.make_node("Relu", ["x"], ["z"])], outputs=[_x("z")])
    assert "missing ['y'], unexpected ['z']" in _found(_check(tmp_path, model), "dims")


def test_profiles_must_cover_every_dynamic_input(tmp_path):
    report = _check(tmp_path, _relu(), profiles=[Profile("p", {"seq": DimRange(1, 1, 4)})])
    assert "profile 'p': no range for dynamic dims ['batch']" in _found(report, "profiles")


def test_profiles_must_keep_total_equal_past_plus_seq(tmp_path):
    spec = GraphSpec("g", (TensorSpec("x", "float32", ("batch", "seq")), TensorSpec("m", "float32", ("batch", "total")),
                           TensorSpec("p", "float32", ("batch", "past"))),
                     (TensorSpec("y", "float32", ("batch", "seq")),), dim_sums={"total": ("past", "seq")})
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_x(shape=("batch", "seq")), _x("m", ("batch", "total")),
                                                              _x("p", ("batch", "past"))], [_x("y", ("batch", "seq"))])
    bad = Profile("decode", {"batch": DimRange(1, 1, 1), "seq": DimRange(1, 1, 1), "past": DimRange(0, 8, 15),
                             "total": DimRange(1, 9, 15)})
    assert "total 1..15 (opt 9) is not past + seq = 1..16" in _found(_check(tmp_path, model, spec, profiles=[bad]), "profiles")


def test_no_profiles_given_is_reported_not_failed(tmp_path):
    report = _check(tmp_path, _relu(), profiles=None)
    assert report.passed and "not checked" in _found(report, "profiles", "info")


# ---- int64 ------------------------------------------------------------------------------------

def _int64_graph(value: int, op: str = "Add"):
    spec = GraphSpec("g", (TensorSpec("x", "int64", ("batch", 4)),), (TensorSpec("y", "int64", ("batch", 4)),))
    c = numpy_helper.from_array(np.array([value], np.int64), "c")
    return spec, _model([helper.make_node(op, ["x", "c"], ["y"])], [_x(elem=I64)], [_x("y", elem=I64)], [c], opset=17)


def test_int64_is_narrowed_on_tensorrt_8(tmp_path):
    spec, model = _int64_graph(7)
    report = _check(tmp_path, model, spec, target="8", profiles=None)
    assert "TensorRT 8.5 narrows INT64 to INT32: input/output(s) ['x', 'y'] are bound as INT32" in _found(report, "int64", "warn")
    assert report.passed  # in-range constants survive the narrowing


def test_constant_outside_int32_range(tmp_path):
    spec, model = _int64_graph(2**40)
    narrowed = _check(tmp_path, model, spec, target="8", profiles=None)
    assert f"constant c = {2**40} (used by Add) is outside INT32 range; narrowing to INT32 would change it" in _found(narrowed, "int64")
    native = _check(tmp_path, model, spec, target="10", profiles=None)
    assert native.passed and "(kept as INT64)" in _found(native, "int64", "info")


def test_constant_node_outside_int32_range(tmp_path):
    model = _model([helper.make_node("Constant", [], ["c"], value_ints=[3, -(2**35)]),
                    helper.make_node("Mul", ["x", "c"], ["y"])], [_x(shape=("batch", 2), elem=I64)],
                   [_x("y", ("batch", 2), I64)], opset=17)
    spec = GraphSpec("g", (TensorSpec("x", "int64", ("batch", 2)),), (TensorSpec("y", "int64", ("batch", 2)),))
    assert f"constant c = {-(2**35)} (used by Mul)" in _found(_check(tmp_path, model, spec, target="8", profiles=None), "int64")


def test_int64_max_as_a_slice_end_is_harmless(tmp_path):
    ends = numpy_helper.from_array(np.array([2**63 - 1], np.int64), "ends")
    starts = numpy_helper.from_array(np.array([1], np.int64), "starts")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    spec = GraphSpec("g", X_SPEC.inputs, (TensorSpec("y", "float32", ("batch", 3)),))
    model = _model([helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"])], outputs=[_x("y", ("batch", 3))],
                   inits=[starts, ends, axes], opset=17)
    report = _check(tmp_path, model, spec, target="8")
    assert report.passed, report.lines()
    assert "used only as Slice starts/ends (ends=9223372036854775807): clamped by Slice, harmless" in _found(report, "int64", "info")


# ---- weights ----------------------------------------------------------------------------------

def _weighted(n=4096):
    w = numpy_helper.from_array(np.ones((4, n), np.float32), "w")
    spec = GraphSpec("g", X_SPEC.inputs, (TensorSpec("y", "float32", ("batch", n)),))
    return spec, _model([helper.make_node("MatMul", ["x", "w"], ["y"])], outputs=[_x("y", ("batch", n))], inits=[w])


def test_model_over_the_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(static_check, "PROTOBUF_LIMIT", 32 * 1024)  # a 64 KB proto plays a 2 GiB one
    spec, model = _weighted()
    assert "over the 2 GiB protobuf limit" in _found(_check(tmp_path, model, spec), "weights")


def test_external_data_missing_or_truncated(tmp_path):
    spec, model = _weighted()
    _check(tmp_path, model, spec, save_as_external_data=True, location="g.onnx.data")
    (tmp_path / "g.onnx.data").write_bytes(b"\0" * 100)
    report = check_graph(tmp_path / "g.onnx", spec, TrtTarget.parse("10"), BATCH)
    assert "external data g.onnx.data is 100 bytes, the tensor needs bytes up to 65536 (truncated file)" in _found(report, "weights")
    (tmp_path / "g.onnx.data").unlink()
    report = check_graph(tmp_path / "g.onnx", spec, TrtTarget.parse("10"), BATCH)
    assert "external data file g.onnx.data is missing" in _found(report, "weights")


def test_external_data_is_counted(tmp_path):
    spec, model = _weighted()
    report = _check(tmp_path, model, spec, save_as_external_data=True, location="g.onnx.data")
    assert report.passed and "64.0 KB in g.onnx.data" in _found(report, "weights", "ok")


# ---- the real exported graphs -----------------------------------------------------------------

def test_exported_graphs_pass(tiny):
    report = check_artifact(tiny.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
    ok = "\n".join(report.ok)
    for graph in ("vision", "projector", "embed", "decoder", "greedy"):
        assert f"{graph}: tensorrt ops:" in ok and f"{graph}: tensorrt profiles:" in ok
    decoder_ops = next(line for line in report.ok if line.startswith("decoder: tensorrt ops:"))
    for op in ("IsNaN", "GatherND", "Range", "Where", "ReduceMean", "Softmax"):
        assert op in decoder_ops  # the real decoder's ops, all in TensorRT 10's parser list
    assert "prefill: batch 1..1, seq 1..512, total 1..512, past 0..0; decode: batch 1..1, seq 1..1, total 1..512, past 0..511" in ok
    notes = "\n".join(report.notes)
    assert "decoder: tensorrt int64: 2 INT64 input/output(s) ['attention_mask', 'position_ids']" in notes
    assert "engines: none built" in notes


def test_exported_graphs_fail_for_tensorrt_8(tiny):
    """TensorRT 8.5's parser has no LayerNormalization and stops at opset 17: the check says so per graph."""
    report = check_artifact(tiny.artifact, tensorrt=("8", BuildOptions()))
    failed = "\n".join(report.failed)
    assert "vision: tensorrt ops: LayerNormalization (" in failed
    assert "decoder: tensorrt opset: opset 18, outside TensorRT 8.5's range 1..17" in failed


def test_cli_exit_codes(tiny, capsys):
    assert main(["check", str(tiny.artifact), "--tensorrt"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["check", str(tiny.artifact), "--tensorrt", "--trt-version", "8"]) == 1
    assert "FAIL  vision: tensorrt ops: LayerNormalization" in capsys.readouterr().out
    assert main(["check", str(tiny.artifact), "--tensorrt", "--trt-version", "7"]) == 2
    assert "no operator table for TensorRT 7; known majors: 10, 8" in capsys.readouterr().err
    assert main(["check", str(tiny.artifact), "--tensorrt", "--max-context", "100000"]) == 2
    assert "max_context 100000 > the model's context length 512" in capsys.readouterr().err


def test_operator_table_is_data_with_its_source():
    target = TrtTarget.parse("10")
    assert "onnx/onnx-tensorrt docs/operators.md" in target.source
    assert (target.opset_min, target.opset_max, target.int64_native) == (9, 20, True)
    assert target.support("IsNaN")["types"] == ["FP32", "FP16", "BF16", "INT32", "INT64"]
    assert target.support("Unique") is None and target.support("NoSuchOp") is None
    old = TrtTarget.parse("8")
    assert (old.name, old.opset_max, old.int64_native) == ("TensorRT 8.5", 17, False)
