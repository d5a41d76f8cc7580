"""GPU backends behind `make_runner`, and `backend="auto"`.

    trt       TensorRT engines from `vlmdeploy build` (TrtRunner)
    ort-cuda  ONNX Runtime, CUDA execution provider               (pip install 'vlmdeploy[gpu]')
    ort-trt   ONNX Runtime, TensorRT execution provider; it builds its own engines on first use and
              caches them in DIR/ort-trt-cache, with one profile per graph covering our profiles
    auto      the first usable of: trt (engines built for this GPU and TensorRT), ort-cuda, ort-cpu;
              ort-trt is never picked by itself (its first load builds engines for minutes)
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from ..manifest import ArtifactError, load_manifest
from ..runners import OrtRunner, Runner
from ..spec import GraphSpec
from .deps import BackendUnavailable, require_ort_provider
from .profiles import Limits, Profile, derive_profiles, envelope

ORT_PROVIDERS = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}
ORT_TRT_CACHE = "ort-trt-cache"
AUTO_ORDER = ("trt", "ort-cuda", "ort-cpu")


def make_gpu_runner(backend: str, path: str | Path, spec: GraphSpec, threads: int | None = None) -> Runner:
    if backend == "trt":
        from .runner import TrtRunner

        return TrtRunner.from_artifact(Path(path).parent, spec)
    provider = ORT_PROVIDERS[backend]
    require_ort_provider(provider, backend)
    runner = OrtRunner(path, spec, threads, providers=_ort_providers(backend, Path(path), spec))
    if provider not in runner.session.get_providers():  # ONNX Runtime falls back to the CPU quietly
        raise BackendUnavailable(f"backend {backend!r}: ONNX Runtime could not start {provider} for {path} (it "
                                 f"fell back to {runner.session.get_providers()}); see its log above for the cause")
    return runner


def _ort_providers(backend: str, path: Path, spec: GraphSpec) -> list:
    cuda = ("CUDAExecutionProvider", {})
    if backend == "ort-cuda":
        return [cuda, "CPUExecutionProvider"]
    return [("TensorrtExecutionProvider", ort_trt_options(path.parent, spec)), cuda, "CPUExecutionProvider"]


def ort_trt_options(directory: Path, spec: GraphSpec) -> dict:
    """TensorRT EP options: engine and timing caches under the artifact dir, explicit profile shapes."""
    manifest = load_manifest(directory, checksums=False)
    profile = envelope("ort-trt", derive_profiles(spec, Limits.for_model(manifest.model)))
    cache = directory / ORT_TRT_CACHE
    cache.mkdir(exist_ok=True)
    return {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": manifest.model.dims.dtype == "float16",
        **profile_shape_options(spec, profile),
    }


def profile_shape_options(spec: GraphSpec, profile: Profile) -> dict[str, str]:
    """trt_profile_{min,opt,max}_shapes: "input:1x3x336x336,other:..." for every input with a dynamic axis."""
    shapes = {name: s for name, s in profile.shapes(spec).items()
              if any(isinstance(d, str) for d in next(t for t in spec.inputs if t.name == name).shape)}
    return {f"trt_profile_{kind}_shapes": ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shapes.items())
            for i, kind in enumerate(("min", "opt", "max"))}


@lru_cache(maxsize=None)
def resolve_backend(directory: Path) -> str:
    """The best backend usable here for this artifact; says which on stderr (once per directory)."""
    skipped = []
    for backend in AUTO_ORDER:
        why_not = _unusable(backend, directory)
        if why_not is None:
            print(f"vlmdeploy: backend auto -> {backend}" + (f" ({'; '.join(skipped)})" if skipped else ""),
                  file=sys.stderr)
            return backend
        skipped.append(f"{backend}: {why_not}")
    raise AssertionError("ort-cpu is always usable")


def _unusable(backend: str, directory: Path) -> str | None:
    """None when the backend can run this artifact here, else the reason in a few words."""
    try:
        if backend == "trt":
            from .engines import check_platform, current_platform, load_engines

            check_platform(load_engines(directory), current_platform(), directory)
        elif backend in ORT_PROVIDERS:
            require_ort_provider(ORT_PROVIDERS[backend], backend)
    except (BackendUnavailable, ArtifactError, ImportError) as e:
        return str(e).split(";")[0].split(". Install")[0]
    return None
