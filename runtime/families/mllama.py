"""mllama (`MllamaForConditionalGeneration`, Llama-3.2-Vision): cross-attention fusion.

    image -> tiles + aspect ratio (runtime/mllama.py); the prompt keeps ONE <|image|> token per image
    batch: rows' images packed as HF pads them ([B, I] slots, absent ones all zero, id 0)
          -> vision over the B*I slots -> [B, I, T, P, Cvo] (compressed: [B, I, T, 1 + K, Cvo], below)
          -> cross_kv -> each cross layer's K/V [B, Hkv, I, T, P, D]
          -> Batch.context: the cross K/V (constant for the request) and the cross-attention mask
             [B, S, I, T] (each decode step feeds its last row again)
    A batch without any image: one slot of zero K/V and an all-zero mask: the cross layers are the identity,
    as HF skips them.

Visual-token compression acts on each tile's P = 1 + h*w vision rows: the [CLS] row stays (the tile's one
summary row, which the cross-attention layers were trained to read beside the patches) and the h x w patch
grid becomes K rows (pool; topk/merge rank patches by the tile's [CLS] attention in the tower's last
layer, the vision graph's attention_scores [N, T, h*w]), so the cross K/V hold T x (1 + K) rows per image.
`--visual-tokens` counts the patch rows.
The prompt is unchanged (one <|image|> per image): the saving is the cross K/V and every cross layer's
attention over them, not the context.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .. import mllama
from ..compress import METHODS, Compression
from ..generate import DecoderContext
from .base import SCORES, Family, ImageTokens, MediaItem

STATIC_ROWS = ("this artifact's cross_kv and decoder graphs fix the rows per tile (exported before the rows per tile "
               "became the dynamic dim tile_rows); re-export it with this vlmdeploy to compress")


class Mllama(Family):
    name = "mllama"
    media_in_prompt = False
    compression_methods = METHODS  # topk/merge: each tile's [CLS] attention to its patches (attention_scores)

    def configure(self, preprocess: dict) -> None:
        self.params = mllama.MllamaParams.from_dict(preprocess)
        fp = self.facts.family_params
        self.max_tiles, self.tokens_per_tile = fp["max_image_tiles"], fp["tokens_per_tile"]
        self.num_cross = len(fp["cross_attention_layers"])
        self.dynamic_rows = "tile_rows" in self.facts.limits  # cross K/V [B,Hkv,I,T,R,D]; before: [B,Hkv,I,T*P,D]

    def check_compression(self, compression, scored):
        compression = super().check_compression(compression, scored)
        if compression is not None:
            if not self.dynamic_rows:
                raise ValueError(f"the mllama family cannot apply visual-token compression here: {STATIC_ROWS}")
            compression.tokens(patch_grid(self.tokens_per_tile))  # every tile has this grid: a K too large fails at load
        return compression

    @property
    def tile_rows(self) -> int:
        """Cross K/V rows per tile: the vision graph's P, or [CLS] + the K kept patches."""
        if self.compression is None:
            return self.tokens_per_tile
        return 1 + self.compression.tokens(patch_grid(self.tokens_per_tile))

    def compressed(self, item: MediaItem) -> MediaItem:
        """The prompt keeps its one <|image|>; the rows shrink in `_cross_kv` (the same K for every tile)."""
        return replace(item, meta={**item.meta, "compressed": self.tile_rows - 1})

    def prepare(self, image) -> MediaItem:
        out = mllama.preprocess_image(image, self.params)  # tiles [n, 3, t, t]
        return MediaItem(out.tiles, 1, {"grid": out.grid})

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        """One <|image|> per image stays as it is; BOS goes after the leading image tokens (HF's rule)."""
        return mllama.prompt_text(prompt, self.facts.bos_token, self.params.image_token)

    def embed_media(self, items: list[MediaItem], run) -> list[np.ndarray]:
        """No prompt embeddings: the vision states reach the decoder as cross K/V (decoder_context)."""
        return [np.zeros((0, self.facts.dims.hidden), self.facts.dims.dtype) for _ in items]

    def decoder_context(self, ids: list[np.ndarray], items: list[list[MediaItem]], run) -> DecoderContext:
        s = max(len(r) for r in ids)
        num_images = max(1, max(len(r) for r in items))
        mask = np.zeros((len(ids), s, num_images, self.max_tiles), np.int64)  # [B, S, I, T]
        for b, (row, its) in enumerate(zip(ids, items)):
            tiles = [int(np.prod(i.meta["grid"])) for i in its]
            mask[b, s - len(row):] = mllama.cross_attention_mask(row, self.facts.image_token_id, tiles, self.max_tiles,
                                                                 num_images)
        kv = self._cross_kv(items, num_images, run) if any(items) else self._zero_kv(len(ids))
        return DecoderContext(constant=kv, per_token={"cross_attention_mask": mask})

    def _cross_kv(self, items: list[list[MediaItem]], num_images: int, run) -> dict[str, np.ndarray]:
        rows = [[mllama.MllamaImage(i.pixels, i.meta["grid"]) for i in its] for its in items]
        packed = mllama.pack_images(rows, self.max_tiles, num_images)
        b, n = packed.aspect_ratio_ids.shape
        vision, cross_kv = self.facts.pipeline["image"]
        out = run(vision, {
            "pixel_values": packed.pixel_values.reshape(b * n, *packed.pixel_values.shape[2:]).astype(self.facts.dims.dtype),
            "aspect_ratio_ids": packed.aspect_ratio_ids.reshape(-1),
            "aspect_ratio_mask": packed.aspect_ratio_mask.reshape(b * n, -1)})
        states = out["vision_states"]  # [B*I, T, P, Cvo]
        if self.compression is not None:  # scores [B*I, T, P-1] per patch (vision graphs exported with them)
            states = compress_tiles(self.compression, states, out.get(SCORES))  # [B*I, T, 1 + K, Cvo]
        return run(cross_kv, {"vision_states": states.reshape(b, n, *states.shape[1:])})

    def _zero_kv(self, batch: int) -> dict[str, np.ndarray]:
        d = self.facts.dims
        rows = (self.max_tiles, self.tile_rows) if self.dynamic_rows else (self.max_tiles * self.tokens_per_tile,)
        shape = (batch, d.kv_heads, 1, *rows, d.head_dim)
        return {f"cross_key_values.{j}.{kv}": np.zeros(shape, d.dtype) for j in range(self.num_cross)
                for kv in ("key", "value")}

    @classmethod
    def request_kv(cls, facts, images: int, batch: int, compression: Compression | None = None) -> tuple[int, str]:
        d, fp = facts.dims, facts.family_params
        tiles, per_tile = fp["max_image_tiles"], fp["tokens_per_tile"]
        if compression is not None:
            per_tile = 1 + compression.tokens(patch_grid(per_tile))  # [CLS] + the kept patches
        slots = tiles * per_tile  # K/V rows per image, padded tiles included
        layers = len(fp["cross_attention_layers"])
        per_image = 2 * layers * d.kv_heads * slots * d.head_dim * np.dtype(d.dtype).itemsize
        kept = "" if compression is None else f" after {compression.label()} per tile"
        return per_image * batch * max(1, images), (
            f"{layers} cross-attention layers x K,V x {d.kv_heads} heads x {slots} rows ({tiles} tiles x "
            f"{per_tile}{kept}) x {d.head_dim} per image, x {max(1, images)} image(s) x batch {batch}; once per "
            "request, independent of the context")

    @classmethod
    def compressed_tokens(cls, preprocess, row: ImageTokens, compression: Compression) -> ImageTokens:
        """Each tile's rows become [CLS] + K; the context keeps the one <|image|> token."""
        return replace(row, tokens_per_tile=1 + compression.tokens(patch_grid(row.tokens_per_tile)))

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        p = mllama.MllamaParams.from_dict(preprocess) if preprocess else mllama.MllamaParams(tile_size=tile_size[0])
        sizes = list(image_sizes) or [tuple(tile_size)]
        rows = []
        for size in sizes:
            mllama.tile_grid(tuple(size), p)  # the size is valid
            rows.append(ImageTokens(tuple(size), p.max_image_tiles, tile_tokens, 1, typical="" if image_sizes else "typical"))
        return tuple(rows), (f"mllama: one <|image|> token per image in the context; the vision states "
                             f"({p.max_image_tiles} tiles x {tile_tokens} tokens, padded tiles included) are read "
                             "through each cross-attention layer's own K/V, outside the context")


def patch_grid(tokens_per_tile: int) -> tuple[int, int]:
    """A tile's patch grid (h, w): its rows but the [CLS] one (Llama-3.2-Vision: 1601 = 1 + 40 x 40)."""
    side = math.isqrt(tokens_per_tile - 1)
    if side * side != tokens_per_tile - 1:
        raise ValueError(f"{tokens_per_tile} rows per tile are not [CLS] + a square patch grid")
    return side, side


def compress_tiles(compression: Compression, states: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
    """states [N, T, 1 + h*w, C] (scores [N, T, h*w] per patch) -> [N, T, 1 + K, C]: each tile's [CLS] row,
    then its patch grid compressed. Padded tiles and empty image slots are compressed the same way: a text
    row that reads no tile attends evenly to every row (HF's mask; only its MLP output is masked out), so
    their rows matter. Their scores are all 0 and topk keeps the earliest patches (ties: the earlier)."""
    n, t, p, c = states.shape
    grid = patch_grid(p)
    tiles = states.reshape(n * t, p, c)
    tile_scores = [None] * (n * t) if scores is None else scores.reshape(n * t, p - 1)
    kept = np.stack([compression.apply(tile[1:], grid, s)[0] for tile, s in zip(tiles, tile_scores)])  # [N*T, K, C]
    return np.concatenate([tiles[:, :1], kept], axis=1).reshape(n, t, -1, c)


FAMILY = Mllama
