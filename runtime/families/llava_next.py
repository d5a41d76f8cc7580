"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles, a different token count per image.

    image -> best grid resolution -> [base + tiles, 3, crop, crop] -> vision -> projector -> [n, T, C]
          -> unpad the tile grid to the image's aspect, `image_newline` after each row -> [num_tokens, C]

Preprocessing, the token count and the packing are runtime/anyres.py (bit-exact vs HF); the
`image_newline` vector is an artifact tensor.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .. import anyres
from ..compress import Compression, pool_grid
from .base import Family, ImageTokens, MediaItem


class LlavaNext(Family):
    name = "llava_next"
    compression_methods = ("pool",)
    compression_refusal = ("each tile's tokens are stitched into one grid, unpadded to the image's aspect, with a "
                           "newline per row: it needs a grid, so tiles are pooled by a square factor only")

    def configure(self, preprocess: dict) -> None:
        self.params = anyres.AnyresParams.from_dict(preprocess)
        self.newline = self.tensors["image_newline"]  # [C]

    def check_compression(self, compression, scored):
        compression = super().check_compression(compression, scored)
        if compression is not None:
            self.pooled = pooled_params(self.params, compression)  # ValueError for a count it cannot pool to
        return compression

    def compressed(self, item: MediaItem) -> MediaItem:
        size = item.meta["image_size"]
        return replace(item, num_tokens=anyres.num_image_tokens(size, self.pooled), meta={**item.meta, "compressed": True})

    def pack_compressed(self, item, features, scores):
        """features [n, T, C] -> each tile pooled [n, T/f^2, C] -> packed on the pooled grid (as HF packs
        LLaVA-NeXT's features for a patch size f times larger: unpadding and newlines on that grid)."""
        grid = self.params.tile_hw[0] // self.params.patch_size, self.params.tile_hw[1] // self.params.patch_size
        tiles = np.stack([self.compression.apply(f, grid)[0] for f in features])
        return anyres.pack_features(tiles, item.meta["image_size"], self.pooled, self.newline)

    def prepare(self, image) -> MediaItem:
        pixels, size = anyres.preprocess(image, self.params)  # [1 + tiles, 3, crop, crop], (h, w)
        return MediaItem(pixels, anyres.num_image_tokens(size, self.params), {"image_size": size})

    def pack(self, item: MediaItem, features: np.ndarray) -> np.ndarray:
        return anyres.pack_features(features, item.meta["image_size"], self.params, self.newline)

    # -- planning -----------------------------------------------------------------------------

    @classmethod
    def preprocess_from_sizes(cls, arch) -> dict:
        """The llava-hf processors: tiles of the tower's image size, resized by the shortest edge
        and center-cropped; llava-v1.6's pinpoints unless the architecture gives its own."""
        s = arch.image_size
        return anyres.AnyresParams(
            grid_pinpoints=arch.grid_pinpoints or anyres.LLAVA_V16_PINPOINTS, crop_size=(s, s), shortest_edge=s,
            patch_size=arch.patch_size, vision_feature_select_strategy=arch.vision_feature_select_strategy,
            vision_feature_layer=arch.vision_feature_layer,
        ).to_dict()

    @classmethod
    def preprocess_from_checkpoint(cls, arch, config, read_json) -> dict:
        """The image processor's crop/size and the processor's patch size, as the export reads them."""
        image_processor, processor = read_json("preprocessor_config.json"), read_json("processor_config.json")
        if image_processor is None and not (processor or {}).get("image_processor"):
            return cls.preprocess_from_sizes(arch)  # no processor files: the llava-hf layout
        return anyres.AnyresParams.from_hf(image_processor, processor, config).to_dict()

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        """With no sizes: the typical image (a tile-size square, as the export records
        `typical_tokens`; an artifact's own count) and the largest (a pinpoint: no unpadding)."""
        p = anyres.AnyresParams.from_dict(preprocess)
        if image_sizes:
            rows = tuple(_row(s, p) for s in image_sizes)
        else:
            typical = _row((p.tile_side, p.tile_side), p, "typical")
            if facts is not None:
                typical = replace(typical, tokens=facts.tokens_per_image)
            largest = max(p.grid_pinpoints, key=lambda s: anyres.num_image_tokens(s, p))
            rows = (typical, _row(largest, p, "largest"))
        (th, tw), pins = p.tile_hw, ", ".join(f"{h}x{w}" for h, w in p.grid_pinpoints)
        return rows, (f"LLaVA-NeXT anyres: {th}x{tw} tiles of {p.tokens_per_tile:,} tokens, a base tile + the best "
                      f"grid of {pins}; the grid unpadded to the image's aspect, + 1 newline per row")

    @classmethod
    def compressed_tokens(cls, preprocess, row, compression):
        p = anyres.AnyresParams.from_dict(preprocess)
        pooled = pooled_params(p, compression)
        pooled_row = _row(row.size, pooled, row.typical)
        return replace(row, tokens_per_tile=pooled.tokens_per_tile, tokens=pooled_row.tokens, newlines=pooled_row.newlines)

    @classmethod
    def plan_notes(cls, rows, sized):
        big = max((v for v in rows if v.grid), key=lambda v: v.tokens, default=None)
        if big is None:
            return []
        notes = [f"LLaVA-NeXT at {big.size[0]}x{big.size[1]}: {big.tiles} tiles x {big.tokens_per_tile:,} = "
                 f"{big.before_unpadding:,} visual tokens before unpadding (tiles x tokens per tile, the count often "
                 f"quoted); HF's processor and this runtime put {big.tokens:,} <image> tokens in the prompt (after "
                 f"unpadding, incl. {big.newlines} newline tokens)"]
        if not sized:
            notes.append("pass --image-size HxW (repeatable) for the tokens of your images' sizes")
        return notes

    @classmethod
    def projector_extras(cls, text_hidden):
        return {"image_newline": text_hidden}  # [C], an artifact tensor


def pooled_params(p: anyres.AnyresParams, compression: Compression) -> anyres.AnyresParams:
    """The params whose patch size is f times larger: each tile's (h, w) token grid pooled f x f."""
    if p.vision_feature_select_strategy != "default":
        raise ValueError(f"the llava_next family cannot pool features that keep the [CLS] token "
                         f"(vision_feature_select_strategy {p.vision_feature_select_strategy!r})")
    h, w = p.tile_hw[0] // p.patch_size, p.tile_hw[1] // p.patch_size
    oh, ow = pool_grid((h, w), compression.tokens((h, w)))
    if h % oh or w % ow or h // oh != w // ow:
        allowed = [(h // f) * (w // f) for f in range(1, min(h, w) + 1) if h % f == 0 and w % f == 0]
        raise ValueError(f"the llava_next family pools each {h}x{w}-token tile by a square factor; "
                         f"{compression.label()} gives {oh}x{ow}. Allowed tokens per tile: {allowed}")
    return replace(p, patch_size=p.patch_size * (h // oh))


def _row(size, p: anyres.AnyresParams, typical: str = "") -> ImageTokens:
    """One image of (h, w) pixels, as LlavaNextProcessor counts it."""
    size = (int(size[0]), int(size[1]))
    best = anyres.select_best_resolution(size, p.grid_pinpoints)
    th, tw = p.tile_hw
    features = ((th // p.patch_size) * (best[0] // th), (tw // p.patch_size) * (best[1] // tw))
    (top, bottom), _ = anyres.unpad_bounds(size, features)
    return ImageTokens(size, anyres.num_tiles(size, p), p.tokens_per_tile, anyres.num_image_tokens(size, p),
                       anyres.grid_shape(size, p), best, bottom - top, typical)


FAMILY = LlavaNext
