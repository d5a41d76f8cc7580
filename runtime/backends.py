"""Backend name -> runner. The GPU backends (ort-cuda, ort-trt, trt, auto) live in
runtime/tensorrt/backends.py and are imported only when asked for."""

from __future__ import annotations

from pathlib import Path

from .runners import OrtRunner, Runner
from .spec import GraphSpec

# ort-cpu-mapped: ONNX Runtime on the CPU with the weights left memory-mapped (basic optimizations;
# fp16 weights cast to float32 one at a time): ~1x the weights of memory instead of ~2x for fp16
# artifacts, slower. What export validation uses; lets a 7B fp16 artifact run on a 24 GB machine.
BACKENDS = ("ort-cpu", "ort-cpu-mapped", "ort-cuda", "ort-trt", "trt", "auto")


def make_runner(backend: str, path: str | Path, spec: GraphSpec, threads: int | None = None) -> Runner:
    if backend == "auto":
        from .tensorrt.backends import resolve_backend

        backend = resolve_backend(Path(path).parent)
    if backend in ("ort-cpu", "ort-cpu-mapped"):
        return OrtRunner(path, spec, threads, low_memory=backend == "ort-cpu-mapped")
    if backend in BACKENDS:
        from .tensorrt.backends import make_gpu_runner

        return make_gpu_runner(backend, path, spec, threads)
    raise ValueError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
