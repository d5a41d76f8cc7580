"""BLIP-2 (Q-Former, OPT): a seeded tiny checkpoint exported by the real exporter, then the
torch-free runtime against HF: `generate` on a non-square photo and on a left-padded batch (each
row its own image), the language model's `generate` for text only (BLIP-2's own generate needs an
image), prefill logits within 1e-4, `check --tensorrt`. BLIP-2 takes one image per prompt: its
processor puts the queries once, before BOS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import noise_image, photo
from vlmdeploy.runtime.vlm import VLM, PromptError

NEW_TOKENS = 16
QUESTION, CAPTION = "Question: what is in the picture? Answer:", "A photo of"


@pytest.fixture(scope="module")
def blip2(exported_factory):
    return exported_factory("blip2")


def _generate(generate, inputs):
    with torch.no_grad():
        out = generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return [row.tolist() for row in out[:, inputs["input_ids"].shape[1]:]]


def hf_generate(exp, prompts, images):
    exp.processor.tokenizer.padding_side = "left"
    inputs = exp.processor(text=prompts, images=images, return_tensors="pt", padding=True)
    return _generate(exp.model.generate, inputs)


def test_photo_equals_hf(blip2):
    image = photo("chelsea")
    want = hf_generate(blip2, [QUESTION], [image])[0]
    assert VLM.load(blip2.artifact).generate(QUESTION, [image], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want


def test_the_image_matters(blip2):
    """The tiny model's queries read the image (a check on the test, not the runtime)."""
    vlm = VLM.load(blip2.artifact)
    a, b = (vlm.generate(QUESTION, [img], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
            for img in (photo("chelsea"), noise_image(3, size=(60, 90))))
    assert a != b


def test_left_padded_batch_equals_hf(blip2):
    """HF pads between the queries and BOS; the runtime pads before the queries: same real tokens, same answers."""
    images = [photo("coffee"), noise_image(3, size=(60, 90))]
    want = hf_generate(blip2, [QUESTION, CAPTION], images)
    got = VLM.load(blip2.artifact).generate_batch([QUESTION, CAPTION], [[i] for i in images],
                                                  max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [g.token_ids for g in got] == want


def test_text_only_equals_the_language_model(blip2):
    inputs = blip2.processor(text=[CAPTION], return_tensors="pt")
    want = _generate(blip2.model.language_model.generate, inputs)[0]
    assert VLM.load(blip2.artifact).generate(CAPTION, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want


def test_prefill_logits_match_hf(blip2):
    image = photo("astronaut")
    inputs = blip2.processor(text=[QUESTION], images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = blip2.model(**inputs).logits[0].numpy()
    ours = VLM.load(blip2.artifact).prefill_logits(QUESTION, [image])[0]
    assert ours.shape == ref.shape and np.max(np.abs(ours - ref)) <= 1e-4


def test_queries_go_before_bos_and_one_image_only(blip2):
    vlm = VLM.load(blip2.artifact)
    r = vlm.generate(QUESTION, [photo("coffee")], max_new_tokens=1)
    ids = blip2.processor(text=[QUESTION], images=[photo("coffee")], return_tensors="pt")["input_ids"][0]
    assert r.prompt_tokens == len(ids) == 8 + len(blip2.processor.tokenizer(QUESTION)["input_ids"])
    with pytest.raises(PromptError, match="one image per prompt"):
        vlm.generate(QUESTION, [photo("coffee"), photo("coffee")], max_new_tokens=1)
    with pytest.raises(PromptError, match="hold no '<image>' placeholder"):
        vlm.generate("<image> " + QUESTION, [photo("coffee")], max_new_tokens=1)


def test_manifest_and_check_tensorrt(blip2):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    vlm = VLM.load(blip2.artifact)
    assert vlm.facts.family == "blip2" and vlm.facts.pipeline["decoders"] == ["decoder"]  # decoder_gqa declines OPT
    assert vlm.manifest.graphs["projector"].outputs[0].shape == ("num_images", 8, vlm.facts.dims.hidden)
    report = check_artifact(blip2.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
