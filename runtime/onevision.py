"""LLaVA-OneVision image and video preprocessing, token counts and feature packing in numpy + Pillow.

Mirrors transformers 5.24 (``models/llava_onevision``):

- ``preprocess_image``  LlavaOnevisionImageProcessorPil (image_backend "pil", what transformers runs
                        without torchvision) or LlavaOnevisionImageProcessor (the torchvision one), for
                        ONE image: anyres tiles when the image is alone in its prompt, else (a prompt with
                        several images) one tile, the image padded to a square with the mean colour.
- ``image_tokens``      LlavaOnevisionProcessor's ``<image>`` expansion (_get_number_of_features, +1
                        newline for a multi-image tile), for a processor consistent with the model.
- ``pack_image``        LlavaOnevisionModel.pack_image_features: base tile, the tile grid stitched,
                        unpadded, bilinear-downscaled when over ``anyres_max_N`` tiles' worth, newlines.
- ``preprocess_video``  LlavaOnevisionVideoProcessor (torchvision only): each frame squashed to S x S.
- ``pool_video`` / ``video_tokens``  LlavaOnevisionModel.apply_pooling and the ``<video>`` expansion.

Single-image geometry (select_best_resolution, resize into the best resolution, centred zero pad, tiling)
is LLaVA-NeXT's, shared with anyres.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
from PIL import Image

from . import anyres
from .images import (ProcessorParams, HF_COMMON_FIELDS, NOT_COMMON, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, coerce_common_field,
                     hf_common_fields, hf_normalized, rgb_pixels, to_rgb)
from .resize_aa import resize_uint8_aa

Pair = tuple[int, int]

# LlavaOnevisionImageProcessor.image_grid_pinpoints: 1..6 x 1..6 tiles of 384, row-major.
ONEVISION_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
HF_IMAGE_TYPES = ("LlavaOnevisionImageProcessor", "LlavaOnevisionImageProcessorPil",
                  "LlavaOnevisionImageProcessorFast")
HF_VIDEO_TYPES = ("LlavaOnevisionVideoProcessor",)
BACKENDS = ("pil", "torchvision")


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class OnevisionImageParams(ProcessorParams):
    """A LLaVA-OneVision image processor's settings (class defaults: transformers 5.24's) plus the
    model's ``vision_aspect_ratio`` and the vision tower's patch size.

    ``tile`` is HF's ``size`` (height == width, or shortest_edge): the side of every tile and of the
    base image. ``image_backend``: "pil" as LlavaOnevisionImageProcessorPil, "torchvision" as
    LlavaOnevisionImageProcessor with torchvision installed (torch's antialiased resize, fused
    rescale+normalize).
    """

    grid_pinpoints: tuple[Pair, ...] = ONEVISION_PINPOINTS
    tile: int = 384
    resample: int = 3  # PIL code; 3 = BICUBIC
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    patch_size: int = 14
    vision_aspect_ratio: str = "anyres_max_9"
    image_backend: str = "pil"

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        object.__setattr__(self, "grid_pinpoints", _pinpoints(self.grid_pinpoints))
        _ = self.anyres  # checks: pinpoints a whole number of tiles
        max_patches(self.vision_aspect_ratio)
        if self.image_backend == "torchvision" and self.resample not in (2, 3):
            raise ValueError(f"image_backend 'torchvision' resizes with bilinear (2) or bicubic (3) resampling, "
                             f"got resample={self.resample}; use image_backend 'pil' for other filters")

    @classmethod
    def from_hf(cls, image_processor: dict, processor: dict | None = None,
                model_config: dict | None = None, image_backend: str = "pil") -> OnevisionImageParams:
        """From ``preprocessor_config.json`` (or a 5.x ``processor_config.json``'s "image_processor"),
        the processor dict (num_image_tokens, vision_feature_select_strategy, vision_aspect_ratio) and
        ``config.json``; absent keys take HF's class defaults. Raises ValueError where they disagree
        in a way that makes HF's model refuse the processor's tokens."""
        ip, processor, model_config = _image_dict(image_processor), dict(processor or {}), dict(model_config or {})
        vision = _vision_config(model_config)
        params = cls(
            grid_pinpoints=ip.get("image_grid_pinpoints") or ONEVISION_PINPOINTS,
            tile=_hf_tile(ip.get("size"), ip.get("crop_size"), ip.get("do_center_crop")),
            patch_size=vision["patch_size"],
            vision_aspect_ratio=model_config.get("vision_aspect_ratio", "anyres_max_9"),
            image_backend=image_backend,
            **_hf_common(ip, cls),
        )
        _check_model(params, ip, processor, model_config, vision)
        return params



    @property
    def tokens_side(self) -> int:
        """Feature tokens per tile side: tile / patch_size (27 for SigLIP 384/14)."""
        return self.tile // self.patch_size

    @property
    def max_num_patches(self) -> int:
        return max_patches(self.vision_aspect_ratio)

    @property
    def anyres(self) -> anyres.AnyresParams:
        """The LLaVA-NeXT parameters with the same single-image pixels (no crop: tiles are ``tile``); only
        its pixel geometry is used."""
        return anyres.AnyresParams(
            grid_pinpoints=self.grid_pinpoints, crop_size=(self.tile, self.tile), shortest_edge=None,
            size_hw=(self.tile, self.tile), resample=self.resample, do_convert_rgb=self.do_convert_rgb,
            do_resize=self.do_resize, do_center_crop=False, do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor, do_normalize=self.do_normalize, image_mean=self.image_mean,
            image_std=self.image_std, patch_size=self.tile,  # tokens are counted here (384 // 14 = 27, floored)
            vision_feature_select_strategy="full")

    def grid(self, image_size: Pair) -> Pair:
        """(rows, cols) of anyres tiles for an (h, w) image."""
        h, w = anyres.select_best_resolution(image_size, self.grid_pinpoints)
        return h // self.tile, w // self.tile

    def image_tokens(self, image_size: Pair, multi_image: bool = False) -> int:
        """``<image>`` tokens of one (h, w) image (no pixels needed: the planner uses this)."""
        grid = None if multi_image else self.grid(image_size)
        return image_tokens(image_size, grid, self.tokens_side, self.max_num_patches)


@dataclass(frozen=True)
class OnevisionVideoParams(ProcessorParams):
    """A LlavaOnevisionVideoProcessor's settings (class defaults: transformers 5.24's). Frames are
    squashed to ``size`` x ``size`` (no aspect kept) by torchvision's resize."""

    size: int = 384
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if self.do_resize and self.resample not in (2, 3):
            raise ValueError(f"video frames are resized as torchvision does, with bilinear (2) or bicubic (3) "
                             f"resampling; got resample={self.resample}")

    @classmethod
    def from_hf(cls, video_processor: dict) -> OnevisionVideoParams:
        """From ``video_preprocessor_config.json`` (or a 5.x processor_config.json's "video_processor")."""
        vp = dict(video_processor or {})
        kind = vp.get("video_processor_type")
        if kind is not None and kind not in HF_VIDEO_TYPES:
            raise ValueError(f"video_processor_type {kind!r} is not LLaVA-OneVision's; allowed: {HF_VIDEO_TYPES}")
        return cls(size=_hf_tile(vp.get("size"), vp.get("crop_size"), vp.get("do_center_crop")), **_hf_common(vp, cls))




def max_patches(vision_aspect_ratio: str) -> int:
    """"anyres_max_9" -> 9 (HF: ``int(s.strip("anyres_max_"))``)."""
    m = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio) if isinstance(vision_aspect_ratio, str) else None
    if not m or int(m.group(1)) < 1:
        raise ValueError(f'vision_aspect_ratio must be "anyres_max_N" with N >= 1, got {vision_aspect_ratio!r}')
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class OnevisionImage:
    """One preprocessed image: HF's ``pixel_values[i][:tiles]``, ``image_sizes[i]`` and the tile grid."""

    pixels: np.ndarray  # [1 + rows * cols, 3, S, S] float32 (anyres) or [1, 3, S, S] (multi-image)
    image_size: Pair  # (h, w) of the original image
    grid: Pair | None  # (rows, cols) of tiles; None for a multi-image tile


def preprocess_image(image: Image.Image, p: OnevisionImageParams, multi_image: bool = False) -> OnevisionImage:
    """One PIL image -> OnevisionImage. ``multi_image``: the image shares its prompt with others (HF's
    batch_num_images > 1): one tile, padded to a square with the mean colour, no grid."""
    pixels = rgb_pixels(image, p.do_convert_rgb)  # [h, w, 3] uint8
    if multi_image:
        tiles, grid = [_square_tile(pixels, p)], None
    else:
        tiles, grid = anyres.image_tiles(pixels, p.anyres, _resizer(p.image_backend)), p.grid(pixels.shape[:2])
    out = np.stack([hf_normalized(t.transpose(2, 0, 1), p, p.image_backend) for t in tiles])  # [n, 3, S, S]
    return OnevisionImage(out, pixels.shape[:2], grid)


def _square_tile(pixels: np.ndarray, p: OnevisionImageParams) -> np.ndarray:
    """[h, w, 3] -> [S, S, 3] uint8: pad to a square with int(mean * 255), centred (extra pixel
    bottom/right), then resize. Mirrors the processors' pad_to_square and per-tile resize."""
    h, w = pixels.shape[:2]
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[:] = [int(m * 255) for m in p.image_mean]
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = pixels
    if not p.do_resize:
        if side != p.tile:
            raise ImageError(f"a {w}x{h} image pads to {side}x{side}, but do_resize is off and the vision tower "
                             f"takes {p.tile}x{p.tile}; turn do_resize on or give {p.tile}-pixel square images")
        return out
    return _resizer(p.image_backend)(out, (p.tile, p.tile), p.resample)


def _resizer(backend: str):
    return resize_uint8_aa if backend == "torchvision" else anyres._pil_resize


# ---------------------------------------------------------------------------------------------
# Image tokens and packing (LlavaOnevisionProcessor / LlavaOnevisionModel)


def packed_grid(image_size: Pair, grid: Pair, tokens_side: int, max_num_patches: int) -> tuple[Pair, Pair, Pair]:
    """The feature map of an anyres image: ((top, bottom), (left, right)) of the unpadded part of the
    stitched [rows * side, cols * side] map, and (h, w) after the downscale (the unpadded size when
    not over max_num_patches tiles by more than 10%; h may be 0, for a sliver of an image)."""
    rows, cols = _check_grid(grid)
    bounds = anyres.unpad_bounds(image_size, (rows * tokens_side, cols * tokens_side))
    (top, bottom), (left, right) = bounds
    h, w = bottom - top, right - left
    ratio = math.sqrt(h * w / (max_num_patches * tokens_side**2))
    if ratio > 1.1:  # an unpadded map of 0 rows (a 1-pixel sliver of an image) stays empty, as in HF
        h, w = int(h // ratio), int(w // ratio)
        if h < 1 or w < 1:  # HF's interpolate would fail
            raise ImageError(f"a {image_size[1]}x{image_size[0]} image downscales to a {w}x{h} feature map; "
                             "its aspect ratio is too extreme for LLaVA-OneVision (crop or pad it)")
    return bounds[0], bounds[1], (h, w)


def image_tokens(image_size: Pair, grid: Pair | None, tokens_side: int, max_num_patches: int = 9) -> int:
    """``<image>`` tokens of one image: base tile side^2 + the (unpadded, maybe downscaled) map + one
    newline per map row; a multi-image tile (grid None): side^2 + 1 newline."""
    if grid is None:
        return tokens_side**2 + 1
    _, _, (h, w) = packed_grid(image_size, grid, tokens_side, max_num_patches)
    return tokens_side**2 + h * w + h


def pack_image(features: np.ndarray, image_size: Pair, grid: Pair | None, newline: np.ndarray,
               max_num_patches: int = 9) -> np.ndarray:
    """[1 + rows * cols, T, C] projector output of one image -> [image_tokens, C].

    Base tile, then the tiles stitched into one map, unpadded, bilinear-downscaled when
    sqrt(h * w / (max_num_patches * T)) > 1.1, a newline after each row. A multi-image tile
    ([1, T, C], grid None): its T tokens and a newline. Mirrors LlavaOnevisionModel.pack_image_features.
    """
    features, newline = _check_features(features, grid, newline)
    if grid is None:
        return np.concatenate([features[0], newline[None]])
    side = math.isqrt(features.shape[1])
    (top, bottom), (left, right), size = packed_grid(image_size, grid, side, max_num_patches)
    fmap = _stitch(features[1:], grid, side)[top:bottom, left:right]  # [h, w, C]
    if size != fmap.shape[:2]:
        fmap = bilinear(fmap, size)  # [h', w', C]
    rows = np.broadcast_to(newline, (fmap.shape[0], 1, newline.shape[0]))  # [h', 1, C]
    fmap = np.concatenate([fmap, rows], axis=1)  # [h', w' + 1, C]
    return np.concatenate([features[0], fmap.reshape(-1, fmap.shape[-1])])


def _stitch(tiles: np.ndarray, grid: Pair, side: int) -> np.ndarray:
    """[rows * cols, side * side, C] -> [rows * side, cols * side, C], tiles placed row-major."""
    rows, cols = grid
    x = tiles.reshape(rows, cols, side, side, -1).transpose(0, 2, 1, 3, 4)  # [rows, side, cols, side, C]
    return x.reshape(rows * side, cols * side, -1)


def bilinear(x: np.ndarray, size: Pair) -> np.ndarray:
    """[..., H, W, C] float -> [..., h, w, C], as torch's ``F.interpolate(mode="bilinear",
    align_corners=False)`` on a CPU (no antialias: a downscale reads only the two nearest rows and
    columns), in torch's float32 order: h0 * (w0 * x00 + w1 * x01) + h1 * (w0 * x10 + w1 * x11)."""
    (h0, h1, hw0, hw1), (w0, w1, ww0, ww1) = _taps(x.shape[-3], size[0]), _taps(x.shape[-2], size[1])
    y = x.astype(np.float32, copy=False)

    def row(index):  # [..., h, w, C]: one source row per output row, interpolated along W
        r = np.take(y, index, -3)
        return np.take(r, w0, -2) * ww0[:, None] + np.take(r, w1, -2) * ww1[:, None]

    return (row(h0) * hw0[:, None, None] + row(h1) * hw1[:, None, None]).astype(x.dtype, copy=False)


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
    """(first source index, second, their float32 weights) per output index, as torch computes them."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)  # float scale, double index
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)  # [out]
    lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    return i0, np.minimum(i0 + 1, in_size - 1), np.float32(1) - lam, lam


def _check_grid(grid: Any) -> Pair:
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, (int, np.integer)) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be (rows, cols) of tiles, each >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


def _check_features(features: Any, grid: Pair | None, newline: Any) -> tuple[np.ndarray, np.ndarray]:
    features, newline = np.asarray(features), np.asarray(newline)
    if features.ndim != 3:
        raise ValueError(f"features must be [tiles, tokens, channels], got shape {features.shape}")
    side = math.isqrt(features.shape[1])
    if side * side != features.shape[1]:
        raise ValueError(f"features have {features.shape[1]} tokens per tile; a tile's tokens are a square "
                         "(side x side) grid")
    tiles = 1 if grid is None else 1 + math.prod(_check_grid(grid))
    if features.shape[0] != tiles:
        raise ValueError(f"features for a {grid} tile grid must have {tiles} tiles (incl. the base image), "
                         f"got {features.shape[0]}")
    if newline.shape != (features.shape[2],):
        raise ValueError(f"newline must be [{features.shape[2]}] (the feature channels), got {newline.shape}")
    return features, newline.astype(features.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Videos (LlavaOnevisionVideoProcessor / LlavaOnevisionModel.get_video_features)


def preprocess_video(frames: np.ndarray | Sequence[Image.Image], p: OnevisionVideoParams) -> np.ndarray:
    """Frames (uint8 [F, H, W, 3] or PIL images) -> pixel_values_videos [F, 3, S, S] float32: each
    frame squashed to S x S by torch's antialiased resize, then the fused rescale+normalize."""
    frames = _frames(frames)  # [F, H, W, 3] uint8
    if not p.do_resize and frames.shape[1:3] != (p.size, p.size):
        raise ImageError(f"frames are {frames.shape[2]}x{frames.shape[1]}, but do_resize is off and the vision "
                         f"tower takes {p.size}x{p.size}")
    out = np.empty((len(frames), 3, p.size, p.size), np.float32)
    for i, frame in enumerate(frames):
        x = resize_uint8_aa(frame, (p.size, p.size), p.resample) if p.do_resize else frame
        out[i] = hf_normalized(x.transpose(2, 0, 1), p, "torchvision")
    return out


def pool_video(features: np.ndarray, side: int) -> np.ndarray:
    """[F, side * side, C] -> [F, ceil(side / 2)^2, C]: each frame's feature map bilinear-resized to
    ceil(side / 2) on a side. Mirrors LlavaOnevisionModel.apply_pooling."""
    features = np.asarray(features)
    if features.ndim != 3 or features.shape[1] != side * side:
        raise ValueError(f"video features must be [frames, {side}*{side}, channels], got {features.shape}")
    half = -(-side // 2)
    grid = features.reshape(len(features), side, side, -1)  # [F, side, side, C]
    return bilinear(grid, (half, half)).reshape(len(features), half * half, -1)


def video_tokens(frames: int, tokens_side: int) -> int:
    """``<video>`` tokens: frames * ceil(side / 2)^2 pooled tokens + ONE newline for the whole video."""
    return frames * (-(-tokens_side // 2)) ** 2 + 1


def _frames(frames: Any) -> np.ndarray:
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, Image.Image) for f in frames):
        frames = [np.asarray(to_rgb(f)) for f in frames]
        if len({f.shape for f in frames}) > 1:
            raise ImageError(f"all frames of a video must have one size, got {sorted({f.shape for f in frames})}")
        frames = np.stack(frames)
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        what = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ImageError(f"a video is a uint8 array [frames, height, width, 3] (RGB) or a list of PIL images, "
                         f"got {what}")
    if 0 in frames.shape:
        raise ImageError(f"a video array has an empty dimension: {list(frames.shape)}")
    return frames


# ---------------------------------------------------------------------------------------------
# Fields and HF configs


def _coerce(name: str, value: Any) -> Any:
    if name == "image_backend":
        if value not in BACKENDS:
            raise ValueError(f"image_backend must be one of {BACKENDS}, got {value!r}")
        return value
    common = coerce_common_field(name, value)
    if common is not NOT_COMMON:
        return common
    if name in ("tile", "size", "patch_size"):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return int(value)
    return value


def _pinpoints(value: Any) -> tuple[Pair, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"grid_pinpoints must be a non-empty list of (height, width), got {value!r}")
    return tuple(tuple(int(v) for v in pp) if isinstance(pp, (list, tuple)) and len(pp) == 2 else pp
                 for pp in value)


def _image_dict(image_processor: Any) -> dict:
    if not isinstance(image_processor, dict):
        raise ValueError(f"image processor config must be a dict, got {type(image_processor).__name__}")
    kind = image_processor.get("image_processor_type")
    if kind is not None and kind not in HF_IMAGE_TYPES:
        raise ValueError(f"image_processor_type {kind!r} is not LLaVA-OneVision's; allowed: {HF_IMAGE_TYPES}")
    return image_processor


def _hf_common(d: dict, cls) -> dict:
    """The shared flags and numbers of ``cls`` that HF's dict gives."""
    return hf_common_fields(d, tuple(k for k in HF_COMMON_FIELDS if k in {f.name for f in fields(cls)}))


def _hf_tile(size: Any, crop_size: Any, do_center_crop: Any) -> int:
    """HF's ``size`` -> the square tile side. {"height": h, "width": h} or {"shortest_edge": s}; a
    center crop is not supported (LLaVA-OneVision checkpoints have none)."""
    if do_center_crop:
        raise ValueError("do_center_crop is on; LLaVA-OneVision preprocessing here supports no center crop "
                         "(its checkpoints set none)")
    size = {"height": 384, "width": 384} if size is None else size
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        side = size["shortest_edge"]
    elif isinstance(size, dict) and set(size) == {"height", "width"} and size["height"] == size["width"]:
        side = size["height"]
    else:
        raise ValueError(f'size must be {{"height": s, "width": s}} (square) or {{"shortest_edge": s}}, got {size!r}')
    if crop_size is not None and (crop_size.get("height"), crop_size.get("width")) != (side, side):
        raise ValueError(f"crop_size {crop_size} differs from size {size}; HF would cut {crop_size}-pixel tiles "
                         "the model cannot stitch. Remove crop_size")
    return side


def _vision_config(model_config: dict) -> dict:
    """The vision tower's image_size and patch_size: LlavaOnevisionConfig's SigLIP defaults (384, 14) when
    there is no vision_config; a given one must state both (SiglipVisionConfig's own defaults differ)."""
    vision = model_config.get("vision_config")
    if vision is None:
        return {"image_size": 384, "patch_size": 14}
    if "image_size" not in vision or "patch_size" not in vision:
        raise ValueError(f"vision_config must give image_size and patch_size, got keys {sorted(vision)}")
    return vision


def _check_model(p: OnevisionImageParams, ip: dict, processor: dict, model_config: dict, vision: dict) -> None:
    """What makes HF's model and processor agree on the features of an image."""
    image_size = vision["image_size"]
    if image_size != p.tile:
        raise ValueError(f"image tiles are {p.tile}x{p.tile} but the vision tower takes {image_size}x{image_size}")
    model_pinpoints = model_config.get("image_grid_pinpoints")
    if model_pinpoints is not None and _pinpoints(model_pinpoints) != p.grid_pinpoints:
        raise ValueError(f"image processor grid_pinpoints {p.grid_pinpoints} differ from the model config's "
                         f"image_grid_pinpoints {_pinpoints(model_pinpoints)}")
    if processor and processor.get("vision_aspect_ratio", "anyres_max_9") != p.vision_aspect_ratio:
        raise ValueError(f"processor vision_aspect_ratio {processor.get('vision_aspect_ratio')!r} (absent: "
                         "'anyres_max_9') differs from the "
                         f"model's {p.vision_aspect_ratio!r}")
    n = processor.get("num_image_tokens")
    drop = processor.get("vision_feature_select_strategy") == "default"
    if n is not None and (math.isqrt(n) != p.tokens_side or n - drop != p.tokens_side**2):
        strategy = processor.get("vision_feature_select_strategy")
        raise ValueError(f"processor num_image_tokens={n} (strategy {strategy!r}) "
                         f"does not match the tower's {p.tokens_side}x{p.tokens_side} tokens per tile "
                         f"(image_size {image_size} / patch_size {p.patch_size})")
