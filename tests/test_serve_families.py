"""The scheduler on other model families: anyres tiles (LLaVA-NeXT), M-RoPE positions from the image
grids (Qwen2-VL, Qwen2.5-VL), InternVL's wrapped tiles, LLaVA-OneVision, Idefics3's tiles. Mixed image and
text-only chats, chunked prefill, 3 slots, both decoders: every answer equals `VLM.chat`'s."""

from __future__ import annotations

import io
import queue

import pytest

import conftest
from conftest import noise_image, photo
from vlmdeploy.runtime.sampling import SamplingParams
from vlmdeploy.runtime.vlm import VLM
from vlmdeploy.serve.engine import Engine
from vlmdeploy.serve.prepare import PromptBuilder

TINY = {**conftest.VARIANTS, **conftest.FAMILY_VARIANTS, **conftest.QWEN_VARIANTS, **conftest.ZOO_VARIANTS}
FAMILIES = ["llava_next-llama-clip", "qwen2_vl", "qwen2_5_vl", "internvl", "llava_onevision", "idefics3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_scheduler_answers_as_the_runtime(exported_factory, name):
    if name not in TINY:
        pytest.skip(f"no tiny {name} model in this tree (tests/conftest.py)")
    artifact = exported_factory(name).artifact
    images = [photo("chelsea", (150, 100)), noise_image(5, size=(60, 130)), photo("astronaut", (64, 64))]
    jobs = [([image] if i % 2 == 0 else [], 6 + 2 * i) for i, image in enumerate(images * 2)]  # (images, tokens)
    for decoder in VLM.load(artifact, verify=False).facts.pipeline["decoders"]:
        vlm = VLM.load(artifact, decoder=decoder)
        expected = [vlm.chat(_messages(imgs, lambda im: im), max_new_tokens=n, ignore_eos=True).text for imgs, n in jobs]
        engine = Engine(vlm, max_num_seqs=3, prefill_chunk=7, prefill_tokens_per_step=9)
        builder = PromptBuilder(vlm, 1 << 20)
        events = [queue.Queue() for _ in jobs]
        for (imgs, n), q in zip(jobs, events):
            engine.submit(builder.chat(_messages(imgs, _png)), SamplingParams(max_new_tokens=n, ignore_eos=True), q.put)
        got = [_text(q) for q in events]
        engine.stop()
        assert got == expected, decoder


def _messages(images, encode) -> list[dict]:
    content = [{"type": "image", "image": encode(im)} for im in images] + [{"type": "text", "text": "Describe it."}]
    return [{"role": "user", "content": content}]


def _png(image) -> bytes:
    f = io.BytesIO()
    image.save(f, "PNG")
    return f.getvalue()


def _text(events: queue.Queue) -> str:
    text = ""
    while True:
        e = events.get(timeout=120)
        assert e.error is None, e.error
        text += e.text
        if e.finish_reason:
            return text
