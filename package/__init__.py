"""vlmdeploy: export vision-language models to ONNX / TensorRT and run them without PyTorch.

    from vlmdeploy import VLM
    vlm = VLM.load("artifacts/llava")

This directory is the top-level package only; its subpackages live at the repository root
(runtime/, export/, configs/, demo/: see [tool.setuptools.package-dir] in pyproject.toml).
"""

from __future__ import annotations

__all__ = ["VLM", "GenerationResult", "ArtifactError", "PromptError"]


def __getattr__(name: str):
    # lazy: `import vlmdeploy.export` must not pay for the runtime, nor the runtime for the exporter
    if name in ("VLM", "GenerationResult", "PromptError"):
        from .runtime import vlm

        return getattr(vlm, name)
    if name == "ArtifactError":
        from .runtime.manifest import ArtifactError

        return ArtifactError
    raise AttributeError(f"module 'vlmdeploy' has no attribute {name!r}")
