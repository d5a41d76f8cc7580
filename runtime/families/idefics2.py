"""Idefics2 (`Idefics2ForConditionalGeneration`): a perceiver resampler, a fixed count of latents per crop.

    image -> resized (and optionally split into 4 crops + the whole image), runtime/idefics2.py
          -> every crop of a call zero-padded to one square + its pixel mask
          -> host: patch mask + patch positions -> vision -> projector (MLP + resampler) -> [crops, L, C]
    prompt: each <image> -> <fake_token_around_image> + <image> x L per crop, as Idefics2Processor writes it
"""

from __future__ import annotations

import numpy as np

from .. import idefics2
from .base import Family, ImageTokens, MediaItem


class Idefics2(Family):
    name = "idefics2"
    compression_refusal = "its perceiver resampler gives a fixed number of learned latents per image"

    def configure(self, preprocess: dict) -> None:
        self.params = idefics2.Idefics2Params.from_dict(preprocess)
        self.patch_size = self.facts.family_params["patch_size"]
        self.patches_per_side = self.facts.family_params["patches_per_side"]

    def prepare(self, image) -> MediaItem:
        out = idefics2.preprocess_image(image, self.params)  # pixels [n, 3, h, w], mask [n, h, w]
        return MediaItem(out.pixels, self.params.image_seq_len * len(out.pixels), {"pixel_mask": out.pixel_mask})

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        """HF's whole-text rule (adjacent images share their fake tokens; the crop count is the processor's)."""
        return idefics2.expand_prompt(prompt, self.params)

    def embed_media(self, items: list[MediaItem], run) -> list[np.ndarray]:
        """Every crop of the call padded to the graphs' square, one vision and one resampler run."""
        if not items:
            return []
        side = self.facts.dims.image_size[0]
        pixels, masks = _pad_square([i.pixels for i in items], [i.meta["pixel_mask"] for i in items], side)
        patch_mask, positions = idefics2.patch_inputs(masks, self.patch_size, self.patches_per_side)  # [N, P]
        patch_mask = patch_mask.reshape(len(pixels), -1).astype(np.int64)
        vision, projector = self.facts.pipeline["image"]
        features = run(vision, {"pixel_values": pixels.astype(self.facts.dims.dtype), "patch_mask": patch_mask,
                                "position_ids": positions})
        embeds = run(projector, {"image_features": features, "patch_mask": patch_mask})  # [N, L, C]
        splits = np.cumsum([len(i.pixels) for i in items])[:-1]
        return [self._checked(i, e.reshape(-1, e.shape[-1])) for i, e in zip(items, np.split(embeds, splits))]

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        p = idefics2.Idefics2Params.from_dict(preprocess)
        crops = 5 if p.do_image_splitting else 1
        sizes = list(image_sizes) or [tuple(tile_size)]
        rows = tuple(ImageTokens(tuple(s), crops, p.image_seq_len, crops * p.image_seq_len,
                                 typical="" if image_sizes else "typical") for s in sizes)
        return rows, (f"Idefics2: {p.image_seq_len} resampler latents per crop, "
                      f"{'4 crops + the whole image' if p.do_image_splitting else 'one crop'} per image, any size")


def _pad_square(pixels: list[np.ndarray], masks: list[np.ndarray], side: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops [n_i, 3, h, w] + masks [n_i, h, w] -> [N, 3, side, side] and [N, side, side], zero-padded
    bottom/right (as HF pads a batch; the padded patches are masked out)."""
    n = sum(len(p) for p in pixels)
    out, out_mask = np.zeros((n, 3, side, side), np.float32), np.zeros((n, side, side), np.int64)
    row = 0
    for p, m in zip(pixels, masks):
        for crop, mask in zip(p, m):
            h, w = crop.shape[-2:]
            out[row, :, :h, :w], out_mask[row, :h, :w] = crop, mask
            row += 1
    return out, out_mask


FAMILY = Idefics2
