"""Optional GPU libraries, imported only when used; their absence is an error that says what to install."""

from __future__ import annotations

TENSORRT_INSTALL = "pip install 'vlmdeploy[tensorrt]'  (TensorRT 10 + Polygraphy; needs an NVIDIA GPU and driver)"
ORT_GPU_INSTALL = ("pip install 'vlmdeploy[gpu]' && pip uninstall -y onnxruntime && "
                   "pip install --force-reinstall --no-deps onnxruntime-gpu  (onnxruntime and onnxruntime-gpu "
                   "install the same module; only onnxruntime-gpu may remain)")


class BackendUnavailable(RuntimeError):
    """A backend's libraries or GPU are missing; the message says what to install."""


def import_tensorrt(purpose: str):
    """`import tensorrt`, or BackendUnavailable naming the purpose and the install command."""
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(f"{purpose} needs TensorRT, which is not installed here ({e}). "
                                 f"Install: {TENSORRT_INSTALL}") from None
    return tensorrt


def import_polygraphy_trt(purpose: str):
    """polygraphy.backend.trt after checking TensorRT itself is importable (Polygraphy imports it lazily)."""
    import_tensorrt(purpose)
    try:
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as e:
        raise BackendUnavailable(f"{purpose} needs Polygraphy, which is not installed here ({e}). "
                                 f"Install: {TENSORRT_INSTALL}") from None
    return polygraphy_trt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None; never raises."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def require_ort_provider(provider: str, backend: str) -> None:
    from ..offline import import_onnxruntime

    ort = import_onnxruntime()

    available = ort.get_available_providers()
    if provider not in available:
        raise BackendUnavailable(
            f"backend {backend!r} needs ONNX Runtime's {provider}, but this onnxruntime {ort.__version__} offers "
            f"only {available}. Install: {ORT_GPU_INSTALL}"
            + ("; the TensorRT EP also needs TensorRT's libraries: " + TENSORRT_INSTALL
               if provider == "TensorrtExecutionProvider" else "")
        )
