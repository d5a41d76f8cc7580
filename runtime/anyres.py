"""LLaVA-NeXT ("anyres") image handling in numpy + Pillow (no torch, no transformers).

Mirrors transformers 5.24, bit for bit:

- ``preprocess``        LlavaNextImageProcessorPil (the PIL backend: what ``LlavaNextImageProcessor``
                        resolves to without torchvision) for ONE image, without the batch padding
                        of the tile axis (``_pad_for_batching``), which the model drops anyway.
- ``num_image_tokens``  LlavaNextProcessor._get_number_of_features (the number of ``<image>``
                        tokens one image expands into, incl. one newline token per feature row).
- ``pack_features``     LlavaNextModel.pack_image_features (base tile, then the unpadded tile
                        grid with ``image_newline`` after each row).

The layout of one image's ``pixel_values`` is ``[1 + gh * gw, 3, t, t]``: the whole image squashed
to ``t x t`` first, then the tiles of the best grid resolution in row-major order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .images import ImageError, center_crop, check_number, check_triple, hf_crop, shortest_edge_size, to_rgb

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_V16_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
RESAMPLE_CODES = (0, 1, 2, 3, 4, 5)  # PIL: nearest, lanczos, bilinear, bicubic, box, hamming
_HF_TYPES = {f"LlavaNextImageProcessor{s}" for s in ("", "Fast", "Pil")}
# transformers' CLIPVisionConfig defaults (a vision_config dict without these keys gets them) and
# LlavaNextConfig's vision_config when there is none at all.
_CLIP_VISION_DEFAULT = (224, 32)
_LLAVA_NEXT_VISION_DEFAULT = (336, 14)

Pair = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass(frozen=True)
class AnyresParams:
    """Everything a runtime needs from a LLaVA-NeXT checkpoint's image processor, processor and
    model configs. Defaults are the llava-hf llava-v1.6 checkpoints' values (not HF's class
    defaults: ``from_hf`` applies those to absent keys).

    ``grid_pinpoints``/``crop_size``/sizes are (h, w). ``do_pad`` is HF's batch padding of the
    tile axis (kept for completeness; ``preprocess`` returns one image unpadded).
    ``vision_feature_select_strategy``/``vision_feature_layer`` are the model config's (the
    runtime's vision encoder uses them); ``image_token_index`` is the model's ``<image>`` id.
    """

    grid_pinpoints: tuple[Pair, ...] = LLAVA_V16_PINPOINTS
    crop_size: Pair = (336, 336)
    shortest_edge: int | None = 336  # size={"shortest_edge": n} ...
    size_hw: Pair | None = None  # ... or size={"height": h, "width": w} (exactly one)
    resample: int = 3  # PIL code; 3 = BICUBIC
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_pad: bool = True
    patch_size: int = 14
    vision_feature_select_strategy: str = "default"
    vision_feature_layer: int | tuple[int, ...] = -2
    image_token: str = "<image>"
    image_token_index: int = 32000

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        _check_geometry(self)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, image_processor: dict | None, processor: dict | None,
                model_config: dict | None) -> AnyresParams:
        """From the dicts ``save_pretrained`` writes, with HF class defaults for absent keys.

        image_processor: ``preprocessor_config.json`` (4.x layout) or None/{} to use the
            ``"image_processor"`` dict nested in ``processor`` (5.x ``processor_config.json``).
        processor: ``processor_config.json`` (patch_size, vision_feature_select_strategy,
            num_additional_image_tokens, image_token).
        model_config: ``config.json`` (image_grid_pinpoints, vision_config, strategy, layer).

        Raises ValueError where the three disagree in a way that makes HF's own model fail
        (token count != feature count, tile size != vision image size, ...).
        """
        processor, model_config = dict(processor or {}), dict(model_config or {})
        ip = _image_processor_dict(image_processor, processor)
        vision_size, vision_patch = _vision_geometry(model_config)
        size = _hf_size(ip.get("size", {"shortest_edge": 224}))
        params = cls(
            grid_pinpoints=ip.get("image_grid_pinpoints", [list(p) for p in LLAVA_V16_PINPOINTS]),
            crop_size=hf_crop(ip.get("crop_size", {"height": 224, "width": 224})),
            shortest_edge=size.get("shortest_edge"),
            size_hw=(size["height"], size["width"]) if "height" in size else None,
            resample=ip.get("resample", 3),
            do_convert_rgb=_hf_flag(ip, "do_convert_rgb"),
            do_resize=_hf_flag(ip, "do_resize"),
            do_center_crop=_hf_flag(ip, "do_center_crop"),
            do_rescale=_hf_flag(ip, "do_rescale"),
            rescale_factor=ip.get("rescale_factor", 1 / 255),
            do_normalize=_hf_flag(ip, "do_normalize"),
            image_mean=_hf_triple(ip.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=_hf_triple(ip.get("image_std", OPENAI_CLIP_STD)),
            do_pad=_hf_flag(ip, "do_pad"),
            patch_size=processor.get("patch_size") or vision_patch,
            vision_feature_select_strategy=model_config.get("vision_feature_select_strategy",
                                                            "default"),
            vision_feature_layer=model_config.get("vision_feature_layer", -2),
            image_token=processor.get("image_token", "<image>"),
            image_token_index=model_config.get(
                "image_token_index", model_config.get("image_token_id", 32000)),
        )
        _check_against_model(params, model_config, vision_size, vision_patch)
        _check_processor_count(processor)
        return params

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> AnyresParams:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown anyres keys {unknown}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**d)

    # -- derived -----------------------------------------------------------------------------

    @property
    def tile_side(self) -> int:
        """Side of the square the padded image is cut into (HF's get_image_patches patch_size)."""
        return self.crop_size[0]

    @property
    def tile_hw(self) -> Pair:
        """(h, w) of every pixel_values tile (what HF's processor reads off pixel_values)."""
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize:
            return self.size_hw or (self.shortest_edge, self.shortest_edge)
        return (self.tile_side, self.tile_side)

    @property
    def tokens_per_tile(self) -> int:
        """Feature tokens per tile after the select strategy: (tile / patch)^2."""
        th, tw = self.tile_hw
        return (th // self.patch_size) * (tw // self.patch_size)


# ---------------------------------------------------------------------------------------------
# Geometry (image_processing_utils.select_best_resolution / get_patch_output_size)


def select_best_resolution(original_size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> Pair:
    """(h, w) of the pinpoint that keeps most of the image's pixels, then wastes least.
    Mirrors transformers.image_processing_utils.select_best_resolution."""
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in pinpoints:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (int(height), int(width))
    return best_fit


def patch_output_size(original_size: Pair, target: Pair) -> Pair:
    """(h, w) the image is resized to inside ``target`` (aspect kept, the fitted side ceil'ed).
    Mirrors transformers.image_processing_utils.get_patch_output_size."""
    (oh, ow), (th, tw) = original_size, target
    scale_w, scale_h = tw / ow, th / oh
    if scale_w < scale_h:
        return min(math.ceil(oh * scale_w), th), tw
    return th, min(math.ceil(ow * scale_h), tw)


def grid_shape(image_size: Pair, p: AnyresParams) -> Pair:
    """(rows, cols) of tiles. Mirrors modeling_llava_next.get_anyres_image_grid_shape."""
    h, w = select_best_resolution(image_size, p.grid_pinpoints)
    return h // p.tile_side, w // p.tile_side


def num_tiles(image_size: Pair, p: AnyresParams) -> int:
    """Tiles incl. the base image. Mirrors modeling_llava_next.image_size_to_num_patches."""
    h, w = select_best_resolution(image_size, p.grid_pinpoints)
    return math.ceil(h / p.tile_side) * math.ceil(w / p.tile_side) + 1


# ---------------------------------------------------------------------------------------------
# Preprocessing (LlavaNextImageProcessorPil)


def preprocess(image: Image.Image, p: AnyresParams) -> tuple[np.ndarray, Pair]:
    """-> (pixel_values [num_tiles, 3, th, tw] float32, base image first; (h, w) of the image).

    Equal to HF's ``pixel_values[i][:num_tiles]`` and ``image_sizes[i]`` for this image.
    Mirrors LlavaNextImageProcessorPil._preprocess (one image, no batch padding).
    """
    pixels = _rgb_pixels(image, p)  # [h, w, 3] uint8
    tiles = image_tiles(pixels, p)  # num_tiles x [*, *, 3] uint8
    out = np.stack([_finish_tile(t, p).transpose(2, 0, 1) for t in tiles])  # [n, 3, th, tw]
    return out.astype(np.float32, copy=False), pixels.shape[:2]


def image_tiles(pixels: np.ndarray, p: AnyresParams, resize=None) -> list[np.ndarray]:
    """[h, w, 3] uint8 -> [base, tile_0_0, tile_0_1, ...] uint8, before the per-tile transforms.
    Mirrors LlavaNextImageProcessorPil.get_image_patches (LLaVA-OneVision's is the same code).
    ``resize(pixels, (h, w), resample)``: Pillow's (the default), or resize_aa's for HF's
    torchvision backend."""
    resize = resize or _pil_resize
    best = select_best_resolution(pixels.shape[:2], p.grid_pinpoints)
    resized = resize(pixels, patch_output_size(pixels.shape[:2], best), p.resample)
    padded = _pad_centered(resized, best)  # [best_h, best_w, 3]
    base = resize(pixels, p.size_hw or (p.shortest_edge,) * 2, p.resample)
    return [base] + _divide(padded, p.tile_side)


def _finish_tile(tile: np.ndarray, p: AnyresParams) -> np.ndarray:
    """[h, w, 3] uint8 -> [th, tw, 3]: resize, center crop, rescale, normalize, as HF's loop."""
    if p.do_resize:
        h, w = tile.shape[:2]
        tile = _pil_resize(tile, p.size_hw or shortest_edge_size(h, w, p.shortest_edge), p.resample)
    if p.do_center_crop:
        tile = center_crop(tile, p.crop_size)
    if p.do_rescale:
        tile = (tile.astype(np.float64) * p.rescale_factor).astype(np.float32)  # as HF rescale
    if p.do_normalize:
        x = tile if np.issubdtype(tile.dtype, np.floating) else tile.astype(np.float32)
        tile = (x - np.asarray(p.image_mean, x.dtype)) / np.asarray(p.image_std, x.dtype)
    return tile


def _rgb_pixels(image: Image.Image, p: AnyresParams) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image is empty ({image.width}x{image.height} pixels)")
    if p.do_convert_rgb:
        return np.asarray(to_rgb(image))
    if image.mode != "RGB":
        raise ImageError(f"image has mode {image.mode!r} but do_convert_rgb is off; only RGB is allowed")
    return np.asarray(image)


def _pil_resize(pixels: np.ndarray, size_hw: Pair, resample: int) -> np.ndarray:
    """[h, w, 3] uint8 -> [H, W, 3] uint8 through Pillow, as HF's image_transforms.resize."""
    h, w = size_hw
    return np.asarray(Image.fromarray(pixels).resize((w, h), resample=resample))


def _pad_centered(pixels: np.ndarray, target: Pair) -> np.ndarray:
    """Zero-pad [h, w, C] to target, extra pixel bottom/right. Mirrors _pad_for_patching."""
    (h, w), (th, tw) = pixels.shape[:2], target
    top, r_y = divmod(th - h, 2)
    left, r_x = divmod(tw - w, 2)
    return np.pad(pixels, ((top, top + r_y), (left, left + r_x), (0, 0)))


def _divide(pixels: np.ndarray, side: int) -> list[np.ndarray]:
    """Row-major tiles of side x side. Mirrors image_transforms.divide_to_patches."""
    h, w = pixels.shape[:2]
    return [pixels[i : i + side, j : j + side] for i in range(0, h, side) for j in range(0, w, side)]


# ---------------------------------------------------------------------------------------------
# Token count (LlavaNextProcessor) and feature packing (LlavaNextModel)


def num_image_tokens(image_size: Pair, p: AnyresParams) -> int:
    """Number of ``<image>`` tokens one image expands into: base tile + unpadded grid + one
    newline per grid row. Mirrors LlavaNextProcessor._get_number_of_features (for a processor
    config consistent with the model: ``from_hf`` checks that)."""
    th, tw = p.tile_hw
    best_h, best_w = select_best_resolution(image_size, p.grid_pinpoints)
    rows, cols = th // p.patch_size, tw // p.patch_size
    grid = (rows * (best_h // th), cols * (best_w // tw))  # feature grid before unpadding
    (top, bottom), (left, right) = unpad_bounds(image_size, grid)
    unpadded_h, unpadded_w = bottom - top, right - left
    return unpadded_h * unpadded_w + unpadded_h + rows * cols


def unpad_bounds(original_size: Pair, current: Pair) -> tuple[Pair, Pair]:
    """((top, bottom), (left, right)) of the image inside a padded feature grid, with HF's
    ``int(round(x, 7))``. Mirrors modeling_llava_next.unpad_image (and the processor's copy)."""
    (oh, ow), (ch, cw) = original_size, current
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return (pad, ch - pad), (0, cw)
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return (0, ch), (pad, cw - pad)


def pack_features(features: np.ndarray, image_size: Pair, p: AnyresParams,
                  image_newline: np.ndarray) -> np.ndarray:
    """[num_tiles, T, C] projector output of one image -> [num_image_tokens, C].

    Base tile's T tokens, then the tile grid stitched into one feature map, unpadded, with
    ``image_newline`` [C] after every row. Mirrors LlavaNextModel.pack_image_features.
    """
    features = np.asarray(features)
    _check_features(features, image_size, p)
    newline = np.asarray(image_newline).astype(features.dtype, copy=False)  # [C]
    grid = _stitch(features[1:], grid_shape(image_size, p), p.tile_side // p.patch_size)  # [H, W, C]
    (top, bottom), (left, right) = unpad_bounds(image_size, grid.shape[:2])
    grid = grid[top:bottom, left:right]  # [h, w, C]
    rows = np.broadcast_to(newline, (grid.shape[0], 1, newline.shape[0]))  # [h, 1, C]
    grid = np.concatenate([grid, rows], axis=1)  # [h, w + 1, C]
    return np.concatenate([features[0], grid.reshape(-1, grid.shape[-1])], axis=0)


def _stitch(tiles: np.ndarray, grid: Pair, side: int) -> np.ndarray:
    """[gh * gw, side * side, C] -> [gh * side, gw * side, C], tiles placed row-major."""
    gh, gw = grid
    c = tiles.shape[-1]
    x = tiles.reshape(gh, gw, side, side, c).transpose(0, 2, 1, 3, 4)  # [gh, side, gw, side, C]
    return x.reshape(gh * side, gw * side, c)


def _check_features(features: np.ndarray, image_size: Pair, p: AnyresParams) -> None:
    if features.ndim != 3:
        raise ValueError(f"features must be [num_tiles, tokens, channels], got shape {features.shape}")
    n, t = num_tiles(image_size, p), p.tokens_per_tile
    if features.shape[:2] != (n, t):
        raise ValueError(
            f"features for a {image_size[0]}x{image_size[1]} (h x w) image must be [{n}, {t}, C] "
            f"({n} tiles incl. the base image, (tile {p.tile_side} / patch {p.patch_size})^2 tokens "
            f"each after the {p.vision_feature_select_strategy!r} strategy), got {features.shape}"
        )


# ---------------------------------------------------------------------------------------------
# Field checks


def _coerce(name: str, value: Any) -> Any:
    if name.startswith("do_"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    return _COERCE.get(name, lambda n, v: v)(name, value)


def _int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _pair(name: str, value: Any) -> Pair | None:
    if value is None and name == "size_hw":
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be (height, width), got {value!r}")
    return (_int(name, value[0]), _int(name, value[1]))


def _pinpoints(name: str, value: Any) -> tuple[Pair, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of (height, width), got {value!r}")
    return tuple(_pair(name, v) for v in value)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    values = check_triple(name, value)
    if name == "image_std" and 0.0 in values:
        raise ValueError("image_std must not contain 0")
    return values


def _resample(name: str, value: Any) -> int:
    value = _int(name, value, 0)
    if value not in RESAMPLE_CODES:
        raise ValueError(f"resample must be a PIL code in {RESAMPLE_CODES}, got {value}")
    return value


def _strategy(name: str, value: Any) -> str:
    if value not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {value!r}")
    return value


def _layer(name: str, value: Any) -> int | tuple[int, ...]:
    if isinstance(value, (list, tuple)) and value:
        return tuple(_layer(name, v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"vision_feature_layer must be an int or a list of ints, got {value!r}")
    return int(value)


def _optional_int(name: str, value: Any) -> int | None:
    return None if value is None else _int(name, value)


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


_COERCE = {
    "grid_pinpoints": _pinpoints, "crop_size": _pair, "size_hw": _pair,
    "shortest_edge": _optional_int, "resample": _resample, "rescale_factor": check_number,
    "image_mean": _triple, "image_std": _triple, "patch_size": _int,
    "vision_feature_select_strategy": _strategy, "vision_feature_layer": _layer,
    "image_token": _str, "image_token_index": lambda n, v: _int(n, v, 0),
}


def _check_geometry(p: AnyresParams) -> None:
    """What LlavaNextModel needs to stitch tiles back: square tiles, whole patches per tile,
    every pinpoint a whole number of tiles."""
    if (p.shortest_edge is None) == (p.size_hw is None):
        raise ValueError("exactly one of shortest_edge or size_hw must be set (HF's `size`)")
    th, tw = p.tile_hw
    if th != tw or th != p.tile_side:
        raise ValueError(f"tiles must be square and {p.tile_side} (the crop height) on a side, "
                         f"got {th}x{tw}; LlavaNextModel assumes square tiles")
    if th % p.patch_size:
        raise ValueError(f"tile side {th} is not a multiple of patch_size {p.patch_size}")
    bad = [pp for pp in p.grid_pinpoints if pp[0] % th or pp[1] % th]
    if bad:
        raise ValueError(f"grid_pinpoints {bad} are not multiples of the tile side {th}; "
                         "LlavaNextModel's grid shape and tile count would disagree")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# transformers configs -> fields


def _image_processor_dict(image_processor: dict | None, processor: dict) -> dict:
    ip = image_processor or processor.get("image_processor") or {}
    if not isinstance(ip, dict):
        raise ValueError(f"image processor config must be a dict, got {type(ip).__name__}")
    kind = ip.get("image_processor_type")
    if kind is not None and kind not in _HF_TYPES:
        raise ValueError(f"unsupported image_processor_type {kind!r}; supported: {sorted(_HF_TYPES)}")
    return ip


def _vision_geometry(model_config: dict) -> Pair:
    """(image_size, patch_size) of the vision tower, with transformers' config defaults."""
    vision = model_config.get("vision_config")
    if vision is None:
        return _LLAVA_NEXT_VISION_DEFAULT
    if vision.get("model_type", "clip_vision_model") == "clip_vision_model":
        size, patch = _CLIP_VISION_DEFAULT
        return vision.get("image_size", size), vision.get("patch_size", patch)
    if "image_size" not in vision or "patch_size" not in vision:
        raise ValueError(f"vision_config ({vision.get('model_type')}) must give image_size and patch_size")
    return vision["image_size"], vision["patch_size"]


def _check_against_model(p: AnyresParams, model_config: dict, vision_size: int, vision_patch: int) -> None:
    model_pinpoints = _pinpoints("image_grid_pinpoints", model_config.get(
        "image_grid_pinpoints") or LLAVA_V16_PINPOINTS)
    if model_pinpoints != p.grid_pinpoints:
        raise ValueError(f"image processor grid_pinpoints {p.grid_pinpoints} differ from the model "
                         f"config's image_grid_pinpoints {model_pinpoints}")
    if p.tile_hw != (vision_size, vision_size):
        raise ValueError(f"image tiles are {p.tile_hw} but the vision tower takes "
                         f"{vision_size}x{vision_size} (vision_config.image_size)")
    if p.patch_size != vision_patch:
        raise ValueError(f"processor patch_size {p.patch_size} != vision_config.patch_size {vision_patch}")


def _check_processor_count(processor: dict) -> None:
    """HF's processor gives the base tile (t/p)^2 + num_additional_image_tokens tokens, minus one
    for "default"; the model gives (t/p)^2. Any other offset makes HF's model raise."""
    extra = processor.get("num_additional_image_tokens", 0)
    drop = processor.get("vision_feature_select_strategy") == "default"
    if extra - drop != 0:
        raise ValueError(
            f"processor num_additional_image_tokens={extra} with vision_feature_select_strategy="
            f"{processor.get('vision_feature_select_strategy')!r} gives {extra - drop:+d} <image> "
            "token(s) per image versus the model's features (HF's model would raise 'Image features "
            "and image tokens do not match'); use 1 with 'default' (a CLS token) or 0 otherwise"
        )


def _hf_flag(d: dict, key: str) -> bool:
    value = d.get(key, True)  # every LlavaNext flag defaults to True; null means off, as in HF
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key} must be true, false or null, got {value!r}")
    return bool(value)


def _hf_size(size: Any) -> dict:
    """HF get_size_dict(default_to_square=False): int -> shortest_edge, [h, w], or a dict."""
    if isinstance(size, int) and not isinstance(size, bool):
        return {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    if isinstance(size, dict) and set(size) in ({"shortest_edge"}, {"height", "width"}):
        return size
    raise ValueError(f"unsupported size {size!r}; allowed: an int, [height, width], "
                     '{"shortest_edge": n} or {"height": h, "width": w}')


def _hf_triple(value: Any) -> Any:
    """HF allows one number for all channels."""
    is_scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value,) * 3 if is_scalar else value
