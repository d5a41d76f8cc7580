"""`vlmdeploy plan`: parameter counts vs PyTorch (every text backbone and vision tower), weight sizes
vs the artifact's files, KV cache vs what the runtime allocates, visual tokens per image size vs HF's
processors, and the LLaVA-1.5 7B / LLaVA-NeXT numbers the literature quotes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.export.plan import (
    GB, Workload, clip_vision_params, kv_bytes_per_token, llama_params, parse_image_sizes, plan_artifact, plan_model,
    projector_params, text_params, vision_params,
)
from vlmdeploy.export.recipes import Architecture, RecipeError, TinyConfig, load_recipe
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.generate import CACHE_LAYOUTS, HostMemory
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
    original = HostMemory.cache

    def spy(self, batch, capacity):
        made.append((batch, capacity, original(self, batch, capacity)))
        return made[-1][2]

    monkeypatch.setattr(HostMemory, "cache", spy)
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


# ---------------------------------------------------------------------------------------------
# Families, text backbones and vision towers (tiny HF checkpoints: config.json -> counts)

BACKBONES = {
    "llava-mistral-clip": TinyConfig(image_size=28, text_model="mistral", sliding_window=6),
    "llava-qwen2-siglip": TinyConfig(image_size=28, text_model="qwen2", vision_model="siglip", vision_feature_layer=-1,
                                     vision_feature_select_strategy="full"),
    "llava-gemma-clip": TinyConfig(image_size=28, text_model="gemma"),  # lm_head tied (LlavaConfig follows Gemma)
    "llava-phi3-dinov2": TinyConfig(image_size=28, text_model="phi3", vision_model="dinov2"),
    "llava-llama-siglip-multilayer": TinyConfig(image_size=42, vision_model="siglip", vision_feature_layer=[-3, -1],
                                                vision_feature_select_strategy="full", text_heads=8, text_kv_heads=2),
    "llava_next-llama-clip": TinyConfig(image_size=28, family="llava_next"),
    "llava_next-mistral-clip": TinyConfig(image_size=28, family="llava_next", text_model="mistral"),
    "llava_next-gemma-clip": TinyConfig(image_size=28, family="llava_next", text_model="gemma"),  # not tied
    "llava_next-qwen2-clip": TinyConfig(image_size=28, family="llava_next", text_model="qwen2"),
    "llava_next-phi3-clip": TinyConfig(image_size=28, family="llava_next", text_model="phi3"),
}


def _torch_counts(model, cfg: TinyConfig) -> dict[str, int]:
    """What the export keeps, counted on the HF model (shared tensors once): the text model with
    lm_head, the tower up to the feature layer without its final norm / pooling head / mask token,
    the projector (+ LLaVA-NeXT's image_newline)."""
    from vlmdeploy.export.components import feature_layers

    params = dict(model.named_parameters())  # a tied lm_head appears once
    tower = model.model.vision_tower
    kept = max(feature_layers(cfg.vision_feature_layer, cfg.vision_layers))
    layers = tower.encoder.layer if cfg.vision_model == "dinov2" else tower.encoder.layers
    unused = [getattr(tower, name) for name in ("post_layernorm", "head", "layernorm") if hasattr(tower, name)]
    unused += list(layers[kept:])
    dropped = {id(p) for module in unused for p in module.parameters()}
    if cfg.vision_model == "dinov2":
        dropped.add(id(tower.embeddings.mask_token))
    count = lambda prefixes: sum(  # noqa: E731
        p.numel() for n, p in params.items() if n.startswith(prefixes) and id(p) not in dropped)
    return {
        "LLM weights": count(("model.language_model.", "lm_head.")),
        "vision encoder": count("model.vision_tower."),
        "projector": count(("model.multi_modal_projector.", "model.image_newline")),
    }


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from vlmdeploy.export.tiny import build_tiny_checkpoint

    made = {}

    def get(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            model, processor = build_tiny_checkpoint(BACKBONES[name], path)
            made[name] = (path, model, processor)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(BACKBONES))
def test_parameter_counts_per_backbone_and_tower(checkpoints, name):
    path, model, _ = checkpoints(name)
    cfg = BACKBONES[name]
    plan = plan_model(str(path))  # from config.json (+ the processor files)
    expected = _torch_counts(model, cfg)
    assert {row: plan.get(row).params for row in expected} == expected
    assert plan.family == cfg.family
    # the sizes alone (a recipe's architecture:) give the same counts as the config.json
    from_tiny, from_config = Architecture.from_tiny(cfg), Architecture.from_hf_config(json.loads((path / "config.json").read_text()))
    same_head_dim = lambda a: dataclasses.replace(a, head_dim=a.text_head_dim)  # noqa: E731 (None: hidden / heads)
    assert same_head_dim(from_tiny) == same_head_dim(from_config)
    for count in (text_params, vision_params, projector_params):
        assert count(from_tiny) == count(from_config)
    text = model.config.get_text_config()
    assert plan.get("KV cache").nbytes == 2 * text.num_hidden_layers * text.num_key_value_heads * \
        (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads) * 4 * plan.context


def test_sliding_window_is_stored_whole(checkpoints):
    path, _, _ = checkpoints("llava-mistral-clip")
    plan = plan_model(str(path), workload=Workload(context=64))
    (note,) = [n for n in plan.notes if "sliding-window" in n]
    assert "window 6" in note and "2 of 2 layers" in note and "whole context" in note
    assert plan.get("KV cache").nbytes == 2 * 2 * 2 * 16 * 4 * 64  # every token of the context, every layer


def _hf_counts(processor, size):
    """(<image> tokens, tiles) HF's processor gives one image of (h, w) pixels."""
    h, w = size
    image = Image.fromarray(np.random.default_rng(h * 1000 + w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = processor(text="<image>", images=[image], return_tensors="np")
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((out["input_ids"] == image_id).sum()), out["pixel_values"].shape[1]


SIZES = [(28, 28), (56, 56), (28, 56), (56, 28), (30, 70), (70, 30), (100, 20), (13, 57), (200, 199), (5, 5), (57, 41)]


def test_llava_next_tokens_per_image_size_equal_hf_processor(checkpoints, capsys):
    from transformers import LlavaNextProcessor

    path, _, _ = checkpoints("llava_next-llama-clip")
    processor = LlavaNextProcessor.from_pretrained(path)
    plan = plan_model(str(path), workload=Workload(image_sizes=tuple(SIZES)))
    assert [v.size for v in plan.visual] == SIZES
    for size in SIZES:
        tokens, tiles = _hf_counts(processor, size)
        row = plan.tokens(size)
        assert (row.tokens, row.tiles, row.before_unpadding) == (tokens, tiles, tiles * 4), size  # (28 / 14)^2 per tile
    largest = max(plan.visual, key=lambda v: v.tokens)
    assert f"1 image(s) x {largest.tokens:,} visual tokens" in plan.notes[0]
    # the CLI: repeated and comma-separated sizes, JSON rows
    assert main(["plan", "--model", str(path), "--image-size", "30x70,70x30", "--image-size", "13x57", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["visual_tokens"]
    assert [(r["image_size"], r["tokens"]) for r in rows] == [
        ([h, w], _hf_counts(processor, (h, w))[0]) for h, w in [(30, 70), (70, 30), (13, 57)]]


def test_llava_tokens_are_fixed(checkpoints):
    path, _, processor = checkpoints("llava-phi3-dinov2")  # DINOv2: CLS dropped by "default", 4 patches
    plan = plan_model(str(path), workload=Workload(image_sizes=((30, 70), (500, 20))))
    for size in ((30, 70), (500, 20)):
        tokens, _ = _hf_counts(processor, size)
        assert plan.tokens(size).tokens == plan.tokens(size).before_unpadding == tokens == 4


def test_llava_next_recipe_1344_matches_the_survey_and_hf():
    """LLaVA-NeXT at 1344x1344: 5 tiles x 576 = 2,880 before unpadding (the figure surveys quote);
    2,928 <image> tokens after unpadding incl. 48 newlines (what HF's processor puts in the prompt)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    plan = plan_model("llava-next", "fp16", Workload(image_sizes=((1344, 1344), (672, 336))))
    big = plan.tokens((1344, 1344))
    assert (big.tiles, big.tokens_per_tile, big.before_unpadding, big.tokens, big.newlines) == (5, 576, 2880, 2928, 48)
    assert big.grid == (2, 2) and plan.tokens((672, 336)).tokens == 1776
    assert any("5 tiles x 576 = 2,880" in n and "2,928" in n for n in plan.notes)
    assert plan.context == 4096  # default: room for the largest image + text
    # HF's processor with llava-v1.6's settings counts the same
    ip = LlavaNextImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 image_grid_pinpoints=[list(p) for p in load_recipe("llava-next").architecture.grid_pinpoints])
    hf = LlavaNextProcessor(image_processor=ip, tokenizer=build_tiny_tokenizer(256), patch_size=14,
                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    assert _hf_counts(hf, (1344, 1344)) == (2928, 5)
    assert _hf_counts(hf, (672, 336)) == (1776, 3)
    # Mistral-7B: 7.24 B parameters, 8 KV heads: 128 KiB of KV per token in fp16
    assert 7.2e9 < plan.get("LLM weights").params < 7.3e9
    assert plan.get("KV cache").nbytes == 4096 * 2 * 32 * 8 * 128 * 2
    assert 0.28e9 < plan.get("vision encoder").params < 0.31e9


def test_llava_next_recipe_equals_the_hf_config():
    """configs/llava-next.yaml's sizes are what llava-hf/llava-v1.6-mistral-7b-hf's config.json gives
    (it leaves Mistral's defaults out: hidden_size, layers, heads)."""
    config = {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "image_token_index": 32000, "projector_hidden_act": "gelu", "use_image_newline_parameter": True,
        "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2", "architectures": ["MistralForCausalLM"],
                        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mistral",
                        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                        "sliding_window": None, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }
    assert Architecture.from_hf_config(config) == load_recipe("llava-next").architecture


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "gemma", "phi3"])
def test_text_config_defaults_are_transformers(model_type):
    """A config.json may leave out any key its config class defaults; the planner fills in the same."""
    import transformers

    cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
           "phi3": "Phi3Config"}[model_type]
    hf = getattr(transformers, cls)()
    arch = Architecture.from_hf_config({"text_config": {"model_type": model_type}})
    assert (arch.text_hidden, arch.text_layers, arch.text_heads, arch.text_kv_heads, arch.text_intermediate,
            arch.vocab_size, arch.context_length, arch.text_head_dim, arch.tie_word_embeddings) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size,
        hf.vocab_size, hf.max_position_embeddings, getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        hf.tie_word_embeddings)
    assert (arch.image_size, arch.vision_hidden, arch.vision_layers) == (336, 1024, 24)  # LlavaConfig's CLIP-L/336


@pytest.mark.parametrize("model_type", ["clip_vision_model", "siglip_vision_model", "dinov2", "dinov2_with_registers"])
def test_vision_config_defaults_are_transformers(model_type):
    import transformers

    hf = transformers.AutoConfig.for_model(model_type)
    arch = Architecture.from_hf_config({"vision_config": {"model_type": model_type}})
    intermediate = getattr(hf, "intermediate_size", None) or int(hf.hidden_size * hf.mlp_ratio)
    assert (arch.vision_hidden, arch.vision_layers, arch.vision_heads, arch.vision_intermediate, arch.image_size,
            arch.patch_size, arch.vision_registers) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, intermediate, hf.image_size, hf.patch_size,
        getattr(hf, "num_register_tokens", 0))


def test_dinov2_registers_count_like_pytorch():
    import transformers

    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=28,
                                                 patch_size=14, mlp_ratio=2, num_register_tokens=3)
    tower = transformers.Dinov2WithRegistersModel(cfg)
    arch = Architecture.from_hf_config({"vision_config": cfg.to_dict(), "vision_feature_layer": -1})
    dropped = {id(p) for p in tower.layernorm.parameters()} | {id(tower.embeddings.mask_token)}
    assert vision_params(arch) == sum(p.numel() for p in tower.parameters() if id(p) not in dropped)
    assert arch.vision_registers == 3


# ---------------------------------------------------------------------------------------------
# Exported LLaVA-NeXT and sliding-window artifacts (manifest v2)


def test_artifact_llava_next_tokens_are_the_runtimes(exported_factory):
    ex = exported_factory("llava_next-llama-clip")
    sizes = ((30, 70), (56, 56), (100, 20))
    plan = plan_artifact(ex.artifact, Workload(image_sizes=sizes))
    vlm = VLM.load(ex.artifact)
    assert plan.family == "llava_next"
    for h, w in sizes:
        item = vlm.family.prepare(Image.new("RGB", (w, h), (10, 200, 30)))
        assert (plan.tokens((h, w)).tokens, plan.tokens((h, w)).tiles) == (item.num_tokens, item.pixels.shape[0])
    newline = (ex.artifact / "image_newline.npy").stat().st_size
    projector = sum(p.stat().st_size for p in ex.artifact.iterdir() if p.name.startswith("projector.onnx"))
    assert plan.get("projector").nbytes == projector + newline
    typical = plan_artifact(ex.artifact).visual[0]
    assert typical.tokens == load_manifest(ex.artifact).model.tokens_per_image


def test_artifact_kv_sums_kv_layers_and_notes_the_window(exported_factory):
    ex = exported_factory("llava-mistral-clip")  # sliding_window=6 on every layer
    plan = plan_artifact(ex.artifact, Workload(context=64, batch=2))
    layers = load_manifest(ex.artifact).model.kv_layers
    assert {x.window for x in layers} == {6}
    assert plan.get("KV cache").nbytes == sum(2 * x.kv_heads * x.head_dim * 4 for x in layers) * 64 * 2
    assert any("sliding-window" in n and "whole context" in n for n in plan.notes)


# ---------------------------------------------------------------------------------------------
# --image-size


def test_parse_image_sizes():
    assert parse_image_sizes(["1344x1344", "672X336, 28", "10x20 30x40"]) == (
        (1344, 1344), (672, 336), (28, 28), (10, 20), (30, 40))
    assert parse_image_sizes([]) == ()
    for bad in ("13x", "x13", "0x10", "10x10x10", "big"):
        with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
            parse_image_sizes([bad])


def test_cli_plan_llava_next_image_sizes(capsys):
    assert main(["plan", "--model", "llava-next", "--image-size", "1344x1344", "--image-size", "672x336"]) == 0
    out = capsys.readouterr().out
    assert "5 x 576 = 2,880" in out and "2,928 = 576 base + 2,304 grid + 48 newlines" in out
    assert "3 x 576 = 1,728" in out and "1,776" in out
    assert "Mistral" in out and "context 4096 tokens" in out
    assert main(["plan", "--model", "llava-next", "--image-size", "1344x", "--context", "2048"]) == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["plan", "--model", "llava-next", "--image-size", "1344x1344", "--context", "2048"]) == 2
    assert "1 image(s) x 2928 visual tokens" in capsys.readouterr().err


def test_recipe_family_must_match_architecture(monkeypatch):
    from vlmdeploy.export import plan as plan_module
    from vlmdeploy.export.recipes import Recipe

    arch = load_recipe("llava").architecture
    monkeypatch.setattr(plan_module, "load_recipe", lambda name: Recipe(name, "llava_next", hf_id="x/y", architecture=arch))
    with pytest.raises(RecipeError, match="family 'llava_next' but architecture.family 'llava'"):
        plan_model("mismatch")
