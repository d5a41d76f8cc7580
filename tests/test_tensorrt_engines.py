"""Engine builds, the manifest's engines section, backends and their errors: everything that runs on a CPU.

The build orchestration runs with a stand-in for the TensorRT builder (it writes bytes where the engine
would go); building and running real engines is in test_tensorrt_gpu.py (`make test-gpu`).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from vlmdeploy.runtime.check import check_artifact
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.manifest import MANIFEST_VERSION, Manifest, load_manifest, read_manifest, sha256_file
from vlmdeploy.runtime.backends import make_runner
from vlmdeploy.runtime.runners import OrtRunner
from vlmdeploy.runtime.tensorrt import decode
from vlmdeploy.runtime.tensorrt.backends import resolve_backend
from vlmdeploy.runtime.tensorrt.build import BuildError, BuildOptions, build_engines
from vlmdeploy.runtime.tensorrt.cli import add_build_parser, build_options
from vlmdeploy.runtime.tensorrt.cuda import DeviceBuffer
from vlmdeploy.runtime.tensorrt.deps import BackendUnavailable
from vlmdeploy.runtime.tensorrt.engines import EngineMismatch, EnginesSection, Platform, check_platform, verify_engine
from vlmdeploy.runtime.tensorrt.profiles import Limits

PLATFORM = Platform("10.7.0", "NVIDIA Test GPU", "9.0")
ENGINES = ["vision", "projector", "embed", "decoder", "greedy"]


class FakeBuilder:
    """Stands in for loader.build_engine: records the call, appends to the timing cache, writes a plan."""

    def __init__(self, fail_on: str | None = None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, onnx_path: Path, plan_path: Path, spec, profiles, recipe, log):
        assert onnx_path.is_file()
        if spec.name == self.fail_on:
            raise RuntimeError(f"builder died on {spec.name}")
        self.calls.append((spec.name, onnx_path.name, [p.name for p in profiles], recipe))
        with open(recipe.timing_cache, "ab") as f:
            f.write(b"t")
        plan_path.write_bytes(f"plan {spec.name} {recipe.precision}".encode())


@pytest.fixture
def artifact(tiny, tmp_path) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(tiny.artifact, out)
    return out


def _build(directory: Path, builder=None, platform=PLATFORM, **options) -> EnginesSection:
    return build_engines(directory, BuildOptions(precision="fp32", **options), log=lambda msg: None,
                         build_one=builder or FakeBuilder(), platform=platform)


# ---- the build: engines + manifest, atomically ------------------------------------------------

def test_build_writes_engines_and_the_manifest_section(artifact):
    before = read_manifest(artifact)
    inode = os.stat(artifact / "decoder.onnx.data").st_ino
    builder = FakeBuilder()
    section = _build(artifact, builder, max_batch=2, max_context=256)
    assert [c[0] for c in builder.calls] == ENGINES
    assert builder.calls[3][2] == ["prefill", "decode"]
    manifest = load_manifest(artifact)  # every ONNX file still checks out
    assert EnginesSection.from_dict(manifest.engines) == section
    engines = manifest.engines
    assert (engines["tensorrt_version"], engines["gpu"], engines["compute_capability"], engines["precision"]) == (
        "10.7.0", "NVIDIA Test GPU", "9.0", "fp32")
    assert engines["limits"] == {"max_batch": 2, "max_images": 4, "max_context": 256, "max_input": 256, "typical_input": 80,
                                 "rows_per_image": 1, "tile_rows": 1}
    decoder = engines["graphs"]["decoder"]
    assert decoder["onnx"] == "decoder.onnx" and decoder["onnx_sha256"] == before["files"]["decoder.onnx"]["sha256"]
    assert decoder["sha256"] == sha256_file(artifact / "engines/decoder.plan")
    assert [p["name"] for p in decoder["profiles"]] == ["prefill", "decode"]
    assert engines["graphs"]["greedy"]["onnx"] == "engines/greedy.onnx"
    after = read_manifest(artifact)
    assert {k: v for k, v in after.items() if k != "engines"} == before  # the rest of the contract is untouched
    assert os.stat(artifact / "decoder.onnx.data").st_ino == inode  # hard-linked into the new directory, not copied
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_a_second_build_reuses_the_timing_cache(artifact, tmp_path):
    _build(artifact)
    _build(artifact)
    assert (artifact / "engines/timing.cache").read_bytes() == b"t" * 10  # carried over and appended
    shared = tmp_path / "shared.cache"
    builder = FakeBuilder()
    _build(artifact, builder, timing_cache=shared)
    assert shared.read_bytes() == b"t" * 5 and builder.calls[0][3].timing_cache == shared


def test_a_failed_build_leaves_the_directory_as_it_was(artifact):
    manifest_bytes = (artifact / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="builder died on decoder"):
        _build(artifact, FakeBuilder(fail_on="decoder"))
    assert (artifact / "manifest.json").read_bytes() == manifest_bytes
    assert not (artifact / "engines").exists()
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]


def test_the_build_refuses_graphs_tensorrt_would_reject(artifact):
    builder = FakeBuilder()
    with pytest.raises(BuildError, match=r"opset 18, outside TensorRT 8.6's range 1..17"):
        _build(artifact, builder, platform=Platform("8.6.1", "NVIDIA Test GPU", "8.6"))
    assert builder.calls == [] and not (artifact / "engines").exists()


def test_build_options_are_validated():
    with pytest.raises(BuildError, match="--precision 'int8' not one of fp32, fp16, bf16"):
        BuildOptions(precision="int8")
    with pytest.raises(BuildError, match="--workspace must be > 0 GB"):
        BuildOptions(workspace_gb=0)


def test_every_build_flag_maps_to_one_option(tmp_path):
    parser = argparse.ArgumentParser()
    add_build_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build", "DIR", "--precision", "bf16", "--max-batch", "2", "--max-images", "3",
                              "--max-context", "128", "--max-input", "64", "--timing-cache", "t.cache", "--workspace", "6"])
    assert build_options(args) == BuildOptions("bf16", 2, 3, 128, 64, "t.cache", 6.0)


# ---- the engines section: optional, versioned by platform, tied to its ONNX ----------------------

def test_a_manifest_without_engines_is_unchanged(tiny):
    d = read_manifest(tiny.artifact)
    assert "engines" not in d and d["manifest_version"] == MANIFEST_VERSION
    assert "engines" not in Manifest.from_dict(d).to_dict()


def test_engines_run_only_on_the_platform_they_were_built_for(artifact):
    section = _build(artifact)
    check_platform(section, PLATFORM, artifact)
    here = Platform("10.8.0", "NVIDIA A100-SXM4-80GB", "8.0")
    with pytest.raises(EngineMismatch) as e:
        check_platform(section, here, artifact)
    msg = str(e.value)
    assert "built with TensorRT 10.7.0 on NVIDIA Test GPU (compute capability 9.0)" in msg
    assert "this machine has TensorRT 10.8.0 on NVIDIA A100-SXM4-80GB (compute capability 8.0)" in msg
    assert f"vlmdeploy build {artifact}" in msg


def test_engine_files_are_verified(artifact):
    section = _build(artifact)
    files = read_manifest(artifact)["files"]
    entry = section.graphs["decoder"]
    assert verify_engine(artifact, "decoder", entry, files) == artifact / "engines/decoder.plan"
    stale = dict(files, **{"decoder.onnx": dict(files["decoder.onnx"], sha256="0" * 64)})
    with pytest.raises(EngineMismatch, match="built from a different decoder.onnx"):
        verify_engine(artifact, "decoder", entry, stale)
    plan = artifact / "engines/decoder.plan"
    plan.write_bytes(plan.read_bytes()[::-1])
    with pytest.raises(Exception, match="sha256 mismatch"):
        verify_engine(artifact, "decoder", entry, files)
    plan.write_bytes(b"x")
    with pytest.raises(Exception, match="missing or truncated"):
        verify_engine(artifact, "decoder", entry, files)


def test_check_reports_built_engines(artifact):
    _build(artifact)
    report = check_artifact(artifact, tensorrt=("10", BuildOptions()))
    assert report.passed and any(line.startswith("engines: ['decoder', 'embed', 'greedy', 'projector', 'vision'] intact")
                                 for line in report.ok)
    (artifact / "engines/vision.plan").write_bytes(b"corrupt")
    report = check_artifact(artifact, tensorrt=("10", BuildOptions()))
    assert any("engines:" in line and "vision.plan" in line for line in report.failed)


# ---- backends: missing libraries, auto ----------------------------------------------------------

def test_build_without_tensorrt_says_what_to_install(artifact, capsys):
    assert main(["build", str(artifact)]) == 2
    err = capsys.readouterr().err
    assert "vlmdeploy build: error: building TensorRT engines" in err and "pip install 'vlmdeploy[tensorrt]'" in err
    assert not (artifact / "engines").exists()


def test_trt_backend_errors(artifact):
    spec = load_manifest(artifact).graphs["vision"]
    with pytest.raises(Exception, match=r"no TensorRT engines in the manifest; build them on this GPU with `vlmdeploy build"):
        make_runner("trt", artifact / "vision.onnx", spec)
    _build(artifact)
    with pytest.raises(BackendUnavailable, match=r"needs TensorRT, which is not installed here .*pip install 'vlmdeploy\[tensorrt\]'"):
        make_runner("trt", artifact / "vision.onnx", spec)


@pytest.mark.parametrize("backend, provider", [("ort-cuda", "CUDAExecutionProvider"), ("ort-trt", "TensorrtExecutionProvider")])
def test_ort_gpu_backends_say_what_to_install(tiny, backend, provider):
    import onnxruntime

    if provider in onnxruntime.get_available_providers():
        pytest.skip(f"{provider} is installed here")
    spec = load_manifest(tiny.artifact).graphs["vision"]
    with pytest.raises(BackendUnavailable) as e:
        make_runner(backend, tiny.artifact / "vision.onnx", spec)
    assert f"backend {backend!r} needs ONNX Runtime's {provider}" in str(e.value)
    assert "pip install 'vlmdeploy[gpu]'" in str(e.value) and "pip uninstall -y onnxruntime" in str(e.value)


def test_unknown_backend_lists_the_known_ones(tiny):
    spec = load_manifest(tiny.artifact).graphs["vision"]
    with pytest.raises(ValueError, match="unknown backend 'cuda'; available: ort-cpu, ort-cpu-mapped, ort-cuda, ort-trt, trt, auto"):
        make_runner("cuda", tiny.artifact / "vision.onnx", spec)


def test_auto_picks_the_best_backend_here_and_says_which(artifact, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: auto would pick ort-cuda")
    spec = load_manifest(artifact).graphs["vision"]
    resolve_backend.cache_clear()
    assert isinstance(make_runner("auto", artifact / "vision.onnx", spec), OrtRunner)
    err = capsys.readouterr().err
    assert "vlmdeploy: backend auto -> ort-cpu (trt: " in err and "no TensorRT engines in the manifest" in err
    assert "ort-cuda: backend 'ort-cuda' needs ONNX Runtime's CUDAExecutionProvider" in err
    make_runner("auto", artifact / "vision.onnx", spec)
    assert capsys.readouterr().err == ""  # said once per directory
    _build(artifact)
    resolve_backend.cache_clear()
    make_runner("auto", artifact / "vision.onnx", spec)
    assert "trt: building" not in (err := capsys.readouterr().err) and "needs TensorRT, which is not installed" in err


# ---- pieces of the GPU path that are plain arithmetic or plain ONNX -----------------------------

class FakeDeviceBuffer(DeviceBuffer):
    """Addresses without cudaMalloc: enough to check the cache's view arithmetic."""

    next_ptr = 1 << 20

    def __init__(self, nbytes: int):
        self.nbytes, self.ptr = nbytes, FakeDeviceBuffer.next_ptr
        FakeDeviceBuffer.next_ptr += nbytes + 4096


def test_device_kv_cache_views(monkeypatch):
    from vlmdeploy.runtime.spec import ModelDims
    from vlmdeploy.runtime.tensorrt.profiles import ProfileError

    monkeypatch.setattr(decode, "DeviceBuffer", FakeDeviceBuffer)
    dims = ModelDims((56, 56), 16, 64, 64, 256, num_layers=2, kv_heads=2, head_dim=16, dtype="float32")
    cache = decode.DeviceKVCache(dims, Limits(max_batch=2, max_images=1, max_context=32, max_input=32, typical_input=8))
    cache.reset(batch=2, capacity=10)
    present = cache.present(6)
    assert list(present) == ["present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    region = 2 * 2 * 10 * 16 * 4  # one layer's K: [B, H, capacity, D] float32
    ptrs = [t.ptr for t in present.values()]
    assert [p - ptrs[0] for p in ptrs] == [0, region, 2 * region, 3 * region]  # disjoint, in one buffer
    assert all(t.shape == (2, 2, 6, 16) and t.nbytes <= region for t in present.values())
    cache.advance(6)
    past = cache.past()
    assert [t.ptr for t in past.values()] == ptrs and past["past_key_values.1.value"].shape == (2, 2, 6, 16)
    assert cache.present(1)["present.0.key"].ptr == cache.buffers[0].ptr != ptrs[0]  # ping-pong
    with pytest.raises(ValueError, match="KV cache full: 6 cached \\+ 5 new > capacity 10"):
        cache.present(5)
    with pytest.raises(ProfileError, match="exceeds the engines. limits"):
        cache.reset(batch=3, capacity=10)


def test_greedy_graph_takes_the_last_positions_argmax(tmp_path):
    import onnxruntime as ort

    from vlmdeploy.runtime.spec import ModelDims
    from vlmdeploy.runtime.tensorrt.greedy import write_greedy_onnx

    dims = ModelDims((56, 56), 16, 64, 64, 256, 2, 2, 16, "float32")
    write_greedy_onnx(tmp_path / "greedy.onnx", dims)
    logits = np.random.default_rng(0).standard_normal((3, 5, 256)).astype(np.float32)
    (ids,) = ort.InferenceSession(str(tmp_path / "greedy.onnx")).run(None, {"logits": logits})
    assert ids.dtype == np.int64 and ids.tolist() == np.argmax(logits[:, -1], axis=-1)[:, None].tolist()


def test_polygraphy_comparator_runs_on_cpu(tiny, tmp_path):
    """The comparison `make ci-engines` runs, with ONNX Runtime standing in for TensorRT."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from vlmdeploy.runtime.tensorrt.compare import compare_runners, profile_feeds
    from vlmdeploy.runtime.tensorrt.profiles import derive_profiles

    manifest = load_manifest(tiny.artifact)
    limits = Limits.for_model(manifest.model, max_context=32)
    (profile,) = derive_profiles(manifest.graphs["projector"], limits)
    feeds = profile_feeds(manifest.graphs["projector"], profile, manifest.model)
    assert [f["image_features"].shape[0] for f in feeds] == [1, 4]  # min = opt, max
    runner = lambda path: OnnxrtRunner(SessionFromOnnx(str(tiny.artifact / path), providers=["CPUExecutionProvider"]))
    assert compare_runners(runner("projector.onnx"), runner("projector.onnx"), feeds, 1e-6, 1e-6)
    assert not compare_runners(runner("projector.onnx"), runner(_perturbed(tiny.artifact, tmp_path)), feeds, 1e-3, 1e-3)
    decode_profile = derive_profiles(manifest.graphs["decoder"], limits)[1]
    decoder_feeds = profile_feeds(manifest.graphs["decoder"], decode_profile, manifest.model)
    assert [f["past_key_values.0.key"].shape[2] for f in decoder_feeds] == [0, 16, 31]
    assert compare_runners(runner("decoder.onnx"), runner("decoder.onnx"), decoder_feeds, 1e-6, 1e-6)


def _perturbed(artifact: Path, tmp_path: Path) -> Path:
    """projector.onnx with its largest weight scaled by 1.1: what a wrong engine looks like to the comparator."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact / "projector.onnx"))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, weight.name))
    onnx.save(model, str(tmp_path / "projector.onnx"))
    return tmp_path / "projector.onnx"


class FakeContext:
    """Records what TrtRunner asks of a TensorRT execution context."""

    def __init__(self):
        self.calls = []

    def set_optimization_profile_async(self, index, stream):
        self.calls.append(("profile", index))

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name, tuple(shape)))
        return True

    def set_tensor_address(self, name, ptr):
        self.calls.append(("address", name, ptr))

    def execute_async_v3(self, stream):
        self.calls.append(("execute",))
        return True


class FakeCudart:
    def __init__(self):
        self.copies = []

    def memcpy(self, dst, src, nbytes, kind, stream):
        self.copies.append((kind.value, nbytes))


def _fake_trt_runner(monkeypatch, spec, profiles):
    """A TrtRunner over a recording context, fake device memory and a fake CUDA runtime (no GPU)."""
    from types import SimpleNamespace

    from vlmdeploy.runtime.tensorrt import cuda, runner as runner_module

    fake_cudart = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: fake_cudart)
    monkeypatch.setattr(runner_module, "DeviceBuffer", FakeDeviceBuffer)
    r = runner_module.TrtRunner.__new__(runner_module.TrtRunner)
    dtypes = {t.name: np.dtype(t.np_dtype) for t in (*spec.inputs, *spec.outputs)}
    r.spec, r.profiles, r.context, r.active_profile, r.last_run_s = spec, profiles, FakeContext(), 0, 0.0
    r.stream = SimpleNamespace(ptr=7, synchronize=lambda: None)
    r._dtype = dtypes.__getitem__
    r._axes = [(t.name, axis, d) for t in spec.inputs for axis, d in t.dynamic_axes().items()]
    r._max_shapes, r._staging = runner_module._max_shapes(spec, profiles), {}
    return r, fake_cudart


def test_trt_runner_binds_per_call_in_the_right_profile(tiny, monkeypatch):
    from vlmdeploy.runtime.tensorrt.cuda import DeviceTensor
    from vlmdeploy.runtime.tensorrt.profiles import ProfileError, derive_profiles

    manifest = load_manifest(tiny.artifact)
    spec = manifest.graphs["decoder"]
    profiles = derive_profiles(spec, Limits.for_model(manifest.model, max_context=64, max_input=32))
    runner, cudart = _fake_trt_runner(monkeypatch, spec, profiles)
    d = manifest.model.dims
    past = {n: DeviceTensor(1 << 30, (1, d.kv_heads, 9, d.head_dim), np.dtype("float32")) for n in spec.input_names[3:]}
    feeds = {"inputs_embeds": np.zeros((1, 1, d.hidden), np.float32), "attention_mask": np.ones((1, 10), np.int64),
             "position_ids": np.full((1, 1), 9, np.int64), **past}
    present = {n: DeviceTensor(1 << 31, (1, d.kv_heads, 10, d.head_dim), np.dtype("float32")) for n in spec.output_names[1:]}
    result = runner.run(feeds, out=present)  # a decode step: past 9, seq 1 -> the decode profile
    calls = runner.context.calls
    assert calls[0] == ("profile", 1) and calls[-1] == ("execute",)
    assert ("shape", "past_key_values.0.key", (1, d.kv_heads, 9, d.head_dim)) in calls
    assert ("address", "past_key_values.0.key", 1 << 30) in calls and ("address", "present.1.value", 1 << 31) in calls
    assert result["present.0.key"] is present["present.0.key"] and result["logits"].shape == (1, 1, d.vocab)
    assert [kind for kind, _ in cudart.copies] == [1, 1, 1, 2]  # 3 host inputs up, logits down; the cache stays
    runner.context.calls.clear()
    runner.run(feeds, out=present)
    assert ("profile", 1) not in runner.context.calls  # already active
    too_long = dict(feeds, inputs_embeds=np.zeros((1, 40, d.hidden), np.float32), position_ids=np.zeros((1, 40), np.int64),
                    attention_mask=np.ones((1, 40), np.int64), **{n: DeviceTensor(1, (1, d.kv_heads, 0, d.head_dim), np.dtype("float32")) for n in past})
    with pytest.raises(ProfileError, match=r"input 'inputs_embeds': shape \[1, 40, 64\] \(seq=40\)"):
        runner.run(too_long)
    wrong = dict(present, **{"present.0.key": DeviceTensor(1, (1, d.kv_heads, 11, d.head_dim), np.dtype("float32"))})
    with pytest.raises(Exception, match="output buffer 'present.0.key': device tensor"):
        runner.run(feeds, out=wrong)


class RecordingRunner:
    """Stands in for a TrtRunner in the decode loop: checks feeds against the spec, records the dims, returns `out`."""

    def __init__(self, spec, stream):
        self.spec, self.stream, self.calls, self.last_run_s = spec, stream, [], 0.0

    def run(self, feeds, out=None):
        from vlmdeploy.runtime.tensorrt.runner import _checkable

        dims = self.spec.check_feeds({n: _checkable(v) for n, v in feeds.items()})
        self.calls.append((dims, {n: type(v).__name__ for n, v in feeds.items()}))
        return dict(out)


def test_decode_loop_with_device_memory_keeps_the_cache_on_the_device(tiny, monkeypatch):
    from types import SimpleNamespace

    from vlmdeploy.runtime.generate import Batch, DecodeLoop
    from vlmdeploy.runtime.sampling import Sampler, SamplingParams
    from vlmdeploy.runtime.tensorrt import cuda
    from vlmdeploy.runtime.tensorrt.greedy import greedy_spec

    fake_cudart = FakeCudart()
    monkeypatch.setattr(cuda, "cudart", lambda: fake_cudart)
    monkeypatch.setattr(decode, "DeviceBuffer", FakeDeviceBuffer)
    manifest = load_manifest(tiny.artifact)
    d, stream = manifest.model.dims, SimpleNamespace(ptr=7, synchronize=lambda: None)
    embed, decoder, greedy = (RecordingRunner(s, stream) for s in (manifest.graphs["embed"], manifest.graphs["decoder"], greedy_spec(d)))
    limits = Limits.for_model(manifest.model, max_batch=2, max_context=64, max_input=32)
    loop = DecodeLoop(embed, decoder, manifest.model, decode.DeviceMemory(greedy, d, limits))  # the one loop
    batch = Batch(np.zeros((2, 5, d.hidden), np.float32), np.array([[0, 1, 1, 1, 1], [1] * 5], np.int64))
    tokens = list(loop.tokens(batch, 4, Sampler(SamplingParams(max_new_tokens=4))))
    assert len(tokens) == 4 and all(t.shape == (2,) for t in tokens)
    assert [(c[0]["seq"], c[0]["past"], c[0]["total"]) for c in decoder.calls] == [(5, 0, 5), (1, 5, 6), (1, 6, 7), (1, 7, 8)]
    assert decoder.calls[1][1]["past_key_values.0.key"] == "DeviceTensor"  # the cache is bound on the device
    assert decoder.calls[1][1]["inputs_embeds"] == "DeviceTensor" and decoder.calls[1][1]["attention_mask"] == "ndarray"
    assert [c[1]["input_ids"] for c in embed.calls] == ["DeviceTensor"] * 3  # the argmax output feeds embed directly
    assert len(greedy.calls) == 4 and batch.stats.steps == 3
    down = [nbytes for kind, nbytes in fake_cudart.copies if kind == 2]
    assert down == [2 * 8] * 4  # per step only the token ids [B] int64 come back to the host
    with pytest.raises(Exception, match="exceeds the engines' limits"):
        next(loop.tokens(Batch(np.zeros((2, 40, d.hidden), np.float32), np.ones((2, 40), np.int64)), 4,
                         Sampler(SamplingParams())))
