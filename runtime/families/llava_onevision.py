"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): anyres_max images, and video.

    image -> anyres tiles (one 384 tile when the prompt holds several images) -> vision -> projector
          -> base tile + the unpadded tile map, bilinear-downscaled to at most N tiles' worth
             (anyres_max_N), a newline after each row (runtime/onevision.py)
    video -> frames squashed to 384x384 -> vision -> projector [F, T, C] -> 2x2 bilinear pooling
          -> [F * ceil(side/2)^2, C] + one newline

The graphs are LLaVA's; the difference is data (the processor parameters, `image_newline`) and the
host-side packing. Images and videos share one vision run.

Visual-token compression (`pool` only: tiles are stitched and unpadded, so each must stay a grid):
    image -> every tile's side x side tokens pooled to a square s x s (K = s^2 per tile), then packed
             as HF packs a tower of s x s tokens per tile (unpadding, downscale, newlines on that grid)
    video -> each frame's tokens after OneVision's own 2x2 pooling pooled on to K (any rows x cols)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import onevision as ov
from ..compress import Compression, pool_grid
from ..video import FrameSampling
from ..images import parallel_map
from .base import Family, ImageTokens, MediaItem


class LlavaOnevision(Family):
    name = "llava_onevision"
    compression_methods = ("pool",)
    compression_refusal = ("each image's tiles are stitched into one map, unpadded to the image's aspect and "
                           "downscaled, with a newline per row: it needs a grid, so tiles are pooled to a square only")
    media_kinds = ("image", "video")

    def configure(self, preprocess: dict) -> None:
        self.image_params = ov.OnevisionImageParams.from_dict(preprocess["image"])
        self.video_params = ov.OnevisionVideoParams.from_dict(preprocess["video"])
        self.frame_sampling = FrameSampling(**preprocess.get("video_sampling", {"rule": "uniform"}))
        self.newline = self.tensors["image_newline"]  # [C]

    def check_compression(self, compression, scored):
        compression = super().check_compression(compression, scored)
        if compression is not None:  # ValueError for a count the tiles cannot pool to (frames: per video)
            self.pooled_side = pooled_side(self.image_params.tokens_side, compression)
        return compression

    def compressed(self, item: MediaItem) -> MediaItem:
        if item.kind == "video":
            grid = _frame_grid(self.image_params.tokens_side)
            h, w = pool_grid(grid, self.compression.tokens(grid))  # ValueError: a count a frame cannot pool to
            return replace(item, num_tokens=len(item.pixels) * h * w + 1, meta={**item.meta, "compressed": (h, w)})
        p = self.image_params
        tokens = ov.image_tokens(item.meta["image_size"], item.meta["grid"], self.pooled_side, p.max_num_patches)
        return replace(item, num_tokens=tokens, meta={**item.meta, "compressed": True})

    def pack_compressed(self, item, features, scores):
        """features [rows, side^2, C] -> image: each tile pooled to [s^2, C], packed on the pooled grid;
        video: each frame 2x2-pooled as uncompressed, then pooled to the frame grid for K, + the newline."""
        side = self.image_params.tokens_side
        if item.kind == "video":
            frames = ov.pool_video(features, side)  # [F, T', C]
            grid = _frame_grid(side)
            pool = Compression("pool", keep=int(np.prod(item.meta["compressed"])))
            pooled = np.concatenate([pool.apply(f, grid)[0] for f in frames])  # [F * K, C]
            return np.concatenate([pooled, self.newline[None]])
        square = Compression("pool", keep=self.pooled_side**2)
        tiles = np.stack([square.apply(f, (side, side))[0] for f in features])  # [rows, s^2, C]
        return ov.pack_image(tiles, item.meta["image_size"], item.meta["grid"], self.newline,
                             self.image_params.max_num_patches)

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
    def compressed_tokens(cls, preprocess, row, compression):
        p = ov.OnevisionImageParams.from_dict(preprocess["image"])
        if row.typical == "video":
            grid = _frame_grid(p.tokens_side)
            k = int(np.prod(pool_grid(grid, compression.tokens(grid))))
            return replace(row, tokens_per_tile=k, tokens=row.tiles * k + 1)
        s = pooled_side(p.tokens_side, compression)
        return replace(row, tokens_per_tile=s * s, tokens=ov.image_tokens(row.size, p.grid(row.size), s, p.max_num_patches))

    @classmethod
    def projector_extras(cls, text_hidden):
        return {"image_newline": text_hidden}


def pooled_side(side: int, compression: Compression) -> int:
    """The side s of the square each side x side tile is pooled to (K = s^2 tokens per tile)."""
    oh, ow = pool_grid((side, side), compression.tokens((side, side)))
    if oh != ow:
        raise ValueError(f"the llava_onevision family pools each {side}x{side}-token tile to a square; "
                         f"{compression.label()} gives {oh}x{ow}. Allowed tokens per tile: "
                         f"{[s * s for s in range(side, 0, -1)]}")
    return oh


def _frame_grid(side: int) -> tuple[int, int]:
    """A video frame's token grid after OneVision's 2x2 pooling (ceil(side / 2) per side)."""
    half = -(-side // 2)
    return half, half


FAMILY = LlavaOnevision
