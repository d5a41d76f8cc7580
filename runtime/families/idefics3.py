"""Idefics3 and SmolVLM: an image split into rows x cols tiles + a global tile, pixel-shuffle connector.

    image -> longest edge resized, split into tiles of the tower's size + the whole image as one tile
          (runtime/idefics3.py) -> [tiles, 3, t, t]
    all tiles of a call -> vision (with each tile's patch positions, computed here from its pixel mask)
          -> projector -> [tiles, n, C] -> [tiles * n, C] per image
    prompt: each <image> -> HF's text: <fake_token_around_image><row_r_col_c><image>*n ... <global-img><image>*n
"""

from __future__ import annotations

import numpy as np

from .. import idefics3
from .base import Family, ImageTokens, MediaItem


class Idefics3(Family):
    name = "idefics3"
    compression_refusal = "its tiles are pixel-shuffled and wrapped in per-tile row/column text tokens; not supported yet"

    def configure(self, preprocess: dict) -> None:
        self.params = idefics3.Idefics3Params.from_dict(preprocess)
        self.patch_size = self.facts.family_params["patch_size"]

    def prepare(self, image) -> MediaItem:
        out = idefics3.preprocess_image(image, self.params)  # [tiles, 3, t, t]
        return MediaItem(out.pixels, self.params.image_seq_len * len(out.pixels),
                         {"grid": out.grid, "pixel_mask": out.pixel_mask})

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        placeholder = self.facts.image_token
        parts = prompt.split(placeholder)
        if len(parts) - 1 != len(items):
            raise ValueError(f"prompt has {len(parts) - 1} {placeholder} placeholders but {len(items)} images were "
                             "given; give one image per placeholder")
        return parts[0] + "".join(idefics3.image_prompt(*i.meta["grid"], self.params) + part
                                  for i, part in zip(items, parts[1:]))

    def embed_media(self, items: list[MediaItem], run) -> list[np.ndarray]:
        """One vision run over every tile of every image, with the tiles' patch positions."""
        if not items:
            return []
        pixels = np.concatenate([i.pixels for i in items]).astype(self.facts.dims.dtype)  # [N, 3, t, t]
        masks = np.concatenate([i.meta["pixel_mask"] for i in items])  # [N, t, t]
        side = self.facts.dims.image_size[0] // self.patch_size
        _, positions = idefics3.patch_positions(masks, self.patch_size, side)  # [N, P]
        vision, projector = self.facts.pipeline["image"]
        features = run(vision, {"pixel_values": pixels, "position_ids": positions})
        embeds = run(projector, features)  # [N, n, C]
        splits = np.cumsum([len(i.pixels) for i in items])[:-1]
        return [self._checked(i, e.reshape(-1, e.shape[-1])) for i, e in zip(items, np.split(embeds, splits))]

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        p = idefics3.Idefics3Params.from_dict(preprocess)
        sizes = list(image_sizes) or [(p.tile, p.tile), (p.longest_edge, p.longest_edge)]
        rows = []
        for s in sizes:
            r, c = p.grid(tuple(s))
            rows.append(ImageTokens(tuple(s), p.num_tiles(tuple(s)), p.image_seq_len, p.image_token_count(tuple(s)),
                                    grid=(r, c) if r else None, resolution=p.split_size(tuple(s)) if r else None,
                                    typical="" if image_sizes else "typical"))
        return tuple(rows), (f"Idefics3/SmolVLM: longest edge to {p.longest_edge} px, split into {p.tile}x{p.tile} "
                             f"tiles + one global tile, {p.image_seq_len} <image> tokens each (+ row/col and "
                             "wrapper tokens in the text)")


FAMILY = Idefics3
