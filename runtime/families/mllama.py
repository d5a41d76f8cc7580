"""mllama (`MllamaForConditionalGeneration`, Llama-3.2-Vision): cross-attention fusion.

    image -> tiles + aspect ratio (runtime/mllama.py); the prompt keeps ONE <|image|> token per image
    batch: rows' images packed as HF pads them ([B, I] slots, absent ones all zero, id 0)
          -> vision over the B*I slots -> [B, I, T, P, Cvo] -> cross_kv -> each cross layer's K/V [B, Hkv, I, T*P, D]
          -> Batch.context: the cross K/V (constant for the request) and the cross-attention mask
             [B, S, I, T] (each decode step feeds its last row again)
    A batch without any image: one slot of zero K/V and an all-zero mask: the cross layers are the identity,
    as HF skips them.
"""

from __future__ import annotations

import numpy as np

from .. import mllama
from ..generate import DecoderContext
from .base import Family, ImageTokens, MediaItem


class Mllama(Family):
    name = "mllama"
    media_in_prompt = False
    compression_refusal = (
        "its image tokens are cross-attention K/V rows, not prompt tokens, and the exported graphs fix their count: "
        "cross_kv takes vision_states [batch, images, tiles, P, C] and the decoder cross K/V of tiles x P rows with "
        "P = tokens_per_tile a static dimension, and the decoder expands each tile's cross-attention mask to P rows "
        "inside the graph; fewer rows per tile would need graphs exported with P dynamic")

    def configure(self, preprocess: dict) -> None:
        self.params = mllama.MllamaParams.from_dict(preprocess)
        fp = self.facts.family_params
        self.max_tiles, self.tokens_per_tile = fp["max_image_tiles"], fp["tokens_per_tile"]
        self.num_cross = len(fp["cross_attention_layers"])

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
        states = run(vision, {
            "pixel_values": packed.pixel_values.reshape(b * n, *packed.pixel_values.shape[2:]).astype(self.facts.dims.dtype),
            "aspect_ratio_ids": packed.aspect_ratio_ids.reshape(-1),
            "aspect_ratio_mask": packed.aspect_ratio_mask.reshape(b * n, -1)})["vision_states"]  # [B*I, T, P, Cvo]
        return run(cross_kv, {"vision_states": states.reshape(b, n, *states.shape[1:])})

    def _zero_kv(self, batch: int) -> dict[str, np.ndarray]:
        d = self.facts.dims
        shape = (batch, d.kv_heads, 1, self.max_tiles * self.tokens_per_tile, d.head_dim)
        return {f"cross_key_values.{j}.{kv}": np.zeros(shape, d.dtype) for j in range(self.num_cross)
                for kv in ("key", "value")}

    @classmethod
    def request_kv(cls, facts, images: int, batch: int) -> tuple[int, str]:
        d, fp = facts.dims, facts.family_params
        slots = fp["max_image_tiles"] * fp["tokens_per_tile"]  # K/V rows per image, padded tiles included
        layers = len(fp["cross_attention_layers"])
        per_image = 2 * layers * d.kv_heads * slots * d.head_dim * np.dtype(d.dtype).itemsize
        return per_image * batch * max(1, images), (
            f"{layers} cross-attention layers x K,V x {d.kv_heads} heads x {slots} rows ({fp['max_image_tiles']} tiles x "
            f"{fp['tokens_per_tile']}) x {d.head_dim} per image, x {max(1, images)} image(s) x batch {batch}; once per "
            "request, independent of the context")

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


FAMILY = Mllama
