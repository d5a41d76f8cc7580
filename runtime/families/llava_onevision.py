"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres_max images, and video.

    image -> anyres tiles (one 384 tile when the prompt holds several images) -> vision -> projector
          -> base tile + the unpadded tile map, bilinear-downscaled to at most N tiles' worth
             (anyres_max_N), a newline after each row (runtime/onevision.py)
    video -> frames squashed to 384x384 -> vision -> projector [F, T, C] -> 2x2 bilinear pooling
          -> [F * ceil(side/2)^2, C] + one newline

The graphs are LLaVA's; the difference is data (the processor parameters, `image_newline`) and the
host-side packing. Images and videos share one vision run.
"""

from __future__ import annotations

import numpy as np

from .. import onevision as ov
from ..video import FrameSampling
from ..images import parallel_map
from .base import Family, ImageTokens, MediaItem


class LlavaOnevision(Family):
    name = "llava_onevision"
    compression_refusal = "its anyres tiles are pooled and unpadded by the family's own rules; not supported yet"
    media_kinds = ("image", "video")

    def configure(self, preprocess: dict) -> None:
        self.image_params = ov.OnevisionImageParams.from_dict(preprocess["image"])
        self.video_params = ov.OnevisionVideoParams.from_dict(preprocess["video"])
        self.frame_sampling = FrameSampling(**preprocess.get("video_sampling", {"rule": "uniform"}))
        self.newline = self.tensors["image_newline"]  # [C]

    def prepare(self, image, multi_image: bool = False) -> MediaItem:
        out = ov.preprocess_image(image, self.image_params, multi_image)  # [1 + tiles, 3, S, S]
        p = self.image_params
        tokens = ov.image_tokens(out.image_size, out.grid, p.tokens_side, p.max_num_patches)
        return MediaItem(out.pixels, tokens, {"image_size": out.image_size, "grid": out.grid})

    def prepare_images(self, images, **options) -> list[MediaItem]:
        """HF's processor tiles an image only when it is its prompt's one image."""
        return parallel_map(lambda image: self.prepare(image, multi_image=len(images) > 1, **options), images)

    def prepare_video(self, frames, fps=None, **options) -> MediaItem:
        pixels = ov.preprocess_video(frames, self.video_params)  # [F, 3, S, S]
        return MediaItem(pixels, ov.video_tokens(len(pixels), self.image_params.tokens_side), kind="video")

    def pack(self, item: MediaItem, features: np.ndarray) -> np.ndarray:
        """features [rows, T, C] -> [num_tokens, C]."""
        if item.kind == "video":
            pooled = ov.pool_video(features, self.image_params.tokens_side)  # [F, T', C]
            return np.concatenate([pooled.reshape(-1, pooled.shape[-1]), self.newline[None]])
        return ov.pack_image(features, item.meta["image_size"], item.meta["grid"], self.newline,
                             self.image_params.max_num_patches)

    # -- planning -----------------------------------------------------------------------------

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        p = ov.OnevisionImageParams.from_dict(preprocess["image"])
        sizes = list(image_sizes) or [(p.tile, p.tile), max(p.grid_pinpoints, key=lambda s: s[0] * s[1])]
        rows = tuple(ImageTokens(tuple(s), 1 + p.grid(s)[0] * p.grid(s)[1], p.tokens_side**2, p.image_tokens(s),
                                 typical="" if image_sizes else "typical") for s in sizes)
        rule = (f"LLaVA-OneVision anyres_max_{p.max_num_patches}: {p.tile}x{p.tile} tiles of {p.tokens_side**2} "
                f"tokens, the tile map unpadded and downscaled to at most {p.max_num_patches} tiles' worth, + 1 "
                "newline per row; an image sharing its prompt with others: one tile + 1 newline")
        return rows, rule

    @classmethod
    def video_tokens(cls, preprocess, frames, size):
        p = ov.OnevisionImageParams.from_dict(preprocess["image"])
        per_frame = (-(-p.tokens_side // 2)) ** 2
        side = preprocess["video"]["size"]
        return ImageTokens(tuple(size), frames, per_frame, ov.video_tokens(frames, p.tokens_side), resolution=(side, side),
                           typical="video")

    @classmethod
    def projector_extras(cls, text_hidden):
        return {"image_newline": text_hidden}


FAMILY = LlavaOnevision
