"""Issue 14: export memory that does not grow with the model.

The plan (export/exporter.py `_export_into`): weights memory-mapped, graphs written and PyTorch's
validation outputs recorded first, torch freed, then ONNX Runtime validates one graph at a time with
the weights left mapped. Checked here on tiny models: torch's model is gone and its checkpoint pages
are not resident when ONNX Runtime loads a graph; the validation session keeps one copy of fp16
weights (the full optimization level makes float32 copies); the recorded reference replays only in
order; fp16 graphs are compared with float32 arithmetic on the same weights, and the manifest says so;
the export refuses before loading when memory or disk is short. The 7B-shaped run is
tests/test_export_large.py (`make test-large`)."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vlmdeploy.export import exporter, onnx_export
from vlmdeploy.export.export_plan import ANON_FIXED_BYTES, Machine, ResourceError, check_machine, export_needs
from vlmdeploy.runtime import runners
from vlmdeploy.runtime.backends import make_runner
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec


def test_torch_is_freed_before_onnx_runtime_loads_a_graph_and_fp16_is_checked_in_float32(tiny, tmp_path, monkeypatch):
    model_alive, seen, mapped = [], [], []
    real_load, real_init = exporter._load, runners.OrtRunner.__init__

    def load(src, log):
        out = real_load(src, log)
        model_alive.append(weakref.ref(out[1]))
        mapped.extend(out[4])  # the weights' mappings (alone: one per shard; after some other test files: none, not found why)
        return out

    def ort_init(self, path, spec, *args, **kwargs):
        gc.collect()
        seen.append((Path(path).name, model_alive[0]() is None, _resident_in(mapped), kwargs))
        real_init(self, path, spec, *args, **kwargs)

    monkeypatch.setattr(exporter, "_load", load)
    monkeypatch.setattr(runners.OrtRunner, "__init__", ort_init)
    checkpoint = shutil.copytree(tiny.checkpoint, tmp_path / "checkpoint")  # mapped by no other model of this process
    exporter.export_model(str(checkpoint), tmp_path / "fp16", dtype="fp16", log=lambda m: None)
    assert {name for name, *_ in seen} == {"vision.onnx", "projector.onnx", "embed.onnx", "decoder.onnx"}
    for name, freed, resident, kwargs in seen:
        assert freed, f"{name}: the torch model was alive when ONNX Runtime loaded it"
        assert resident == 0, f"{name}: {resident} bytes of the checkpoint still resident"
        assert kwargs.get("low_memory") is True
    # what fp16 validation compared (the manifest says it): float32 arithmetic on the same weights
    validation = json.loads((tmp_path / "fp16" / "manifest.json").read_text())["validation"]
    for name in ("vision", "projector", "embed", "decoder"):
        record = validation[name]
        assert record["reference"] == "pytorch float32 arithmetic on the float16 weights"
        assert record["tolerance_rule"] == "0.02 * max(1, max |reference|)"
        assert all(run["max_abs_diff"] <= run["tolerance"] for run in record["runs"])


def _resident_in(mappings) -> int:
    """Resident bytes of this process's mappings that start and end where `mappings` do (/proc/self/smaps)."""
    wanted, total, inside = {(m.start, m.end) for m in mappings}, 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            inside = tuple(int(x, 16) for x in parts[0].split("-")) in wanted
        elif inside and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


def _matmul_graph(path: Path, k: int, n: int) -> GraphSpec:
    """y [1, n] = x [1, k] @ W [k, n], W float16 in an external data file."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return GraphSpec("g", (TensorSpec("x", "float16", (1, k)),), (TensorSpec("y", "float16", (1, n)),))


def _anon_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_validation_session_keeps_fp16_weights_mapped_not_copied_as_float32(tmp_path):
    spec = _matmul_graph(tmp_path / "g.onnx", 4096, 8192)  # 64 MiB of fp16 weights
    weights = 4096 * 8192 * 2
    x = {"x": np.ones((1, 4096), np.float16)}
    grown = {}
    for low in (True, False):
        gc.collect()
        before = _anon_bytes()
        runner = make_runner("ort-cpu-mapped" if low else "ort-cpu", tmp_path / "g.onnx", spec, threads=1)
        runner.run(x)
        grown[low] = _anon_bytes() - before
        del runner
    assert grown[False] > 1.5 * weights  # measured: ORT's full level folds the Cast into a float32 copy
    assert grown[True] < 0.5 * weights, grown


def test_recorded_reference_replays_in_order_only():
    rng = np.random.default_rng(0)
    recorded = onnx_export.Recorded.record(lambda feeds: [feeds["a"] * 2],
                                           lambda dims: {"a": rng.standard_normal(dims["n"])}, [{"n": 2}, {"n": 3}])
    replay = recorded.replay()
    feeds = replay.feeds_at({"n": 2})
    assert np.array_equal(replay.reference(feeds)[0], feeds["a"] * 2)
    with pytest.raises(RuntimeError, match="asked for dims"):
        replay.feeds_at({"n": 2})  # the second run was recorded at n=3
    other = recorded.replay()
    with pytest.raises(RuntimeError, match="other inputs"):
        other.reference({"a": np.zeros(2)})


def test_float32_arithmetic_on_fp16_weights_equals_a_float32_model(tiny):
    from vlmdeploy.export.components import DecoderGraph
    from vlmdeploy.export.llava import FAMILY

    m16 = type(tiny.model).from_pretrained(tiny.checkpoint, dtype=torch.float16).eval()
    m32 = type(tiny.model).from_pretrained(tiny.checkpoint, dtype=torch.float32).eval()
    for p32, p16 in zip(m32.parameters(), m16.parameters()):
        p32.data = p16.data.float()
    text = m16.config.get_text_config()
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 5, text.hidden_size, generator=g).half()
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, :2] = 0
    pos = torch.arange(5).expand(2, 5)
    past = [torch.zeros(2, text.num_key_value_heads, 0, text.hidden_size // text.num_attention_heads)] * (2 * text.num_hidden_layers)
    pixels = torch.randn(2, 3, m16.config.vision_config.image_size, m16.config.vision_config.image_size, generator=g).half()
    with torch.no_grad():
        want = [DecoderGraph(m32.model.language_model, m32.lm_head, text)(embeds.float(), mask, pos, *past)[0],
                FAMILY.reference_features(m32, pixels.float())]
        plain = DecoderGraph(m16.model.language_model, m16.lm_head, text)(embeds, mask, pos, *[p.half() for p in past])[0]
        with onnx_export.float32_arithmetic():
            got = [DecoderGraph(m16.model.language_model, m16.lm_head, text)(embeds, mask, pos, *[p.half() for p in past])[0],
                   FAMILY.reference_features(m16, pixels)]
    for w, x in zip(want, got):
        assert x.dtype == torch.float32 and torch.equal(w, x)
    assert not torch.equal(plain.float(), want[0])  # fp16 arithmetic differs: the mode is what makes it float32


def test_fp32_manifest_names_a_float32_reference(tiny):
    validation = json.loads((tiny.artifact / "manifest.json").read_text())["validation"]
    assert validation["decoder"]["reference"] == "pytorch float32"
    assert validation["decoder"]["tolerance_rule"] == "0.0001 * max(1, max |reference|)"


def test_export_refuses_before_loading_when_memory_or_disk_is_short(tiny, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(exporter, "_load", lambda *a: loaded.append(a))
    needs = export_needs(str(tiny.checkpoint), "fp32")
    cases = {"memory": Machine(ram=lambda: needs.ram_bytes - 1, disk=lambda p: 1 << 50),
             "disk": Machine(ram=lambda: 1 << 50, disk=lambda p: needs.disk_bytes - 1)}
    for what, machine in cases.items():
        with pytest.raises(ResourceError, match=f"{what}: .*needs ~") as e:
            exporter.export_model(str(tiny.checkpoint), tmp_path / what, dtype="fp32", machine=machine,
                                  log=lambda m: None)
        assert "--skip-resource-check" in str(e.value)
        assert not (tmp_path / what).exists() and not list(tmp_path.glob(f".{what}*"))
    assert not loaded


def test_needs_follow_the_measured_curve_for_llava_7b():
    needs = export_needs("llava", "fp16")
    assert 14.0e9 < needs.weights_bytes < 14.2e9  # LLaVA-1.5-7B without the unused last vision layer
    assert needs.largest_graph_bytes == pytest.approx(13.5e9, rel=0.01)  # the decoder
    assert needs.disk_bytes > needs.weights_bytes
    with pytest.raises(ResourceError, match="memory"):
        check_machine(needs, Path("/tmp"), Machine(ram=lambda: 2 * 10**9, disk=lambda p: 1 << 50))
    check_machine(needs, Path("/tmp"), Machine(ram=lambda: needs.ram_bytes, disk=lambda p: needs.disk_bytes))
    assert needs.ram_bytes < 0.3 * needs.weights_bytes  # the trimmed curve: mapped pages are not kept


def test_a_13b_export_is_not_refused_for_memory_on_a_24_gb_machine():
    needs = export_needs("llava-13b", "fp16")
    assert needs.weights_bytes > 26e9 > 24e9  # more weights than this machine has memory
    assert needs.ram_bytes < 0.3 * needs.weights_bytes
    check_machine(needs, Path("/tmp"), Machine(ram=lambda: 20 * 10**9, disk=lambda p: needs.disk_bytes))
    with pytest.raises(ResourceError, match="disk"):
        check_machine(needs, Path("/tmp"), Machine(ram=lambda: 20 * 10**9, disk=lambda p: 20 * 10**9))


def test_weights_converted_at_load_count_as_anonymous_memory(tiny):
    """The tiny checkpoint is stored in float32: an fp16 export converts it (nothing stays mapped)."""
    fp32, fp16 = export_needs(str(tiny.checkpoint), "fp32"), export_needs(str(tiny.checkpoint), "fp16")
    assert fp16.anon_bytes >= ANON_FIXED_BYTES + fp16.weights_bytes
    assert fp32.anon_bytes < ANON_FIXED_BYTES + fp32.weights_bytes / 2  # stored as exported: it stays mapped


def test_plan_export_line(capsys):
    from vlmdeploy.runtime.cli import main

    assert main(["plan", "--model", "llava", "--export", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["export"]
    assert out["ram_bytes"] == export_needs("llava", "fp16").ram_bytes
    assert main(["plan", "--model", "llava", "--export"]) == 0
    assert "export (fp16): peak memory ~" in capsys.readouterr().out

