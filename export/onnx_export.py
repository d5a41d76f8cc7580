"""Spec-driven ONNX export and validation, shared by every model family.

The graph spec gives input/output names, dtypes and named dynamic axes; from it come the
`dynamic_shapes` for torch.onnx.export (one `Dim` per name, shared across tensors), the example
inputs, and the shapes validation runs at.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch.export import Dim
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from vlmdeploy.runtime.runners import OrtRunner
from vlmdeploy.runtime.spec import GraphSpec

# Max abs diff allowed between ONNX Runtime and PyTorch, relative to the reference's magnitude:
# tol = ATOL[dtype] * max(1, max|reference|).
ATOL = {"float32": 1e-4, "float16": 2e-2}


def dynamic_shapes(spec: GraphSpec, module: torch.nn.Module) -> tuple:
    """torch.export dynamic_shapes from the spec. `*args` of forward is ONE pytree element."""
    dims = {name: Dim(name.replace(".", "_"), min=0) for name in spec.dim_names()}
    per_input = [{axis: dims[d] for axis, d in t.dynamic_axes().items()} or None for t in spec.inputs]
    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        fixed = len(params) - 1
        return (*per_input[:fixed], tuple(per_input[fixed:]))
    return tuple(per_input)


def export_graph(module: torch.nn.Module, spec: GraphSpec, example: dict[str, np.ndarray], path: Path, opset: int) -> None:
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    with torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec, module), verbose=False,
        )
    program.save(str(path), external_data=True)
    stamp_spec_dims(path, spec)


def stamp_spec_dims(path: Path, spec: GraphSpec) -> None:
    """Check IO names and write the spec's dim names into the graph's IO shapes (the exporter names
    derived dims by expression, e.g. 'past + seq'; TensorRT profiles and readers want 'total')."""
    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != spec.input_names or got_out != spec.output_names:
        raise RuntimeError(
            f"{path.name}: exported inputs {got_in} / outputs {got_out} differ from the spec "
            f"{spec.input_names} / {spec.output_names}"
        )
    for value, tensor in zip([*model.graph.input, *model.graph.output], [*spec.inputs, *spec.outputs]):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            raise RuntimeError(f"{path.name}: {tensor.name} has rank {len(dims)}, spec says {len(tensor.shape)}")
        for dim, want in zip(dims, tensor.shape):
            if isinstance(want, str):
                dim.dim_param = want
    onnx.save(model, str(path))


def max_abs_diff(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[float, float]:
    """(max abs diff, max |ref|) over all outputs."""
    diff = max(float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)), initial=0.0)) for r, g in zip(ref, got))
    scale = max(float(np.max(np.abs(r.astype(np.float64)), initial=0.0)) for r in ref)
    return diff, scale


def validate_graph(
    path: Path, spec: GraphSpec, reference: Callable[[dict], list[np.ndarray]],
    feeds_at: Callable[[dict], dict], dims_list: list[dict], dtype: str,
    valid: Callable[[dict, list], list] = lambda feeds, outs: outs,
    while_loaded: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """Run the ONNX graph in ONNX Runtime and the torch reference on fresh random inputs at several
    shapes; return the record for the manifest. Raises ValueError beyond tolerance. `while_loaded()`
    is entered once the session exists and left before it is released (the exporter's page trimmer)."""
    runner = OrtRunner(path, spec, low_memory=True)
    with while_loaded():
        return _compare_runs(runner, spec, reference, feeds_at, dims_list, dtype, valid)


def _compare_runs(runner, spec: GraphSpec, reference, feeds_at, dims_list: list[dict], dtype: str, valid) -> dict:
    worst, shapes = 0.0, []
    for dims in dims_list:
        feeds = feeds_at(dims)
        ref = valid(feeds, reference(feeds))
        got = runner.run(feeds)
        diff, scale = max_abs_diff(ref, valid(feeds, [got[n] for n in spec.output_names]))
        tol = ATOL[dtype] * max(1.0, scale)
        if not diff <= tol:
            raise ValueError(
                f"graph {spec.name}: ONNX Runtime differs from PyTorch by {diff:.3g} at {dims} "
                f"(tolerance {tol:.3g}); the export is wrong"
            )
        worst = max(worst, diff)
        shapes.append({"dims": dims, "max_abs_diff": diff, "tolerance": tol})
    return {"max_abs_diff": worst, "runs": shapes}


class Recorded:
    """Validation inputs and PyTorch's outputs, computed while the torch model is loaded, replayed
    later to ONNX Runtime's validation (once torch is freed: the two never hold the weights at once).

        record: dims -> feeds_at(dims) -> [reference_inputs(feeds, dims)] -> reference(...) -> outputs
        replay: feeds_at(dims) and reference(inputs) return what was recorded, in the same order;
                a call out of order (other dims, other inputs) raises instead of comparing wrong runs.
    """

    def __init__(self, runs: list[tuple[dict, dict, dict, list[np.ndarray]]], reference_kind: str):
        self.runs = runs  # (dims, feeds, the reference's inputs, its outputs)
        self.reference_kind = reference_kind
        self._i = 0

    @classmethod
    def record(cls, reference, feeds_at, dims_list: list[dict], reference_inputs=lambda feeds, dims: feeds,
               dtype: str = "float32") -> "Recorded":
        """Run the torch reference on every validation shape now. fp16 graphs get a float32 reference
        (the same fp16 weights, float32 arithmetic: `float32_arithmetic`): what an fp16 graph should
        be compared against, and torch's fp16 kernels on a CPU are slow besides."""
        runs = []
        upcast = dtype == "float16"
        for dims in dims_list:
            feeds = feeds_at(dims)
            inputs = reference_inputs(feeds, dims)
            with float32_arithmetic() if upcast else contextlib.nullcontext():
                outputs = [np.asarray(o) for o in reference(inputs)]
            runs.append((dims, feeds, inputs, outputs))
        kind = "pytorch float32 arithmetic on the float16 weights" if upcast else f"pytorch {dtype}"
        return cls(runs, kind)

    def replay(self) -> "Recorded":
        return Recorded(self.runs, self.reference_kind)

    def feeds_at(self, dims: dict) -> dict:
        want, feeds = self.runs[self._i][0], self.runs[self._i][1]
        if dims != want:
            raise RuntimeError(f"validation replay: asked for dims {dims}, recorded {want}")
        return feeds

    def reference(self, inputs: dict) -> list[np.ndarray]:
        _, _, recorded, outputs = self.runs[self._i]
        if set(inputs) != set(recorded) or not all(np.array_equal(inputs[k], recorded[k]) for k in inputs):
            raise RuntimeError("validation replay: the reference was asked about other inputs than recorded")
        self._i += 1
        return [o.copy() for o in outputs]


class float32_arithmetic(TorchFunctionMode):
    """Run an fp16 model's forward in float32: every float16 tensor an op receives is upcast (one
    weight at a time; no float32 copy of the model), and float16 dtypes asked for (`.to(float16)`,
    `dtype=model.dtype`) become float32. In-place ops keep their float16 target (upcasting it would
    write into a temporary copy)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inplace = name.endswith("_") and not name.startswith("__") or name in ("__setitem__", "__iadd__", "__imul__")
        first, rest = (args[:1], args[1:]) if inplace and args else ((), args)
        rest, kwargs = tree_map(_to_float32, (rest, kwargs))
        return func(*first, *rest, **kwargs)


def _to_float32(x):
    if x is torch.float16:
        return torch.float32
    if isinstance(x, torch.Tensor) and x.dtype == torch.float16:
        return x.float()
    return x


def torch_reference(module: torch.nn.Module, spec: GraphSpec) -> Callable[[dict], list[np.ndarray]]:
    def run(feeds: dict) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [t.detach().numpy() for t in out]

    return run
