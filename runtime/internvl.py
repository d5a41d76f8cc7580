"""InternVL image preprocessing and ``<image>`` prompt text in numpy + Pillow (no torch, no transformers).

Mirrors transformers 5.24:

- ``preprocess_image``  GotOcr2ImageProcessorPil (image_backend "pil", what transformers runs without
                        torchvision) or GotOcr2ImageProcessor (the torchvision one): with crop_to_patches
                        (InternVLProcessor always passes it), the image is resized to a cols x rows canvas of
                        tiles whose aspect ratio is closest to the image's (min_patches..max_patches tiles),
                        cut into tiles row-major, then a thumbnail (the whole image resized to one tile) when
                        there is more than one tile; each tile rescaled and normalized.
- ``tile_grid`` / ``num_tiles``  get_optimal_tiled_canvas / get_number_of_image_patches, from (h, w) alone.
- ``image_prompt``      InternVLProcessor.replace_image_token: what replaces one image placeholder
                        (``<IMG_CONTEXT>`` in the text HF's chat template writes) in the prompt:
                        ``<img>`` + ``<IMG_CONTEXT>`` * (image_seq_length * tiles) + ``</img>``.
- ``preprocess_video`` / ``video_prompt``  InternVLVideoProcessor (torchvision only: each frame squashed to one
                        tile, no tiling) and InternVLProcessor.replace_video_token (one line per frame,
                        ``Frame{i}: <img>...</img>``). Frame sampling (initial_shift) is not here.

The model (not here: the projector graph) turns each tile's vision features into image_seq_length tokens:
InternVLModel.get_image_features drops the CLS token, reshapes to a square map, ``InternVLModel.pixel_shuffle``
(scale_factor = config.downsample_ratio), then InternVLMultiModalProjector (LayerNorm, Linear, act, Linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from .images import (ProcessorParams, HF_COMMON_FIELDS, NOT_COMMON, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, coerce_common_field,
                     hf_common_fields, hf_normalized, rgb_pixels)
from .resize_aa import resize_uint8_aa

Pair = tuple[int, int]

HF_IMAGE_TYPES = ("GotOcr2ImageProcessor", "GotOcr2ImageProcessorPil", "GotOcr2ImageProcessorFast")
HF_VIDEO_TYPES = ("InternVLVideoProcessor",)
BACKENDS = ("pil", "torchvision")
# The tokenizer's extra_special_tokens in the InternVL -hf checkpoints (and HF's conversion script).
START_IMAGE_TOKEN, END_IMAGE_TOKEN, CONTEXT_IMAGE_TOKEN = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclass(frozen=True)
class InternVLParams(ProcessorParams):
    """A GotOcr2 image processor's settings (class defaults: transformers 5.24's), InternVLProcessor's
    image_seq_length and the image tokens.

    ``tile`` is HF's ``size`` as (height, width). ``crop_to_patches`` defaults to true: InternVLProcessor
    passes crop_to_patches=True on every call, whatever the image processor's own (false) default.
    ``image_backend``: "pil" as GotOcr2ImageProcessorPil, "torchvision" as GotOcr2ImageProcessor with
    torchvision installed (torch's antialiased resize, fused rescale+normalize).
    """

    tile: Pair = (384, 384)
    crop_to_patches: bool = True
    min_patches: int = 1
    max_patches: int = 12
    resample: int = 3  # PIL code; 3 = BICUBIC
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    image_seq_length: int = 256
    start_image_token: str = START_IMAGE_TOKEN
    end_image_token: str = END_IMAGE_TOKEN
    context_image_token: str = CONTEXT_IMAGE_TOKEN
    image_backend: str = "pil"

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if self.min_patches > self.max_patches:
            raise ValueError(f"min_patches ({self.min_patches}) is over max_patches ({self.max_patches}); HF would "
                             "silently use one tile. Set min_patches <= max_patches")
        if self.image_backend == "torchvision" and self.resample not in (2, 3):
            raise ValueError(f"image_backend 'torchvision' resizes with bilinear (2) or bicubic (3) resampling, "
                             f"got resample={self.resample}; use image_backend 'pil' for other filters")

    @classmethod
    def from_hf(cls, image_processor: dict, processor: dict | None = None, model_config: dict | None = None,
                image_backend: str = "pil", special_tokens: dict | None = None) -> InternVLParams:
        """From ``preprocessor_config.json`` (or a 5.x ``processor_config.json``'s "image_processor"), the
        processor dict (image_seq_length), ``config.json`` and the tokenizer's ``extra_special_tokens``
        (start_image_token, end_image_token, context_image_token); absent keys take HF's defaults.
        ``crop_to_patches`` is InternVLProcessor's (true). Raises ValueError where the model would refuse
        the processor's tokens."""
        ip, processor = _image_dict(image_processor), dict(processor or {})
        tokens = {k: v for k, v in (special_tokens or {}).items()
                  if k in ("start_image_token", "end_image_token", "context_image_token")}
        params = cls(tile=_hf_tile(ip.get("size")), image_backend=image_backend,
                     image_seq_length=processor.get("image_seq_length", 256), **_hf_common(ip), **tokens)
        if model_config:
            _check_model(params, model_config)
        return params

    @classmethod
    def from_hf_video(cls, video_processor: dict, processor: dict | None = None,
                      special_tokens: dict | None = None) -> InternVLParams:
        """From ``video_preprocessor_config.json`` (or a 5.x processor_config.json's "video_processor"): frames
        are one tile each (no tiling), resized and normalized as torchvision does."""
        vp = dict(video_processor or {})
        kind = vp.get("video_processor_type")
        if kind is not None and kind not in HF_VIDEO_TYPES:
            raise ValueError(f"video_processor_type {kind!r} is not InternVL's; allowed: {HF_VIDEO_TYPES}")
        if vp.get("do_center_crop"):
            raise ValueError("do_center_crop is on; InternVL video preprocessing here supports no center crop")
        common = {k: v for k, v in _hf_common(vp).items() if k not in ("min_patches", "max_patches")}
        image = cls.from_hf({"size": vp.get("size"), **common}, processor, image_backend="torchvision",
                            special_tokens=special_tokens)
        return cls.from_dict({**image.to_dict(), "crop_to_patches": False})



    @property
    def tiles_on(self) -> bool:
        """Whether images are cut into tiles (the PIL backend also needs max_patches > 1)."""
        return self.crop_to_patches and (self.max_patches > 1 or self.image_backend == "torchvision")

    def grid(self, image_size: Pair) -> Pair:
        """(rows, cols) of tiles of an (h, w) image; (1, 1) when it is not tiled."""
        if not self.tiles_on:
            return 1, 1
        cols, rows = tile_grid(image_size, self.tile, self.min_patches, self.max_patches)
        return rows, cols

    def num_tiles(self, image_size: Pair) -> int:
        """Tiles (incl. the thumbnail) of an (h, w) image: the planner's count, no pixels needed."""
        return num_tiles(self.grid(image_size))

    def image_tokens(self, image_size: Pair) -> int:
        """Prompt tokens that replace one image: <img>, image_seq_length per tile, </img>."""
        return self.image_seq_length * self.num_tiles(image_size) + 2


def supported_grids(min_patches: int, max_patches: int) -> list[Pair]:
    """(cols, rows) with min <= cols * rows <= max, stably sorted by tile count (HF's
    get_all_supported_aspect_ratios: cols outer, rows inner, then sorted by product)."""
    grids = [(c, r) for c in range(1, max_patches + 1) for r in range(1, max_patches + 1)
             if min_patches <= c * r <= max_patches]
    return sorted(grids, key=lambda g: g[0] * g[1])


def tile_grid(image_size: Pair, tile: Pair, min_patches: int, max_patches: int) -> Pair:
    """(cols, rows) of the canvas whose aspect ratio is closest to an (h, w) image's. On a tie the later
    (more tiles) grid wins while the image's area is over half the canvas's. HF's get_optimal_tiled_canvas,
    operation for operation (float64 ratios, exact equality on ties)."""
    h, w = image_size
    if h < 1 or w < 1:
        raise ImageError(f"cannot tile an empty image ({w}x{h} pixels)")
    aspect, area = w / h, w * h
    best, best_diff = (1, 1), float("inf")
    for grid in supported_grids(min_patches, max_patches):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile[0] * tile[1] * grid[0] * grid[1]:
            best = grid
    return best


def num_tiles(grid: Pair) -> int:
    """rows * cols tiles, plus the thumbnail when that is more than one."""
    n = grid[0] * grid[1]
    return n + 1 if n > 1 else n


def image_prompt(num_tiles: int, p: InternVLParams) -> str:
    """The text that replaces one image placeholder: <img><IMG_CONTEXT>*(seq * tiles)</img>."""
    if isinstance(num_tiles, bool) or not isinstance(num_tiles, (int, np.integer)) or num_tiles < 1:
        raise ValueError(f"num_tiles must be a positive integer, got {num_tiles!r}")
    return p.start_image_token + p.context_image_token * (p.image_seq_length * int(num_tiles)) + p.end_image_token


def video_prompt(num_frames: int, p: InternVLParams) -> str:
    """The text that replaces one ``<video>``: one line per frame, ``Frame{i}: <img>`` + image_seq_length
    context tokens + ``</img>``, joined by newlines (no trailing one)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    return "\n".join(f"Frame{i + 1}: {image_prompt(1, p)}" for i in range(num_frames))


def preprocess_video(frames: np.ndarray | list[Image.Image], p: InternVLParams) -> np.ndarray:
    """Frames (uint8 [F, H, W, 3] or PIL images) -> pixel_values [F, 3, tile_h, tile_w] float32: each frame
    one tile, as InternVLVideoProcessor (torchvision's resize, fused rescale+normalize). ``p`` from
    ``InternVLParams.from_hf_video``."""
    if p.image_backend != "torchvision" or p.crop_to_patches:
        raise ValueError("video frames are preprocessed as torchvision does, one tile each: use params from "
                         "InternVLParams.from_hf_video (image_backend 'torchvision', crop_to_patches off)")
    return np.stack([hf_normalized(_whole(f, p).transpose(2, 0, 1), p, p.image_backend) for f in _frames(frames, p)])  # [F, 3, th, tw]


def _frames(frames: Any, p: InternVLParams) -> list[np.ndarray]:
    if isinstance(frames, (list, tuple)) and frames:
        return [rgb_pixels(f, p.do_convert_rgb) for f in frames]
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        what = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ImageError(f"a video is a uint8 array [frames, height, width, 3] (RGB) or a non-empty list of PIL "
                         f"images, got {what}")
    if 0 in frames.shape:
        raise ImageError(f"a video array has an empty dimension: {list(frames.shape)}")
    return list(frames)


# ---------------------------------------------------------------------------------------------
# Pixels


def preprocess_image(image: Image.Image, p: InternVLParams) -> np.ndarray:
    """One PIL image -> pixel_values [tiles, 3, tile_h, tile_w] float32 (tiles row-major, then the
    thumbnail), HF's pixel_values for this image."""
    pixels = rgb_pixels(image, p.do_convert_rgb)  # [H, W, 3] uint8
    tiles = _tiles(pixels, p) if p.tiles_on else [_whole(pixels, p)]
    return np.stack([hf_normalized(t.transpose(2, 0, 1), p, p.image_backend) for t in tiles])  # [n, 3, th, tw]


def _tiles(pixels: np.ndarray, p: InternVLParams) -> list[np.ndarray]:
    """[H, W, 3] -> rows * cols tiles [th, tw, 3] (+ the thumbnail), uint8. The canvas resize happens
    whatever do_resize says (as HF's crop_image_to_patches)."""
    (th, tw), resize = p.tile, _resizer(p.image_backend)
    rows, cols = p.grid(pixels.shape[:2])
    canvas = resize(pixels, (rows * th, cols * tw), p.resample)  # [rows*th, cols*tw, 3]
    tiles = [canvas[r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(resize(pixels, p.tile, p.resample))
    return tiles


def _whole(pixels: np.ndarray, p: InternVLParams) -> np.ndarray:
    """[H, W, 3] -> [th, tw, 3]: one tile, the image resized (or, with do_resize off, as given)."""
    if p.do_resize:
        return _resizer(p.image_backend)(pixels, p.tile, p.resample)
    if pixels.shape[:2] != p.tile:
        raise ImageError(f"a {pixels.shape[1]}x{pixels.shape[0]} image with do_resize and crop_to_patches off "
                         f"must already be {p.tile[1]}x{p.tile[0]} (the vision tower's size)")
    return pixels


def _pil_resize(pixels: np.ndarray, size: Pair, resample: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8 with Pillow (HF's PIL backend; same size: a copy)."""
    h, w = size
    return np.asarray(Image.fromarray(pixels).resize((w, h), resample=resample))


def _tv_resize(pixels: np.ndarray, size: Pair, resample: int) -> np.ndarray:
    """torchvision's resize: unchanged at the same size, else torch's antialiased uint8 kernel."""
    return pixels if pixels.shape[:2] == tuple(size) else resize_uint8_aa(pixels, size, resample)


def _resizer(backend: str):
    return _tv_resize if backend == "torchvision" else _pil_resize


# ---------------------------------------------------------------------------------------------
# Fields and HF configs


def _coerce(name: str, value: Any) -> Any:
    if name == "image_backend":
        if value not in BACKENDS:
            raise ValueError(f"image_backend must be one of {BACKENDS}, got {value!r}")
        return value
    common = coerce_common_field(name, value, flags=("crop_to_patches",))
    if common is not NOT_COMMON:
        return common
    if name == "tile":
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not all(_positive_int(v) for v in value)):
            raise ValueError(f"tile must be (height, width), two positive integers, got {value!r}")
        return int(value[0]), int(value[1])
    if name.endswith("_token"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        return value
    if not _positive_int(value):  # min_patches, max_patches, image_seq_length
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1


def _image_dict(image_processor: Any) -> dict:
    if not isinstance(image_processor, dict):
        raise ValueError(f"image processor config must be a dict, got {type(image_processor).__name__}")
    kind = image_processor.get("image_processor_type")
    if kind is not None and kind not in HF_IMAGE_TYPES:
        raise ValueError(f"image_processor_type {kind!r} is not InternVL's (GotOcr2); allowed: {HF_IMAGE_TYPES}")
    return image_processor


def _hf_common(d: dict) -> dict:
    """The flags and numbers HF's dict gives (and min/max_patches). crop_to_patches is not read:
    InternVLProcessor passes true."""
    return hf_common_fields(d, (*HF_COMMON_FIELDS, "min_patches", "max_patches"))


def _hf_tile(size: Any) -> Pair:
    if size is None:
        return 384, 384
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        return size["height"], size["width"]
    raise ValueError(f'size must be {{"height": h, "width": w}} (the tile), got {size!r}')


def _check_model(p: InternVLParams, config: dict) -> None:
    """The tile is the vision tower's image_size and image_seq_length is its tokens after the pixel
    shuffle: (image_size / patch_size)^2 * downsample_ratio^2."""
    vision = config.get("vision_config") or {}
    image_size = _pair(vision.get("image_size", (448, 448)))
    patch = _pair(vision.get("patch_size", (14, 14)))
    if image_size != p.tile:
        raise ValueError(f"image tiles are {p.tile[1]}x{p.tile[0]} but the vision tower takes "
                         f"{image_size[1]}x{image_size[0]} (vision_config.image_size)")
    ratio = config.get("downsample_ratio", 0.5)
    want = int((image_size[0] // patch[0]) * (image_size[1] // patch[1]) * ratio**2)
    if want != p.image_seq_length:
        raise ValueError(f"processor image_seq_length={p.image_seq_length} but the model makes {want} tokens per "
                         f"tile ((image_size / patch_size)^2 * downsample_ratio^2 = "
                         f"{image_size[0] // patch[0]}*{image_size[1] // patch[1]}*{ratio}^2)")
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("vision_feature_select_strategy must be 'default' (the CLS token dropped, a square "
                         f"map left), got {config.get('vision_feature_select_strategy')!r}")
    if not math.isclose(1 / ratio, round(1 / ratio)):
        raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {ratio}")


def _pair(value: Any) -> Pair:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))
