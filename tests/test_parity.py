"""The runtime against HF transformers on the same weights: greedy tokens, prefill logits, per graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VARIANTS, noise_image, photo
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 24
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def hf_generate(exp, prompts, images, max_new_tokens=NEW_TOKENS):
    """HF batch generate, greedy, EOS disabled, left padding; returns the new tokens per row."""
    processor, model = exp.processor, exp.model
    processor.tokenizer.padding_side = "left"
    flat = [img for imgs in images for img in imgs] or None
    inputs = processor(images=flat, text=prompts, return_tensors="pt", padding=True)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [row.tolist() for row in out[:, inputs["input_ids"].shape[1]:]]


DECODERS = ("decoder", "decoder_gqa")  # portable (TensorRT's) and ONNX Runtime's in-place-KV decoder


@pytest.fixture(scope="module", params=[(v, d) for v in VARIANTS for d in DECODERS], ids=lambda p: f"{p[0]}-{p[1]}")
def variant(request, exported_factory):
    name, decoder = request.param
    exp = exported_factory(name)
    return exp, VLM.load(exp.artifact, decoder=decoder)


def test_default_decoder_is_the_in_place_one(tiny):
    assert VLM.load(tiny.artifact).decoder_graph == "decoder_gqa"


def test_graphs_match_pytorch(variant):
    exp, vlm = variant
    for name, record in vlm.manifest.validation.items():
        assert record["max_abs_diff"] <= 1e-4, (name, record)
        assert len(record["runs"]) >= 2


def test_prefill_logits_match_hf(variant):
    exp, vlm = variant
    img = photo("astronaut")
    inputs = exp.processor(images=[img], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        ref = exp.model(**inputs).logits[0].numpy()  # [S, V]
    ours = vlm.prefill_logits(PROMPT, [img])[0]
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-4


def test_greedy_tokens_match_hf(variant):
    exp, vlm = variant
    img = photo("chelsea")
    want = hf_generate(exp, [PROMPT], [[img]])[0]
    got = vlm.generate(PROMPT, [img], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert got.token_ids == want
    assert len(got.token_ids) == NEW_TOKENS
    assert got.text == exp.processor.tokenizer.decode(want, skip_special_tokens=True)


def test_left_padded_batch_matches_hf(variant):
    exp, vlm = variant
    prompts = [PROMPT, "USER: <image> <image>\nCompare them, please. ASSISTANT:", "USER: hi ASSISTANT:"]
    images = [[photo("coffee")], [noise_image(1), photo("chelsea")], []]
    want = hf_generate(exp, prompts, images)
    got = vlm.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [g.token_ids for g in got] == want


def test_chat_matches_hf_chat_template(tiny):
    vlm = VLM.load(tiny.artifact)
    img = photo("coffee")
    messages = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Describe it."}]}]
    hf_messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = tiny.processor.apply_chat_template(hf_messages, add_generation_prompt=True)
    want = hf_generate(tiny, [prompt], [[img]])[0]
    assert vlm.render_chat(messages)[0] == prompt
    assert vlm.chat(messages, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want


def test_stream_concatenates_to_generate_text(tiny):
    vlm = VLM.load(tiny.artifact)
    img = noise_image(5)
    full = vlm.generate(PROMPT, [img], max_new_tokens=30, ignore_eos=True)
    pieces = list(vlm.stream(PROMPT, [img], max_new_tokens=30, ignore_eos=True))
    assert "".join(pieces) == full.text
    assert len(pieces) > 1


def test_eos_stops_generation(tiny):
    vlm = VLM.load(tiny.artifact)
    img = noise_image(6)
    free = vlm.generate(PROMPT, [img], max_new_tokens=20, ignore_eos=True).token_ids
    # Declare the 5th greedy token an EOS: generation must stop right before it.
    eos = free[4]
    vlm.facts = type(vlm.facts)(**{**vlm.facts.__dict__, "eos_token_ids": (eos,)})
    stopped = vlm.generate(PROMPT, [img], max_new_tokens=20)
    assert stopped.token_ids == free[: free.index(eos)]
    assert stopped.finish_reason == "stop"


def _stop_case(tiny, width: int):
    """A greedy generation, a stop string taken from its middle, and the generation cut by it."""
    vlm, img = VLM.load(tiny.artifact), noise_image(7)
    kw = dict(max_new_tokens=30, ignore_eos=True)
    full = vlm.generate(PROMPT, [img], **kw)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + width]
    return vlm, img, kw, full, stop, vlm.generate(PROMPT, [img], stop=[stop], **kw)


def test_stop_string_truncates_text(tiny):
    _, _, _, full, stop, cut = _stop_case(tiny, 2)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_stream_never_shows_a_stop_string(tiny):
    vlm, img, kw, _, stop, cut = _stop_case(tiny, 3)
    streamed = "".join(vlm.stream(PROMPT, [img], stop=[stop], **kw))
    assert streamed == cut.text and stop not in streamed


def test_sampling_is_seeded(tiny):
    vlm = VLM.load(tiny.artifact)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123, ignore_eos=True)
    a = vlm.generate("USER: hello ASSISTANT:", **kw).token_ids
    b = vlm.generate("USER: hello ASSISTANT:", **kw).token_ids
    c = vlm.generate("USER: hello ASSISTANT:", **{**kw, "seed": 124}).token_ids
    assert a == b and a != c
