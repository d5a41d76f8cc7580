"""Build one TensorRT engine with Polygraphy's loaders (they compose; the last call does the work):

    SaveEngine(
        EngineFromNetwork(
            PostprocessNetwork(NetworkFromOnnxPath(onnx), pin_overflow_layers_to_fp32),   # fp16 only
            config=CreateConfig(profiles, fp16/bf16, precision_constraints="obey",
                                load_timing_cache=cache, memory_pool_limits={WORKSPACE: ...},
                                progress_monitor=...),
            save_timing_cache=cache),
        plan)

Under fp16 the layers whose intermediate values outgrow fp16's 65504 run in fp32: softmax, layer/RMS
norms (x**2 and its mean, the reciprocal square root). bf16 has fp32's range and needs no pinning.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..spec import GraphSpec
from .deps import import_polygraphy_trt, import_tensorrt
from .profiles import Profile

PURPOSE = "building TensorRT engines (vlmdeploy build)"


@dataclass(frozen=True)
class EngineRecipe:
    """How to build one engine; what `vlmdeploy build` flags turn into."""

    precision: str  # fp32 | fp16 | bf16
    timing_cache: Path
    workspace_gb: float | None = None


def build_engine(onnx_path: Path, plan_path: Path, spec: GraphSpec, profiles: list[Profile], recipe: EngineRecipe,
                 log=print) -> None:
    poly = import_polygraphy_trt(PURPOSE)
    network = poly.NetworkFromOnnxPath(str(onnx_path))  # parse_from_file: external data next to the model
    if recipe.precision == "fp16":
        network = poly.PostprocessNetwork(network, pin_overflow_layers_to_fp32, name="pin norms/softmax to fp32")
    config = poly.CreateConfig(**_config_args(spec, profiles, recipe, log))
    engine = poly.EngineFromNetwork(network, config=config, save_timing_cache=str(recipe.timing_cache))
    poly.SaveEngine(engine, str(plan_path))()


def _config_args(spec: GraphSpec, profiles: list[Profile], recipe: EngineRecipe, log) -> dict:
    trt = import_tensorrt(PURPOSE)
    args = dict(
        profiles=polygraphy_profiles(spec, profiles),
        fp16=recipe.precision == "fp16",
        bf16=recipe.precision == "bf16",
        precision_constraints="obey" if recipe.precision == "fp16" else None,
        load_timing_cache=str(recipe.timing_cache),
        progress_monitor=progress_monitor(log),
    )
    if recipe.workspace_gb:
        args["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(recipe.workspace_gb * 2**30)}
    return args


def polygraphy_profiles(spec: GraphSpec, profiles: list[Profile]) -> list:
    """Our profiles as Polygraphy Profiles: (min, opt, max) shapes per input, one range per dim name."""
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    out = []
    for p in profiles:
        poly = PolygraphyProfile()
        for name, (lo, opt, hi) in p.shapes(spec).items():
            poly.add(name, lo, opt, hi)
        out.append(poly)
    return out


def pin_overflow_layers_to_fp32(network) -> None:
    """Run layers whose values outgrow fp16 in fp32 (needs precision_constraints="obey")."""
    trt = import_tensorrt(PURPOSE)
    from polygraphy.backend.trt import util as trt_util

    classes = trt_util.get_layer_class_mapping()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if _overflows_fp16(layer, trt, classes):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def _overflows_fp16(layer, trt, classes) -> bool:
    floating = (trt.float32, trt.float16)
    if layer.num_outputs == 0 or layer.get_output(0).dtype not in floating:
        return False
    kind = layer.type
    if kind in {getattr(trt.LayerType, n, None) for n in ("SOFTMAX", "NORMALIZATION", "REDUCE")}:
        return True  # softmax sums, layer/RMS norm statistics
    if kind == trt.LayerType.ELEMENTWISE:
        layer.__class__ = classes[kind]  # TensorRT's Python API: downcast to read `op`
        return layer.op == trt.ElementWiseOperation.POW  # x**2 of the norm
    if kind == trt.LayerType.UNARY:
        layer.__class__ = classes[kind]
        return layer.op in (trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP)  # 1/sqrt(var)
    return False


def progress_monitor(log):
    """A trt.IProgressMonitor that prints each build phase with its elapsed time (None before TensorRT 10)."""
    trt = import_tensorrt(PURPOSE)
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.started[phase_name] = time.perf_counter()
            depth = 1 + (parent_phase is not None)
            log(f"{'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            elapsed = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            if elapsed > 1.0:
                log(f"    {phase_name}: {elapsed:.1f}s")

    return BuildProgress()


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
