"""Idefics2 (perceiver resampler): a seeded tiny checkpoint exported by the real exporter, then the
torch-free runtime against HF `generate` (greedy, EOS off) through both decoders: a non-square photo
(4 crops + the whole image, each resized on its own and padded: pixel masks), two images in one
prompt (shared fake tokens), text only, a left-padded batch; prefill logits within 1e-4; `check
--tensorrt`. Preprocessing, padding, prompt text and patch inputs vs HF: tests/test_idefics2_preprocess.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import both_decoders, hf_generate_batch, photo
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 16
ONE, TWO = "User:<image>What is it?<end_of_utterance>\nAssistant:", "User:<image><image>Compare.<end_of_utterance>\nAssistant:"
TEXT = "User: Tell me.<end_of_utterance>\nAssistant:"
CASES = {"photo": (ONE, lambda: [photo("chelsea", (150, 100))]),
         "two images": (TWO, lambda: [photo("coffee", (40, 30)), photo("astronaut", (60, 130))]),
         "text only": (TEXT, lambda: [])}


@pytest.fixture(scope="module")
def exp(exported_factory):
    return exported_factory("idefics2")


def hf_generate(exp, prompts, images):
    return hf_generate_batch(exp, prompts, images, NEW_TOKENS, nested=True)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_hf(exp, case):
    prompt, images = CASES[case]
    want = hf_generate(exp, [prompt], [images()])[0]
    for vlm in both_decoders(exp):
        assert vlm.generate(prompt, images(), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want, vlm.decoder_graph


def test_left_padded_batch_equals_hf(exp):
    prompts, images = [p for p, _ in CASES.values()], [i() for _, i in CASES.values()]
    want = hf_generate(exp, prompts, images)
    assert len({tuple(w) for w in want}) == 3  # the rows differ: the images matter
    for vlm in both_decoders(exp):
        got = vlm.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [g.token_ids for g in got] == want, vlm.decoder_graph


def test_prefill_logits_match_hf(exp):
    prompt, images = CASES["two images"]
    inputs = exp.processor(text=[prompt], images=[images()], return_tensors="pt")
    with torch.no_grad():
        ref = exp.model(**inputs).logits[0].numpy()
    ours = VLM.load(exp.artifact).prefill_logits(prompt, images())[0]
    assert ours.shape == ref.shape and np.max(np.abs(ours - ref)) <= 1e-4


def test_manifest_and_check_tensorrt(exp):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    vlm = VLM.load(exp.artifact)
    graphs = vlm.manifest.graphs
    assert vlm.facts.family == "idefics2" and graphs["projector"].input_names == ["image_features", "patch_mask"]
    assert graphs["projector"].outputs[0].shape == ("num_images", 4, vlm.facts.dims.hidden)  # 4 latents a crop
    assert vlm.facts.limits["rows_per_image"] == 5
    report = check_artifact(exp.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
