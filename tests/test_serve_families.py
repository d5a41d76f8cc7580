"""The scheduler on other model families: anyres tiles (LLaVA-NeXT), M-RoPE positions from the image
grids (Qwen2-VL, Qwen2.5-VL), InternVL's wrapped tiles, LLaVA-OneVision, Idefics3's tiles, mllama's per-slot cross K/V. Mixed image and
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
FAMILIES = ["llava_next-llama-clip", "qwen2_vl", "qwen2_5_vl", "internvl", "llava_onevision", "idefics3", "idefics2", "mllama"]


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


def test_video_parts_and_media_options_through_the_openai_client(exported_factory, tmp_path):
    """Qwen2-VL served: a `video_url` part (a data: URL of a clip) and `mm_processor_kwargs` (max_pixels,
    num_frames) in the extra body give the answer `VLM.chat` gives for the same video and options."""
    import base64

    from test_qwen2_vl import _write_lossless, video_frames
    from test_serve import RunningServer

    from vlmdeploy.serve.app import ServeConfig

    artifact = exported_factory("qwen2_vl").artifact
    clip = _write_lossless(tmp_path / "pan.mov", video_frames(6))
    url = "data:video/quicktime;base64," + base64.b64encode(clip.read_bytes()).decode()
    image = photo("chelsea", (300, 200))
    server = RunningServer(ServeConfig(str(artifact), model_name="qwen", max_model_len=400))
    try:
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png(image)).decode()}},
                   {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "Same?"}]
        options = {"max_pixels": 28 * 28 * 16, "num_frames": 4}
        got = server.client.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0,
            extra_body={"ignore_eos": True, "mm_processor_kwargs": options})
        vlm = VLM.load(artifact)
        local = [{"role": "user", "content": [{"type": "image", "image": image},
                                              {"type": "video", "video": clip, "num_frames": 4},
                                              {"type": "text", "text": "Same?"}]}]
        want = vlm.chat(local, max_new_tokens=8, ignore_eos=True, max_pixels=28 * 28 * 16)
        assert got.choices[0].message.content == want.text
        assert got.usage.prompt_tokens == want.prompt_tokens
        assert want.prompt_tokens < vlm.chat(local, max_new_tokens=1).prompt_tokens  # the options took effect
        status, body = server.post("/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user", "content": content}],
                                                            "mm_processor_kwargs": {"max_pixels": 10**9}})
        assert status == 400 and "max_pixels" in body["error"]["message"]
        status, body = server.post("/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user", "content": content}],
                                                            "mm_processor_kwargs": {"resolution": 3}})
        assert status == 400 and "allowed" in body["error"]["message"]
    finally:
        server.stop()
