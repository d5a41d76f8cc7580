"""`vlmdeploy quantize DIR --out OUT`: an exported fp32 artifact -> a copy whose decoder_gqa weights are
int8/int4, without re-exporting; the same graph `export --quantize` writes, the source untouched."""

from __future__ import annotations

import contextlib
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
    record = vlm.manifest.source["int8_compute"]
    assert list(record) == ["vision"] and record["vision"]["graphs"] == ["vision", "projector"]
    assert vlm.manifest.source.get("quantization") is None and vlm.prefill_graph is None
    for graph in ("vision", "projector"):
        assert vlm.manifest.validation[f"{graph}_int8"]["cosine"] > 0.99
        assert b"MatMulInteger" in (out / f"{graph}.onnx").read_bytes()
    assert sha256_file(out / "decoder_gqa.onnx.data") == sha256_file(tiny.artifact / "decoder_gqa.onnx.data")
    assert len(vlm.generate(PROMPT, [photo("coffee")], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    with pytest.raises(ArtifactError, match="already int8"):
        from vlmdeploy.export.quantize import quantize_artifact

        quantize_artifact(out, tmp_path / "again", None, vision=True)


class CountingRunner:
    """Wraps a runner; records the sequence length of each pass."""

    def __init__(self, runner, seen: list):
        self.runner, self.seen, self.spec = runner, seen, runner.spec

    def run(self, feeds, out=None):
        self.seen.append((self.spec.name, feeds["inputs_embeds"].shape[1]))
        return self.runner.run(feeds, out=out)

    def __getattr__(self, name):
        return getattr(self.runner, name)


@pytest.fixture(scope="module")
def prefill_int8(tiny, tmp_path_factory):
    """`quantize --prefill --vision --scheme int4`: decoder_gqa_int8 (from fp32 decoder_gqa) for the prompt
    pass, decoder_gqa's weights int4 for the steps, int8-compute image graphs."""
    out = tmp_path_factory.mktemp("p") / "prefill"
    assert main(["quantize", str(tiny.artifact), "--out", str(out), "--prefill", "--vision", "--scheme", "int4"]) == 0
    return out


def test_int8_prefill_graph_runs_the_prompt_pass_only(tiny, prefill_int8):
    from vlmdeploy.runtime.generate import DecodeLoop

    vlm = VLM.load(prefill_int8)
    m = vlm.manifest
    assert m.model.pipeline["prefill"] == {"decoder_gqa": "decoder_gqa_int8"} and vlm.prefill_graph == "decoder_gqa_int8"
    assert m.source["int8_compute"]["prefill"]["graph"] == "decoder_gqa_int8" and m.source["quantization"]["bits"] == 4
    assert b"MatMulInteger" in (prefill_int8 / "decoder_gqa_int8.onnx").read_bytes()
    assert b"MatMulNBits" in (prefill_int8 / "decoder_gqa.onnx").read_bytes()  # decode: the int4 weights
    assert m.validation["decoder_gqa_int8"]["cosine"] > 0.99
    seen = []
    runners = {g: CountingRunner(vlm.runners[g], seen) for g in ("decoder_gqa", "decoder_gqa_int8")}
    vlm.decoder = DecodeLoop(vlm.runners["embed"], runners["decoder_gqa"], vlm.facts, prefill=runners["decoder_gqa_int8"])
    result = vlm.generate(PROMPT, [photo("coffee")], max_new_tokens=5, ignore_eos=True)
    assert len(result.token_ids) == 5 and seen[0][0] == "decoder_gqa_int8" and seen[0][1] > 1
    assert seen[1:] == [("decoder_gqa", 1)] * 4
    # the same artifact without the int8 prefill: the fp32-weights-free decode graph for every pass
    plain = VLM.load(prefill_int8, int8_prefill=False)
    assert plain.prefill_graph is None and "decoder_gqa_int8" not in plain.runners
    from vlmdeploy.export.plan import plan_artifact

    llm = plan_artifact(prefill_int8).lines[0]  # the planner counts what the runtime loads
    files = [f for g in ("embed", "decoder_gqa", "decoder_gqa_int8") for f in (f"{g}.onnx", f"{g}.onnx.data")]
    assert "decoder_gqa_int8.onnx" in llm.detail and llm.nbytes == sum((prefill_int8 / f).stat().st_size for f in files)


def test_int8_prefill_refusals(tiny, prefill_int8, quantized, tmp_path):
    from vlmdeploy.export.quantize import quantize_artifact

    with pytest.raises(ArtifactError, match="prefill graph is already int8"):
        quantize_artifact(prefill_int8, tmp_path / "a", None, prefill=True)
    with pytest.raises(ArtifactError, match="already quantized"):  # its decoder_gqa is no longer fp32
        quantize_artifact(quantized, tmp_path / "b", None, prefill=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_quantize_kinds_equal_quantize_of_the_fp32_export(tiny, prefill_int8, tmp_path):
    """`export --quantize int4 vision prefill` writes the graphs `quantize --scheme int4 --vision --prefill`
    derives from the fp32 export, byte for byte."""
    assert main(["export", "--model", str(tiny.checkpoint), "--out", str(tmp_path / "e"),
                 "--quantize", "int4", "vision", "prefill"]) == 0
    for f in ("vision.onnx.data", "projector.onnx.data", "decoder_gqa_int8.onnx.data", "decoder_gqa.onnx.data"):
        assert sha256_file(tmp_path / "e" / f) == sha256_file(prefill_int8 / f), f
    exported = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert exported["model"]["pipeline"]["prefill"] == {"decoder_gqa": "decoder_gqa_int8"}
    assert set(exported["source"]["int8_compute"]) == {"vision", "prefill"}


@pytest.mark.parametrize("kinds, error", [(["int8", "int4"], "one weight scheme"), (["fp8"], "invalid choice")])
def test_export_quantize_kinds_refused(tiny, tmp_path, capsys, kinds, error):
    with pytest.raises(SystemExit) if kinds == ["fp8"] else contextlib.nullcontext():
        assert main(["export", "--model", str(tiny.checkpoint), "--out", str(tmp_path / "e"), "--quantize", *kinds]) == 2
    assert error in capsys.readouterr().err and not (tmp_path / "e").exists()


# One tiny model per family (conftest): `quantize --vision --prefill` must work for each. Families whose
# decoder_gqa declines (BLIP-2's OPT, mllama's cross-attention) take --vision only.
INT8_FAMILIES = {"llava_next-llama-clip": True, "qwen2_vl": True, "llava_onevision": True, "internvl": True,
                 "idefics3": True, "idefics2": True, "blip2": False, "mllama": False}


@pytest.mark.parametrize("name", sorted(INT8_FAMILIES))
def test_int8_compute_every_family(exported_factory, name, tmp_path):
    """Every family's image chain computes in int8 with outputs near fp32 (cosine recorded per graph), its
    prompt pass runs decoder_gqa_int8 where it has decoder_gqa, and the artifact passes check and generates."""
    from vlmdeploy.runtime.check import check_artifact

    exp = exported_factory(name)
    out, prefill = tmp_path / "int8c", INT8_FAMILIES[name]
    assert main(["quantize", str(exp.artifact), "--out", str(out), "--vision", *(["--prefill"] if prefill else [])]) == 0
    vlm = VLM.load(out)
    graphs = vlm.manifest.source["int8_compute"]["vision"]["graphs"]
    assert graphs and all(b"MatMulInteger" in (out / f"{g}.onnx").read_bytes() for g in graphs)
    for g in graphs:
        assert vlm.manifest.validation[f"{g}_int8"]["cosine"] > 0.98, (g, vlm.manifest.validation[f"{g}_int8"])
    assert vlm.prefill_graph == ("decoder_gqa_int8" if prefill else None)
    if prefill:
        assert vlm.manifest.validation["decoder_gqa_int8"]["cosine"] > 0.98
    report = check_artifact(out)
    assert report.passed, report.failed
    messages = [{"role": "user", "content": [{"type": "image", "image": photo("coffee")},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    if name == "blip2":  # no chat template: its queries go before BOS, the prompt is plain text
        got = vlm.generate("Question: what is in the picture? Answer:", [photo("coffee")], max_new_tokens=4, ignore_eos=True)
    else:
        got = vlm.chat(messages, max_new_tokens=4, ignore_eos=True)
    assert len(got.token_ids) == 4
