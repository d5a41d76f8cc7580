"""One runner interface for every backend.

`runner.run(feeds, out=None)` checks the feeds against the graph's spec (from the manifest) and
raises SpecError naming the tensor, the shape it got and what is allowed; then the backend runs.
`out` maps output names to preallocated arrays the backend writes into (ORT: IOBinding), which is
how the decoder writes the KV cache and logits without a copy in Python.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from .offline import import_onnxruntime
from .spec import GraphSpec, SpecError

class Runner:
    """Base: feed checking and output-buffer checking; subclasses implement `_run`."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.last_run_s = 0.0  # time inside the backend's run call, for overhead measurements

    def run(self, feeds: Mapping[str, np.ndarray], out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        dims = self.spec.check_feeds(feeds)
        if out:
            self._check_out(out, dims)
        return self._run(feeds, out or {})

    def _check_out(self, out: Mapping[str, np.ndarray], dims: dict[str, int]) -> None:
        shapes = self.spec.output_shapes(dims)
        for name, arr in out.items():
            if name not in shapes:
                raise SpecError(f"graph {self.spec.name!r}: no output named {name!r}; outputs are {list(shapes)}")
            if arr.shape != shapes[name] or not arr.flags.c_contiguous:
                raise SpecError(
                    f"graph {self.spec.name!r} output buffer {name!r}: shape {list(arr.shape)} "
                    f"(contiguous={arr.flags.c_contiguous}), needs contiguous {list(shapes[name])}"
                )

    def _run(self, feeds, out) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        pass


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(threads) -> int | None:
    """None (all cores) or an int in 1..8 x the cores; more only oversubscribes (1000 hangs ONNX Runtime)."""
    if threads is None:
        return None
    most = 8 * (os.cpu_count() or 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most:
        raise ValueError(f"threads must be an int from 1 to {most} (8 x this machine's {os.cpu_count()} cores) or "
                         f"None for all cores, got {threads!r}")
    return threads


class OrtRunner(Runner):
    """ONNX Runtime; on the CPU unless `providers` names GPU execution providers."""

    def __init__(self, path: str | Path, spec: GraphSpec, threads: int | None = None, providers: list | None = None,
                 low_memory: bool = False):
        """`low_memory` (export validation): basic graph optimizations only, no memory arena or
        pattern, priority execution order. The full level folds the Casts ORT's CPU kernels need
        around float16 weights into float32 copies (2x the fp16 weights, measured); basic leaves the
        weights memory-mapped from the external data file and casts one at a time while it runs."""
        super().__init__(spec)
        ort = import_onnxruntime()

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = check_threads(threads) or default_threads()
        opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if low_memory
                                         else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if low_memory:
            # ORT's default order runs every weight's Cast first (they depend on nothing), so all the
            # float32 copies are alive at once; priority order runs each next to its MatMul (measured:
            # 0.5B decoder peak 965 -> 585 MB, 7B anonymous memory 17 GB and growing -> one weight)
            opts.enable_cpu_mem_arena = opts.enable_mem_pattern = False
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        providers = providers or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self._local = threading.local()  # per-thread IOBinding state
        self._check_session_matches_spec(path)

    def _check_session_matches_spec(self, path) -> None:
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != self.spec.input_names or got_out != self.spec.output_names:
            raise SpecError(
                f"{path}: graph inputs {got_in} / outputs {got_out} differ from the manifest's spec "
                f"{self.spec.input_names} / {self.spec.output_names}; re-run `vlmdeploy export`"
            )

    def _run(self, feeds, out) -> dict[str, np.ndarray]:
        if not out:
            t0 = time.perf_counter()
            values = self.session.run(None, dict(feeds))
            self.last_run_s = time.perf_counter() - t0
            return dict(zip(self.spec.output_names, values))
        return self._run_bound(feeds, out)

    def _run_bound(self, feeds, out) -> dict[str, np.ndarray]:
        """IOBinding: inputs by pointer (zero-copy), outputs written straight into the caller's
        buffers. The binding persists across calls and a tensor is re-bound only when its buffer
        (address, shape, dtype) changed: in a decode loop the KV cache and logits buffers are bound
        once, and each step re-binds just the new token's embedding, the mask and the positions."""
        binding = self._binding()
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            if self._rebind(("in", name), arr):
                binding.bind_cpu_input(name, arr)
        for name in self.spec.output_names:
            arr = out.get(name)
            if self._rebind(("out", name), arr):
                if arr is None:
                    binding.bind_output(name, "cpu")  # ONNX Runtime allocates it per run
                else:
                    binding.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
        t0 = time.perf_counter()
        self.session.run_with_iobinding(binding)
        self.last_run_s = time.perf_counter() - t0
        result = dict(out)
        if len(out) < len(self.spec.output_names):
            for name, value in zip(self.spec.output_names, binding.get_outputs()):
                if name not in out:
                    result[name] = value.numpy()
        return result

    def _binding(self):
        """This thread's IOBinding (an InferenceSession may be run from several threads at once; a
        binding may not: each thread binds its own buffers)."""
        local = self._local
        if getattr(local, "io", None) is None:
            local.io, local.bound = self.session.io_binding(), {}
        return local.io

    def _rebind(self, key: tuple, arr: np.ndarray | None) -> bool:
        """True when `arr` is not what is bound under `key` (and records it as bound)."""
        if arr is None:  # an ORT-allocated output stays bound to the last run's value: always re-bind
            self._local.bound.pop(key, None)
            return True
        sig = (arr.ctypes.data, arr.shape, arr.dtype.str)
        if self._local.bound.get(key) == sig:
            return False
        self._local.bound[key] = sig
        return True
