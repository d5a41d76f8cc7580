"""Shared fixtures: seeded tiny LLaVA checkpoints, exported once per session."""

from __future__ import annotations

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before anything imports onnxruntime (runtime/offline.py)

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.export.recipes import TinyConfig

# Variants cover: MHA vs GQA, feature layer -2 / -1 / a list, default vs full, two image sizes, pad-to-square.
VARIANTS = {
    "mha-default-l2": TinyConfig(seed=1, image_size=56, text_heads=4, text_kv_heads=4, vision_feature_layer=-2,
                                 vision_feature_select_strategy="default"),
    "gqa-full-l1": TinyConfig(seed=2, image_size=42, text_heads=4, text_kv_heads=2, vision_feature_layer=-1,
                              vision_feature_select_strategy="full"),
    "gqa-multilayer-pad": TinyConfig(seed=3, image_size=28, text_heads=8, text_kv_heads=2, text_hidden=64,
                                     vision_feature_layer=[-3, -1], vision_feature_select_strategy="default",
                                     do_pad=True),
}


# One tiny model per family x text backbone x vision tower the README's "Supported models" table lists
# (the structures of llava-1.5, llava-v1.6-vicuna/-mistral, llava-interleave-qwen; Gemma, Phi-3, DINOv2).
FAMILY_VARIANTS = {
    "llava-mistral-clip": TinyConfig(seed=11, image_size=28, text_model="mistral", sliding_window=6),
    "llava-qwen2-siglip": TinyConfig(seed=12, image_size=28, text_model="qwen2", vision_model="siglip",
                                     vision_feature_layer=-1, vision_feature_select_strategy="full"),
    "llava-gemma-clip": TinyConfig(seed=13, image_size=28, text_model="gemma"),
    # LongRoPE switching at 36 positions: the text prompt (32 tokens) starts short and crosses it while
    # generating; the image prompts (39, 40) start above it
    "llava-phi3-dinov2": TinyConfig(seed=14, image_size=28, text_model="phi3", vision_model="dinov2",
                                    longrope_original=36),
    "llava_next-llama-clip": TinyConfig(seed=15, image_size=28, family="llava_next"),
    "llava_next-mistral-clip": TinyConfig(seed=16, image_size=28, family="llava_next", text_model="mistral"),
    "llava-llama-clip-hd20": TinyConfig(seed=17, image_size=28, text_hidden=80, text_heads=4, text_kv_heads=2),
}

# Qwen2-VL / Qwen2.5-VL (tests/test_qwen2_vl.py): images up to 64 merged tokens, a 2-layer ViT;
# Qwen2.5-VL with 56-px windows (2x2 units) and its last block on full attention
_QWEN = dict(text_model="qwen2", vocab_size=300, text_hidden=64, text_heads=4, text_kv_heads=2, vision_hidden=32,
             vision_heads=2, vision_layers=2)
QWEN_VARIANTS = {
    "qwen2_vl": TinyConfig(seed=21, family="qwen2_vl", **_QWEN),
    "qwen2_5_vl": TinyConfig(seed=22, family="qwen2_5_vl", **_QWEN),
}
# The projector zoo and video families (tests/test_<family>.py)
ZOO_VARIANTS = {
    # Idefics2 (tests/test_idefics2.py): a ViT of 28-px images (4x4 patches), an MLP + 2-layer perceiver
    # with 4 latents per crop, Mistral; images split into 4 crops + the whole image, padded with pixel masks
    "idefics2": TinyConfig(seed=28, family="idefics2", image_size=28, patch_size=7, vocab_size=300, num_query_tokens=4),
    # mllama (tests/test_mllama.py): a tiled ViT of 28-px tiles (2x2 patches + CLS, up to 4 tiles), 3 local
    # + 2 gated global layers, Llama of 4 layers whose layers 1 and 3 cross-attend to the vision states
    "mllama": TinyConfig(seed=29, family="mllama", image_size=28, vocab_size=300),
    # Idefics3 / SmolVLM (tests/test_idefics3.py): a ViT of 28-px tiles (4x4 patches, 4 tokens after the
    # shuffle), images split up to 3x3 + a global tile, Llama
    "idefics3": TinyConfig(seed=26, family="idefics3", image_size=28, patch_size=7, vocab_size=400),
    "smolvlm": TinyConfig(seed=27, family="smolvlm", image_size=28, patch_size=7, vocab_size=400),
    # InternVL (tests/test_internvl.py): InternViT 28/7 (4x4 patches + CLS), pixel shuffle -> 4 tokens a
    # tile, up to 6 tiles + a thumbnail, Qwen2
    "internvl": TinyConfig(seed=25, family="internvl", text_model="qwen2", image_size=28, patch_size=7, vocab_size=300),
    # BLIP-2 (tests/test_blip2.py): BLIP ViT 28/14, a 2-layer Q-Former with 8 queries, OPT
    "blip2": TinyConfig(seed=24, family="blip2", text_model="opt", image_size=28),
    # LLaVA-OneVision (tests/test_llava_onevision.py): SigLIP 42/14 (3x3 tokens a tile, odd: pooling
    # interpolates), Qwen2, anyres_max_1 (every tiled image is downscaled)
    "llava_onevision": TinyConfig(seed=23, family="llava_onevision", text_model="qwen2", vision_model="siglip",
                                  vision_feature_layer=-1, vision_feature_select_strategy="full", image_size=42,
                                  vocab_size=300, onevision_max_tiles=1),
}


@dataclasses.dataclass
class Exported:
    name: str
    model: object  # transformers LlavaForConditionalGeneration
    processor: object  # transformers LlavaProcessor
    checkpoint: Path
    artifact: Path


@pytest.fixture(scope="session")
def exported_factory(tmp_path_factory):
    from vlmdeploy.export.exporter import export_model
    from vlmdeploy.export.tiny import build_tiny_checkpoint

    cache: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model, processor = build_tiny_checkpoint({**VARIANTS, **FAMILY_VARIANTS, **QWEN_VARIANTS, **ZOO_VARIANTS}[name],
                                                     root / "checkpoint")
            export_model(str(root / "checkpoint"), root / "artifact", log=lambda msg: None)
            cache[name] = Exported(name, model, processor, root / "checkpoint", root / "artifact")
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny(exported_factory) -> Exported:
    return exported_factory("mha-default-l2")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """The shipped shapes model exported as `make demo` does (the server tests share it)."""
    from vlmdeploy.runtime.cli import main

    out = tmp_path_factory.mktemp("serve-shapes") / "artifact"
    assert main(["export", "--model", "shapes", "--out", str(out)]) == 0
    return out


def preprocess_photos(wide: tuple[int, int] = (1000, 60), tall: tuple[int, int] = (90, 1200)) -> dict[str, Image.Image]:
    """The photos the *_preprocess.py files compare with HF's processors: odd, square, portrait, tiny and
    extreme-aspect sizes (`wide` / `tall` as (width, height))."""
    import skimage.data

    chelsea, coffee = Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())
    astronaut = Image.fromarray(skimage.data.astronaut())
    return {
        "chelsea": chelsea,  # 451x300: odd width
        "astronaut": astronaut,  # 512x512
        "portrait": coffee.transpose(Image.Transpose.TRANSPOSE),  # 400x600
        "tiny": chelsea.resize((20, 13)),
        "wide": astronaut.resize(wide),
        "tall": coffee.resize(tall),
    }


def photo(name: str = "chelsea", size: tuple[int, int] | None = None) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)())
    return img.resize(size) if size else img


def noise_image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def both_decoders(exp):
    """The exported model loaded once per decoder: decoder_gqa (ONNX Runtime's in-place KV) and the
    portable one (TensorRT's); a family test that expects both fails if the export dropped one."""
    from vlmdeploy.runtime.vlm import VLM

    decoders = VLM.load(exp.artifact, verify=False).facts.pipeline["decoders"]
    assert decoders == ["decoder_gqa", "decoder"]
    return [VLM.load(exp.artifact, decoder=d) for d in decoders]


def hf_generate_greedy(model, inputs, max_new_tokens: int) -> list[list[int]]:
    """HF `generate`, greedy, EOS off: each row's new tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    return [row.tolist() for row in out[:, inputs["input_ids"].shape[1]:]]


def hf_generate_batch(exp, prompts, images, max_new_tokens: int, nested: bool = True) -> list[list[int]]:
    """HF batch generate through the checkpoint's processor, left padding. `images`: one list per prompt;
    `nested`: passed as such (a prompt's images are one sample), else flattened in order."""
    exp.processor.tokenizer.padding_side = "left"
    given = (images if any(images) else None) if nested else ([i for row in images for i in row] or None)
    inputs = exp.processor(text=prompts, images=given, return_tensors="pt", padding=True)
    return hf_generate_greedy(exp.model, inputs, max_new_tokens)
