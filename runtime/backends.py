"""Backend name -> runner. The GPU backends (ort-cuda, ort-trt, trt, auto) live in
runtime/tensorrt/backends.py and are imported only when asked for."""

from __future__ import annotations

from pathlib import Path

from .runners import OrtRunner, Runner
from .spec import GraphSpec

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt", "auto")


def make_runner(backend: str, path: str | Path, spec: GraphSpec, threads: int | None = None) -> Runner:
    if backend == "auto":
        from .tensorrt.backends import resolve_backend

        backend = resolve_backend(Path(path).parent)
    if backend == "ort-cpu":
        return OrtRunner(path, spec, threads)
    if backend in BACKENDS:
        from .tensorrt.backends import make_gpu_runner

        return make_gpu_runner(backend, path, spec, threads)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
