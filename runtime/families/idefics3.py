"""Idefics3 and SmolVLM: an image split into rows x cols tiles + a global tile, pixel-shuffle connector.

    image -> longest edge resized, split into tiles of the tower's size + the whole image as one tile
          (runtime/idefics3.py) -> [tiles, 3, t, t]
    all tiles of a call -> vision (with each tile's patch positions, computed here from its pixel mask)
          -> projector -> [tiles, n, C] -> [tiles * n, C] per image
    prompt: each <image> -> HF's text: <fake_token_around_image><row_r_col_c><image>*n ... <global-img><image>*n
    compression (--visual-tokens K): each tile's shuffled grid to K tokens, the tags unchanged, <image>*K
    per tile (runtime/families/shuffled_tiles.py)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import idefics3
from .base import SCORES, ImageTokens, MediaItem
from .shuffled_tiles import ShuffledTiles


class Idefics3(ShuffledTiles):
    name = "idefics3"

    def configure(self, preprocess: dict) -> None:
        self.params = idefics3.Idefics3Params.from_dict(preprocess)
        self.patch_size = self.facts.family_params["patch_size"]

    @property
    def tile_tokens(self) -> int:
        return self.params.image_seq_len

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
        return parts[0] + "".join(self._image_prompt(i) + part for i, part in zip(items, parts[1:]))

    def _image_prompt(self, item: MediaItem) -> str:
        """Every tile's tags as HF writes them, with K <image> tokens per tile when compressed."""
        return idefics3.image_prompt(*item.meta["grid"], replace(self.params, image_seq_len=self.kept_per_tile(item)))

    def embed_media(self, items: list[MediaItem], run) -> list[np.ndarray]:
        """One vision run over every tile of every image, with the tiles' patch positions."""
        if not items:
            return []
        pixels = np.concatenate([i.pixels for i in items]).astype(self.facts.dims.dtype)  # [N, 3, t, t]
        masks = np.concatenate([i.meta["pixel_mask"] for i in items])  # [N, t, t]
        side = self.facts.dims.image_size[0] // self.patch_size
        _, positions = idefics3.patch_positions(masks, self.patch_size, side)  # [N, P]
        vision, projector = self.facts.pipeline["image"]
        feeds = {"pixel_values": pixels, "position_ids": positions}
        scores = None  # [N, P] per patch, when compression ranks tokens
        if self.compression is not None and self.compression.needs_scores:
            outputs = run(vision, feeds, all_outputs=True)
            features, scores = outputs["image_features"], outputs[SCORES]
        else:
            features = run(vision, feeds)
        embeds = run(projector, features)  # [N, n, C]
        splits = np.cumsum([len(i.pixels) for i in items])[:-1]
        rows = [None] * len(items) if scores is None else np.split(scores, splits)
        return [self._checked(i, self.pack_item(i, e, s)) for i, e, s in zip(items, np.split(embeds, splits), rows)]

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
