"""What an export writes: graphs shaped by the spec, a complete manifest, both checkpoint layouts."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from conftest import VARIANTS
from test_hf_files import write_v4_layout
from test_parity import PROMPT, hf_generate
from vlmdeploy.export.exporter import export_model
from vlmdeploy.export.components import feature_layers
from vlmdeploy.runtime.manifest import MANIFEST_VERSION, sha256_file
from vlmdeploy.runtime.spec import kv_names
from vlmdeploy.runtime.vlm import VLM
from conftest import photo


def graph(exp, name) -> onnx.ModelProto:
    return onnx.load(str(exp.artifact / f"{name}.onnx"), load_external_data=False)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_vision_graph_stops_at_the_feature_layer(exported_factory, name):
    exp = exported_factory(name)
    cfg = VARIANTS[name]
    keep = max(feature_layers(cfg.vision_feature_layer, cfg.vision_layers))
    norms = [n for n in graph(exp, "vision").graph.node if n.op_type == "LayerNormalization"]
    assert len(norms) == 1 + 2 * keep  # pre_layrnorm + two per encoder layer kept; no post_layernorm


def test_decoder_graph_is_engine_friendly(tiny):
    g = graph(tiny, "decoder").graph
    ops = {n.op_type for n in g.node}
    assert not ops & {"If", "Loop", "Scan"}
    shape = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    inputs = {v.name: shape(v) for v in g.input}
    outputs = {v.name: shape(v) for v in g.output}
    past, present = kv_names(VARIANTS["mha-default-l2"].text_layers)
    assert inputs["inputs_embeds"][:2] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", "total"]
    assert all(inputs[n][0] == "batch" and inputs[n][2] == "past" for n in past)
    assert all(outputs[n][0] == "batch" and outputs[n][2] == "total" for n in present)


def test_manifest_records_files_facts_and_versions(tiny):
    m = json.loads((tiny.artifact / "manifest.json").read_text())
    assert m["manifest_version"] == MANIFEST_VERSION
    on_disk = {p.name for p in tiny.artifact.iterdir()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    for name, meta in m["files"].items():
        assert meta["sha256"] == sha256_file(tiny.artifact / name)
    assert {"decoder.onnx.data", "tokenizer.json", "chat_template.jinja"} <= on_disk
    facts = m["model"]
    cfg = tiny.model.config
    assert facts["family"] == "llava" and facts["positions"] == "cumsum"
    assert facts["media"]["image"] == {"placeholder": "<image>", "token_id": cfg.image_token_id,
                                       "typical_tokens": (56 // 14) ** 2}
    assert facts["family_params"]["tokens_per_image"] == (56 // 14) ** 2
    assert facts["context_length"] == cfg.text_config.max_position_embeddings
    assert facts["dims"]["kv_heads"] == cfg.text_config.num_key_value_heads
    assert facts["kv_layers"] == [{"kv_heads": cfg.text_config.num_key_value_heads, "head_dim": 16, "window": None}] * 2
    assert facts["pipeline"] == {"image": ["vision", "projector"], "embed": "embed", "decoders": ["decoder_gqa", "decoder"]}
    assert facts["limits"]["seq"] == facts["context_length"] and facts["limits"]["rows_per_image"] == 1
    assert set(m["versions"]) >= {"torch", "transformers", "onnx", "onnxruntime"}
    assert set(m["validation"]) == {"vision", "projector", "embed", "decoder", "decoder_gqa"}


def test_export_from_a_transformers_4_layout(tiny, tmp_path):
    """Published llava-hf checkpoints use the 4.x file layout; the export must read it the same."""
    v4 = write_v4_layout(tiny.checkpoint, tmp_path / "v4")
    for f in tiny.checkpoint.iterdir():
        if f.name in ("config.json", "model.safetensors"):
            shutil.copy(f, v4 / f.name)
    export_model(str(v4), tmp_path / "art", log=lambda m: None)
    img = photo("coffee")
    want = hf_generate(tiny, [PROMPT], [[img]], max_new_tokens=12)[0]
    assert VLM.load(tmp_path / "art").generate(PROMPT, [img], max_new_tokens=12, ignore_eos=True).token_ids == want


def test_fp16_export_runs_close_to_fp32(tiny, tmp_path):
    export_model(str(tiny.checkpoint), tmp_path / "fp16", dtype="fp16", log=lambda m: None)
    vlm16, vlm32 = VLM.load(tmp_path / "fp16"), VLM.load(tiny.artifact)
    assert vlm16.manifest.graphs["decoder"].inputs[0].dtype == "float16"
    img = photo("chelsea")
    l16 = vlm16.prefill_logits(PROMPT, [img]).astype("float32")
    l32 = vlm32.prefill_logits(PROMPT, [img])
    assert float(abs(l16 - l32).max()) < 0.05 * max(1.0, float(abs(l32).max()))
    assert torch.tensor(l16).argmax(-1).eq(torch.tensor(l32).argmax(-1)).float().mean() > 0.9
