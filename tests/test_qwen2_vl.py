"""Qwen2-VL and Qwen2.5-VL: seeded tiny checkpoints exported by the real exporter, then the
torch-free runtime against HF `generate` (greedy, EOS off): two images of different sizes and
aspect ratios in one prompt, text only, an image + a video, a left-padded batch with different
image sizes; prefill logits within 1e-4; `check --tensorrt` on every graph.

HF's video processor needs torchvision (not installable here), so the video path feeds HF's model
the `pixel_values_videos` / `video_grid_thw` our preprocessing makes (that preprocessing is checked
against a transcription of HF's rules in tests/test_qwen_preprocess.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import QWEN_VARIANTS, both_decoders, hf_generate_batch, hf_generate_greedy, noise_image, photo
from vlmdeploy.runtime.vlm import VLM, PromptError

NEW_TOKENS = 20
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def chat(text: str) -> str:
    return f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


TWO = chat(f"{IMG}What is this? {IMG}And this one?")
ONE = chat(f"{IMG}Describe the picture.")
TEXT = chat("Tell me a story.")
WITH_VIDEO = chat(f"{IMG}Is this in the video? {VID}")


def two_images():
    return [photo("chelsea", (150, 100)), noise_image(5, size=(60, 130))]  # 3:2 and a tall one


def video_frames(n: int = 5) -> np.ndarray:
    """[n, 56, 84, 3] uint8: a photo panning right (an odd count: the last frame is repeated in time)."""
    base = np.asarray(photo("astronaut", (160, 56)))
    return np.stack([base[:, 8 * i: 8 * i + 84] for i in range(n)])


@pytest.fixture(scope="module", params=list(QWEN_VARIANTS))
def qwen(request, exported_factory):
    return exported_factory(request.param)


def hf_generate(exp, prompts, images):
    return hf_generate_batch(exp, prompts, images, NEW_TOKENS, nested=False)


def _generate(model, inputs):
    return hf_generate_greedy(model, inputs, NEW_TOKENS)


def test_two_images_of_different_sizes_equal_hf(qwen):
    want = hf_generate(qwen, [TWO], [two_images()])[0]
    for vlm in both_decoders(qwen):
        got = vlm.generate(TWO, two_images(), max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert got.token_ids == want, vlm.decoder_graph


def test_text_only_equals_hf(qwen):
    want = hf_generate(qwen, [TEXT], [[]])[0]
    for vlm in both_decoders(qwen):
        assert vlm.generate(TEXT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want, vlm.decoder_graph


def test_left_padded_batch_with_different_image_sizes_equals_hf(qwen):
    prompts = [TWO, TEXT, ONE]
    images = [two_images(), [], [photo("coffee", (120, 90))]]
    want = hf_generate(qwen, prompts, images)
    for vlm in both_decoders(qwen):
        got = vlm.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert [g.token_ids for g in got] == want, vlm.decoder_graph


def test_image_and_video_equal_hf(qwen):
    """HF's model fed the same video patches, its image processor for the image, its get_rope_index."""
    vlms = both_decoders(qwen)
    image, frames = photo("coffee", (100, 70)), video_frames()
    got = [vlm.generate(WITH_VIDEO, [image], [frames], max_new_tokens=NEW_TOKENS, ignore_eos=True) for vlm in vlms]
    family = vlms[0].family
    video = family.prepare_video(frames, fps=24.0)  # load_video of bare frames: 24 fps, as HF's metadata default
    img = qwen.processor.image_processor(images=[image], return_tensors="pt")
    n_image = int(img["image_grid_thw"].prod()) // 4
    text = WITH_VIDEO.replace("<|image_pad|>", "<|image_pad|>" * n_image).replace("<|video_pad|>", "<|video_pad|>" * video.num_tokens)
    ids = qwen.processor.tokenizer(text, return_tensors="pt")["input_ids"]
    cfg = qwen.model.config
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int(),
              "pixel_values": img["pixel_values"], "image_grid_thw": img["image_grid_thw"],
              "pixel_values_videos": torch.from_numpy(video.pixels.reshape(-1, video.pixels.shape[-1])),
              "video_grid_thw": torch.tensor([video.meta["grid"]])}
    if cfg.model_type == "qwen2_5_vl":
        inputs["second_per_grid_ts"] = torch.tensor([2 / 24.0])
    assert video.meta["grid"][0] == 3  # 5 frames -> 3 temporal patches (the last frame repeated)
    want = _generate(qwen.model, inputs)[0]
    assert [g.token_ids for g in got] == [want, want]


def test_prefill_logits_match_hf(qwen):
    inputs = qwen.processor(images=two_images(), text=[TWO], return_tensors="pt")
    with torch.no_grad():
        ref = qwen.model(**inputs).logits[0].numpy()  # [S, V]
    ours = VLM.load(qwen.artifact).prefill_logits(TWO, two_images())[0]
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-4


def test_min_max_pixels_per_call_change_the_tokens_as_hf(qwen):
    """A request's max_pixels shrinks the image (fewer tokens) exactly as HF's processor with that setting."""
    vlm = VLM.load(qwen.artifact)
    image = photo("chelsea", (300, 200))
    small = vlm.family.prepare(image, max_pixels=28 * 28 * 16)
    full = vlm.family.prepare(image)
    assert small.num_tokens < full.num_tokens <= 64
    hf = qwen.processor.image_processor(images=[image], size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16},
                                        return_tensors="pt")
    assert small.meta["grid"] == tuple(hf["image_grid_thw"][0].tolist())
    got = vlm.generate(ONE, [image], max_new_tokens=4, ignore_eos=True, max_pixels=28 * 28 * 16)
    assert got.prompt_tokens == len(qwen.processor.tokenizer(ONE)["input_ids"]) - 1 + small.num_tokens
    with pytest.raises(PromptError, match="max_pixels"):
        vlm.generate(ONE, [image], max_new_tokens=1, max_pixels=10**9)


def test_manifest_and_check_tensorrt(qwen):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    vlm = VLM.load(qwen.artifact)
    facts = vlm.facts
    assert facts.family == "qwen2_vl" and facts.positions == "mrope"
    assert set(facts.media) == {"image", "video"} and facts.pipeline["video"] == ["vision"]
    for name in ("decoder", "decoder_gqa"):
        assert vlm.manifest.graphs[name].inputs[2].shape == (3, "batch", "seq")
    windowed = qwen.model.config.model_type == "qwen2_5_vl"
    assert ("windows" in vlm.manifest.graphs["vision"].input_names) == windowed
    report = check_artifact(qwen.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed
    ok = "\n".join(report.ok)
    for graph in ("vision", "embed", "decoder"):
        assert f"{graph}: tensorrt profiles:" in ok and f"{graph}: tensorrt control: no If/Loop/Scan" in ok


def test_video_placeholders_and_families_without_video(qwen, tiny):
    vlm = VLM.load(qwen.artifact)
    with pytest.raises(PromptError, match="1 <|video_pad|> placeholder but 0 videos"):
        vlm.generate(chat(VID), max_new_tokens=1)
    with pytest.raises(PromptError, match="takes no video"):
        VLM.load(tiny.artifact).generate("USER: hi ASSISTANT:", videos=[video_frames()], max_new_tokens=1)
    with pytest.raises(PromptError, match="min_pixels/max_pixels apply to"):
        VLM.load(tiny.artifact).generate("USER: hi ASSISTANT:", max_new_tokens=1, max_pixels=1000)


def test_chat_with_a_video_item(qwen):
    """{"type": "video"} content renders <|video_pad|> through the chat template; same tokens as the raw prompt."""
    vlm = VLM.load(qwen.artifact)
    frames = video_frames(4)
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}]
    raw = chat(f"{VID}What happens?")
    assert vlm._render_chat(messages)[0] == raw
    got = vlm.chat(messages, max_new_tokens=6, ignore_eos=True)
    assert got.token_ids == vlm.generate(raw, videos=[frames], max_new_tokens=6, ignore_eos=True).token_ids


def _write_lossless(path, frames: np.ndarray, rate: int = 24):
    """frames [F, H, W, 3] uint8 -> a lossless PNG-in-MOV clip PyAV decodes back exactly."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("png", rate=rate)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "rgb24"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_video_file_decoded_with_pyav_and_cli(qwen, tmp_path, capsys):
    """A clip on disk (PyAV) gives the tokens its frames give; sampling by count picks HF's frames;
    the CLI's --video / --video-frames take the same path."""
    import json

    from vlmdeploy.runtime.cli import main

    frames = video_frames(6)
    clip = _write_lossless(tmp_path / "pan.mov", frames)
    vlm = VLM.load(qwen.artifact, decoder="decoder")
    prompt = chat(f"{VID}What happens?")
    by_file = vlm.generate(prompt, videos=[clip], max_new_tokens=6, ignore_eos=True)
    assert by_file.token_ids == vlm.generate(prompt, videos=[frames], max_new_tokens=6, ignore_eos=True).token_ids
    four = vlm.generate(prompt, videos=[{"video": clip, "num_frames": 4}], max_new_tokens=6, ignore_eos=True)
    want = vlm.generate(prompt, videos=[frames[[0, 1, 3, 4]]], max_new_tokens=6, ignore_eos=True)  # HF: linspace(0, 5, 4)
    assert four.token_ids == want.token_ids and four.prompt_tokens < by_file.prompt_tokens
    capsys.readouterr()
    assert main(["run", str(qwen.artifact), "--video", str(clip), "--video-frames", "4", "--prompt", "What happens?",
                 "--max-new-tokens", "6", "--ignore-eos", "--json"]) == 0
    messages = [{"role": "user", "content": [{"type": "video", "video": clip, "num_frames": 4},
                                             {"type": "text", "text": "What happens?"}]}]
    assert json.loads(capsys.readouterr().out)["token_ids"] == VLM.load(qwen.artifact).chat(
        messages, max_new_tokens=6, ignore_eos=True).token_ids


def test_plan_counts_image_and_video_tokens_as_the_runtime(qwen, capsys):
    """`vlmdeploy plan DIR --image-size --video-frames`: the counts the runtime's preprocessing gives."""
    import json

    from vlmdeploy.runtime.cli import main

    vlm = VLM.load(qwen.artifact)
    image = photo("chelsea", (300, 200))
    frames = np.zeros((7, 112, 84, 3), np.uint8)
    assert main(["plan", str(qwen.artifact), "--image-size", "200x300", "--video-frames", "7", "--video-size", "112x84",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["visual_tokens"][0]["tokens"] == vlm.family.prepare(image).num_tokens
    video = vlm.family.prepare_video(frames).num_tokens
    assert any(f"{video} visual tokens" in n and "7 frames" in n for n in plan["notes"])


def test_plan_refuses_video_for_a_family_without_it(tiny):
    from vlmdeploy.export.plan import Workload, plan_artifact

    with pytest.raises(ValueError, match="the llava family takes no video"):
        plan_artifact(tiny.artifact, Workload(video_frames=4))
