"""Spec-driven ONNX export and validation, shared by every model family.

The graph spec gives input/output names, dtypes and named dynamic axes; from it come the
`dynamic_shapes` for torch.onnx.export (one `Dim` per name, shared across tensors), the example
inputs, and the shapes validation runs at.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch.export import Dim

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
) -> dict:
    """Run the ONNX graph in ONNX Runtime and the torch reference on fresh random inputs at several
    shapes; return the record for the manifest. Raises ValueError beyond tolerance."""
    runner = OrtRunner(path, spec)
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


def torch_reference(module: torch.nn.Module, spec: GraphSpec) -> Callable[[dict], list[np.ndarray]]:
    def run(feeds: dict) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return [t.detach().numpy() for t in out]

    return run
