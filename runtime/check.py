"""`vlmdeploy check DIR`: is this artifact directory sound? Returns a report; never raises on a bad graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dummy import bound_outputs, sample_feeds, validation_dims, with_sums
from .manifest import ArtifactError, Manifest, load_manifest
from .backends import make_runner


@dataclass
class CheckReport:
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "warn: ..." / "info: ..." lines that do not fail the check

    def add(self, passed: bool, what: str) -> None:
        (self.ok if passed else self.failed).append(what)

    @property
    def passed(self) -> bool:
        return not self.failed


def check_artifact(directory: str | Path, backend: str = "ort-cpu", tensorrt: tuple | None = None) -> CheckReport:
    """`tensorrt`: (trt_version, BuildOptions) adds the static TensorRT check (runtime/tensorrt/build.py)."""
    report = CheckReport()
    directory = Path(directory)
    try:
        manifest = load_manifest(directory, checksums=True)
    except ArtifactError as e:
        report.add(False, f"manifest and checksums: {e}")
        return report
    report.add(True, f"manifest v{manifest.to_dict()['manifest_version']}, {len(manifest.files)} files, sha256 match")
    for name in manifest.graphs:
        _check_onnx(directory, manifest, name, report)
        _check_run(directory, manifest, name, backend, report)
    if tensorrt is not None:
        _check_tensorrt(directory, manifest, tensorrt, report)
    return report


def _check_tensorrt(directory: Path, manifest: Manifest, request: tuple, report: CheckReport) -> None:
    from .tensorrt.build import tensorrt_check

    for severity, line in tensorrt_check(directory, manifest, *request):
        if severity in ("ok", "error"):
            report.add(severity == "ok", line)
        else:
            report.notes.append(f"{severity}: {line}")


def _check_onnx(directory: Path, manifest: Manifest, name: str, report: CheckReport) -> None:
    import onnx

    path = directory / manifest.graph_files[name]
    try:
        onnx.checker.check_model(str(path), full_check=True)  # path form: handles external data and >2 GB
        report.add(True, f"{name}: onnx checker and shape inference")
    except Exception as e:  # noqa: BLE001 — any checker failure is a finding, reported per graph
        report.add(False, f"{name}: onnx checker: {type(e).__name__}: {str(e)[:300]}")


def _check_run(directory: Path, manifest: Manifest, name: str, backend: str, report: CheckReport) -> None:
    spec = manifest.graphs[name]
    rng = np.random.default_rng(0)
    try:
        runner = make_runner(backend, directory / manifest.graph_files[name], spec)
        shapes = validation_dims(spec)
        for dims in shapes:
            dims = with_sums(spec, dims)
            feeds = sample_feeds(spec, dims, manifest.model, rng)
            out = runner.run(feeds, out=bound_outputs(spec, feeds))
            _check_outputs(spec, dims, out)
        report.add(True, f"{name}: ran on {backend} at {len(shapes)} shapes, outputs finite and as specified")
    except Exception as e:  # noqa: BLE001
        report.add(False, f"{name}: run on {backend}: {type(e).__name__}: {str(e)[:300]}")


def _check_outputs(spec, dims: dict, out: dict) -> None:
    for name, shape in spec.output_shapes(dims).items():
        if out[name].shape != shape:
            raise ValueError(f"output {name} has shape {list(out[name].shape)}, spec says {list(shape)} at {dims}")
        if not np.all(np.isfinite(out[name])):
            raise ValueError(f"output {name} has non-finite values at {dims}")
