"""`vlmdeploy plan`: parameter counts vs PyTorch, weight sizes vs the artifact's files, KV cache vs
what the runtime allocates, and the LLaVA-1.5 7B numbers the literature quotes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.export.plan import (
    GB, Workload, clip_vision_params, kv_bytes_per_token, llama_params, plan_artifact, plan_model, projector_params,
)
from vlmdeploy.export.recipes import Architecture, TinyConfig
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.generate import CACHE_LAYOUTS, Decoder
from vlmdeploy.runtime.manifest import load_manifest
from vlmdeploy.runtime.vlm import VLM

KV_ROWS = ("KV cache", "KV cache, runtime's 2nd buffer")


def _kv(plan) -> int:
    return sum(line.nbytes for line in plan.lines if line.component in KV_ROWS)


# ---------------------------------------------------------------------------------------------
# From sizes: recipes and checkpoints


@pytest.mark.parametrize("cfg", [
    TinyConfig(),
    TinyConfig(text_kv_heads=4, vision_feature_layer=-1, vision_feature_select_strategy="full", image_size=42),
    TinyConfig(text_heads=8, text_kv_heads=2, vision_feature_layer=[-3, -1], vision_intermediate=96),
], ids=["gqa-l2", "mha-full-l1", "multilayer"])
def test_parameter_counts_equal_pytorch(cfg):
    from vlmdeploy.export.components import feature_layers
    from vlmdeploy.export.tiny import build_tiny_model

    model, _ = build_tiny_model(cfg)
    arch = Architecture.from_tiny(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    tower = model.model.vision_tower
    kept = max(feature_layers(cfg.vision_feature_layer, cfg.vision_layers))  # layers the export keeps
    vision = count(tower) - count(tower.post_layernorm) - sum(count(layer) for layer in tower.encoder.layers[kept:])
    assert llama_params(arch) == count(model.model.language_model) + count(model.lm_head)
    assert clip_vision_params(arch) == vision
    assert projector_params(arch) == count(model.model.multi_modal_projector)


def test_llava_7b_fp16_matches_the_known_numbers():
    """LLaVA-1.5 7B in fp16: ~14 GB of LLM weights, ~0.6 GB vision, ~1 GB of KV per 2K tokens."""
    plan = plan_model("llava", "fp16", Workload(context=2048))
    llm, vision, projector = (plan.get(c) for c in ("LLM weights", "vision encoder", "projector"))
    assert 6.7e9 < llm.params < 6.8e9 and 13.0 * GB < llm.nbytes < 14.5 * GB
    assert 0.28e9 < vision.params < 0.31e9 and 0.55 * GB < vision.nbytes < 0.65 * GB
    assert projector.nbytes < 0.1 * GB
    kv = plan.get("KV cache").nbytes
    assert kv == 2048 * 2 * 32 * 32 * 128 * 2  # 1.07 GB: 0.5 MiB per token
    assert plan.get("KV cache, runtime's 2nd buffer").nbytes == kv  # the portable decoder's ping-pong
    assert 0.1 * GB < plan.get("activations (estimate)").nbytes < 1.5 * GB
    assert 15 * GB < plan.total < 18 * GB
    assert plan_model("llava", "fp16", Workload(context=4096, batch=2)).get("KV cache").nbytes == 4 * kv


def test_llava_13b_and_int8():
    plan = plan_model("llava-13b", "fp16", Workload(context=2048))
    assert 25 * GB < plan.get("LLM weights").nbytes < 27 * GB
    int8 = plan_model("llava", "int8", Workload(context=2048))
    assert int8.get("LLM weights").nbytes == plan_model("llava", "fp16").get("LLM weights").nbytes // 2
    assert int8.get("KV cache").nbytes == plan_model("llava", "fp16").get("KV cache").nbytes  # fp16 cache


def test_plan_from_a_checkpoint_dir_reads_config_json(tiny):
    plan = plan_model(str(tiny.checkpoint))
    assert plan.dtype == "fp32"
    assert plan.get("LLM weights").params == sum(p.numel() for p in tiny.model.model.language_model.parameters()) + \
        tiny.model.lm_head.weight.numel()


# ---------------------------------------------------------------------------------------------
# From an exported directory: exact


def test_artifact_weights_are_the_files_the_runtime_loads(tiny):
    plan = plan_artifact(tiny.artifact)
    vlm = VLM.load(tiny.artifact)
    decoder = getattr(vlm, "decoder_graph", "decoder")
    size = lambda graph: sum(  # noqa: E731
        p.stat().st_size for p in tiny.artifact.iterdir() if p.name.startswith(f"{graph}.onnx")
    )
    assert f"`{decoder}`" in plan.source
    assert plan.get("LLM weights").nbytes == size("embed") + size(decoder)
    assert plan.get("vision encoder").nbytes == size("vision")
    assert plan.get("projector").nbytes == size("projector")
    # and they are close to the parameter counts (the rest is graph structure)
    from_sizes = plan_model(str(tiny.checkpoint))
    for row in ("LLM weights", "vision encoder"):
        assert from_sizes.get(row).nbytes <= plan.get(row).nbytes < from_sizes.get(row).nbytes * 1.6 + 200_000


@pytest.mark.parametrize("context,batch", [(64, 1), (100, 3)])
def test_artifact_kv_equals_the_runtime_cache(tiny, context, batch):
    plan = plan_artifact(tiny.artifact, Workload(context=context, batch=batch))
    d = load_manifest(tiny.artifact).model.dims
    decoder = plan.source.split("`")[1]
    cache = CACHE_LAYOUTS[decoder](d.num_layers, batch, d.kv_heads, d.head_dim, context, np.dtype(d.dtype))
    assert _kv(plan) == cache.nbytes
    assert plan.get("KV cache").nbytes == kv_bytes_per_token(d.num_layers, d.kv_heads, d.head_dim, d.dtype) * context * batch


def test_artifact_kv_equals_what_generate_allocates(tiny, monkeypatch):
    """Record the cache object `generate` creates; the plan for its capacity gives its nbytes."""
    made = []
    original = Decoder._cache

    def spy(self, batch, capacity, dtype):
        made.append((batch, capacity, original(self, batch, capacity, dtype)))
        return made[-1][2]

    monkeypatch.setattr(Decoder, "_cache", spy)
    vlm = VLM.load(tiny.artifact)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    vlm.generate_batch(["<image>\nhi", "<image>\nwhat is it?"], [[image], [image]], max_new_tokens=5, ignore_eos=True)
    (batch, capacity, cache), = made
    plan = plan_artifact(tiny.artifact, Workload(context=capacity, batch=batch))
    assert _kv(plan) == cache.nbytes


def test_artifact_dtype_is_fixed(tiny):
    with pytest.raises(ValueError, match="holds fp32 graphs"):
        plan_artifact(tiny.artifact, dtype="fp16")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_plan_model_and_dir(tiny, capsys):
    assert main(["plan", "--model", "llava", "--dtype", "fp16", "--context", "2048"]) == 0
    out = capsys.readouterr().out
    for row in ("LLM weights", "vision encoder", "projector", "KV cache", "activations (estimate)", "total"):
        assert row in out
    assert "13.48 GB" in out and "1.07 GB" in out
    assert main(["plan", str(tiny.artifact), "--context", "128", "--batch", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["context"] == 128 and d["batch"] == 2
    assert d["total_bytes"] == sum(line["bytes"] for line in d["lines"])


@pytest.mark.parametrize("args,fragment", [
    (["plan"], "exactly one"),
    (["plan", "--model", "llava", "--context", "9000"], "exceeds the model's context length 4096"),
    (["plan", "--model", "llava", "--images", "4", "--context", "2048"], "4 image(s) x 576 visual tokens"),
    (["plan", "--model", "llava", "--batch", "0"], "--batch must be >= 1"),
    (["plan", "--model", "no-such-recipe"], "unknown model"),
])
def test_cli_plan_errors(capsys, args, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("vlmdeploy plan: error: ")
    assert fragment in err
