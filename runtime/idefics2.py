"""Idefics2 image preprocessing, batch padding, prompt text and vision patch inputs in numpy + Pillow.

Mirrors transformers 5.24 (``models/idefics2``):

- ``preprocess_image``  Idefics2ImageProcessorPil (what transformers runs without torchvision) for ONE image:
                        with do_image_splitting the uint8 image is cut into 4 quarters (the bottom and right
                        ones take the odd row / column) + the whole; each crop resized on its own (down so its
                        long side fits longest_edge, then each side raised to at least shortest_edge: the
                        aspect ratio is NOT kept for small or thin crops), rescaled, normalized. Crops differ in
                        size, so they come padded bottom/right with zeros to the largest, with a pixel mask.
- ``pad_images``        HF's batch padding: every crop of the call padded to the batch's largest H and W.
                        (HF also pads each prompt to the batch's image count with all-zero images; the model
                        drops those, see ``patch_inputs``, so they are not made here.)
- ``expand_prompt``     the processor's text rule, whole: each ``<image>`` becomes ``image_prompt``; then two
                        adjacent fake tokens become one (so consecutive images share one, also across
                        images) and a fake token followed by a character other than whitespace or ``<`` gets
                        a space after it.
- ``patch_inputs``      the patch attention mask and position ids Idefics2Model.get_image_features /
                        Idefics2VisionEmbeddings compute from pixel masks: a patch is on only when ALL its
                        pixels are (Idefics3: any), positions as Idefics3 (``idefics3.patch_position_ids``).

The perceiver resampler (the projector graph, not here) takes the vision output and the same patch
attention mask, flattened: ``connector(image_hidden_states, attention_mask=patch_attention_mask.view(N, -1))``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .idefics3 import patch_position_ids, pixel_patches
from .images import (ProcessorParams, HF_COMMON_FIELDS, IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, NOT_COMMON, ImageError,
                     coerce_common_field, hf_common_fields, hf_normalized, rgb_pixels)

Pair = tuple[int, int]

HF_IMAGE_TYPES = tuple(f"Idefics2ImageProcessor{s}" for s in ("", "Fast", "Pil"))
IMAGE_TOKEN, FAKE_IMAGE_TOKEN = "<image>", "<fake_token_around_image>"
SPLIT_CROPS = 5  # 4 quarters + the whole image


@dataclass(frozen=True)
class Idefics2Params(ProcessorParams):
    """An Idefics2 image processor's settings (defaults: transformers 5.24's class defaults), the
    processor's image_seq_len and its two image tokens."""

    shortest_edge: int = 378
    longest_edge: int = 980
    do_image_splitting: bool = False
    do_pad: bool = True
    resample: int = 2  # PIL code; 2 = BILINEAR
    do_convert_rgb: bool = True
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STANDARD_STD
    image_seq_len: int = 64
    image_token: str = IMAGE_TOKEN
    fake_image_token: str = FAKE_IMAGE_TOKEN

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if self.shortest_edge > self.longest_edge:
            raise ValueError(f"shortest_edge ({self.shortest_edge}) must not exceed longest_edge ({self.longest_edge})")

    @classmethod
    def from_hf(cls, image_processor: dict, processor: dict | None = None,
                model_config: dict | None = None) -> Idefics2Params:
        """From ``preprocessor_config.json`` (or a 5.x ``processor_config.json``'s "image_processor"), the
        processor dict (image_seq_len) and ``config.json``; absent keys take HF's defaults."""
        ip, processor = _image_dict(image_processor), dict(processor or {})
        params = cls(**_size(ip), image_seq_len=processor.get("image_seq_len", 64), **_hf_common(ip))
        if model_config:
            _check_model(params, model_config)
        return params



    # -- sizes (no pixels needed: the planner uses these) --------------------------------------

    @property
    def num_crops(self) -> int:
        """Images the vision tower sees per image (and image_seq_len blocks in the prompt)."""
        return SPLIT_CROPS if self.do_image_splitting else 1

    def crop_sizes(self, image_size: Pair) -> list[Pair]:
        """(h, w) of each crop of an (h, w) image after resizing, in HF's order."""
        crops = split_sizes(image_size) if self.do_image_splitting else [tuple(image_size)]
        return [self.resized_size(c) for c in crops]

    def resized_size(self, crop_size: Pair) -> Pair:
        """(h, w) of one crop after HF's resize (itself when do_resize is off)."""
        return resized_size(crop_size, self.shortest_edge, self.longest_edge) if self.do_resize else tuple(crop_size)

    def image_token_count(self) -> int:
        """``<image>`` tokens of one image (the same for every image)."""
        return self.image_seq_len * self.num_crops


def resized_size(image_size: Pair, shortest_edge: int, longest_edge: int) -> Pair:
    """HF's Idefics2 get_resize_output_image_size: the long side down to ``longest_edge`` when over it (the
    other int() of the aspect-ratio scaled one), then each side raised to at least ``shortest_edge`` on its
    own (never scaled up together)."""
    h, w = image_size
    if h < 1 or w < 1:
        raise ImageError(f"cannot resize an empty image ({w}x{h} pixels)")
    aspect = w / h
    if w >= h and w > longest_edge:
        w, h = longest_edge, int(longest_edge / aspect)
    elif h > w and h > longest_edge:
        h, w = longest_edge, int(longest_edge * aspect)
    return max(h, shortest_edge), max(w, shortest_edge)


def split_sizes(image_size: Pair) -> list[Pair]:
    """(h, w) of HF's split_images crops: top-left, top-right, bottom-left, bottom-right (the second half of
    an odd side is the larger), then the whole image."""
    h, w = image_size
    if h < 2 or w < 2:
        raise ImageError(f"a {w}x{h} image cannot be split into 4 crops (each side needs 2 pixels or more)")
    hs, ws = (h // 2, h - h // 2), (w // 2, w - w // 2)
    return [(hs[0], ws[0]), (hs[0], ws[1]), (hs[1], ws[0]), (hs[1], ws[1]), (h, w)]


# ---------------------------------------------------------------------------------------------
# Prompt text


def image_prompt(n_crops: int, p: Idefics2Params) -> str:
    """One image's text as ``expand_prompt`` leaves it between other text: a fake token, then per crop
    ``<image>`` * image_seq_len and a fake token (consecutive crops share one). Two images in a row
    share the fake token between them: use ``expand_prompt`` for whole texts."""
    if isinstance(n_crops, bool) or not isinstance(n_crops, (int, np.integer)) or n_crops < 1:
        raise ValueError(f"n_crops must be a positive integer, got {n_crops!r}")
    return p.fake_image_token + (p.image_token * p.image_seq_len + p.fake_image_token) * n_crops


def expand_prompt(text: str, p: Idefics2Params) -> str:
    """Idefics2Processor's rewrite of one text: every ``<image>`` replaced by (fake + image_seq_len images +
    fake) per crop; every doubled fake token made one (within and across images, and any the text wrote);
    a space inserted after a fake token followed by a character that is neither whitespace nor ``<``.
    The crop count is the processor's ``do_image_splitting`` (HF's text ignores a per-call override)."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    fake = p.fake_image_token
    one = f"{fake}{p.image_token * p.image_seq_len}{fake}" * p.num_crops
    text = text.replace(p.image_token, one).replace(fake + fake, fake)
    return re.sub(rf"{re.escape(fake)}(?=[^\s<])", f"{fake} ", text)


# ---------------------------------------------------------------------------------------------
# Pixels


@dataclass(frozen=True)
class Idefics2Image:
    """One preprocessed image: HF's pixel_values and pixel_attention_mask rows for it when it is the
    call's only image."""

    pixels: np.ndarray  # [n, 3, H, W] float32, n = 1 or 5; crops padded bottom/right with 0 to the largest
    pixel_mask: np.ndarray  # [n, H, W] int64, 1 = image


def preprocess_image(image: Image.Image, p: Idefics2Params) -> Idefics2Image:
    """One PIL image -> Idefics2Image."""
    pixels = rgb_pixels(image, p.do_convert_rgb)  # [H, W, 3] uint8
    crops = _split(pixels) if p.do_image_splitting else [pixels]
    if p.do_resize:
        crops = [_resize(c, p.resized_size(c.shape[:2]), p.resample) for c in crops]
    normalized = [hf_normalized(c.transpose(2, 0, 1), p) for c in crops]  # [3, h_i, w_i] float32 each
    return Idefics2Image(*_pad(normalized, _max_size(c.shape[1:] for c in normalized)))


def pad_images(images: Sequence[Idefics2Image]) -> tuple[np.ndarray, np.ndarray]:
    """The crops of one call's images (in order), each padded bottom/right with 0 to the largest H and W
    among them: (pixels [N, 3, Hmax, Wmax] float32, pixel masks [N, Hmax, Wmax] int64), N = all crops.
    HF's pixel_values / pixel_attention_mask are these, grouped per prompt, with all-zero images filling
    prompts that have fewer images (dropped by the model)."""
    if not images or not all(isinstance(im, Idefics2Image) for im in images):
        raise ValueError("pad_images takes a non-empty list of Idefics2Image (from preprocess_image)")
    size = _max_size(im.pixels.shape[2:] for im in images)
    padded = [_pad_image(im, size) for im in images]
    return np.concatenate([x for x, _ in padded]), np.concatenate([m for _, m in padded])


def _pad_image(image: Idefics2Image, size: Pair) -> tuple[np.ndarray, np.ndarray]:
    """[n, 3, h, w], [n, h, w] -> [n, 3, H, W], [n, H, W]: zeros added bottom/right (mask 0 there)."""
    n, _, h, w = image.pixels.shape
    pixels = np.zeros((n, 3, *size), np.float32)
    mask = np.zeros((n, *size), np.int64)
    pixels[:, :, :h, :w], mask[:, :h, :w] = image.pixels, image.pixel_mask
    return pixels, mask


def _pad(crops: list[np.ndarray], size: Pair) -> tuple[np.ndarray, np.ndarray]:
    """[3, h_i, w_i] each -> ([n, 3, H, W] float32, [n, H, W] int64): HF's pad (zeros bottom/right)."""
    pixels = np.zeros((len(crops), 3, *size), np.float32)
    mask = np.zeros((len(crops), *size), np.int64)
    for i, c in enumerate(crops):
        pixels[i, :, :c.shape[1], :c.shape[2]] = c
        mask[i, :c.shape[1], :c.shape[2]] = 1
    return pixels, mask


def _max_size(sizes) -> Pair:
    sizes = [tuple(s) for s in sizes]
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def _split(pixels: np.ndarray) -> list[np.ndarray]:
    """[h, w, 3] -> 4 quarters + the whole (HF's split_images, on the uint8 image before any resize)."""
    (h0, w0), _, _, _, _ = split_sizes(pixels.shape[:2])
    return [pixels[:h0, :w0], pixels[:h0, w0:], pixels[h0:, :w0], pixels[h0:, w0:], pixels]


def _resize(pixels: np.ndarray, size: Pair, resample: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8 with Pillow (HF's PIL backend; same size: a copy)."""
    h, w = size
    return np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((w, h), resample=resample))


# ---------------------------------------------------------------------------------------------
# Vision patch inputs (Idefics2Model.get_image_features + Idefics2VisionEmbeddings.forward)


def patch_inputs(pixel_masks: np.ndarray, patch_size: int, num_patches_per_side: int) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
    """Pixel masks [N, H, W] -> (patch_attention_mask [N, H/P * W/P] bool, position_ids [N, H/P * W/P] int64).

    A patch is on when ALL its P x P pixels are (remainder rows and columns dropped, as unfold); positions
    as ``idefics3.patch_position_ids``. The same flattened mask is the vision encoder's attention mask and
    the perceiver resampler's ``attention_mask`` (context part). ``num_patches_per_side`` is
    vision_config.image_size // patch_size. HF first drops every image whose pixel values are all exactly
    0.0 (``real_images_inds``: the zero images that pad prompts to the batch's image count): pass only the
    real images' masks.
    """
    patch_mask = pixel_patches(pixel_masks, patch_size).all(axis=(2, 4))  # [N, h, w] bool
    return patch_mask.reshape(len(patch_mask), -1), patch_position_ids(patch_mask, num_patches_per_side)


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
        raise ValueError(f"{name} must be a positive integer, got {value!r}")  # edges, image_seq_len
    return int(value)


def _image_dict(image_processor: Any) -> dict:
    if not isinstance(image_processor, dict):
        raise ValueError(f"image processor config must be a dict, got {type(image_processor).__name__}")
    kind = image_processor.get("image_processor_type")
    if kind is not None and kind not in HF_IMAGE_TYPES:
        raise ValueError(f"image_processor_type {kind!r} is not Idefics2's; allowed: {HF_IMAGE_TYPES}")
    return image_processor


def _size(d: dict) -> dict:
    size = d.get("size")
    if size is None:
        return {}
    if not isinstance(size, dict) or set(size) != {"shortest_edge", "longest_edge"}:
        raise ValueError(f'size must be {{"shortest_edge": a, "longest_edge": b}}, got {size!r}')
    return dict(size)


def _hf_common(d: dict) -> dict:
    """The flags and numbers HF's dict gives (and do_image_splitting, do_pad)."""
    return hf_common_fields(d, (*HF_COMMON_FIELDS, "do_image_splitting", "do_pad"))


def _check_model(p: Idefics2Params, config: dict) -> None:
    """image_seq_len is the perceiver's latent count; a resized image holds at least one whole patch."""
    n_latents = (config.get("perceiver_config") or {}).get("resampler_n_latents", 64)
    if n_latents != p.image_seq_len:
        raise ValueError(f"processor image_seq_len={p.image_seq_len} but the perceiver makes {n_latents} tokens per "
                         "image (perceiver_config.resampler_n_latents)")
    patch = (config.get("vision_config") or {}).get("patch_size", 32)
    if p.do_resize and p.shortest_edge < patch:
        raise ValueError(f"shortest_edge={p.shortest_edge} is below the vision patch_size {patch}: a thin image "
                         "would have no whole patch")
