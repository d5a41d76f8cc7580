"""Qwen2-VL / Qwen2.5-VL image and video preprocessing in numpy + Pillow (no torch, no transformers).

Images reproduce bit for bit transformers 5.24's ``Qwen2VLImageProcessorPil`` (what
``Qwen2VLImageProcessor`` resolves to without torchvision; Qwen2.5-VL uses the same class): RGB
conversion, ``smart_resize`` to a multiple of ``patch_size * merge_size`` with the pixel count in
[min_pixels, max_pixels], Pillow resize on uint8, float64 rescale cast to float32, float32 normalize,
then the patch layout the vision tower reads (one row per patch, merge-size blocks contiguous).

Videos reproduce ``Qwen2VLVideoProcessor`` (which needs torchvision, so is checked against its own
code with torch standing in for torchvision): one smart_resize for all frames, torchvision's resize
(torch's antialiased uint8 kernel, ported in resize_aa.py; it differs from Pillow's by 1-2 levels on
a few pixels), the fused rescale+normalize in float32, frames padded to a multiple of
``temporal_patch_size`` by repeating the last one, consecutive frames paired in time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .images import MAX_RESIZED_PIXELS, NOT_COMMON, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageError, coerce_common_field, to_rgb
from .resize_aa import resize_uint8_aa

MAX_ASPECT_RATIO = 200  # smart_resize refuses a longer side over 200x the shorter (as HF)

# transformers 5.24 class defaults: Qwen2VLImageProcessor.size / Qwen2VLVideoProcessor.size.
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # 3,136 / 1,003,520 (4..1280 tokens)
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 28 * 28 * 768  # 100,352 / 602,112 per frame

HF_IMAGE_TYPES = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
HF_VIDEO_TYPES = ("Qwen2VLVideoProcessor",)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """(h, w), both multiples of ``factor``, area near height*width clamped to [min_pixels, max_pixels].

    transformers' ``models.qwen2_vl.image_processing_qwen2_vl.smart_resize``, operation for
    operation (Python ``round`` is round-half-even, as there). Refused with ValueError: an empty
    side, an aspect ratio over 200 (HF's rule), and a result with a 0 side (only reachable with a
    tiny ``min_pixels``; HF would fail later).
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize an empty image ({width}x{height} pixels)")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(f"a {width}x{height} image has an aspect ratio of {aspect:.1f}; "
                         f"Qwen2-VL preprocessing allows at most {MAX_ASPECT_RATIO} (crop or pad it)")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise ValueError(f"a {width}x{height} image resizes to {w_bar}x{h_bar} with min_pixels={min_pixels}; "
                         f"raise min_pixels to at least {factor * factor}")
    return h_bar, w_bar


def tokens_for(grid_thw: Sequence[int], merge_size: int) -> int:
    """Visual tokens of one image or video: t*h*w patches, merge_size**2 patches per token."""
    t, h, w = grid_thw
    return t * h * w // merge_size**2


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """[F, C, H, W] (F a multiple of temporal_patch_size) -> [F/T * H/P * W/P, C*T*P*P].

    Rows in HF's order: time, then merge blocks row-major, then the merge_size x merge_size
    patches of a block; within a row channel, time, patch row, patch column.
    """
    f, c, h, w = frames.shape
    t, m, p = temporal_patch_size, merge_size, patch_size
    gt, gh, gw = f // t, h // p, w // p
    x = frames.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, T, P, P]
    return x.reshape(gt * gh * gw, c * t * p * p)


def pad_frames(frames: Sequence, temporal_patch_size: int) -> Sequence:
    """[F, ...] -> [F', ...] (an array or a list), F' the next multiple of temporal_patch_size, by
    repeating the last frame (as HF)."""
    pad = -len(frames) % temporal_patch_size
    if not pad:
        return frames
    if isinstance(frames, np.ndarray):
        return np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    return [*frames, *[frames[-1]] * pad]


@dataclass(frozen=True)
class QwenVLPreprocessor:
    """Settings of one transformers Qwen2-VL processor (the image one or the video one).

    ``min_pixels``/``max_pixels`` are HF's ``size["shortest_edge"]``/``size["longest_edge"]``: the
    defaults of a call. ``max_pixels_limit`` is the hard ceiling set at load or build time so a request
    cannot outgrow memory: a call's min_pixels/max_pixels may not exceed it, nor may a resized image
    (smart_resize can overshoot max_pixels a little). None: a call may not ask for more than the
    configured max(min_pixels, max_pixels), and the configured settings work as in HF.
    ``cap_pixels_per_frame``/``max_video_tokens`` are the video processor's total-budget option.
    ``image_backend`` is how images are resized and normalized: "pil" as ``Qwen2VLImageProcessorPil`` (what
    transformers runs without torchvision), "torchvision" as ``Qwen2VLImageProcessor`` with torchvision
    installed. Videos are always done as the video processor does (torchvision; it has no PIL backend).
    """

    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    max_pixels_limit: int | None = None
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_convert_rgb: bool = True
    do_resize: bool = True
    resample: int = 3  # PIL code; 3 = BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    image_backend: str = "pil"  # not "backend": a read-only property of HF processors

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        _check_pixel_range(self.min_pixels, self.max_pixels, "")
        for name in ("min_pixels", "max_pixels"):
            if self.max_pixels_limit is not None and getattr(self, name) > self.max_pixels_limit:
                raise ValueError(f"{name} {getattr(self, name):,} is over max_pixels_limit {self.max_pixels_limit:,}")
        if self.do_normalize and 0.0 in self.image_std:
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: dict, video: bool = False) -> QwenVLPreprocessor:
        """From HF's dict: ``preprocessor_config.json`` (image), ``video_preprocessor_config.json``,
        a 5.x ``processor_config.json``'s ``"image_processor"``/``"video_processor"`` dict, or
        ``to_dict()``'s output. ``video=True`` takes Qwen2VLVideoProcessor's class defaults for absent
        keys (transformers builds the video processor from ``preprocessor_config.json`` when a
        checkpoint has no video config, so pass the image dict then). Keys HF ignores are ignored.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a Qwen2-VL processor config must be a dict, got {type(d).__name__}")
        _check_hf_type(d)
        min_pixels, max_pixels = _hf_pixel_range(d, video)
        known = {f.name for f in fields(cls)} - {"min_pixels", "max_pixels"}
        given = {k: v for k, v in d.items() if k in known and v is not None}
        given.update({k: False for k, v in d.items() if k in known and v is None and k.startswith("do_")})  # as HF
        if not given.get("cap_pixels_per_frame"):
            given.pop("max_video_tokens", None)  # unused without the cap
        return cls(min_pixels=min_pixels, max_pixels=max_pixels, **given)

    def to_dict(self) -> dict:
        """HF's layout (``size`` with shortest/longest_edge), which ``from_dict`` reads back; JSON types."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d["size"] = {"shortest_edge": d.pop("min_pixels"), "longest_edge": d.pop("max_pixels")}
        return d

    # -- sizes (no pixels needed: the planner uses these) --------------------------------------

    @property
    def factor(self) -> int:
        """Sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    def pixel_range(self, min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
        """A call's (min_pixels, max_pixels): the configured ones unless given, checked against the limit."""
        lo = self.min_pixels if min_pixels is None else min_pixels
        hi = self.max_pixels if max_pixels is None else max_pixels
        _check_pixel_range(lo, hi, "requested ")
        limit = self.max_pixels_limit or max(self.min_pixels, self.max_pixels)
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and value > limit:
                raise ValueError(f"requested {name} {value:,} is over the limit of {limit:,} pixels per image/frame "
                                 f"set at load time (max_pixels_limit); ask for a smaller {name}")
        return lo, hi

    def resized_size(self, height: int, width: int, frames: int = 1, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[int, int]:
        """(h, w) an image (frames=1) or a video's frames are resized to."""
        lo, hi = self.pixel_range(min_pixels, max_pixels)
        if self.cap_pixels_per_frame and frames > 1:
            hi = _video_pixel_cap(hi, lo, frames, self.factor, self.temporal_patch_size, self.max_video_tokens)
        h, w = smart_resize(height, width, self.factor, lo, hi) if self.do_resize else (height, width)
        _check_resized(height, width, h, w, self.max_pixels_limit or MAX_RESIZED_PIXELS)
        return h, w

    def grid_thw(self, height: int, width: int, frames: int = 1, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image (frames=1) or a video of ``frames`` frames of height x width."""
        h, w = self.resized_size(height, width, frames, min_pixels, max_pixels)
        _check_divisible(h, w, self.factor)
        t = -(-max(frames, 1) // self.temporal_patch_size)  # ceil: the last frame is repeated
        return t, h // self.patch_size, w // self.patch_size

    # -- pixels ------------------------------------------------------------------------------

    def image(self, image: Image.Image, min_pixels: int | None = None,
              max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        """-> (patches float32 [h*w, C*T*P*P], grid_thw (1, h, w)); HF's pixel_values / image_grid_thw."""
        pixels = self._rgb(image, "image")  # [H, W, 3] uint8
        size = self.resized_size(*pixels.shape[:2], 1, min_pixels, max_pixels)
        if self.image_backend == "torchvision":
            x = self._tv_normalized(self._tv_resized(pixels, size))  # [C, h, w]
        else:
            x = self._pil_normalized(self._pil_resized(pixels, size))
        frames = np.broadcast_to(x, (self.temporal_patch_size, *x.shape))  # an image is T equal frames
        return self._patches(frames)

    def video(self, frames: Sequence[Image.Image] | np.ndarray, min_pixels: int | None = None,
              max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int, int]]:
        """Frames (PIL images, or uint8 [F, H, W, 3]) -> (patches float32 [t*h*w, C*T*P*P], grid_thw).

        One size for all frames (from the first frame, as HF's batched resize); F padded to a
        multiple of temporal_patch_size by repeating the last frame.
        """
        rgb = self._video_rgb(frames)  # F x [H, W, 3] uint8
        size = self.resized_size(*rgb[0].shape[:2], len(rgb), min_pixels, max_pixels)
        rgb, t = pad_frames(rgb, self.temporal_patch_size), self.temporal_patch_size  # F' x [H, W, 3]
        groups = [rgb[i:i + t] for i in range(0, len(rgb), t)]
        out = None  # [t*h*w, C*T*P*P], filled one temporal patch at a time: the only big array
        for i, group in enumerate(groups):
            x = np.stack([self._tv_normalized(self._tv_resized(f, size)) for f in group])  # [T, C, h, w]
            patches, (_, h, w) = self._patches(x)  # [h*w, C*T*P*P]
            if out is None:
                out = np.empty((len(groups) * len(patches), patches.shape[1]), np.float32)
            out[i * len(patches):(i + 1) * len(patches)] = patches
        return out, (len(groups), h, w)

    def _patches(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        f, _, h, w = frames.shape  # [F, C, h, w]
        _check_divisible(h, w, self.factor)
        patches = patchify(frames, self.patch_size, self.merge_size, self.temporal_patch_size)
        grid = (f // self.temporal_patch_size, h // self.patch_size, w // self.patch_size)
        return np.ascontiguousarray(patches, np.float32), grid

    def _pil_resized(self, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """[H, W, 3] uint8 -> [h, w, 3] uint8 (Pillow, as HF's PIL backend)."""
        if not self.do_resize:
            return pixels
        h, w = size
        return np.asarray(Image.fromarray(pixels).resize((w, h), resample=self.resample))

    def _pil_normalized(self, pixels: np.ndarray) -> np.ndarray:
        """[h, w, 3] uint8 -> [3, h, w] float32, HF's arithmetic (float64 rescale, float32 normalize)."""
        x = pixels.transpose(2, 0, 1)
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)[:, None, None]
            x = (x - mean) / np.asarray(self.image_std, np.float32)[:, None, None]
        return x

    def _tv_resized(self, pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """[H, W, 3] uint8 -> [h, w, 3] uint8, as torchvision resizes uint8 images on a CPU."""
        return resize_uint8_aa(pixels, size, self.resample) if self.do_resize else pixels

    def _tv_normalized(self, pixels: np.ndarray) -> np.ndarray:
        """[h, w, 3] uint8 -> [3, h, w] float32, HF's torchvision arithmetic: rescale fused into
        mean and std (mean / rescale_factor, std / rescale_factor), then (x - mean) / std in float32."""
        x = pixels.transpose(2, 0, 1).astype(np.float32)
        if self.do_normalize:
            unscale = np.float32(1.0 / self.rescale_factor if self.do_rescale else 1.0)
            mean = (np.asarray(self.image_mean, np.float32) * unscale)[:, None, None]
            return (x - mean) / (np.asarray(self.image_std, np.float32) * unscale)[:, None, None]
        return x * np.float32(self.rescale_factor) if self.do_rescale else x

    def _rgb(self, image: Any, name: str) -> np.ndarray:
        """A PIL image -> [H, W, 3] uint8."""
        if not isinstance(image, Image.Image):
            raise ImageError(f"{name} is a {type(image).__name__}; expected a PIL.Image.Image "
                             "(use load_image() for paths and bytes)")
        if image.width == 0 or image.height == 0:
            raise ImageError(f"{name} is empty ({image.width}x{image.height} pixels)")
        if not self.do_convert_rgb and image.mode != "RGB":
            raise ImageError(f"{name} has mode {image.mode!r} but do_convert_rgb is off; only RGB is allowed")
        try:
            return np.asarray(to_rgb(image) if self.do_convert_rgb else image)
        except (OSError, ValueError) as e:
            raise ImageError(f"{name} (mode {image.mode!r}) cannot be converted to RGB: {e}") from e

    def _video_rgb(self, frames: Any) -> list[np.ndarray]:
        """PIL frames or a uint8 [F, H, W, 3] array -> F x [H, W, 3] uint8, all one size."""
        if isinstance(frames, np.ndarray):
            _check_frame_array(frames)
            rgb = list(frames)
        elif isinstance(frames, (list, tuple)):
            rgb = [self._rgb(f, f"frames[{i}]") for i, f in enumerate(frames)]
        else:
            raise ImageError(f"a video is a list of PIL images or a uint8 array [F, H, W, 3], "
                             f"got a {type(frames).__name__}")
        if not rgb:
            raise ImageError("a video needs at least one frame, got 0")
        sizes = {f.shape[:2] for f in rgb}
        if len(sizes) > 1:
            raise ImageError(f"all frames of a video must have one size, got (h, w) sizes {sorted(sizes)}")
        return rgb


# ---------------------------------------------------------------------------------------------
# Checks


def _check_frame_array(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ImageError(f"a video array must be uint8 [frames, height, width, 3] (RGB), "
                         f"got {frames.dtype} {list(frames.shape)}")
    if 0 in frames.shape:
        raise ImageError(f"a video array has an empty dimension: {list(frames.shape)}")


def _check_pixel_range(lo: Any, hi: Any, what: str) -> None:
    """Positive integers. min_pixels over max_pixels is allowed, as in HF (max_pixels is applied first, so
    it wins; e.g. a video config setting only max_pixels below the class's min_pixels)."""
    for name, value in (("min_pixels", lo), ("max_pixels", hi)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what}{name} must be a positive integer, got {value!r}")


def _check_resized(height: int, width: int, h: int, w: int, limit: int) -> None:
    """smart_resize can overshoot max_pixels (extreme aspect ratios, min_pixels rounding up)."""
    limit = min(limit, MAX_RESIZED_PIXELS)
    if h * w > limit:
        knob = "max_pixels_limit" if limit < MAX_RESIZED_PIXELS else "images.MAX_RESIZED_PIXELS"
        raise ValueError(f"a {width}x{height} image resizes to {w}x{h} = {h * w:,} pixels, over the limit of "
                         f"{limit:,} ({knob}); crop it to a less extreme aspect ratio or ask for a smaller min_pixels")


def _check_divisible(h: int, w: int, factor: int) -> None:
    if h % factor or w % factor:
        raise ValueError(f"a {w}x{h} image is not a multiple of patch_size*merge_size = {factor} on each side; "
                         "with do_resize off, give images of such sizes")


def _video_pixel_cap(max_pixels: int, min_pixels: int, frames: int, factor: int, temporal_factor: int,
                     max_video_tokens: int) -> int:
    """Qwen2VLVideoProcessor.resize with cap_pixels_per_frame: each frame gets an even share of
    90% of max_video_tokens tokens' pixels, never below 1.05 * min_pixels."""
    total_pixels = int(max_video_tokens * factor * factor * 0.9)
    return max(min(max_pixels, total_pixels * temporal_factor // frames), int(min_pixels * 1.05))


# ---------------------------------------------------------------------------------------------
# HF config -> fields


def _check_hf_type(d: dict) -> None:
    for key, allowed in (("image_processor_type", HF_IMAGE_TYPES), ("video_processor_type", HF_VIDEO_TYPES)):
        kind = d.get(key)
        if kind is not None and kind not in allowed:
            raise ValueError(f"{key} {kind!r} is not a Qwen2-VL processor; allowed: {', '.join(allowed)}")
    if "image_processor" in d or "video_processor" in d:
        raise ValueError('this is a whole processor config: pass its "image_processor" or "video_processor" dict')


def _hf_pixel_range(d: dict, video: bool) -> tuple[int, int]:
    """HF __init__: ``size`` (or the class default), then top-level min_pixels/max_pixels override it
    (older configs saved both, and a legacy ``size`` of {min_pixels, max_pixels})."""
    default = {"shortest_edge": VIDEO_MIN_PIXELS if video else IMAGE_MIN_PIXELS,
               "longest_edge": VIDEO_MAX_PIXELS if video else IMAGE_MAX_PIXELS}
    size = d.get("size")
    size = dict(default) if size is None else size
    if not isinstance(size, dict):
        raise ValueError(f'size must be {{"shortest_edge": min_pixels, "longest_edge": max_pixels}}, got {size!r}')
    size = dict(size)
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if d.get(key) is not None:
            size[edge] = d[key]
            size.pop(key, None)
    if set(size) != {"shortest_edge", "longest_edge"}:
        raise ValueError(f'size must have exactly "shortest_edge" (min_pixels) and "longest_edge" (max_pixels), '
                         f"got {d.get('size')!r} (with min_pixels={d.get('min_pixels')!r}, "
                         f"max_pixels={d.get('max_pixels')!r})")
    return size["shortest_edge"], size["longest_edge"]


def _coerce(name: str, value: Any) -> Any:
    if name == "image_backend":
        if value not in ("pil", "torchvision"):
            raise ValueError(f'image_backend must be "pil" or "torchvision", got {value!r}')
        return value
    common = coerce_common_field(name, value, flags=("cap_pixels_per_frame",))
    if common is not NOT_COMMON:
        return common
    if value is None and name == "max_pixels_limit":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
