"""TrtRunner: one TensorRT engine behind the runner interface (`runner.run(feeds, out=None)`).

Per call: the feed is checked against the spec (Runner.run), the first optimization profile that
accepts its dims becomes active (ProfileError naming tensor, shape and ranges when none does), input
shapes are set, addresses bound, and the engine is enqueued on the runner's CUDA stream.

Feeds and `out` buffers are numpy arrays or DeviceTensors. numpy arrays are copied through device
buffers allocated once per tensor, at the largest shape any profile allows; DeviceTensors are bound
as they are, so a caller that keeps its tensors on the GPU (decode.py) moves nothing across.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import numpy as np

from ..manifest import ArtifactError, read_manifest
from ..runners import Runner
from ..spec import GraphSpec, SpecError
from .cuda import DeviceBuffer, DeviceTensor, Stream
from .deps import import_polygraphy_trt, import_tensorrt
from .engines import check_platform, current_platform, load_engines, verify_engine
from .profiles import Profile, select_profile

PURPOSE = "backend 'trt' (TensorRT engines)"
_SHARED_STREAM: list[Stream] = []  # one stream for every TrtRunner of the process: engines run in call order


def shared_stream() -> Stream:
    if not _SHARED_STREAM:
        _SHARED_STREAM.append(Stream())
    return _SHARED_STREAM[0]


class TrtRunner(Runner):
    def __init__(self, plan: str | Path, spec: GraphSpec, profiles: list[Profile], stream: Stream | None = None):
        super().__init__(spec)
        self.trt = import_tensorrt(PURPOSE)
        self.profiles = profiles
        self.runtime, self.engine = _load_engine(Path(plan))
        self.context = self.engine.create_execution_context()
        self.stream = stream or shared_stream()
        self.active_profile = 0  # a new context starts on profile 0
        self._check_engine_matches_spec(plan)
        self._axes = [(t.name, axis, d) for t in spec.inputs for axis, d in t.dynamic_axes().items()]
        self._max_shapes = _max_shapes(spec, profiles)
        self._staging: dict[str, DeviceBuffer] = {}  # numpy feeds/outputs pass through these; made on first use

    @classmethod
    def from_artifact(cls, directory: str | Path, spec: GraphSpec, verify: bool = True, stream: Stream | None = None) -> "TrtRunner":
        """The engine `vlmdeploy build` made for this graph, after checking it belongs to this GPU and TensorRT."""
        directory = Path(directory)
        section = load_engines(directory)
        check_platform(section, current_platform(), directory)
        entry = section.graphs.get(spec.name)
        if entry is None:
            raise ArtifactError(f"{directory}: no engine for graph {spec.name!r} (engines: {sorted(section.graphs)}); "
                                f"rebuild with `vlmdeploy build {directory}`")
        plan = verify_engine(directory, spec.name, entry, read_manifest(directory)["files"], verify)
        return cls(plan, spec, list(entry.profiles), stream)

    # ---- the runner interface ------------------------------------------------------------------

    def run(self, feeds: Mapping, out: Mapping | None = None) -> dict:
        """Runner.run, with DeviceTensors checked against the spec by shape and dtype like arrays."""
        out = out or {}
        dims = self.spec.check_feeds({n: _checkable(v) for n, v in feeds.items()})
        self._check_out({n: v for n, v in out.items() if not isinstance(v, DeviceTensor)}, dims)
        shapes = self.spec.output_shapes(dims)
        for name, v in out.items():
            if isinstance(v, DeviceTensor) and (v.shape, v.dtype) != (shapes.get(name), self._dtype(name)):
                raise SpecError(f"graph {self.spec.name!r} output buffer {name!r}: device tensor {list(v.shape)} "
                                f"{v.dtype}, needs {list(shapes.get(name, ()))} {self._dtype(name)}")
        return self._run(feeds, out)

    def _run(self, feeds, out) -> dict:
        dims = {d: feeds[name].shape[axis] for name, axis, d in self._axes}
        self._activate(select_profile(self.spec, self.profiles, dims))
        for t in self.spec.inputs:
            self._bind_input(t.name, feeds[t.name])
        targets = {name: self._bind_output(name, shape, out.get(name))
                   for name, shape in self.spec.output_shapes(dims).items()}
        t0 = time.perf_counter()
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError(f"TensorRT failed to enqueue graph {self.spec.name!r} at dims {dims}")
        result = self._collect(targets, out)
        self.last_run_s = time.perf_counter() - t0
        return result

    def _activate(self, index: int) -> None:
        if index != self.active_profile:
            self.context.set_optimization_profile_async(index, self.stream.ptr)
            self.active_profile = index

    def _bind_input(self, name: str, value) -> None:
        device = value if isinstance(value, DeviceTensor) else self._staging_tensor(name, value.shape, value.dtype)
        if not isinstance(value, DeviceTensor):
            device.copy_from(value, self.stream)
        if not self.context.set_input_shape(name, value.shape):
            raise SpecError(f"graph {self.spec.name!r} input {name!r}: TensorRT refused shape {list(value.shape)} in "
                            f"profile {self.profiles[self.active_profile].describe()}")
        self.context.set_tensor_address(name, device.ptr)

    def _bind_output(self, name: str, shape, target) -> DeviceTensor:
        device = target if isinstance(target, DeviceTensor) else self._staging_tensor(name, shape, self._dtype(name))
        self.context.set_tensor_address(name, device.ptr)
        return device

    def _collect(self, targets: dict[str, DeviceTensor], out: Mapping) -> dict:
        """Device outputs the caller bound stay on the device; the rest are copied into numpy arrays."""
        result = dict(targets)
        to_host = [name for name in targets if not isinstance(out.get(name), DeviceTensor)]
        for name in to_host:
            host = out.get(name)
            host = np.empty(targets[name].shape, targets[name].dtype) if host is None else host
            result[name] = targets[name].copy_to(host, self.stream)
        if to_host:
            self.stream.synchronize()
        return result

    def _staging_tensor(self, name: str, shape, dtype) -> DeviceTensor:
        if name not in self._staging:
            itemsize = np.dtype(self._dtype(name)).itemsize
            self._staging[name] = DeviceBuffer(int(np.prod(self._max_shapes[name], dtype=np.int64)) * itemsize)
        return self._staging[name].tensor(shape, dtype)

    def _dtype(self, name: str) -> np.dtype:
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _check_engine_matches_spec(self, plan) -> None:
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        want = {t.name: np.dtype(t.np_dtype) for t in (*self.spec.inputs, *self.spec.outputs)}
        got = {n: self._dtype(n) for n in names}
        if got != want:
            raise SpecError(f"{plan}: engine tensors {got} differ from the manifest's spec {want}; "
                            "rebuild with `vlmdeploy build`")

    def close(self) -> None:
        for buffer in self._staging.values():
            buffer.free()
        self._staging.clear()
        self.context = self.engine = self.runtime = None


def _load_engine(plan: Path):
    """(runtime, engine): the runner holds both, as the runtime must outlive its engine."""
    poly = import_polygraphy_trt(PURPOSE)
    from polygraphy.backend.common import BytesFromPath

    runtime = import_tensorrt(PURPOSE).Runtime(poly.get_trt_logger())
    try:
        engine = poly.EngineFromBytes(BytesFromPath(str(plan)), runtime=runtime)()
    except Exception as e:  # noqa: BLE001 — Polygraphy raises its own exception type
        raise ArtifactError(f"{plan}: TensorRT could not deserialize the engine ({e}); it was built with another "
                            "TensorRT version or is corrupt. Rebuild with `vlmdeploy build`.") from e
    if engine is None:
        raise ArtifactError(f"{plan}: TensorRT could not deserialize the engine; rebuild with `vlmdeploy build`")
    return runtime, engine


def _max_shapes(spec: GraphSpec, profiles: list[Profile]) -> dict[str, tuple[int, ...]]:
    """The largest shape of every input and output over all profiles: the size of its staging buffer."""
    dims: dict[str, int] = {}
    for p in profiles:
        for d, r in p.dims.items():
            dims[d] = max(dims.get(d, 0), r.max)
    return {**{t.name: t.concrete_shape(dims) for t in spec.inputs}, **spec.output_shapes(dims)}


def _checkable(value):
    """What GraphSpec.check_feeds reads of a DeviceTensor (shape, dtype) as a zero-stride numpy view."""
    if not isinstance(value, DeviceTensor):
        return value
    return np.lib.stride_tricks.as_strided(np.empty(1, value.dtype), value.shape, (0,) * value.ndim, writeable=False)
