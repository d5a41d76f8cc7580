"""TensorRT engines and GPU runners on a real GPU (`make test-gpu`, `pytest -m gpu`).

Each test skips with its reason where TensorRT, a CUDA GPU, or onnxruntime-gpu is missing, which is
every machine this project's CI runs on (shared/FACTS.md); they run where TensorRT exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.manifest import load_manifest
from vlmdeploy.runtime.tensorrt.build import BuildOptions, build_engines
from vlmdeploy.runtime.tensorrt.deps import BackendUnavailable


def _tensorrt_missing() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'vlmdeploy[tensorrt]')"
    try:
        from vlmdeploy.runtime.tensorrt.cuda import gpu_info

        gpu_info()
    except (BackendUnavailable, ImportError) as e:
        return f"no usable CUDA GPU: {e}"
    return None


def _provider_missing(provider: str) -> str | None:
    import onnxruntime

    if provider not in onnxruntime.get_available_providers():
        return f"onnxruntime {onnxruntime.__version__} has no {provider} (pip install 'vlmdeploy[gpu]')"
    return None


NO_TENSORRT = _tensorrt_missing()
pytestmark = pytest.mark.gpu
needs_tensorrt = pytest.mark.skipif(NO_TENSORRT is not None, reason=NO_TENSORRT or "")
LIMITS = dict(max_batch=2, max_images=2, max_context=128, max_input=96)
PROMPT_TOKENS = dict(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny, tmp_path_factory) -> Path:
    """The tiny model with fp32 engines built on this GPU (small limits: a fast build)."""
    out = tmp_path_factory.mktemp("trt") / "tiny"
    shutil.copytree(tiny.artifact, out)
    build_engines(out, BuildOptions(precision="fp32", **LIMITS), log=lambda msg: None)
    return out


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (60, 50, 3), dtype=np.uint8))


def _tokens(directory: Path, backend: str, device_loop: bool = False, **kw) -> list[int]:
    """`device_loop`: the decode loop with DeviceMemory (what backend="trt" uses); else with HostMemory."""
    from vlmdeploy.runtime.generate import DecodeLoop
    from vlmdeploy.runtime.vlm import VLM

    vlm = VLM.load(directory, backend=backend, decoder="decoder")
    if not device_loop:
        vlm.decoder = DecodeLoop(vlm.runners["embed"], vlm.runners["decoder"], vlm.facts)
    prompt = f"{vlm.facts.image_token}\nWhat is in the picture?"
    return vlm.generate(prompt, [_image()], **PROMPT_TOKENS, **kw).token_ids


@needs_tensorrt
def test_engines_match_onnx_runtime_on_every_profile(engines):
    from vlmdeploy.runtime.tensorrt.compare import compare_engines

    lines = compare_engines(engines)
    assert len(lines) == 6  # vision, projector, embed, decoder x2 profiles, greedy
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)


@needs_tensorrt
def test_manifest_records_this_gpu_and_tensorrt(engines):
    import tensorrt

    from vlmdeploy.runtime.tensorrt.cuda import gpu_info

    section = load_manifest(engines).engines
    assert section["tensorrt_version"] == tensorrt.__version__
    assert (section["gpu"], section["compute_capability"]) == (gpu_info().name, gpu_info().compute_capability)


@needs_tensorrt
@pytest.mark.parametrize("device_loop", [False, True], ids=["host-loop", "device-loop"])
def test_trt_tokens_equal_onnx_runtime(engines, device_loop):
    assert _tokens(engines, "trt", device_loop) == _tokens(engines, "ort-cpu")


@needs_tensorrt
def test_trt_sampling_on_the_device_loop_is_seeded(engines):
    kw = dict(temperature=0.8, top_p=0.9, seed=3)
    assert _tokens(engines, "trt", True, **kw) == _tokens(engines, "ort-cpu", **kw)


@needs_tensorrt
def test_trt_batch_equals_onnx_runtime(engines):
    from vlmdeploy.runtime.vlm import VLM

    prompts = ["<image>\nDescribe it.", "<image>\nAnd this one, in more words?"]
    images = [[_image(1)], [_image(2)]]
    want = [r.token_ids for r in VLM.load(engines, decoder="decoder").generate_batch(prompts, images, **PROMPT_TOKENS)]
    got = [r.token_ids for r in VLM.load(engines, backend="trt").generate_batch(prompts, images, **PROMPT_TOKENS)]
    assert got == want


@needs_tensorrt
def test_shape_outside_every_profile_is_an_error(engines):
    from vlmdeploy.runtime.tensorrt.profiles import ProfileError
    from vlmdeploy.runtime.tensorrt.runner import TrtRunner

    spec = load_manifest(engines).graphs["embed"]
    runner = TrtRunner.from_artifact(engines, spec)
    ids = np.zeros((1, 97), np.int64)  # max_input is 96
    with pytest.raises(ProfileError, match=r"input 'input_ids': shape \[1, 97\] \(seq=97\) is outside every optimization"):
        runner.run({"input_ids": ids})
    assert runner.run({"input_ids": ids[:, :96]})["inputs_embeds"].shape == (1, 96, spec.outputs[0].shape[-1])


@needs_tensorrt
def test_engines_from_another_platform_are_refused(engines, tmp_path):
    from vlmdeploy.runtime.tensorrt.engines import EngineMismatch
    from vlmdeploy.runtime.tensorrt.runner import TrtRunner

    other = tmp_path / "other"
    shutil.copytree(engines, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["engines"]["tensorrt_version"] = "9.9.9"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineMismatch, match="built with TensorRT 9.9.9 on .* but this machine has TensorRT"):
        TrtRunner.from_artifact(other, load_manifest(other).graphs["vision"])


@needs_tensorrt
def test_fp16_engines_keep_norms_in_fp32_and_stay_close(tiny, tmp_path):
    from vlmdeploy.runtime.tensorrt.compare import compare_engines

    out = tmp_path / "fp16"
    shutil.copytree(tiny.artifact, out)
    build_engines(out, BuildOptions(precision="fp16", **LIMITS), log=lambda msg: None)
    lines = compare_engines(out)
    assert all(line.startswith("ok") for line in lines), "\n".join(lines)


@needs_tensorrt
def test_auto_picks_trt_when_engines_fit_this_gpu(engines, capsys):
    from vlmdeploy.runtime.tensorrt.backends import resolve_backend

    resolve_backend.cache_clear()
    assert resolve_backend(engines) == "trt"
    assert "backend auto -> trt" in capsys.readouterr().err


ORT_GPU_MISSING = {
    "ort-cuda": _provider_missing("CUDAExecutionProvider"),
    "ort-trt": _provider_missing("TensorrtExecutionProvider") or NO_TENSORRT,
}


@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=why or ""))
                                     for b, why in ORT_GPU_MISSING.items()])
def test_ort_gpu_backends_equal_the_cpu(tiny, tmp_path, backend):
    directory = tmp_path / "tiny"
    shutil.copytree(tiny.artifact, directory)
    assert _tokens(directory, backend) == _tokens(directory, "ort-cpu")
    if backend == "ort-trt":
        assert any((directory / "ort-trt-cache").iterdir())  # its engine cache lives under the artifact dir
