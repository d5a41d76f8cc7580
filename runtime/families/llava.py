"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size image -> a fixed number of tokens.

    image -> CLIP-style resize/crop (images.ImagePreprocessor) -> [1, 3, H, W] -> vision -> projector -> [T, C]
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ..compress import METHODS, pool_bin_starts, pool_grid
from ..images import ImagePreprocessor
from ..spec import is_int
from .base import Family, ImageTokens, MediaItem


class Llava(Family):
    name = "llava"
    compression_methods = METHODS
    compression_refusal = "its image features keep the [CLS] token (vision_feature_select_strategy 'full'): not a square grid"

    def configure(self, preprocess: dict) -> None:
        self.preprocessor = ImagePreprocessor.from_dict(preprocess)
        self.tokens = self.facts.family_params.get("tokens_per_image", self.facts.tokens_per_image)
        if not is_int(self.tokens, 1):
            raise ValueError(f"family_params.tokens_per_image must be an int >= 1, got {self.tokens!r}")
        side = math.isqrt(self.tokens)
        self.grid = (side, side)  # the patch grid of the features
        if side * side != self.tokens:
            self.compression_methods = ()

    def check_compression(self, compression, scored):
        compression = super().check_compression(compression, scored)
        if compression is not None:
            compression.tokens(self.grid)  # every image has this grid: a K too large fails at load
        return compression

    def prepare(self, image) -> MediaItem:
        return MediaItem(self.preprocessor([image]), self.tokens)  # [1, 3, H, W]

    def compressed(self, item: MediaItem) -> MediaItem:
        return replace(item, num_tokens=self.compression.tokens(self.grid), meta={**item.meta, "compressed": self.grid})

    def pack_compressed(self, item, features, scores):
        """features [1, T, C], scores [1, T] -> the kept [K, C]; item.meta["kept_at"]: where each sits
        in the uncompressed grid (prompt_positions)."""
        kept, where = self.compression.apply(features[0], self.grid, None if scores is None else scores[0])
        item.meta["kept_at"] = where if self.compression.method != "pool" else self._pool_starts()
        return kept

    def _pool_starts(self) -> np.ndarray:
        return pool_bin_starts(self.grid, pool_grid(self.grid, self.compression.tokens(self.grid)))

    def prompt_positions(self, ids: np.ndarray, items: list[MediaItem]) -> np.ndarray | None:
        """ids [S] -> positions [S] when compressing: each kept token keeps the position it has in the
        uncompressed prompt (pool: its bin's first token; topk: its own; merge: its own, a contextual
        token its group's target's), and the text after an image continues where it would have
        (FastV's rule: the language model reads where a token sits in the picture from its position;
        shapes-hd's `where` answers at 25% pool: 21% renumbered, 96% with these)."""
        if self.compression is None:
            return None
        image_at = np.flatnonzero(np.asarray(ids) == self.facts.media["image"].token_id)  # every placeholder
        kept_at = iter([i.meta.get("kept_at") for i in items])
        out, pos, i, n = [], 0, 0, 0  # i: next token, n: next placeholder
        while n < len(image_at):  # an image's K placeholders (check_placeholders: whole spans)
            text = image_at[n] - i  # tokens before this image
            where = next(kept_at, None)
            where = self._pool_starts() if where is None else where  # before its vision run (plan)
            out += [pos + np.arange(text), pos + text + where]
            pos, i, n = pos + text + self.tokens, image_at[n] + len(where), n + len(where)
        out.append(pos + np.arange(len(ids) - i))
        return np.concatenate(out).astype(np.int64)

    @classmethod
    def compressed_tokens(cls, preprocess, row, compression):
        side = math.isqrt(row.tokens_per_tile)
        if side * side != row.tokens_per_tile:
            cls.refuse(compression, ())  # features with the [CLS] token, as at load
        k = compression.tokens((side, side))
        return replace(row, tokens_per_tile=k, tokens=k)

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        """Every image is one tile of a fixed count: the artifact's (as `configure`), else the tile's."""
        fixed = facts.family_params.get("tokens_per_image", facts.tokens_per_image) if facts else tile_tokens
        h, w = tile_size
        rule = f"LLaVA: every image is resized to {h}x{w}, one tile of {fixed:,} tokens whatever its size"
        if image_sizes:
            return tuple(ImageTokens(tuple(s), 1, fixed, fixed) for s in image_sizes), rule
        return (ImageTokens(None, 1, fixed, fixed, typical="any size"),), rule


FAMILY = Llava
