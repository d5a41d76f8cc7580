"""Preprocessing throughput: this runtime's numpy + Pillow preprocessing vs Hugging Face's image
processors (their PIL backends, what transformers runs without torchvision), on the same photos,
images per second, one thread each, in one process (median of N rounds). The last column is ours on
the three photos as one call's images (`parallel_map`, what `generate` does with several images of a
prompt: one thread per core of this process).

    .venv/bin/python scripts/preprocess_speed.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import skimage.data
from PIL import Image


def photos() -> list[Image.Image]:
    """Three real photos at phone-ish sizes (non-square)."""
    return [Image.fromarray(skimage.data.chelsea()).resize((1280, 853)),
            Image.fromarray(skimage.data.astronaut()).resize((1024, 1024)),
            Image.fromarray(skimage.data.coffee()).resize((800, 600))]


def cases():
    """(name, ours(image), hf(image)) per family's processor at its published geometry."""
    import transformers

    from vlmdeploy.runtime import anyres, internvl, idefics3, onevision, qwen_images
    from vlmdeploy.runtime.images import ImagePreprocessor

    clip = transformers.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours_clip = ImagePreprocessor.from_hf_config(clip.to_dict())
    next_hf = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                                      image_grid_pinpoints=[list(p) for p in anyres.LLAVA_V16_PINPOINTS])
    next_p = anyres.AnyresParams.from_hf(next_hf.to_dict(), {"patch_size": 14}, {"vision_config": {"image_size": 336, "patch_size": 14}})
    qwen_hf = transformers.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=1003520)
    qwen = qwen_images.QwenVLPreprocessor.from_dict(qwen_hf.to_dict())
    ivl_hf = transformers.GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, max_patches=12, crop_to_patches=True)
    ivl = internvl.InternVLParams.from_hf(ivl_hf.to_dict(), {"image_seq_length": 256})
    ide_hf = transformers.Idefics3ImageProcessorPil(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364})
    ide = idefics3.Idefics3Params.from_hf(ide_hf.to_dict())
    ov_hf = transformers.LlavaOnevisionImageProcessorPil()
    ov = onevision.OnevisionImageParams.from_hf(ov_hf.to_dict())
    return [
        ("CLIP 336 (LLaVA-1.5)", lambda im: ours_clip([im]), lambda im: clip(images=[im], return_tensors="np")),
        ("LLaVA-NeXT anyres 336", lambda im: anyres.preprocess(im, next_p), lambda im: next_hf(images=[im], return_tensors="np")),
        ("Qwen2-VL (<= 1M px)", lambda im: qwen.image(im), lambda im: qwen_hf(images=[im], return_tensors="np")),
        ("InternVL 448 x <= 12", lambda im: internvl.preprocess_image(im, ivl), lambda im: ivl_hf(images=[im], crop_to_patches=True, return_tensors="np")),
        ("Idefics3 364 tiles", lambda im: idefics3.preprocess_image(im, ide), lambda im: ide_hf(images=[[im]], return_tensors="np")),
        ("LLaVA-OneVision 384", lambda im: onevision.preprocess_image(im, ov), lambda im: ov_hf(images=[im], return_tensors="np")),
    ]


def rate(fn, images, rounds: int, parallel: bool = False) -> float:
    from vlmdeploy.runtime.images import parallel_map

    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        if parallel:
            parallel_map(fn, images)
        else:
            for im in images:
                fn(im)
        times.append(time.perf_counter() - t)
    return len(images) / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    images = photos()
    print("| processor | ours images/s | HF images/s | ours / HF | ours, one call of 3 (parallel) | that / HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ours, hf in cases():
        ours(images[0]), hf(images[0])  # warm up
        r_ours, r_hf, r_par = rate(ours, images, a.rounds), rate(hf, images, a.rounds), rate(ours, images, a.rounds, True)
        print(f"| {name} | {r_ours:.1f} | {r_hf:.1f} | {r_ours / r_hf:.2f}x | {r_par:.1f} | {r_par / r_hf:.2f}x |")


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    np.seterr(all="ignore")
    main()
