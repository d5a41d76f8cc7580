"""InternVL (`InternVLForConditionalGeneration`): dynamic tiles, pixel shuffle, <img>...</img>.

    image -> the closest-aspect grid of 1..max_patches tiles + a thumbnail (runtime/internvl.py)
          -> [tiles, 3, S, S] -> vision -> projector (pixel shuffle + MLP) -> [tiles, seq, C]
    prompt: each <IMG_CONTEXT> placeholder -> <img> + <IMG_CONTEXT> x (seq x tiles) + </img>
    compression (--visual-tokens K): each tile's shuffled grid to K tokens, K x tiles in <img>...</img>
    (runtime/families/shuffled_tiles.py)
"""

from __future__ import annotations

from dataclasses import replace

from .. import internvl
from .base import ImageTokens, MediaItem
from .shuffled_tiles import ShuffledTiles


class InternVL(ShuffledTiles):
    name = "internvl"

    def configure(self, preprocess: dict) -> None:
        self.params = internvl.InternVLParams.from_dict(preprocess)

    @property
    def tile_tokens(self) -> int:
        return self.params.image_seq_length

    def prepare(self, image) -> MediaItem:
        pixels = internvl.preprocess_image(image, self.params)  # [tiles, 3, S, S]
        return MediaItem(pixels, self.params.image_seq_length * len(pixels))

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        """The i-th placeholder -> HF's replacement for image i (wrapped in <img> ... </img>; compressed:
        K context tokens per tile)."""
        placeholder = self.facts.image_token
        parts = prompt.split(placeholder)
        if len(parts) - 1 != len(items):
            raise ValueError(f"prompt has {len(parts) - 1} {placeholder} placeholders but {len(items)} images were "
                             "given; give one image per placeholder")
        return parts[0] + "".join(self._image_prompt(i) + part for i, part in zip(items, parts[1:]))

    def _image_prompt(self, item: MediaItem) -> str:
        kept = replace(self.params, image_seq_length=self.kept_per_tile(item))
        return internvl.image_prompt(len(item.pixels), kept)

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        p = internvl.InternVLParams.from_dict(preprocess)
        sizes = list(image_sizes) or [tuple(p.tile)]
        rows = tuple(ImageTokens(tuple(s), p.num_tiles(s), p.image_seq_length, p.image_tokens(s),
                                 typical="" if image_sizes else "typical") for s in sizes)
        th, tw = p.tile
        return rows, (f"InternVL: {th}x{tw} tiles in the closest-aspect grid of {p.min_patches}..{p.max_patches} "
                      f"(+ a thumbnail), {p.image_seq_length} tokens each, wrapped in {p.start_image_token}..."
                      f"{p.end_image_token}")


FAMILY = InternVL
