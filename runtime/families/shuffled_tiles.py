"""Visual-token compression for families whose vision rows are tiles after a pixel shuffle (InternVL,
Idefics3/SmolVLM): each tile's token grid (side x side after the shuffle) is compressed on its own, and
the tile keeps its wrapper text with K placeholder tokens instead of side^2.

    tiles [n, side^2, C] (+ scores [n, (side*r)^2] per patch before the shuffle, mean per r x r block)
        -> each tile: pool / topk / merge to K -> [n * K, C]; the prompt: every tile's K tokens
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..compress import METHODS, Compression, compress_tiles
from .base import Family, ImageTokens, MediaItem


class ShuffledTiles(Family):
    """A Family whose every vision row (tile) gives `tile_tokens` prompt tokens on a square grid."""

    compression_methods = METHODS
    compression_refusal = "its tiles' tokens are not a square grid"

    @property
    def tile_tokens(self) -> int:
        """Tokens per tile without compression (the projector's output rows)."""
        raise NotImplementedError

    @property
    def tile_grid(self) -> tuple[int, int]:
        return _square(self.tile_tokens)

    def check_compression(self, compression, scored):
        if compression is not None and math.isqrt(self.tile_tokens) ** 2 != self.tile_tokens:
            self.refuse(compression, ())
        compression = super().check_compression(compression, scored)
        if compression is not None:
            compression.tokens(self.tile_grid)  # every tile has this grid: a K too large fails at load
        return compression

    def kept_per_tile(self, item: MediaItem) -> int:
        """The placeholder tokens each of the item's tiles holds in the prompt."""
        return item.meta.get("compressed", self.tile_tokens)

    def compressed(self, item: MediaItem) -> MediaItem:
        k = self.compression.tokens(self.tile_grid)
        return replace(item, num_tokens=k * len(item.pixels), meta={**item.meta, "compressed": k})

    def pack_compressed(self, item, features, scores):
        """features [n, T, C] (scores [n, P]) -> [n * K, C], tile by tile in order."""
        kept = compress_tiles(self.compression, features, self.tile_grid, scores)  # [n, K, C]
        return kept.reshape(-1, kept.shape[-1])

    @classmethod
    def compressed_tokens(cls, preprocess, row: ImageTokens, compression: Compression) -> ImageTokens:
        """Every tile's side^2 placeholders become K; the wrapper text is unchanged."""
        k = compression.tokens(_square(row.tokens_per_tile))
        return replace(row, tokens_per_tile=k, tokens=row.tokens - row.tiles * (row.tokens_per_tile - k))


def _square(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return side, side
