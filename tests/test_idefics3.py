"""Idefics3 and SmolVLM: seeded tiny checkpoints exported by the real exporter, then the torch-free
runtime against HF `generate` (greedy, EOS off) through both decoders: a non-square photo (split into
tiles + a global tile), two images in one prompt, text only, a left-padded batch; prefill logits within
1e-4; `check --tensorrt`. Preprocessing, prompt text and patch positions vs HF:
tests/test_idefics3_preprocess.py."""

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


@pytest.fixture(scope="module", params=["idefics3", "smolvlm"])
def exp(request, exported_factory):
    pytest.importorskip("num2words")  # SmolVLM's processor needs it
    return exported_factory(request.param)


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


def test_prompt_as_the_processor_writes_it(exp):
    prompt, images = CASES["photo"]
    want = exp.processor(text=[prompt], images=[images()], return_tensors="np")["input_ids"][0]
    item = VLM.load(exp.artifact).family.prepare(images()[0])
    assert item.meta["grid"] == (2, 3)  # 150x100 -> 84x56 -> 3 cols x 2 rows of 28 + the global tile
    assert VLM.load(exp.artifact).generate(prompt, images(), max_new_tokens=1).prompt_tokens == len(want)


def test_manifest_and_check_tensorrt(exp):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    vlm = VLM.load(exp.artifact)
    assert vlm.facts.family == "idefics3"
    assert vlm.manifest.graphs["vision"].input_names == ["pixel_values", "position_ids"]
    assert vlm.facts.limits["rows_per_image"] == 10  # up to 3x3 tiles + the global one
    report = check_artifact(exp.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
