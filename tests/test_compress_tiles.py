"""Visual-token compression on families whose tiles are pixel-shuffled (InternVL, Idefics3): each tile's
shuffled token grid compressed to K; the scores per patch (HF's own attention) folded onto the shuffled
tokens by the model's own pixel_shuffle; generation with K tokens per tile equal to HF `generate` fed
the same compressed embeddings in HF's own prompt for K tokens per tile; the planner's count equal
to the runtime's. The methods themselves vs PyTorch: tests/test_compress.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import photo
from test_compress import torch_pool, torch_topk, torch_visionzip
from vlmdeploy.runtime import idefics3
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.compress import block_scores, pool_grid
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 8
PROMPTS = {"internvl": "<|im_start|>user\n<IMG_CONTEXT>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n",
           "idefics3": "User:<image>What is it?<end_of_utterance>\nAssistant:"}
SEQ_ATTR = {"internvl": "image_seq_length", "idefics3": "image_seq_len"}  # the processor's tokens per tile


def image():
    return photo("chelsea", (150, 100))


@pytest.fixture(scope="module", params=["internvl", "idefics3"])
def exp(request, exported_factory):
    return exported_factory(request.param)


# ---- HF's side: features, attention, pixel shuffle, prompt ------------------------------------------


def hf_tiles(exp, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, T, C] per tile out of HF's get_image_features, scores [n, T] per shuffled token:
    HF's attention per patch folded by the model's own pixel_shuffle, mean over the folded patches)."""
    model, cfg = exp.model.model, exp.model.config
    tower = model.vision_tower if exp.name == "internvl" else model.vision_model
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            if exp.name == "internvl":
                out = model.get_image_features(pixel_values=inputs["pixel_values"],
                                               vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                               output_attentions=True)
                patch_scores = out.attentions[-1].mean(1)[:, 0, 1:]  # [n, P]: the [CLS] row, CLS column dropped
            else:
                out = model.get_image_features(pixel_values=inputs["pixel_values"],
                                               pixel_attention_mask=inputs["pixel_attention_mask"], output_attentions=True)
                patch_scores = out.attentions[-1].mean(1).mean(1)  # [n, P]: mean attention received
    finally:
        tower.set_attn_implementation("sdpa")
    n, p = patch_scores.shape
    features = out.pooler_output
    features = (torch.cat(list(features)) if isinstance(features, (list, tuple)) else features).reshape(n, -1, features[0].shape[-1])
    return features, _shuffled(exp, patch_scores[..., None]).mean(-1)  # [n, T, C], [n, T]


def _shuffled(exp, x: torch.Tensor) -> torch.Tensor:
    """x [n, P, c] per patch -> [n, T, c * r^2]: the model's own pixel shuffle."""
    model, cfg = exp.model.model, exp.model.config
    if exp.name == "idefics3":
        return model.connector.pixel_shuffle(x, cfg.scale_factor)
    side = math.isqrt(x.shape[1])
    out = model.pixel_shuffle(x.reshape(x.shape[0], side, side, -1), scale_factor=cfg.downsample_ratio)
    return out.reshape(x.shape[0], -1, out.shape[-1])


def hf_inputs(exp, k: int | None):
    """HF's processor with k tokens per tile (its own image_seq_len option): ids and pixels."""
    proc, attr = exp.processor, SEQ_ATTR[exp.name]
    before = getattr(proc, attr)
    setattr(proc, attr, k or before)
    try:
        images = [[image()]] if exp.name == "idefics3" else [image()]
        return proc(text=[PROMPTS[exp.name]], images=images, return_tensors="pt")
    finally:
        setattr(proc, attr, before)


def hf_generate(exp, ids: torch.Tensor, kept: np.ndarray) -> list[int]:
    """HF generate on inputs_embeds: the prompt's image tokens hold `kept` [n * K, C]."""
    model = exp.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = torch.from_numpy(kept)
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None)
    return out[0, -NEW_TOKENS:].tolist()


def reference(method: str, k: int, features: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
    """Each tile [T, C] (a 2x2 grid in these tiny models) compressed by the PyTorch references -> [n * K, C]
    (pool: to the runtime's grid for K, 2 -> 2x1; tests/test_compress.py checks that rule)."""
    side = math.isqrt(features.shape[1])
    tiles = []
    for f, s in zip(features.numpy(), scores.numpy()):
        contextual = max(1, round(k * 10 / 64))
        tiles.append({"pool": lambda: torch_pool(f, (side, side), pool_grid((side, side), k)),
                      "topk": lambda: torch_topk(f, s, k),
                      "merge": lambda: torch_visionzip(f, s, k - contextual, contextual)}[method]())
    return np.concatenate(tiles)


# ---- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, k", [("pool", 1), ("pool", 2), ("topk", 2), ("merge", 3)])
def test_generation_with_k_tokens_per_tile_equals_hf(exp, method, k):
    """The runtime's prompt is HF's processor's for K tokens per tile (same tags, same length) and its
    greedy tokens equal HF generate fed HF's features, compressed tile by tile by the references."""
    vlm = VLM.load(exp.artifact, visual_tokens=k, compression=method)
    got = vlm.generate(PROMPTS[exp.name], [image()], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    full = hf_inputs(exp, None)
    ids = hf_inputs(exp, k)["input_ids"]
    assert got.prompt_tokens == ids.shape[1] < full["input_ids"].shape[1]
    features, scores = hf_tiles(exp, full)
    assert got.token_ids == hf_generate(exp, ids, reference(method, k, features, scores))


def test_attention_scores_per_patch_equal_hf(exp):
    """The vision graph's attention_scores (per patch, before the shuffle) equal HF's attention, and
    block_scores folds them as the model's own pixel_shuffle does."""
    vlm = VLM.load(exp.artifact)
    inputs = hf_inputs(exp, None)
    pixels = inputs["pixel_values"].reshape(-1, *inputs["pixel_values"].shape[-3:]).numpy()
    feeds = {"pixel_values": pixels}
    if exp.name == "idefics3":
        side = vlm.facts.dims.image_size[0] // vlm.family.patch_size
        feeds["position_ids"] = idefics3.patch_positions(np.ones((len(pixels), *pixels.shape[-2:]), np.int64),
                                                         vlm.family.patch_size, side)[1]
    got = vlm.runners["vision"].run(feeds)["attention_scores"]  # [n, P]
    _, want = hf_tiles(exp, inputs)  # [n, T], folded by HF's pixel_shuffle
    np.testing.assert_allclose(block_scores(got, vlm.family.tile_grid), want.numpy(), atol=2e-6)
    index = torch.arange(got.shape[1], dtype=torch.float32)[None, :, None]  # each patch's own index as a channel
    groups = _shuffled(exp, index)[0].numpy()  # [T, r^2]: the patches each shuffled token folds
    side = math.isqrt(got.shape[1])
    rows, cols = groups // side, groups % side
    r = side // vlm.family.tile_grid[0]
    assert (rows // r == (np.arange(len(groups)) // vlm.family.tile_grid[1])[:, None]).all()
    assert (cols // r == (np.arange(len(groups)) % vlm.family.tile_grid[1])[:, None]).all()


def test_plan_counts_what_the_runtime_prompts(exp, capsys):
    """`vlmdeploy plan DIR --image-size HxW --visual-tokens K`: the tokens it drops equal the runtime's."""
    h, w = image().size[1], image().size[0]
    counts = []
    for option in ([], ["--visual-tokens", "1"]):
        assert main(["plan", str(exp.artifact), "--image-size", f"{h}x{w}", "--json", *option]) == 0
        counts.append(json.loads(capsys.readouterr().out)["visual_tokens"][0])
    prompts = [VLM.load(exp.artifact, **kw).generate(PROMPTS[exp.name], [image()], max_new_tokens=1).prompt_tokens
               for kw in ({}, {"visual_tokens": 1})]
    assert counts[0]["tokens"] - counts[1]["tokens"] == prompts[0] - prompts[1] == counts[0]["tiles"] * 3
    assert counts[1]["tokens_per_tile"] == 1


def test_bad_counts_name_what_is_allowed(exp):
    with pytest.raises(ValueError, match=r"5 is more than an image's 4 visual tokens \(2x2\); allowed: 1\.\.4"):
        VLM.load(exp.artifact, visual_tokens=5, compression="topk")
    with pytest.raises(ValueError, match=r"pool cannot make 3 tokens from a 2x2 grid"):
        VLM.load(exp.artifact, visual_tokens=3)


def test_internvit_scores_with_qk_norm_equal_hf():
    """InternViT with q/k normalization (InternVL's 6B towers): the exported scores apply it as HF does."""
    import transformers

    from vlmdeploy.export.internvl import InternVisionGraph

    cfg = transformers.InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, image_size=28, patch_size=7, use_qk_norm=True)
    torch.manual_seed(0)
    tower = transformers.InternVLVisionModel(cfg).eval()
    with torch.no_grad():
        for norm in (tower.encoder.layer[-1].attention.q_norm, tower.encoder.layer[-1].attention.k_norm):
            norm.weight.uniform_(0.5, 1.5)  # not the identity at init
        pixels = torch.randn(2, 3, 28, 28)
        _, got = InternVisionGraph(tower, -1, "default", scores=True)(pixels)
        tower.set_attn_implementation("eager")
        want = tower(pixels, output_attentions=True).attentions[-1].mean(1)[:, 0, 1:]
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
