"""Image loading and fixed-size image preprocessing in numpy + Pillow (no torch, no transformers).

Reproduces bit for bit transformers 5.x's PIL-backend ``CLIPImageProcessor``,
``LlavaImageProcessor``, ``SiglipImageProcessor`` and ``BitImageProcessor`` (DINOv2): the same
Pillow calls (RGB conversion, resize) and the same numpy arithmetic (float64 rescale cast to
float32, float32 normalize). The four share one pipeline in transformers (``PilBackend``); they
differ only in their class defaults (``_HF_DEFAULTS``) and in Llava's pad-to-square.
"""

from __future__ import annotations

import io
import math
import os
import stat
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}

# image_processor_type -> family. Without torchvision, transformers 5.x runs every one of these
# (the plain, "Fast" and "Pil" names) with its PIL backend, which is what we reproduce.
_HF_FAMILIES = {"CLIP": "clip", "Llava": "llava", "Siglip": "siglip", "Bit": "bit", "Blip": "blip"}
_HF_TYPES = {
    f"{prefix}ImageProcessor{suffix}": family
    for prefix, family in _HF_FAMILIES.items()
    for suffix in ("", "Fast", "Pil")
}

# Each family's class defaults in transformers 5.24 (what a key absent from the config takes).
# All four also default do_resize/do_rescale/do_normalize/do_convert_rgb to true,
# rescale_factor to 1/255 and default_to_square to false.
_CLIP_DEFAULTS = {
    "size": {"shortest_edge": 224},
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_pad": False,
    "resample": 3,  # BICUBIC
    "image_mean": OPENAI_CLIP_MEAN,
    "image_std": OPENAI_CLIP_STD,
}
_HF_DEFAULTS = {
    "clip": _CLIP_DEFAULTS,
    "llava": _CLIP_DEFAULTS,
    "bit": _CLIP_DEFAULTS,  # DINOv2 checkpoints set size 256 and ImageNet mean/std themselves
    "blip": {  # BLIP / BLIP-2: resize to a fixed square, no crop, CLIP's mean/std
        "size": {"height": 384, "width": 384},
        "crop_size": None,
        "do_center_crop": False,
        "do_pad": False,
        "resample": 3,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
    },
    "siglip": {
        "size": {"height": 224, "width": 224},
        "crop_size": None,
        "do_center_crop": False,  # not a SigLIP class attribute: None, i.e. off
        "do_pad": False,
        "resample": 3,
        "image_mean": IMAGENET_STANDARD_MEAN,
        "image_std": IMAGENET_STANDARD_STD,
    },
}


def hf_image_processor_kinds() -> tuple[str, ...]:
    """The ``image_processor_type`` values ``ImagePreprocessor.from_hf_config`` accepts."""
    return tuple(sorted(_HF_TYPES))


class ImageError(ValueError):
    """An image that cannot be loaded or preprocessed."""


# ---------------------------------------------------------------------------------------------
# Loading


# Budgets for what the runtime decodes and resizes (a tiny file can expand to gigabytes).
MAX_FILE_BYTES = 64 << 20  # an image file or bytes object
MAX_DECODED_PIXELS = 64_000_000  # width x height of the decoded image
MAX_RESIZED_PIXELS = 64_000_000  # width x height after a processor's resize rule (extreme aspect ratios)


_POOL_NAME = "vlmdeploy-preprocess"
_pool_lock = threading.Lock()
_pool: list = []  # one thread pool for the process, made on first use


def parallel_map(fn: Callable[[Any], Any], items: Sequence) -> list:
    """[fn(x) for x in items], the items spread over the cores this process may use: decoding and
    resizing run in Pillow's C code with the GIL released, so the images of one call preprocess in
    parallel. One item, one core, or a call from inside the pool (no nested waits): in this thread.
    The first failing item's exception propagates."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if len(items) < 2 or workers < 2 or threading.current_thread().name.startswith(_POOL_NAME):
        return [fn(x) for x in items]
    with _pool_lock:
        if not _pool:
            from concurrent.futures import ThreadPoolExecutor

            _pool.append(ThreadPoolExecutor(workers, thread_name_prefix=_POOL_NAME))
    return list(_pool[0].map(fn, items))


def load_image(source: Any, exif_transpose: bool | None = None) -> Image.Image:
    """Decode a path, bytes or PIL image fully (so truncation fails here, not later).

    Keeps the image mode (alpha is handled by the preprocessor). EXIF orientation as transformers:
    a path or bytes is rotated upright (its ``load_image`` does that), a PIL image is used as given
    (its processors take it as is). ``exif_transpose`` overrides. Files and pixels are budgeted
    (MAX_FILE_BYTES, MAX_DECODED_PIXELS): a FIFO, a device or a decompression bomb is refused.
    """
    if exif_transpose is None:
        exif_transpose = not isinstance(source, Image.Image)
    name, opener = _opener(source)
    try:
        image = opener()
        image.load()
    except ImageError as e:
        raise ImageError(str(e).replace("image is", f"{name} is", 1)) from None
    except FileNotFoundError as e:
        raise ImageError(f"{name} does not exist: {e}") from e
    except IsADirectoryError as e:
        raise ImageError(f"{name} is a directory, not an image file") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not a readable image (not a format Pillow knows)") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name} is not a readable image (too many pixels): {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        reason = "truncated file" if "truncated" in str(e).lower() else "corrupt data"
        raise ImageError(f"{name} is not a readable image ({reason}): {e}") from e
    _check_pixels(name, image.size)
    return ImageOps.exif_transpose(image) if exif_transpose else image


def _check_pixels(name: str, size: tuple[int, int]) -> None:
    if size[0] * size[1] > MAX_DECODED_PIXELS:
        raise ImageError(f"{name} is {size[0]}x{size[1]} pixels, over the budget of {MAX_DECODED_PIXELS:,} pixels "
                         "per image; downscale it first")


def _opener(source: Any):
    """(name for messages, zero-arg callable returning an unloaded PIL image)."""
    if isinstance(source, Image.Image):
        return "image", lambda: source
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > MAX_FILE_BYTES:
            raise ImageError(f"<{len(data)} bytes> is over the budget of {MAX_FILE_BYTES:,} bytes per image")
        return f"<{len(data)} bytes>", lambda: _pil_open(data)
    if isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "ftp", "s3", "gs"):
        raise ImageError(f"{source[:80]} is a URL; vlmdeploy does not fetch images from the network. Download it and "
                         "give the file's path or bytes")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        return path, lambda: _open_path(path)
    raise ImageError(
        f"cannot load an image from a {type(source).__name__}; "
        "allowed: a path (str or pathlib.Path), bytes, or a PIL.Image.Image"
    )


def _open_path(path: str) -> Image.Image:
    """Regular files only (a FIFO would block, /dev/zero never ends), within the byte budget."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(path)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path} is not a regular file (a pipe, socket or device); give an image file")
    if st.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{path} is {st.st_size:,} bytes, over the budget of {MAX_FILE_BYTES:,} bytes per image")
    with open(path, "rb") as f:  # read eagerly: no file handle stays open
        data = f.read(MAX_FILE_BYTES + 1)
    return _pil_open(data)


def _pil_open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    _check_pixels("image", image.size)  # from the header: before the pixels are decoded
    return image


# ---------------------------------------------------------------------------------------------
# Preprocessing


@dataclass(frozen=True)
class ImagePreprocessor:
    """Fixed-size image preprocessing; defaults are transformers' CLIPImageProcessor defaults.

    ``to_dict()`` gives this dataclass's fields (the manifest format, unchanged since the
    CLIP/LLaVA-only version: a SigLIP preprocessor is size_hw with no crop, a BiT one is
    shortest_edge + crop).

    Order: convert to RGB -> pad to square (Llava ``do_pad``) -> resize -> center crop ->
    rescale -> normalize. Resize target is ``shortest_edge`` or ``size_hw`` (exactly one).
    """

    do_convert_rgb: bool = True
    do_pad: bool = False  # LlavaImageProcessor: pad to square with the mean colour first
    do_resize: bool = True
    shortest_edge: int | None = 224
    size_hw: tuple[int, int] | None = None
    resample: int | None = 3  # PIL code; 3 = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] | None = (224, 224)  # (h, w)
    do_rescale: bool = True
    rescale_factor: float | None = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] | None = OPENAI_CLIP_STD

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            object.__setattr__(self, f.name, _coerce_field(f.name, value))
        _check_required(self)
        if self._fixed_size() is None:
            raise ValueError(
                "preprocessing without a center crop, a height/width resize, or pad+shortest_edge "
                "resize gives a size that depends on each image; pixel_values needs one fixed size"
            )

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, d: dict) -> ImagePreprocessor:
        """From a ``preprocessor_config.json`` dict or a 5.x ``processor_config.json``'s
        ``"image_processor"`` dict, with the class's transformers defaults for absent keys.

        Accepts the types listed by ``hf_image_processor_kinds()``."""
        if not isinstance(d, dict):
            raise ValueError(f"image processor config must be a dict, got {type(d).__name__}")
        family = _hf_family(d)
        pre = cls(**_hf_fields(d, family))
        if family != "llava":
            _check_batch_pad(d, pre.output_size)
        return pre

    def to_dict(self) -> dict:
        """Plain JSON types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ImagePreprocessor:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            allowed = [f.name for f in fields(cls)]
            raise ValueError(f"unknown image preprocessor keys {unknown}; allowed: {allowed}")
        return cls(**d)

    # -- use ---------------------------------------------------------------------------------

    @property
    def output_size(self) -> tuple[int, int]:
        """(H, W) of pixel_values."""
        return self._fixed_size()

    def __call__(self, images: Sequence[Image.Image] | Image.Image) -> np.ndarray:
        """-> float32 [n, 3, H, W], equal to HF ``processor(images)["pixel_values"]``."""
        if isinstance(images, Image.Image):
            images = [images]
        out = [self._one(image, i) for i, image in enumerate(images)]  # n x [3, H, W]
        if not out:
            return np.zeros((0, 3, *self.output_size), np.float32)
        return np.stack(out)  # [n, 3, H, W]

    def _one(self, image: Image.Image, i: int) -> np.ndarray:
        if not isinstance(image, Image.Image):
            raise ImageError(
                f"images[{i}] is a {type(image).__name__}; expected a PIL.Image.Image "
                "(use load_image() for paths and bytes)"
            )
        if image.width == 0 or image.height == 0:
            raise ImageError(f"images[{i}] is empty ({image.width}x{image.height} pixels)")
        try:
            pixels = self._geometry(self._rgb(image, i))  # [H, W, 3] uint8
        except OSError as e:  # a lazily opened file that fails to decode
            raise ImageError(f"images[{i}] is not a readable image: {e}") from e
        except ImageError:
            raise
        except ValueError as e:  # e.g. Pillow has no conversion from this mode
            mode = image.mode
            raise ImageError(f"images[{i}] (mode {mode!r}) cannot be converted to RGB: {e}") from e
        return self._normalized(pixels)  # [3, H, W]

    def _rgb(self, image: Image.Image, i: int) -> Image.Image:
        if self.do_convert_rgb:
            return to_rgb(image)
        if image.mode != "RGB":
            raise ImageError(
                f"images[{i}] has mode {image.mode!r} but do_convert_rgb is off; "
                "only RGB is allowed"
            )
        return image

    def _geometry(self, image: Image.Image) -> np.ndarray:
        """RGB image -> [H, W, 3] uint8: pad, resize, crop. The resize reads the PIL image as it is (no
        round trip of the full-size picture through numpy, which HF makes: same pixels, fewer copies)."""
        if self.do_pad:
            image = Image.fromarray(pad_to_square(np.asarray(image), _pad_color(self.image_mean)))
        pixels = np.asarray(self._resize(image) if self.do_resize else image)
        return center_crop(pixels, self.crop_size) if self.do_center_crop else pixels

    def _normalized(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> [3, H, W] float32, through a per-channel table of the 256 values, each
        computed with HF's arithmetic (so equal to it bit for bit) instead of float math per pixel."""
        return np.ascontiguousarray(self._value_table()[pixels, np.arange(3)].transpose(2, 0, 1))

    def _value_table(self) -> np.ndarray:
        """[256, 3] float32: uint8 value, channel -> rescaled and normalized as HF does it."""
        table = self.__dict__.get("_table")
        if table is None:
            x = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)  # [256, 3]
            if self.do_rescale:
                x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)  # as HF
            else:
                x = x.astype(np.float32)
            if self.do_normalize:
                x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)  # float32, as HF
            table = self.__dict__["_table"] = x
        return table

    def _resize(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        oh, ow = self.size_hw or shortest_edge_size(h, w, self.shortest_edge)
        if oh * ow > MAX_RESIZED_PIXELS:
            raise ImageError(f"a {w}x{h} image would be resized to {ow}x{oh} (the processor keeps the aspect ratio), "
                             f"over the budget of {MAX_RESIZED_PIXELS:,} pixels; crop or pad it to a less extreme "
                             "aspect ratio")
        return image.resize((ow, oh), resample=self.resample)

    def _fixed_size(self) -> tuple[int, int] | None:
        if self.do_center_crop:
            return self.crop_size
        if self.do_resize and self.size_hw:
            return self.size_hw
        if self.do_resize and self.do_pad:
            return (self.shortest_edge, self.shortest_edge)  # square in, square out
        return None


# ---------------------------------------------------------------------------------------------
# The steps (public so they can be tested and reused)


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' convert_to_rgb: anything with alpha or a transparency key is composited
    onto WHITE; everything else goes through Pillow's ``convert("RGB")``."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert("RGB") of an RGB image is a copy


def shortest_edge_size(h: int, w: int, shortest_edge: int) -> tuple[int, int]:
    """Short side -> shortest_edge, long side truncated (int), as HF / torchvision."""
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if w <= h else (shortest_edge, new_long)


def pad_to_square(pixels: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """[h, w, 3] -> [m, m, 3], m = max(h, w); the image centred, offset (m - side) // 2."""
    h, w = pixels.shape[:2]
    if h == w:
        return pixels
    m = max(h, w)
    out = np.empty((m, m, 3), pixels.dtype)
    out[:] = np.asarray(color, pixels.dtype)
    top, left = (m - h) // 2, (m - w) // 2
    out[top : top + h, left : left + w] = pixels
    return out


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w, C] -> [ch, cw, C]; a side smaller than the crop is zero-padded, the image placed
    at ceil((c - side) / 2), as HF's numpy center_crop."""
    (h, w), (ch, cw) = pixels.shape[:2], size
    if h < ch or w < cw:
        canvas = np.zeros((max(h, ch), max(w, cw), *pixels.shape[2:]), pixels.dtype)
        top, left = math.ceil(max(ch - h, 0) / 2), math.ceil(max(cw - w, 0) / 2)
        canvas[top : top + h, left : left + w] = pixels
        pixels, (h, w) = canvas, canvas.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    return pixels[top : top + ch, left : left + cw]


def _pad_color(mean: tuple[float, float, float] | None) -> tuple[int, int, int]:
    return tuple(int(x * 255) for x in mean) if mean else (0, 0, 0)  # truncated, as HF


# ---------------------------------------------------------------------------------------------
# Field validation


def _coerce_field(name: str, value: Any) -> Any:
    if name.startswith("do_"):
        return _check_bool(name, value)
    if value is None:
        return None
    if name in ("shortest_edge", "resample"):
        return _check_int(name, value, 0 if name == "resample" else 1)
    if name in ("size_hw", "crop_size"):
        return _check_pair(name, value)
    if name == "rescale_factor":
        return check_number(name, value)
    return check_triple(name, value)  # image_mean, image_std


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if name == "resample" and value not in RESAMPLE_NAMES:
        raise ValueError(f"resample must be a PIL code in {RESAMPLE_NAMES}, got {value!r}")
    return int(value)


def _check_pair(name: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be (height, width), got {value!r}")
    return tuple(_check_int(name, v, 1) for v in value)


# The fields every HF image processor shares: read from its dict by `hf_common_fields`, checked by
# `coerce_common_field` (the Qwen2-VL, LLaVA-OneVision, InternVL and Idefics3 parameter classes).
HF_COMMON_FIELDS = ("resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                    "image_std", "do_convert_rgb")
NOT_COMMON = object()  # coerce_common_field's answer for a field it does not know


def hf_common_fields(d: dict, keys=HF_COMMON_FIELDS) -> dict:
    """The given keys an HF processor dict sets; a null do_* flag is off, as in HF."""
    out = {k: d[k] for k in keys if k in d and d[k] is not None}
    out.update({k: False for k in keys if k.startswith("do_") and k in d and d[k] is None})
    return out


def coerce_common_field(name: str, value: Any, flags: tuple[str, ...] = ()) -> Any:
    """A shared processor field checked and normalized (do_* and `flags`: bools; mean/std: a triple,
    one number meaning all three, std without 0; rescale_factor: a number; resample: a PIL code);
    NOT_COMMON for any other field."""
    if name.startswith("do_") or name in flags:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if name in ("image_mean", "image_std"):
        is_scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
        values = check_triple(name, (value,) * 3 if is_scalar else value)  # HF allows one value for all
        if name == "image_std" and 0.0 in values:
            raise ValueError(f"image_std must not contain 0, got {values}")
        return values
    if name == "rescale_factor":
        return check_number(name, value)
    if name == "resample":
        if isinstance(value, bool) or value not in RESAMPLE_NAMES:
            raise ValueError(f"resample must be a PIL code in {RESAMPLE_NAMES}, got {value!r}")
        return int(value)
    return NOT_COMMON


class ProcessorParams:
    """Mixin for a frozen dataclass of processor parameters stored in the manifest: `to_dict` gives
    JSON types (tuples as lists), `from_dict` reads it back and names unknown keys."""

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict):
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {allowed}")
        return cls(**d)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def rgb_pixels(image: Any, do_convert_rgb: bool = True) -> np.ndarray:
    """A PIL image -> [H, W, 3] uint8 (converted to RGB as HF does, or refused when conversion is off)."""
    if not isinstance(image, Image.Image):
        raise ImageError(f"expected a PIL.Image.Image, got {type(image).__name__} (use load_image() for paths)")
    if image.width == 0 or image.height == 0:
        raise ImageError(f"image is empty ({image.width}x{image.height} pixels)")
    if not do_convert_rgb and image.mode != "RGB":
        raise ImageError(f"image has mode {image.mode!r} but do_convert_rgb is off; only RGB is allowed")
    return np.asarray(to_rgb(image) if do_convert_rgb else image)


def hf_normalized(pixels: np.ndarray, p, backend: str = "pil") -> np.ndarray:
    """[3, h, w] uint8 -> float32 rescaled and normalized with `p`'s do_rescale / rescale_factor /
    do_normalize / image_mean / image_std, in the arithmetic of HF's backend: "pil" rescales in float64
    cast to float32, then normalizes in float32; "torchvision" folds the rescale into mean and std."""
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (p.image_mean, p.image_std))  # [3, 1, 1]
    if backend == "pil":
        x = (pixels.astype(np.float64) * p.rescale_factor).astype(np.float32) if p.do_rescale else pixels.astype(np.float32)
        return (x - mean) / std if p.do_normalize else x
    x = pixels.astype(np.float32)
    if p.do_normalize:
        unscale = np.float32(1.0 / p.rescale_factor if p.do_rescale else 1.0)
        return (x - mean * unscale) / (std * unscale)
    return x * np.float32(p.rescale_factor) if p.do_rescale else x


def check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_triple(name: str, value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {value!r}")
    return tuple(check_number(name, v) for v in value)


def _check_required(p: ImagePreprocessor) -> None:
    needs = [
        (p.do_resize, p.resample is not None, "do_resize needs resample"),
        (p.do_resize, (p.shortest_edge is None) != (p.size_hw is None),
         "do_resize needs exactly one of shortest_edge or size_hw"),
        (p.do_center_crop, p.crop_size is not None, "do_center_crop needs crop_size"),
        (p.do_rescale, p.rescale_factor is not None, "do_rescale needs rescale_factor"),
        (p.do_normalize, p.image_mean is not None and p.image_std is not None,
         "do_normalize needs image_mean and image_std"),
        (p.do_normalize, p.image_std is None or 0.0 not in p.image_std,
         "image_std must not contain 0"),
    ]
    for active, ok, message in needs:
        if active and not ok:
            raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# transformers config -> fields (HF's rules: a key absent takes the class default; a key present
# with null stays null, so a null do_* flag is off)


def _hf_fields(d: dict, family: str) -> dict:
    """The dataclass fields for an HF config of this family (class defaults for absent keys)."""
    defaults = _HF_DEFAULTS[family]

    def get(key):  # a key present with null stays null, as in HF
        return d.get(key, defaults[key])

    size = _hf_size(get("size"), bool(d.get("default_to_square", False)))
    if family == "clip" and d.get("use_square_size"):
        size = {"height": 224, "width": 224}  # HF uses the CLASS default (224), not `size`
    return dict(
        do_convert_rgb=_hf_flag(d, "do_convert_rgb"),
        # Other families' do_pad pads the batch to its largest image: a no-op at a fixed size
        # (pad_size is checked by _check_batch_pad); Llava's pads each image to a square first.
        do_pad=family == "llava" and _hf_flag(d, "do_pad", get("do_pad")),
        do_resize=_hf_flag(d, "do_resize"),
        shortest_edge=(size or {}).get("shortest_edge"),
        size_hw=(size["height"], size["width"]) if size and "height" in size else None,
        resample=get("resample"),
        do_center_crop=_hf_flag(d, "do_center_crop", get("do_center_crop")),
        crop_size=hf_crop(get("crop_size")),
        do_rescale=_hf_flag(d, "do_rescale"),
        rescale_factor=d.get("rescale_factor", 1 / 255),
        do_normalize=_hf_flag(d, "do_normalize"),
        image_mean=_hf_triple(get("image_mean")),
        image_std=_hf_triple(get("image_std")),
    )


def _hf_family(d: dict) -> str:
    field, kind = "image_processor_type", d.get("image_processor_type")
    if kind is None and isinstance(d.get("feature_extractor_type"), str):
        field, kind = "feature_extractor_type", d["feature_extractor_type"]
        kind = kind.replace("FeatureExtractor", "ImageProcessor")  # as HF's AutoImageProcessor
    if kind is None and "image_processor" in d:
        raise ValueError('this is a whole processor config: pass its "image_processor" dict')
    if kind not in _HF_TYPES:
        raise ValueError(
            f"unsupported {field} {d.get(field)!r}; supported image_processor_type values: "
            f"{', '.join(hf_image_processor_kinds())}"
        )
    return _HF_TYPES[kind]


def _check_batch_pad(d: dict, output_size: tuple[int, int]) -> None:
    """CLIP/SigLIP/BiT do_pad zero-pads the finished pixel_values to pad_size (or to the largest
    image in the batch, a no-op here): refuse a pad_size that would change the output."""
    pad = d.get("pad_size")
    if not _hf_flag(d, "do_pad", False) or pad is None:
        return
    if hf_crop(pad, "pad_size") != tuple(output_size):
        raise ValueError(
            f"do_pad with pad_size {pad!r} zero-pads pixel_values beyond the {output_size} "
            "output; not supported. Allowed: do_pad false, pad_size null, or pad_size equal "
            "to the output size"
        )


def _hf_flag(d: dict, key: str, default: bool = True) -> bool:
    value = d.get(key, default)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{key} must be true, false or null, got {value!r}")
    return bool(value)


def _hf_size(size: Any, default_to_square: bool) -> dict | None:
    """HF get_size_dict for `size`: int -> shortest_edge (or square), [h, w], or a dict."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    if isinstance(size, dict) and set(size) in ({"shortest_edge"}, {"height", "width"}):
        return size
    raise ValueError(
        f"unsupported size {size!r}; allowed: an int, [height, width], "
        '{"shortest_edge": n} or {"height": h, "width": w}'
    )


def hf_crop(crop: Any, name: str = "crop_size") -> tuple[int, int] | None:
    if crop is None:
        return None
    if isinstance(crop, int) and not isinstance(crop, bool):
        return (crop, crop)
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return tuple(crop)
    if isinstance(crop, dict) and set(crop) == {"height", "width"}:
        return (crop["height"], crop["width"])
    raise ValueError(
        f"unsupported {name} {crop!r}; allowed: an int, [height, width] or "
        '{"height": h, "width": w}'
    )


def _hf_triple(value: Any) -> Any:
    """HF allows one float for all channels."""
    is_scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (value,) * 3 if is_scalar else value
