"""InternVL: a seeded tiny checkpoint (InternViT, pixel shuffle, Qwen2) exported by the real exporter,
then the torch-free runtime against HF `generate` (greedy, EOS off) through both decoders: a non-square
photo (3x2 tiles + a thumbnail), two images in one prompt, text only, a left-padded batch; prefill
logits within 1e-4; `check --tensorrt`. Preprocessing vs HF: tests/test_internvl_preprocess.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import both_decoders, hf_generate_batch, photo
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 16


def chat(body: str) -> str:
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


ONE, TWO, TEXT = chat("<IMG_CONTEXT>\nWhat is it?"), chat("<IMG_CONTEXT>\n<IMG_CONTEXT>\nCompare them."), chat("Tell me.")
CASES = {"photo": (ONE, lambda: [photo("chelsea", (150, 100))]),
         "two images": (TWO, lambda: [photo("coffee", (120, 90)), photo("astronaut", (60, 130))]),
         "text only": (TEXT, lambda: [])}


@pytest.fixture(scope="module")
def exp(exported_factory):
    return exported_factory("internvl")


def hf_generate(exp, prompts, images):
    return hf_generate_batch(exp, prompts, images, NEW_TOKENS, nested=False)


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
    inputs = exp.processor(text=[prompt], images=images(), return_tensors="pt")
    with torch.no_grad():
        ref = exp.model(**inputs).logits[0].numpy()
    ours = VLM.load(exp.artifact).prefill_logits(prompt, images())[0]
    assert ours.shape == ref.shape and np.max(np.abs(ours - ref)) <= 1e-4


def test_prompt_wraps_tiles_as_the_processor(exp):
    prompt, images = CASES["photo"]
    want = exp.processor(text=[prompt], images=images(), return_tensors="np")["input_ids"][0]
    got = VLM.load(exp.artifact).generate(prompt, images(), max_new_tokens=1)
    assert got.prompt_tokens == len(want) == len(exp.processor.tokenizer(prompt)["input_ids"]) - 1 + 2 + 4 * 7


def test_manifest_and_check_tensorrt(exp):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    vlm = VLM.load(exp.artifact)
    assert vlm.facts.family == "internvl" and vlm.facts.image_token == "<IMG_CONTEXT>"
    assert vlm.manifest.graphs["projector"].outputs[0].shape == ("num_images", 4, vlm.facts.dims.hidden)
    assert vlm.facts.limits["rows_per_image"] == 7  # 6 tiles + the thumbnail
    report = check_artifact(exp.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
