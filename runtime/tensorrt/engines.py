"""The manifest's optional `engines` section: which engines were built, for which GPU and TensorRT, from which ONNX.

    "engines": {
      "tensorrt_version": "10.7.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
      "precision": "fp16", "limits": {"max_batch": 1, ...},
      "graphs": {"decoder": {"file": "engines/decoder.plan", "sha256": ..., "size": ...,
                             "onnx": "decoder.onnx", "onnx_sha256": ..., "profiles": [{"name": "prefill", "dims": {...}}]},
                 ...},
      "built_with": {"polygraphy": "0.49.9", "vlmdeploy": "0.1.0"}
    }

An engine only runs on the GPU model and TensorRT version it was built with (TensorRT's rule for plans);
loading it anywhere else is an ArtifactError that names both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..manifest import ArtifactError, read_manifest, sha256_file
from .profiles import Limits, Profile

ENGINES_DIR = "engines"
# The portable decoder: the one TensorRT runs (decoder_gqa uses ONNX Runtime's contrib ops).
ENGINE_DECODER = "decoder"
GREEDY = "greedy"
PRECISIONS = ("fp32", "fp16", "bf16")


def engine_graphs(model_facts) -> tuple[str, ...]:
    """The graphs the TensorRT runtime runs, from the manifest's pipeline: the media chain(s), the
    token embedding and the portable decoder (plus the on-GPU argmax, GREEDY, built beside them)."""
    p = model_facts.pipeline
    return (*p["image"], p["embed"], ENGINE_DECODER)


class EngineMismatch(ArtifactError):
    """Engines built for another GPU or TensorRT version, or from ONNX files that changed since."""


@dataclass(frozen=True)
class Platform:
    """Where an engine was built or is about to run."""

    tensorrt_version: str
    gpu: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu} (compute capability {self.compute_capability})"


@dataclass(frozen=True)
class EngineEntry:
    file: str  # relative to the artifact directory
    sha256: str
    size: int
    onnx: str  # the ONNX it was built from, relative
    onnx_sha256: str
    profiles: tuple[Profile, ...]

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "size": self.size, "onnx": self.onnx,
                "onnx_sha256": self.onnx_sha256, "profiles": [p.to_dict() for p in self.profiles]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "EngineEntry":
        return cls(d["file"], d["sha256"], d["size"], d["onnx"], d["onnx_sha256"],
                   tuple(Profile.from_dict(p) for p in d["profiles"]))


@dataclass(frozen=True)
class EnginesSection:
    platform: Platform
    precision: str
    limits: Limits
    graphs: Mapping[str, EngineEntry]
    built_with: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        p = self.platform
        return {"tensorrt_version": p.tensorrt_version, "gpu": p.gpu, "compute_capability": p.compute_capability,
                "precision": self.precision, "limits": self.limits.to_dict(),
                "graphs": {n: e.to_dict() for n, e in self.graphs.items()}, "built_with": dict(self.built_with)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "EnginesSection":
        return cls(Platform(d["tensorrt_version"], d["gpu"], d["compute_capability"]), d["precision"],
                   Limits.from_dict(d["limits"]), {n: EngineEntry.from_dict(e) for n, e in d["graphs"].items()},
                   d.get("built_with", {}))


def current_platform() -> Platform:
    """TensorRT version and GPU of this machine; BackendUnavailable when either is missing."""
    from .cuda import gpu_info
    from .deps import import_tensorrt

    trt = import_tensorrt("TensorRT engines")
    gpu = gpu_info()
    return Platform(trt.__version__, gpu.name, gpu.compute_capability)


def load_engines(directory: str | Path) -> EnginesSection:
    """The engines section of DIR/manifest.json; ArtifactError saying how to build when there is none."""
    d = read_manifest(directory)
    if not d.get("engines"):
        raise ArtifactError(f"{directory}: no TensorRT engines in the manifest; build them on this GPU with "
                            f"`vlmdeploy build {directory}` (make engines)")
    try:
        return EnginesSection.from_dict(d["engines"])
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory}: malformed engines section ({e!r}); rebuild with `vlmdeploy build {directory}`") from e


def check_platform(section: EnginesSection, here: Platform, directory: str | Path) -> None:
    """Engines run only where they were built: same TensorRT version, same GPU model."""
    built = section.platform
    if (built.tensorrt_version, built.gpu, built.compute_capability) != (here.tensorrt_version, here.gpu, here.compute_capability):
        raise EngineMismatch(f"{directory}: the engines were built with {built.describe()}, but this machine has "
                             f"{here.describe()}; TensorRT engines run only on the GPU model and TensorRT version "
                             f"they were built with. Rebuild here: vlmdeploy build {directory}")


def verify_engine(directory: Path, name: str, entry: EngineEntry, onnx_files: Mapping[str, dict], checksums: bool = True) -> Path:
    """The engine file exists, is intact, and was built from the ONNX the manifest lists now."""
    path = Path(directory) / entry.file
    rebuild = f"rebuild with `vlmdeploy build {directory}`"
    if not path.is_file() or path.stat().st_size != entry.size:
        raise ArtifactError(f"{path}: engine for {name!r} is missing or truncated (manifest says {entry.size} bytes); {rebuild}")
    if checksums and sha256_file(path) != entry.sha256:
        raise ArtifactError(f"{path}: sha256 mismatch with the manifest; the engine is corrupt or was replaced; {rebuild}")
    source = onnx_files.get(entry.onnx)
    if source is not None and source["sha256"] != entry.onnx_sha256:
        raise EngineMismatch(f"{path}: built from a different {entry.onnx} (sha256 {entry.onnx_sha256[:12]}…, now "
                             f"{source['sha256'][:12]}…); the ONNX was re-exported since; {rebuild}")
    return path
