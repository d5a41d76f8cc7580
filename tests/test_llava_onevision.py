"""LLaVA-OneVision: a seeded tiny checkpoint (SigLIP, Qwen2, anyres_max_1) exported by the real
exporter, then the torch-free runtime against HF `generate` (greedy, EOS off) through both decoders:
a non-square photo (tiles unpadded and bilinear-downscaled), two images in one prompt (one tile
each, as HF's processor does for a multi-image prompt), text only, a left-padded batch, and an
image + a video (HF's video processor needs torchvision, so HF's model is fed the
`pixel_values_videos` our preprocessing makes: tests/test_onevision_preprocess.py checks those);
prefill logits within 1e-4; `check --tensorrt`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import both_decoders, hf_generate_batch, hf_generate_greedy, photo
from vlmdeploy.runtime import onevision as ov
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 16


def chat(body: str) -> str:
    return f"<|im_start|>user {body}<|im_end|>\n<|im_start|>assistant\n"


ONE, TWO, TEXT = chat("<image>\nWhat is it?"), chat("<image><image>\nCompare them."), chat("\nTell me a story.")
WITH_VIDEO = chat("<image><video>\nIs it in the video?")


@pytest.fixture(scope="module")
def onevision(exported_factory):
    return exported_factory("llava_onevision")


def images_two():
    return [photo("chelsea", (150, 100)), photo("astronaut", (60, 130))]


def hf_generate(exp, prompts, images):
    """Images nested per prompt (a prompt's images are one multi-image sample)."""
    return hf_generate_batch(exp, prompts, images, NEW_TOKENS)


def _generate(model, inputs):
    return hf_generate_greedy(model, inputs, NEW_TOKENS)


@pytest.mark.parametrize("case", ["photo", "two images", "text only"])
def test_greedy_tokens_equal_hf(onevision, case):
    prompt, images = {"photo": (ONE, [photo("chelsea", (150, 100))]), "two images": (TWO, images_two()),
                      "text only": (TEXT, [])}[case]
    want = hf_generate(onevision, [prompt], [images])[0]
    for vlm in both_decoders(onevision):
        assert vlm.generate(prompt, images, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want, vlm.decoder_graph


def test_left_padded_batch_equals_hf(onevision):
    prompts, images = [ONE, TEXT, TWO], [[photo("coffee", (90, 120))], [], images_two()]
    want = hf_generate(onevision, prompts, images)
    for vlm in both_decoders(onevision):
        got = vlm.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [g.token_ids for g in got] == want, vlm.decoder_graph


def test_image_and_video_equal_hf(onevision):
    """5 frames of a panning photo: squashed to 42x42, 3x3 tokens pooled to 2x2 per frame, one newline."""
    image = photo("coffee", (100, 70))
    base = np.asarray(photo("astronaut", (160, 56)))
    frames = np.stack([base[:, 8 * i: 8 * i + 84] for i in range(5)])  # [5, 56, 84, 3]
    vlms = both_decoders(onevision)
    got = [v.generate(WITH_VIDEO, [image], [frames], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for v in vlms]
    video = vlms[0].family.prepare_video(frames)
    assert video.num_tokens == 5 * 4 + 1
    n_image = vlms[0].family.prepare(image).num_tokens  # equal to the processor's: test_token_counts_equal_the_processor
    text = WITH_VIDEO.replace("<image>", "<image>" * n_image).replace("<video>", "<video>" * video.num_tokens)
    proc = onevision.processor
    ids = proc.tokenizer(text, return_tensors="pt")["input_ids"]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "batch_num_images": torch.tensor([1]),
              **proc.image_processor(images=[image], return_tensors="pt"),
              "pixel_values_videos": torch.from_numpy(video.pixels[None])}  # [1, F, 3, S, S]
    want = _generate(onevision.model, inputs)[0]
    assert got == [want, want]


def test_prefill_logits_match_hf(onevision):
    inputs = onevision.processor(text=[TWO], images=[images_two()], return_tensors="pt")
    with torch.no_grad():
        ref = onevision.model(**inputs).logits[0].numpy()
    ours = VLM.load(onevision.artifact).prefill_logits(TWO, images_two())[0]
    assert ours.shape == ref.shape and np.max(np.abs(ours - ref)) <= 1e-4


def test_token_counts_equal_the_processor(onevision):
    """The prompt's <image> count for single- and multi-image prompts, as HF's processor expands them."""
    vlm = VLM.load(onevision.artifact)
    token = onevision.model.config.image_token_id
    for images, prompt in (([photo("chelsea", (150, 100))], ONE), (images_two(), TWO)):
        ids = onevision.processor(text=[prompt], images=[images], return_tensors="pt")["input_ids"][0]
        assert int((ids == token).sum()) == sum(i.num_tokens for i in vlm.family.prepare_images(images))


def test_manifest_and_check_tensorrt(onevision):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    facts = VLM.load(onevision.artifact).facts
    assert facts.family == "llava_onevision" and set(facts.media) == {"image", "video"}
    assert facts.pipeline["video"] == facts.pipeline["image"] == ["vision", "projector"]
    assert facts.tensors == {"image_newline": "image_newline.npy"}
    report = check_artifact(onevision.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed


def test_pool_video_is_the_video_rule():
    assert ov.video_tokens(8, 27) == 8 * 14 * 14 + 1  # SigLIP 384/14: 27x27 -> 14x14 per frame
