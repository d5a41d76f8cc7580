"""mllama (Llama-3.2-Vision) image tiles, aspect ratios, prompt text and cross-attention mask in numpy + Pillow.

Mirrors transformers 5.24 (``models/mllama``; MllamaImageProcessorPil, what transformers runs without
torchvision, and MllamaProcessor):

- ``preprocess_image``  one image -> its tiles: the canvas of whole tiles (at most ``max_image_tiles``) the
                        image fits best (``optimal_canvas``: the smallest upscale, else the largest
                        downscale; ties -> the smaller area), resized keeping its aspect ratio
                        (``fit_to_canvas``), zero-padded bottom/right (uint8, before the rescale), rescaled,
                        normalized, cut into tiles row by row.
- ``pack_images``       a batch's images -> pixel_values [B, I, T, 3, t, t] (missing images and tiles: 0.0),
                        aspect_ratio_ids [B, I] (1 + the (rows, cols) index in ``supported_aspect_ratios``;
                        0: no image), aspect_ratio_mask [B, I, T] (tile 0 always on).
- ``prompt_text``       build_string_from_input: BOS after the leading ``<|image|>`` tokens unless the text
                        holds BOS already.
- ``cross_attention_mask``  per token and image, which tiles the token reads: an image is read from its
                        ``<|image|>`` token up to the next image token (to the end for the last image; a run
                        of consecutive image tokens all read to where the run's last one stops).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .images import (HF_COMMON_FIELDS, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, NOT_COMMON, ImageError,
                     ProcessorParams, coerce_common_field, hf_common_fields, hf_normalized, rgb_pixels)

Pair = tuple[int, int]

HF_IMAGE_TYPES = tuple(f"MllamaImageProcessor{s}" for s in ("", "Fast", "Pil"))
IMAGE_TOKEN = "<|image|>"


@dataclass(frozen=True)
class MllamaParams(ProcessorParams):
    """An Mllama image processor's settings (defaults: transformers 5.24's class defaults)."""

    tile_size: int = 224  # size.height == size.width
    max_image_tiles: int = 4
    resample: int = 2  # PIL code; 2 = BILINEAR
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    image_token: str = IMAGE_TOKEN

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))

    @classmethod
    def from_hf(cls, image_processor: dict) -> "MllamaParams":
        """From ``preprocessor_config.json`` (or a 5.x ``processor_config.json``'s "image_processor")."""
        if not isinstance(image_processor, dict):
            raise ValueError(f"image processor config must be a dict, got {type(image_processor).__name__}")
        kind = image_processor.get("image_processor_type")
        if kind is not None and kind not in HF_IMAGE_TYPES:
            raise ValueError(f"image_processor_type {kind!r} is not Mllama's; allowed: {HF_IMAGE_TYPES}")
        for flag in ("do_resize", "do_pad"):
            if image_processor.get(flag, True) is not True:
                raise ValueError(f"{flag} must be true: MllamaImageProcessor supports no other mode")
        d = hf_common_fields(image_processor, tuple(k for k in HF_COMMON_FIELDS if k != "do_resize"))
        return cls(**_size(image_processor), **d, **_tiles(image_processor))

    @property
    def num_aspect_ratios(self) -> int:
        return len(supported_aspect_ratios(self.max_image_tiles))


# ---------------------------------------------------------------------------------------------
# Sizes (no pixels: the planner uses these)


@lru_cache(maxsize=16)
def supported_aspect_ratios(max_tiles: int) -> tuple[Pair, ...]:
    """Every (a, b) with a * b <= max_tiles, a outer: HF's get_all_supported_aspect_ratios."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def optimal_canvas(size: Pair, max_tiles: int, tile: int) -> Pair:
    """(h, w) of the tile canvas HF's get_optimal_tiled_canvas picks for an (h, w) image."""
    canvases = np.array(supported_aspect_ratios(max_tiles)) * tile  # [K, 2] (h, w)
    scale_h, scale_w = canvases[:, 0] / size[0], canvases[:, 1] / size[1]
    scales = np.where(scale_w > scale_h, scale_h, scale_w)
    up = scales[scales >= 1]
    chosen = canvases[scales == (np.min(up) if len(up) else np.max(scales[scales < 1]))]
    best = chosen[np.argmin(chosen[:, 0] * chosen[:, 1])] if len(chosen) > 1 else chosen[0]
    return int(best[0]), int(best[1])


def fit_to_canvas(size: Pair, canvas: Pair, tile: int) -> Pair:
    """(h, w) the image is resized to inside its canvas: HF's get_image_size_fit_to_canvas."""
    h, w = size
    target_w, target_h = np.clip(w, tile, canvas[1]), np.clip(h, tile, canvas[0])
    scale_h, scale_w = target_h / h, target_w / w
    if scale_w < scale_h:
        return int(min(math.floor(h * scale_w) or 1, target_h)), int(target_w)
    return int(target_h), int(min(math.floor(w * scale_h) or 1, target_w))


def tile_grid(size: Pair, p: MllamaParams) -> Pair:
    """(rows, cols) of tiles an (h, w) image becomes."""
    if size[0] < 1 or size[1] < 1:
        raise ImageError(f"cannot tile an empty image ({size[1]}x{size[0]} pixels)")
    ch, cw = optimal_canvas(tuple(size), p.max_image_tiles, p.tile_size)
    return ch // p.tile_size, cw // p.tile_size


def aspect_ratio_id(grid: Pair, max_tiles: int) -> int:
    """1 + the grid's index among the supported aspect ratios (0 means no image)."""
    return supported_aspect_ratios(max_tiles).index(tuple(grid)) + 1


# ---------------------------------------------------------------------------------------------
# Pixels


@dataclass(frozen=True)
class MllamaImage:
    """One preprocessed image."""

    tiles: np.ndarray  # [rows * cols, 3, t, t] float32
    grid: Pair  # (rows, cols)

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


def preprocess_image(image: Image.Image, p: MllamaParams) -> MllamaImage:
    """One PIL image -> its tiles (MllamaImageProcessorPil's resize, pad, rescale, normalize, split)."""
    pixels = rgb_pixels(image, p.do_convert_rgb)  # [H, W, 3] uint8
    grid = tile_grid(pixels.shape[:2], p)
    canvas = (grid[0] * p.tile_size, grid[1] * p.tile_size)
    h, w = fit_to_canvas(pixels.shape[:2], canvas, p.tile_size)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((w, h), resample=p.resample))
    padded = np.zeros((3, *canvas), np.uint8)  # HF pads the uint8 image with 0, then rescales
    padded[:, :h, :w] = resized.transpose(2, 0, 1)
    x = hf_normalized(padded, p)  # [3, H, W] float32
    t = p.tile_size
    tiles = x.reshape(3, grid[0], t, grid[1], t).transpose(1, 3, 0, 2, 4).reshape(-1, 3, t, t)
    return MllamaImage(np.ascontiguousarray(tiles), grid)


@dataclass(frozen=True)
class PackedImages:
    pixel_values: np.ndarray  # [B, I, T, 3, t, t] float32
    aspect_ratio_ids: np.ndarray  # [B, I] int64
    aspect_ratio_mask: np.ndarray  # [B, I, T] int64
    num_tiles: list[list[int]]  # [B][images of the row]


def pack_images(rows: Sequence[Sequence[MllamaImage]], max_tiles: int, num_images: int | None = None) -> PackedImages:
    """A batch's images, row by row, as HF stacks them: every row padded to the batch's image count
    (or `num_images`) with absent images, every image to `max_tiles` tiles, with 0.0."""
    num_images = max(len(r) for r in rows) if num_images is None else num_images
    shapes = [im.tiles.shape[1:] for r in rows for im in r]
    tile_shape = shapes[0] if shapes else (3, 1, 1)
    pixels = np.zeros((len(rows), num_images, max_tiles, *tile_shape), np.float32)
    ids = np.zeros((len(rows), num_images), np.int64)
    mask = np.zeros((len(rows), num_images, max_tiles), np.int64)
    mask[:, :, 0] = 1
    for b, row in enumerate(rows):
        for i, im in enumerate(row):
            pixels[b, i, :im.num_tiles] = im.tiles
            ids[b, i] = aspect_ratio_id(im.grid, max_tiles)
            mask[b, i, :im.num_tiles] = 1
    return PackedImages(pixels, ids, mask, [[im.num_tiles for im in r] for r in rows])


# ---------------------------------------------------------------------------------------------
# Prompt text and the cross-attention mask


def prompt_text(prompt: str, bos_token: str | None, image_token: str = IMAGE_TOKEN) -> str:
    """HF's build_string_from_input: BOS inserted after the leading image tokens unless already present."""
    if not bos_token or bos_token in prompt:
        return prompt
    n = 0
    while prompt.startswith(image_token):
        prompt, n = prompt[len(image_token):], n + 1
    return f"{image_token * n}{bos_token}{prompt}"


def image_spans(ids: Sequence[int], image_token_id: int) -> list[Pair]:
    """[start, end) of the tokens each image is read by (HF's get_cross_attention_token_mask, -1 resolved)."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(at, at[1:])] + [[at[-1], len(ids)]] if at else []
    end = len(ids)
    for span in reversed(spans):  # a run of adjacent image tokens reads to where the run's last one stops
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [tuple(s) for s in spans]


def cross_attention_mask(ids: Sequence[int], image_token_id: int, num_tiles: Sequence[int], max_tiles: int,
                         num_images: int | None = None) -> np.ndarray:
    """One row's mask [S, I, max_tiles] int64: 1 where token s reads tile k of image i."""
    spans = image_spans(ids, image_token_id)
    if len(spans) != len(num_tiles):
        raise ValueError(f"the prompt holds {len(spans)} {IMAGE_TOKEN} tokens but {len(num_tiles)} images were given")
    mask = np.zeros((len(ids), len(spans) if num_images is None else num_images, max_tiles), np.int64)
    for i, ((start, end), tiles) in enumerate(zip(spans, num_tiles)):
        mask[start:end, i, :tiles] = 1
    return mask


# ---------------------------------------------------------------------------------------------
# Fields and HF configs


def _coerce(name: str, value: Any) -> Any:
    common = coerce_common_field(name, value)
    if common is not NOT_COMMON:
        return common
    if name == "image_token":
        if not isinstance(value, str) or not value:
            raise ValueError(f"image_token must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")  # tile_size, max_image_tiles
    return int(value)


def _size(d: dict) -> dict:
    size = d.get("size")
    if size is None:
        return {}
    if not isinstance(size, dict) or not size.get("height") or size.get("height") != size.get("width"):
        raise ValueError(f'size must be {{"height": t, "width": t}} (square tiles), got {size!r}')
    return {"tile_size": size["height"]}


def _tiles(d: dict) -> dict:
    return {"max_image_tiles": d["max_image_tiles"]} if d.get("max_image_tiles") is not None else {}
