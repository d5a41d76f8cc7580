"""Will TensorRT accept these ONNX graphs? Static rules that need no GPU and no TensorRT install.

    ops       every node's op is in the ONNX-TensorRT parser's list for the target release (ops.py),
              with a supported input type, constant inputs where the parser needs them
    control   no If / Loop / Scan in an engine graph (NVIDIA/TensorRT#4032, #2723)
    opset     default-domain opset inside the release's range; no custom domains (those need plugins)
    rank      every graph input and output has a static rank
    dims      the graph's named dims match the manifest spec, every dynamic axis is named, output
              dims follow from input dims
    profiles  the profiles the build would use cover every dynamic input, one range per name
    int64     INT64 inputs/initializers: narrowed to INT32 (8.x) or kept (>= 9); constants outside INT32
    weights   .onnx under the 2 GiB protobuf limit; external data present and long enough

Each rule returns findings (ok / info / warn / error); a graph passes when no finding is an error.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..spec import GraphSpec
from .ops import TrtTarget
from .profiles import Profile, check_profiles

PROTOBUF_LIMIT = 2**31  # bytes; a ModelProto this large cannot be serialized or parsed
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CONTROL_FLOW = ("If", "Loop", "Scan")
DATA_INPUT = {"Where": 1}  # ops whose typed data input is not input 0
SLICE_BOUNDS = {("Slice", 1), ("Slice", 2)}  # starts / ends: TensorRT clamps them, INT64_MAX sentinels are fine
DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX TensorProto element type -> the type names of operators.md
TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
              11: "DOUBLE", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4", 23: "FP4"}
SPEC_DTYPES = {"float32": 1, "float16": 10, "int64": 7, "int32": 6, "bool": 9}


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # ok | info | warn | error
    message: str


@dataclass
class GraphReport:
    graph: str
    path: Path
    target: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def lines(self) -> list[str]:
        return [f"{f.severity:<5} {self.graph}: {f.rule}: {f.message}" for f in self.findings]


@dataclass
class _Graph:
    """One ONNX model with what the rules look up: every node (subgraphs and functions too), tensor types,
    constant values, and who consumes each tensor."""

    path: Path
    model: object  # onnx.ModelProto, shapes inferred
    nodes: list
    types: dict[str, int]
    constants: dict  # name -> TensorProto (initializers and Constant nodes)
    consumers: dict[str, list[tuple[object, int]]]
    inference_error: str | None = None


def check_graph(path: str | Path, spec: GraphSpec, target: TrtTarget, profiles: list[Profile] | None) -> GraphReport:
    g = _load(Path(path))
    report = GraphReport(spec.name, Path(path), target.name)
    if g.inference_error:
        report.findings.append(Finding("rank", "warn", f"ONNX shape inference failed ({g.inference_error}); "
                                       "types and ranks of intermediate tensors are unknown"))
    for rule in (_rule_ops, _rule_control_flow, _rule_opset, _rule_rank):
        report.findings += rule(g, target)
    report.findings += _rule_dims(g, spec)
    report.findings += _rule_profiles(spec, profiles)
    report.findings += _rule_int64(g, target)
    report.findings += _rule_weights(g)
    return report


# ---- loading -------------------------------------------------------------------------------

def _load(path: Path) -> _Graph:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # weights stay on disk; the rules need the proto only
    error = None
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 — reported as a finding, the other rules still run
        error = f"{type(e).__name__}: {str(e)[:200]}"
    nodes, constants = list(_all_nodes(model)), _constants(model)
    return _Graph(path, model, nodes, _types(model, constants), constants, _consumers(nodes), error)


def _all_nodes(model):
    """Main-graph nodes, then nodes of subgraphs (If/Loop/Scan bodies) and of local functions."""
    stack = [model.graph.node] + [f.node for f in model.functions]
    while stack:
        for node in stack.pop(0):
            yield node
            for attr in node.attribute:
                stack += [attr.g.node] if attr.HasField("g") else []
                stack += [sub.node for sub in attr.graphs]


def _types(model, constants: dict) -> dict[str, int]:
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.value_info, *g.input, *g.output]}
    types.update({name: t.data_type for name, t in constants.items()})
    return types


def _constants(model) -> dict:
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            out[node.output[0]] = _constant_tensor(node)
    return out


def _constant_tensor(node):
    """The value of a Constant node as a TensorProto (value, value_int(s), value_float(s))."""
    from onnx import TensorProto, helper

    attr, name = node.attribute[0], node.output[0]
    if attr.name == "value":
        return attr.t
    scalars = {"value_int": (TensorProto.INT64, attr.i), "value_float": (TensorProto.FLOAT, attr.f)}
    lists = {"value_ints": (TensorProto.INT64, list(attr.ints)), "value_floats": (TensorProto.FLOAT, list(attr.floats))}
    if attr.name in scalars:
        elem, value = scalars[attr.name]
        return helper.make_tensor(name, elem, [], [value])
    if attr.name in lists:
        elem, values = lists[attr.name]
        return helper.make_tensor(name, elem, [len(values)], values)
    return helper.make_tensor(name, TensorProto.UNDEFINED, [0], [])


def _consumers(nodes) -> dict[str, list[tuple[object, int]]]:
    out = defaultdict(list)
    for node in nodes:
        for i, name in enumerate(node.input):
            if name:
                out[name].append((node, i))
    return out


def _is_external(t) -> bool:
    return t.data_location == 1  # TensorProto.EXTERNAL


# ---- rules ---------------------------------------------------------------------------------

def _rule_ops(g: _Graph, target: TrtTarget) -> list[Finding]:
    problems: dict[tuple[str, str], list[str]] = defaultdict(list)  # (op, why) -> node names
    used = sorted({n.op_type for n in g.nodes if n.domain in DEFAULT_DOMAINS})
    for node in g.nodes:
        if node.domain in DEFAULT_DOMAINS:
            for why in _node_problems(g, node, target):
                problems[(node.op_type, why)].append(node.name or node.output[0])
    findings = [Finding("ops", "error", f"{op} ({len(names)} node(s), e.g. {names[0]}): {why}")
                for (op, why), names in sorted(problems.items())]
    if not findings:
        findings.append(Finding("ops", "ok", f"{len(used)} op types, all imported by the ONNX-TensorRT parser of "
                                f"{target.name}: {', '.join(used)}"))
    notes = [f"{op}: {target.support(op)['restrictions']}" for op in used
             if target.support(op) and "restrictions" in target.support(op)]
    if notes:
        findings.append(Finding("ops", "info", "parser restrictions on ops used here: " + "; ".join(notes)))
    return findings


def _node_problems(g: _Graph, node, target: TrtTarget) -> list[str]:
    entry = target.support(node.op_type)
    if entry is None:
        return [target.missing_reason(node.op_type)]
    problems = []
    type_name = _trt_type_name(_data_type(g, node), target)
    if type_name is not None and type_name not in entry["types"]:
        problems.append(f"input type {type_name} is not among the supported types {', '.join(entry['types'])}")
    for index, what in entry.get("constant_inputs", {}).items():
        i = int(index)
        if i < len(node.input) and node.input[i] and node.input[i] not in g.constants:
            problems.append(f"input {i} ({what}) must be an initializer or Constant, here it is computed")
    outputs = [o for o in node.output if o]
    if len(outputs) > entry.get("max_outputs", len(outputs)):
        problems.append(f"only the first {entry['max_outputs']} output(s) are supported, the node uses {len(outputs)}")
    return problems


def _data_type(g: _Graph, node) -> int | None:
    index = DATA_INPUT.get(node.op_type, 0)
    if index < len(node.input) and node.input[index]:
        return g.types.get(node.input[index])
    return g.types.get(node.output[0]) if node.output else None


def _trt_type_name(elem_type: int | None, target: TrtTarget) -> str | None:
    """The type TensorRT sees: DOUBLE is cast to FP32; INT64 to INT32 on releases that narrow it."""
    if not elem_type:
        return None
    name = TYPE_NAMES.get(elem_type, f"ONNX type {elem_type}")
    if name == "DOUBLE":
        return "FP32"
    if name == "INT64" and not target.int64_native:
        return "INT32"
    return name


def _rule_control_flow(g: _Graph, target: TrtTarget) -> list[Finding]:
    found = defaultdict(list)
    for node in g.nodes:
        if node.op_type in CONTROL_FLOW:
            found[node.op_type].append(node.name or node.output[0])
    if not found:
        return [Finding("control", "ok", "no If/Loop/Scan")]
    return [Finding("control", "error", f"{op} ({len(names)} node(s), e.g. {names[0]}): control flow in an engine "
                    "graph; TensorRT builds If-based merged decoders badly or not at all (NVIDIA/TensorRT#4032, "
                    "#2723). Export prefill and decode as one graph without control flow.")
            for op, names in sorted(found.items())]


def _rule_opset(g: _Graph, target: TrtTarget) -> list[Finding]:
    findings = []
    functions = {(f.domain, f.name) for f in g.model.functions}
    for imp in g.model.opset_import:
        used = sorted({n.op_type for n in g.nodes if n.domain == imp.domain and (n.domain, n.op_type) not in functions})
        if imp.domain in DEFAULT_DOMAINS:
            ok = target.opset_min <= imp.version <= target.opset_max
            where = "inside" if ok else "outside"
            findings.append(Finding("opset", "ok" if ok else "error", f"opset {imp.version}, {where} {target.name}'s "
                                    f"range {target.opset_min}..{target.opset_max}" +
                                    ("" if ok else "; re-export with --opset in that range")))
        elif used:
            findings.append(Finding("opset", "error", f"domain {imp.domain!r} (ops {', '.join(used)}): not an ONNX "
                                    "domain the parser imports; these ops need TensorRT plugins"))
    return findings


def _rule_rank(g: _Graph, target: TrtTarget) -> list[Finding]:
    graph = g.model.graph
    init = {t.name for t in graph.initializer}
    unranked = [vi.name for vi in [*graph.input, *graph.output]
                if vi.name not in init and not vi.type.tensor_type.HasField("shape")]
    findings = [Finding("rank", "error", f"{name}: dynamic rank (no shape); TensorRT needs a static rank for every "
                        "input and output") for name in unranked]
    known = {vi.name for vi in graph.value_info if vi.type.tensor_type.HasField("shape")} | init
    known |= {vi.name for vi in [*graph.input, *graph.output]}
    unknown = [o for n in graph.node for o in n.output if o and o not in known and n.op_type != "Constant"]
    if unknown:
        findings.append(Finding("rank", "warn", f"{len(unknown)} intermediate tensor(s) of unknown rank to ONNX "
                                f"shape inference (e.g. {unknown[0]}); TensorRT needs static ranks everywhere"))
    if not findings:
        findings.append(Finding("rank", "ok", "static rank for every input, output and intermediate tensor"))
    return findings


def _rule_dims(g: _Graph, spec: GraphSpec) -> list[Finding]:
    graph = g.model.graph
    init = {t.name for t in graph.initializer}
    io = {vi.name: vi for vi in [*graph.input, *graph.output] if vi.name not in init}
    want = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    findings = []
    missing, extra = sorted(set(want) - set(io)), sorted(set(io) - set(want))
    if missing or extra:
        findings.append(Finding("dims", "error", f"graph inputs/outputs differ from the manifest spec: missing "
                                f"{missing}, unexpected {extra}"))
    for name in sorted(set(want) & set(io)):
        findings += [Finding("dims", "error", m) for m in _tensor_dim_problems(io[name], want[name])]
    findings += [Finding("dims", "error", m) for m in _underived_output_dims(spec)]
    if not findings:
        findings.append(Finding("dims", "ok", f"named dims {spec.dim_names()} match the spec on every input and "
                                "output" + (f"; {', '.join(f'{t} = {a} + {b}' for t, (a, b) in spec.dim_sums.items())}"
                                            if spec.dim_sums else "")))
    return findings


def _tensor_dim_problems(vi, t) -> list[str]:
    tt = vi.type.tensor_type
    problems = []
    if tt.elem_type != SPEC_DTYPES.get(t.dtype):
        problems.append(f"{t.name}: type {TYPE_NAMES.get(tt.elem_type, tt.elem_type)} but the spec says {t.dtype}")
    if not tt.HasField("shape"):
        return problems  # the rank rule reports it
    dims = tt.shape.dim
    if len(dims) != len(t.shape):
        return problems + [f"{t.name}: rank {len(dims)} but the spec says {list(t.shape)}"]
    for axis, (d, want) in enumerate(zip(dims, t.shape)):
        got = d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
        if got is None:
            problems.append(f"{t.name} axis {axis}: dynamic but unnamed; profiles are derived from dim names "
                            f"(the spec names it {want!r})")
        elif got != want:
            problems.append(f"{t.name} axis {axis}: {got!r} in the graph but {want!r} in the spec" +
                            (" (the export specialized a dynamic axis)" if isinstance(want, str) else ""))
    return problems


def _underived_output_dims(spec: GraphSpec) -> list[str]:
    """Output dims the runner cannot know before running: neither an input dim nor a sum of input dims."""
    inputs = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    derived = inputs | {s for s, parts in spec.dim_sums.items() if set(parts) <= inputs}
    return [f"output {t.name}: dim {d!r} is not an input dim or a sum of input dims; output buffers cannot be sized"
            for t in spec.outputs for d in t.shape if isinstance(d, str) and d not in derived]


def _rule_profiles(spec: GraphSpec, profiles: list[Profile] | None) -> list[Finding]:
    if profiles is None:
        return [Finding("profiles", "info", "not checked (no build limits given)")]
    problems = check_profiles(spec, profiles)
    if problems:
        return [Finding("profiles", "error", p) for p in problems]
    return [Finding("profiles", "ok", f"{len(profiles)} profile(s) cover every dynamic input, one range per dim: "
                    + "; ".join(p.describe() for p in profiles))]


def _rule_int64(g: _Graph, target: TrtTarget) -> list[Finding]:
    graph = g.model.graph
    inputs = [vi.name for vi in [*graph.input, *graph.output] if vi.type.tensor_type.elem_type == 7]
    consts = {n: t for n, t in g.constants.items() if t.data_type == 7}
    outside = _outside_int32(g, consts)
    sentinels = {n: v for n, v in outside.items() if all((c.op_type, i) in SLICE_BOUNDS for c, i in g.consumers.get(n, []))}
    others = {n: v for n, v in outside.items() if n not in sentinels}
    findings = []
    if target.int64_native and (inputs or consts):
        findings.append(Finding("int64", "info", f"{len(inputs)} INT64 input/output(s) {inputs} and {len(consts)} INT64 "
                                f"constant(s) stay INT64 ({target.name} imports INT64 natively; bind INT64)"))
    elif inputs or consts:
        findings.append(Finding("int64", "warn", f"{target.name} narrows INT64 to INT32: input/output(s) {inputs} are "
                                f"bound as INT32 and {len(consts)} INT64 constant(s) are cast, clamping to +-2^31-1"))
    if sentinels:
        findings.append(Finding("int64", "info", f"{len(sentinels)} constant(s) outside INT32 range used only as Slice "
                                f"starts/ends ({_values(sentinels)}): clamped by Slice, harmless"))
    for name, value in others.items():
        users = sorted({c.op_type for c, _ in g.consumers.get(name, [])})
        severity = "info" if target.int64_native else "error"
        findings.append(Finding("int64", severity, f"constant {name} = {value} (used by {', '.join(users) or 'no node'}) "
                                "is outside INT32 range" + (" (kept as INT64)" if target.int64_native else
                                                           "; narrowing to INT32 would change it")))
    return findings


def _outside_int32(g: _Graph, consts: dict) -> dict[str, int]:
    """name -> first value outside INT32 range, for INT64 constants stored in the proto."""
    from onnx import numpy_helper

    out = {}
    for name, t in consts.items():
        if _is_external(t) or np.prod(t.dims, dtype=np.int64) > 1_000_000:
            continue
        values = numpy_helper.to_array(t).ravel()
        bad = values[(values < INT32_MIN) | (values > INT32_MAX)]
        if bad.size:
            out[name] = int(bad[0])
    return out


def _values(named: dict[str, int]) -> str:
    return ", ".join(f"{n}={v}" for n, v in list(named.items())[:4]) + (" ..." if len(named) > 4 else "")


def _rule_weights(g: _Graph) -> list[Finding]:
    proto_bytes = g.path.stat().st_size
    inline, external = 0, defaultdict(int)
    findings = []
    for t in g.model.graph.initializer:
        if _is_external(t):
            info = {e.key: e.value for e in t.external_data}
            external[info.get("location", "?")] += _tensor_nbytes(t, info)
            findings += _external_problems(g.path, t, info)
        else:
            inline += _tensor_nbytes(t, {})
    if proto_bytes >= PROTOBUF_LIMIT:
        findings.append(Finding("weights", "error", f"{g.path.name} is {proto_bytes / 2**30:.2f} GiB, over the 2 GiB "
                                "protobuf limit; the parser cannot read it. Export with external data."))
    elif inline > PROTOBUF_LIMIT // 2:
        findings.append(Finding("weights", "warn", f"{inline / 2**30:.2f} GiB of weights inline in {g.path.name}, "
                                "near the 2 GiB protobuf limit; export with external data"))
    total = inline + sum(external.values())
    if not any(f.severity == "error" for f in findings):
        where = ", ".join(f"{_size(n)} in {loc}" for loc, n in external.items()) or "no external data"
        findings.append(Finding("weights", "ok", f"{g.path.name} {_size(proto_bytes)} (< 2 GiB); weights "
                                f"{_size(total)}: {_size(inline)} inline, {where}"))
    return findings


def _external_problems(model_path: Path, t, info: dict) -> list[Finding]:
    location = info.get("location", "")
    data = model_path.parent / location
    end = int(info.get("offset", 0)) + _tensor_nbytes(t, info)
    if Path(location).is_absolute() or ".." in Path(location).parts:
        return [Finding("weights", "error", f"{t.name}: external data location {location!r} must be a file next to "
                        f"{model_path.name} (TensorRT resolves it relative to the model)")]
    if not data.is_file():
        return [Finding("weights", "error", f"{t.name}: external data file {location} is missing")]
    if data.stat().st_size < end:
        return [Finding("weights", "error", f"{t.name}: external data {location} is {data.stat().st_size} bytes, "
                        f"the tensor needs bytes up to {end} (truncated file)")]
    return []


def _tensor_nbytes(t, info: dict) -> int:
    if "length" in info:
        return int(info["length"])
    if t.raw_data:
        return len(t.raw_data)
    import onnx

    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
