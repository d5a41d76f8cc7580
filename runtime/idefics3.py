"""Idefics3 / SmolVLM image preprocessing, prompt text and vision patch positions in numpy + Pillow.

Mirrors transformers 5.24 (``models/idefics3``, ``models/smolvlm``: the two image processors and the two
processors' image prompts are the same code):

- ``preprocess_image``  Idefics3ImageProcessorPil / SmolVLMImageProcessorPil (what transformers runs without
                        torchvision), for ONE image: the longest edge resized to ``size`` (up or down, the other
                        side even), then with do_image_splitting both sides rounded up to multiples of the tile
                        and cut into rows x cols tiles + a global image (the whole squashed to one tile), without
                        it one squashed tile; rescale and normalize. Every tile is tile x tile, so HF's padding
                        only adds all-zero images (and masks) to prompts with fewer images than others.
- ``grid``              the (rows, cols) HF's processor reports, from (h, w) alone (0, 0: not split).
- ``image_prompt``      the processors' replacement of one ``<image>``: per tile
                        ``<fake_token_around_image><row_R_col_C>`` + ``<image>`` * image_seq_len, a newline after
                        each row, then ``\\n<fake_token_around_image><global-img>`` + ``<image>`` * image_seq_len +
                        ``<fake_token_around_image>``; an unsplit image is only the global part (no newlines).
- ``patch_positions``   the patch mask and position ids Idefics3Model.get_image_features / Idefics3VisionEmbeddings
                        compute from a pixel mask (unfold, bucketize), so the vision graph can take them as inputs
                        (``patch_position_ids`` is shared with Idefics2, whose patch mask rule differs).

The connector (not here: the projector graph) is ``Idefics3Connector.pixel_shuffle`` (scale_factor =
config.scale_factor, an int, 2 by default; SmolVLMConnector.pixel_shuffle is the same) then
``modality_projection`` (one bias-free Linear).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from .images import (ProcessorParams, HF_COMMON_FIELDS, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, NOT_COMMON, ImageError,
                     coerce_common_field, hf_common_fields, hf_normalized, rgb_pixels)

Pair = tuple[int, int]

MAX_IMAGE_SIZE = 4096  # HF caps the longest edge after the first resize here
HF_IMAGE_TYPES = tuple(f"{m}ImageProcessor{s}" for m in ("Idefics3", "SmolVLM") for s in ("", "Fast", "Pil"))
IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = "<image>", "<fake_token_around_image>", "<global-img>"


@dataclass(frozen=True)
class Idefics3Params(ProcessorParams):
    """An Idefics3 / SmolVLM image processor's settings (class defaults: transformers 5.24's; the two
    classes share them), the processor's image_seq_len and the image tokens.

    ``longest_edge`` is HF's ``size["longest_edge"]``, ``tile`` its ``max_image_size["longest_edge"]``
    (the vision tower's image_size).
    """

    longest_edge: int = 4 * 364
    tile: int = 364
    do_image_splitting: bool = True
    resample: int = 1  # PIL code; 1 = LANCZOS
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    image_seq_len: int = 169
    image_token: str = IMAGE_TOKEN
    fake_image_token: str = FAKE_IMAGE_TOKEN
    global_image_token: str = GLOBAL_IMAGE_TOKEN

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))

    @classmethod
    def from_hf(cls, image_processor: dict, processor: dict | None = None, model_config: dict | None = None,
                special_tokens: dict | None = None) -> Idefics3Params:
        """From ``preprocessor_config.json`` (or a 5.x ``processor_config.json``'s "image_processor"), the
        processor dict (image_seq_len), ``config.json`` and, for SmolVLM, the tokenizer's named tokens
        (image_token, fake_image_token, global_image_token); absent keys take HF's defaults."""
        ip, processor = _image_dict(image_processor), dict(processor or {})
        tokens = {k: v for k, v in (special_tokens or {}).items()
                  if k in ("image_token", "fake_image_token", "global_image_token")}
        params = cls(longest_edge=_edge(ip, "size", 4 * 364), tile=_edge(ip, "max_image_size", 364),
                     image_seq_len=processor.get("image_seq_len", 169), **_hf_common(ip), **tokens)
        if model_config:
            _check_model(params, model_config)
        return params



    # -- sizes (no pixels needed: the planner uses these) --------------------------------------

    def resized_size(self, image_size: Pair) -> Pair:
        """(h, w) after the first resize (longest edge to ``longest_edge``, capped at 4096)."""
        return longest_edge_size(image_size, self.longest_edge) if self.do_resize else tuple(image_size)

    def split_size(self, image_size: Pair) -> Pair:
        """(h, w) the image is cut from: both sides rounded up to multiples of the tile (splitting on)."""
        return vision_encoder_size(self.resized_size(image_size), self.tile)

    def grid(self, image_size: Pair) -> Pair:
        """(rows, cols) of tiles of an (h, w) image, as HF's processor reports them: (0, 0) when the
        image is one global tile only."""
        if not self.do_image_splitting:
            return 0, 0
        h, w = self.split_size(image_size)
        if h > self.tile or w > self.tile:
            return h // self.tile, w // self.tile
        return 0, 0

    def num_tiles(self, image_size: Pair) -> int:
        """Tiles the vision tower sees for one image: rows * cols + the global one."""
        rows, cols = self.grid(image_size)
        return rows * cols + 1

    def image_token_count(self, image_size: Pair) -> int:
        """``<image>`` tokens of one image (the prompt's other tokens depend on the tokenizer: tokenize
        ``image_prompt``)."""
        return self.image_seq_len * self.num_tiles(image_size)


def longest_edge_size(image_size: Pair, longest_edge: int) -> Pair:
    """HF's get_resize_output_image_size: the longest edge set to ``longest_edge`` (up or down), the other
    side int() of the aspect-ratio scaled one, made even; then both capped at MAX_IMAGE_SIZE."""
    h, w = image_size
    if h < 1 or w < 1:
        raise ImageError(f"cannot resize an empty image ({w}x{h} pixels)")
    aspect = w / h
    if w >= h:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(h, 1), max(w, 1)


def vision_encoder_size(image_size: Pair, tile: int) -> Pair:
    """HF's resize_for_vision_encoder: the longer side rounded up to a multiple of ``tile``, the other
    side int() of it over the aspect ratio, then rounded up too."""
    h, w = image_size
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    if h < 1 or w < 1:  # HF's resize would fail
        raise ImageError(f"a {image_size[1]}x{image_size[0]} image rounds to {w}x{h} tiles' pixels; its aspect ratio "
                         "is too extreme for Idefics3 image splitting (crop or pad it)")
    return h, w


def image_prompt(rows: int, cols: int, p: Idefics3Params) -> str:
    """The text that replaces one ``<image>``: the tiles row by row (a newline after each row), a blank
    line, then the global tile; (0, 0) is the global tile alone. HF's replace_image_token /
    get_image_prompt_string."""
    for name, value in (("rows", rows), ("cols", cols)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if (rows == 0) != (cols == 0):
        raise ValueError(f"rows and cols are both 0 (an unsplit image) or both >= 1, got ({rows}, {cols})")
    images = p.image_token * p.image_seq_len
    whole = f"{p.fake_image_token}{p.global_image_token}{images}{p.fake_image_token}"
    if rows == 0:
        return whole
    lines = ["".join(f"{p.fake_image_token}<row_{r + 1}_col_{c + 1}>{images}" for c in range(cols)) + "\n"
             for r in range(rows)]
    return "".join(lines) + "\n" + whole


# ---------------------------------------------------------------------------------------------
# Pixels


@dataclass(frozen=True)
class Idefics3Image:
    """One preprocessed image: HF's pixel_values and pixel_attention_mask rows for it."""

    pixels: np.ndarray  # [tiles, 3, tile, tile] float32: the grid row-major, then the global tile
    pixel_mask: np.ndarray  # [tiles, tile, tile] int64, 1 = image (every pixel: tiles are never padded)
    grid: Pair  # (rows, cols); (0, 0) when not split


def preprocess_image(image: Image.Image, p: Idefics3Params) -> Idefics3Image:
    """One PIL image -> Idefics3Image."""
    pixels = rgb_pixels(image, p.do_convert_rgb)  # [H, W, 3] uint8
    if p.do_resize:
        pixels = _resize(pixels, p.resized_size(pixels.shape[:2]), p.resample)
    tiles, grid = _split(pixels, p) if p.do_image_splitting else ([_resize(pixels, (p.tile, p.tile), p.resample)],
                                                                  (0, 0))
    out = np.stack([hf_normalized(t.transpose(2, 0, 1), p) for t in tiles])  # [n, 3, tile, tile]
    return Idefics3Image(out, np.ones((len(out), p.tile, p.tile), np.int64), grid)


def _split(pixels: np.ndarray, p: Idefics3Params) -> tuple[list[np.ndarray], Pair]:
    """[h, w, 3] -> (tiles [tile, tile, 3] uint8, (rows, cols)): resized to multiples of the tile, cut
    row-major, + the whole squashed to one tile; an image that fits one tile stays one."""
    pixels = _resize(pixels, vision_encoder_size(pixels.shape[:2], p.tile), p.resample)  # [R*t, C*t, 3]
    t = p.tile
    rows, cols = pixels.shape[0] // t, pixels.shape[1] // t
    if rows == cols == 1:
        return [pixels], (0, 0)
    tiles = [pixels[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(rows) for c in range(cols)]
    return tiles + [_resize(pixels, (t, t), p.resample)], (rows, cols)


def _resize(pixels: np.ndarray, size: Pair, resample: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8 with Pillow (HF's PIL backend; same size: a copy)."""
    h, w = size
    return np.asarray(Image.fromarray(pixels).resize((w, h), resample=resample))


# ---------------------------------------------------------------------------------------------
# Vision patch positions (Idefics3Model.get_image_features + Idefics3VisionEmbeddings.forward)


def patch_positions(pixel_mask: np.ndarray, patch_size: int, num_patches_per_side: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Pixel masks [N, H, W] (nonzero = image) -> (patch_attention_mask [N, H/P, W/P] bool, position_ids
    [N, H/P * W/P] int64), as HF computes them: a patch is on when any of its pixels is (remainder rows and
    columns dropped, as unfold); then ``patch_position_ids``. ``num_patches_per_side`` is
    vision_config.image_size // patch_size."""
    patch_mask = pixel_patches(pixel_mask, patch_size).any(axis=(2, 4))  # [N, h, w] bool
    return patch_mask, patch_position_ids(patch_mask, num_patches_per_side)


def patch_position_ids(patch_mask: np.ndarray, num_patches_per_side: int) -> np.ndarray:
    """Patch masks [N, h, w] bool -> position ids [N, h * w] int64, as the Idefics2 / Idefics3 vision
    embeddings compute them: each image's on-patch count down its first column and along its first row
    gives a step of 1/count; index * step, clamped below 1, is bucketized into num_patches_per_side
    buckets (float32, as torch); off patches get position 0."""
    side = _check_side(num_patches_per_side)
    boundaries = _torch_arange_f32(1 / side, 1.0, 1 / side)  # [side - 1]
    rows = _buckets(patch_mask[:, :, 0].sum(1), patch_mask.shape[1], boundaries)  # [N, h]
    cols = _buckets(patch_mask[:, 0, :].sum(1), patch_mask.shape[2], boundaries)  # [N, w]
    ids = rows[:, :, None] * side + cols[:, None, :]  # [N, h, w]
    return np.where(patch_mask, ids, 0).reshape(len(ids), -1)


def pixel_patches(pixel_mask: Any, patch_size: int) -> np.ndarray:
    """Pixel masks [N, H, W] -> [N, H/P, P, W/P, P] bool (nonzero = on), remainder rows and columns dropped
    as torch's unfold drops them."""
    mask = np.asarray(pixel_mask)
    if mask.ndim != 3 or mask.dtype.kind not in "biu":
        raise ValueError(f"pixel_mask must be [images, height, width] of integers or booleans, got {mask.dtype} "
                         f"{list(mask.shape)}")
    n, h, w = mask.shape
    ph, pw = h // patch_size, w // patch_size
    if ph < 1 or pw < 1:
        raise ValueError(f"pixel_mask of {w}x{h} pixels is smaller than one {patch_size}-pixel patch")
    return mask[:, :ph * patch_size, :pw * patch_size].reshape(n, ph, patch_size, pw, patch_size) != 0


def _buckets(counts: np.ndarray, length: int, boundaries: np.ndarray) -> np.ndarray:
    """[N] on-patch counts -> [N, length] bucket of index * (1 / count) in float32 (count 0: inf / nan,
    as torch; only off patches get those and they are masked to 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.float32(1.0) / counts.astype(np.float32)  # [N]
        coords = np.arange(length, dtype=np.float32)[None, :] * step[:, None]  # [N, length]
    coords = np.minimum(coords, np.float32(1.0 - 1e-6))
    return np.searchsorted(boundaries, coords, side="right").astype(np.int64)  # torch.bucketize(right=True)


def _torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """torch.arange(start, end, step) in float32 as torch's CPU kernel computes it on x86 (checked against
    torch 2.13 for every side 1..399): ceil((end - start) / step) values; blocks of 2 x 8 (two 8-wide
    vectors) from a float32 base = start + step * i plus j * step in float64, each rounded to float32;
    the tail start + step * i in float64, rounded. (Other vector widths, e.g. ARM's, round a few
    boundaries differently by one float32 ulp: so would HF there.)"""
    count = max(math.ceil((end - start) / step), 0)
    out = (start + step * np.arange(count, dtype=np.float64)).astype(np.float32)  # the scalar tail's rule
    blocked = count // 16 * 16
    bases = out[:blocked:8].astype(np.float64)  # [blocked / 8]: float32 bases
    out[:blocked] = (bases[:, None] + np.arange(8) * step).astype(np.float32).reshape(-1)
    return out


def _check_side(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"num_patches_per_side must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Fields and HF configs


def _coerce(name: str, value: Any) -> Any:
    common = coerce_common_field(name, value)
    if common is not NOT_COMMON:
        return common
    if name.endswith("_token"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")  # longest_edge, tile, image_seq_len
    return int(value)


def _image_dict(image_processor: Any) -> dict:
    if not isinstance(image_processor, dict):
        raise ValueError(f"image processor config must be a dict, got {type(image_processor).__name__}")
    kind = image_processor.get("image_processor_type")
    if kind is not None and kind not in HF_IMAGE_TYPES:
        raise ValueError(f"image_processor_type {kind!r} is not Idefics3's or SmolVLM's; allowed: {HF_IMAGE_TYPES}")
    return image_processor


def _edge(d: dict, key: str, default: int) -> int:
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, dict) or set(value) != {"longest_edge"}:
        raise ValueError(f'{key} must be {{"longest_edge": n}}, got {value!r}')
    return value["longest_edge"]


def _hf_common(d: dict) -> dict:
    """The flags and numbers HF's dict gives (and do_image_splitting)."""
    return hf_common_fields(d, (*HF_COMMON_FIELDS, "do_image_splitting"))


def _check_model(p: Idefics3Params, config: dict) -> None:
    """The tile is the vision tower's image_size, and image_seq_len its patches over scale_factor^2."""
    vision = config.get("vision_config") or {}
    image_size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
    if image_size != p.tile:
        raise ValueError(f"max_image_size is {p.tile} but the vision tower takes {image_size}x{image_size} "
                         "(vision_config.image_size)")
    scale = config.get("scale_factor", 2)
    want = int((image_size // patch) ** 2 / scale**2)
    if want != p.image_seq_len:
        raise ValueError(f"processor image_seq_len={p.image_seq_len} but the model makes {want} tokens per tile "
                         f"((image_size // patch_size)^2 / scale_factor^2 = ({image_size} // {patch})^2 / {scale}^2)")
