"""`vlmdeploy quantize DIR --out OUT`: an exported fp32 artifact -> a copy whose decoder_gqa weights are
int8/int4, without re-exporting; the same graph `export --quantize` writes, the source untouched."""

from __future__ import annotations

import json

import pytest

from conftest import photo
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.manifest import ArtifactError, sha256_file
from vlmdeploy.runtime.vlm import VLM

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    before = {f: sha256_file(tiny.artifact / f) for f in ("manifest.json", "decoder_gqa.onnx", "decoder_gqa.onnx.data")}
    assert main(["quantize", str(tiny.artifact), "--out", str(out), "--scheme", "int8"]) == 0
    assert {f: sha256_file(tiny.artifact / f) for f in before} == before  # the source is left as it was
    return out


def test_quantized_copy_loads_checksummed_and_generates_as_export_quantize(tiny, quantized, tmp_path):
    from vlmdeploy.export.exporter import export_model

    vlm = VLM.load(quantized)  # every file's sha256 checked
    source = vlm.manifest.source
    assert source["quantization"]["scheme"] == "int8" and source["quantized_from"] == str(tiny.artifact)
    assert 0 < vlm.manifest.validation["decoder_gqa"]["max_abs_diff_vs_fp32"] < 1.0
    assert "MatMulNBits" in (quantized / "decoder_gqa.onnx").read_bytes().decode("latin-1")
    exported = export_model(str(tiny.checkpoint), tmp_path / "exported", quantize="int8", log=lambda m: None)
    assert exported.source["quantization"] == source["quantization"]
    want = VLM.load(tmp_path / "exported").generate(PROMPT, [photo("coffee")], max_new_tokens=12, ignore_eos=True)
    assert vlm.generate(PROMPT, [photo("coffee")], max_new_tokens=12, ignore_eos=True).token_ids == want.token_ids


def test_refuses_what_it_cannot_quantize(quantized, exported_factory, tmp_path, capsys):
    from vlmdeploy.export.quantize import quantize_artifact

    with pytest.raises(ArtifactError, match="already quantized"):
        quantize_artifact(quantized, tmp_path / "twice", "int4")
    hd20 = exported_factory("llava-llama-clip-hd20").artifact  # head_dim 20: no decoder_gqa
    assert main(["quantize", str(hd20), "--out", str(tmp_path / "x")]) == 2
    assert "no decoder_gqa graph" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))
    m = json.loads((quantized / "manifest.json").read_text())
    assert m["files"]["decoder_gqa.onnx.data"]["size"] == (quantized / "decoder_gqa.onnx.data").stat().st_size


def test_vision_int8_compute(tiny, tmp_path):
    """--vision: the image graphs quantized dynamically (int8 activations x int8 weights, MatMulInteger);
    decoder_gqa untouched; the outputs' movement recorded; the artifact generates."""
    out = tmp_path / "vision-int8"
    assert main(["quantize", str(tiny.artifact), "--out", str(out), "--vision"]) == 0
    vlm = VLM.load(out)
    record = vlm.manifest.source["vision_quantization"]
    assert record["graphs"] == ["vision", "projector"] and vlm.manifest.source.get("quantization") is None
    assert vlm.manifest.validation["vision_int8"]["cosine"] > 0.99
    for graph in ("vision", "projector"):
        assert b"MatMulInteger" in (out / f"{graph}.onnx").read_bytes()
    assert sha256_file(out / "decoder_gqa.onnx.data") == sha256_file(tiny.artifact / "decoder_gqa.onnx.data")
    assert len(vlm.generate(PROMPT, [photo("coffee")], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    with pytest.raises(ArtifactError, match="already int8"):
        from vlmdeploy.export.quantize import quantize_artifact

        quantize_artifact(out, tmp_path / "again", None, vision=True)
