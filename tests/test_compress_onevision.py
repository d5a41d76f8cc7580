"""Visual-token compression on LLaVA-OneVision (`pool`): each anyres tile pooled to a square s x s and
packed as HF packs a tower of s x s tokens per tile (HF's own model and processor, with its projector
followed by the same pooling and its patch size scaled to give s, are the reference); video frames
pooled on after OneVision's own 2x2 pooling (HF's video features, pooled per frame by torch); the
planner's count equal to the runtime's. The tiny model: SigLIP 42/14, 3x3 tokens a tile."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from conftest import hf_generate_greedy, photo
from test_compress import torch_pool
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 8


def chat(body: str) -> str:
    return f"<|im_start|>user {body}<|im_end|>\n<|im_start|>assistant\n"


ONE, TWO, VIDEO = chat("<image>\nWhat is it?"), chat("<image><image>\nCompare them."), chat("<video>\nWhat happens?")


@pytest.fixture(scope="module")
def onevision(exported_factory):
    return exported_factory("llava_onevision")


class PoolTiles(torch.nn.Module):
    """[N, T, C] tiles of sqrt(T) x sqrt(T) tokens -> [N, side^2, C] (torch's adaptive_avg_pool2d)."""

    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, y):
        n, t, c = y.shape
        grid = y.reshape(n, int(t**0.5), int(t**0.5), c).permute(0, 3, 1, 2)  # [N, C, h, w]
        return torch.nn.functional.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)


@contextlib.contextmanager
def hf_pooled_to(exp, side: int):
    """HF's model and processor as if the tower gave side x side tokens per tile: the projector's output
    adaptive-average-pooled to that grid, the patch size scaled so image_size // patch_size == side."""
    model, proc = exp.model.model, exp.processor
    vision = exp.model.config.vision_config
    projector, patch, tokens = model.multi_modal_projector, vision.patch_size, proc.num_image_tokens

    model.multi_modal_projector = torch.nn.Sequential(projector, PoolTiles(side))
    vision.patch_size, proc.num_image_tokens = vision.image_size // side, side * side
    try:
        yield
    finally:
        model.multi_modal_projector, vision.patch_size, proc.num_image_tokens = projector, patch, tokens


@pytest.mark.parametrize("k, case", [(4, "photo"), (1, "photo"), (4, "two images")])
def test_pooled_tiles_generate_as_hf(onevision, k, case):
    """K = s^2 per tile: the prompt holds HF's processor's count for s x s tiles (unpadding, downscale,
    newlines on that grid), and the greedy tokens equal HF generate on the same pooled features."""
    prompt, images = {"photo": (ONE, [photo("chelsea", (150, 100))]),
                      "two images": (TWO, [photo("chelsea", (150, 100)), photo("astronaut", (60, 130))])}[case]
    got = VLM.load(onevision.artifact, visual_tokens=k).generate(prompt, images, max_new_tokens=NEW_TOKENS,
                                                                 ignore_eos=True)
    with hf_pooled_to(onevision, int(k**0.5)):
        inputs = onevision.processor(text=[prompt], images=[images], return_tensors="pt")
        want = hf_generate_greedy(onevision.model, inputs, NEW_TOKENS)[0]
    full = onevision.processor(text=[prompt], images=[images], return_tensors="pt")["input_ids"]
    assert got.prompt_tokens == inputs["input_ids"].shape[1] < full.shape[1]
    assert got.token_ids == want


def test_video_frames_pool_after_the_2x2_pooling(onevision):
    """5 frames: 3x3 tokens -> HF's 2x2 -> 1 token per frame (K=1), + the newline; tokens equal HF generate
    fed HF's video features pooled per frame."""
    base = np.asarray(photo("astronaut", (160, 56)))
    frames = np.stack([base[:, 8 * i: 8 * i + 84] for i in range(5)])  # [5, 56, 84, 3]
    vlm = VLM.load(onevision.artifact, visual_tokens=1)
    got = vlm.generate(VIDEO, [], [frames], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    pixels = torch.from_numpy(vlm.family.prepare_video(frames).pixels[None])  # [1, F, 3, S, S]
    model, cfg = onevision.model, onevision.model.config
    with torch.no_grad():
        feats = model.model.get_video_features(pixel_values_videos=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = feats.pooler_output[0].numpy()  # [F * 4 + 1, C]
    pooled = np.concatenate([torch_pool(f, (2, 2), (1, 1)) for f in feats[:-1].reshape(5, 4, -1)] + [feats[-1:]])
    tok = onevision.processor.tokenizer
    ids = torch.tensor([tok(VIDEO.replace("<video>", "<video>" * len(pooled)))["input_ids"]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == cfg.video_token_id] = torch.from_numpy(pooled)
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None)
    assert got.prompt_tokens == ids.shape[1]
    assert got.token_ids == out[0, -NEW_TOKENS:].tolist()


def test_plan_counts_what_the_runtime_prompts(onevision, capsys):
    """`vlmdeploy plan DIR --image-size --visual-tokens 1`, and the video row of the same workload."""
    from vlmdeploy.export import plan
    from vlmdeploy.runtime.compress import Compression

    image = photo("chelsea", (150, 100))
    assert main(["plan", str(onevision.artifact), "--image-size", "100x150", "--visual-tokens", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["visual_tokens"][0]
    vlm = VLM.load(onevision.artifact, visual_tokens=1)
    item = vlm.family.compressed(vlm.family.prepare(image))
    assert row["tokens"] == item.num_tokens and row["tokens_per_tile"] == 1
    workload = plan.Workload(video_frames=5, video_size=(56, 84), compression=Compression("pool", keep=1))
    video_row = plan._video_row(type(vlm.family), vlm.manifest.preprocess, workload)
    video = vlm.family.compressed(vlm.family.prepare_video(np.zeros((5, 56, 84, 3), np.uint8)))
    assert video_row.tokens == video.num_tokens == 5 + 1


def test_refusals_name_what_is_allowed(onevision):
    with pytest.raises(ValueError, match=r"pools each 3x3-token tile to a square; pool 2 tokens gives 2x1\. "
                                         r"Allowed tokens per tile: \[9, 4, 1\]"):
        VLM.load(onevision.artifact, visual_tokens=2)
    with pytest.raises(ValueError, match=r"llava_onevision family cannot apply visual-token compression 'topk' "
                                         r"\(each image's tiles are stitched .*methods it takes: pool"):
        VLM.load(onevision.artifact, visual_tokens=4, compression="topk")
    vlm = VLM.load(onevision.artifact, visual_tokens=9)  # every tile whole; a frame has 2x2 tokens
    with pytest.raises(ValueError, match=r"9 is more than an image's 4 visual tokens \(2x2\)"):
        vlm.family.compressed(vlm.family.prepare_video(np.zeros((2, 56, 84, 3), np.uint8)))
