"""Qwen2-VL and Qwen2.5-VL: each image or video at its own resolution, M-RoPE positions.

    image -> smart resize, patchify (runtime/qwen_images.py) -> [U, M, C*T*P*P] + grid (t, h, w)
    video -> frames (runtime/video.py) -> the same, frames paired in time
    all items of a call -> one vision graph run (patch positions, frame segments and Qwen2.5-VL's
          window order computed here, runtime/mrope.py) -> [U, C] -> split per item, U_i tokens each
    prompt -> positions [3, S] from the token types and the grids (mrope.rope_index)
"""

from __future__ import annotations

import numpy as np

from dataclasses import replace

from ..compress import pool_grid
from ..mrope import MediaSpan, rope_index, vision_inputs
from ..qwen_images import QwenVLPreprocessor, tokens_for
from ..video import FrameSampling
from .base import Family, ImageTokens, MediaItem

KIND_IDS = {"image": 1, "video": 2}  # token types of HF's mm_token_type_ids


class Qwen2VL(Family):
    name = "qwen2_vl"
    media_kinds = ("image", "video")
    size_options = True
    compression_methods = ("pool",)
    compression_refusal = (
        "its vision graph (ViT + 2x2 merger) has no attention_scores output: they would be the last block's "
        "attention over all of an item's patches, an extra N x N per head in every run of the graph; and a kept "
        "subset of tokens is no grid, so M-RoPE (positions from each item's t x h x w grid) has no rule for it")

    def configure(self, preprocess: dict) -> None:
        self.preprocessor = QwenVLPreprocessor.from_dict(preprocess["image"])
        self.video_preprocessor = QwenVLPreprocessor.from_dict(preprocess["video"], video=True)
        self.frame_sampling = FrameSampling(**preprocess.get("video_sampling", {}))
        p = self.facts.family_params
        self.merge = p["merge_size"]
        self.window_units = p.get("window_units")
        self.tokens_per_second = p.get("tokens_per_second")

    def prepare(self, image, min_pixels: int | None = None, max_pixels: int | None = None) -> MediaItem:
        patches, grid = self.preprocessor.image(image, min_pixels=min_pixels, max_pixels=max_pixels)  # [N, Dp]
        return self._item("image", patches, grid, 1.0)

    def prepare_video(self, frames, fps: float | None = None, min_pixels: int | None = None,
                      max_pixels: int | None = None) -> MediaItem:
        """frames [F, H, W, 3] uint8 (runtime/video.py `load_video`); `fps` of the kept frames."""
        pre = self.video_preprocessor
        patches, grid = pre.video(frames, min_pixels=min_pixels, max_pixels=max_pixels)
        interval = 1.0
        if self.tokens_per_second is not None:  # Qwen2.5-VL: temporal ids spaced by seconds per grid step
            interval = self.tokens_per_second * pre.temporal_patch_size / (fps or 2.0)
        return self._item("video", patches, grid, interval)

    def _item(self, kind: str, patches: np.ndarray, grid, interval: float) -> MediaItem:
        m2 = self.merge * self.merge
        units = patches.reshape(-1, m2, patches.shape[-1])  # [U, M, Dp]
        return MediaItem(units, tokens_for(grid, self.merge), {"grid": tuple(int(g) for g in grid),
                                                                "interval": interval}, kind=kind)

    def embed_media(self, items: list[MediaItem], run) -> list[np.ndarray]:
        """One vision run over every item's units: [U_i, M, Dp] each -> [U_i, C] each."""
        if not items:
            return []
        host = vision_inputs([i.meta["grid"] for i in items], self.merge, self.window_units)
        pixels = np.concatenate([i.pixels for i in items]).astype(self.facts.dims.dtype)  # [U, M, Dp]
        feeds = {"pixel_values": pixels, "vision_positions": host.positions, "segments": host.segments}
        if host.order is not None:  # Qwen2.5-VL: the graph sees units window by window
            feeds.update(pixel_values=np.ascontiguousarray(pixels[host.order]), windows=host.windows)
        embeds = run(self.facts.pipeline["image"][0], feeds)  # [U, C]
        if host.restore is not None:
            embeds = embeds[host.restore]
        splits = np.cumsum([i.pixels.shape[0] for i in items])[:-1]
        return [self._checked(item, self.pack_item(item, e, None)) for item, e in zip(items, np.split(embeds, splits))]

    def prompt_positions(self, ids: np.ndarray, items: list[MediaItem]) -> np.ndarray:
        """ids [S] -> M-RoPE positions [3, S] (HF `get_rope_index` for one unpadded row); pooled
        items take the positions of their pooled grid."""
        types = np.zeros(len(ids), dtype=np.int64)
        for kind, media in self.facts.media.items():
            types[ids == media.token_id] = KIND_IDS[kind]
        spans = [MediaSpan(KIND_IDS[i.kind], self._token_grid(i), i.meta["interval"]) for i in items]
        return rope_index(types, spans, self.merge)

    def _token_grid(self, item: MediaItem) -> tuple[int, int, int]:
        """(t, h, w) in patches of the tokens the prompt holds: the pooled grid (x merge) when compressed."""
        if "compressed" not in item.meta:
            return item.meta["grid"]
        oh, ow = item.meta["compressed"]
        return item.meta["grid"][0], oh * self.merge, ow * self.merge

    def compressed(self, item: MediaItem) -> MediaItem:
        """Each frame's (h, w) merged-token grid pooled to (oh, ow): t * oh * ow tokens."""
        t, h, w = item.meta["grid"]
        grid = (h // self.merge, w // self.merge)
        pooled = pool_grid(grid, self.compression.tokens(grid))
        return replace(item, num_tokens=t * pooled[0] * pooled[1], meta={**item.meta, "compressed": pooled})

    def pack_compressed(self, item, features, scores):
        """features [t*h*w, C] (t-major, row-major merged tokens) -> [t*oh*ow, C], each frame pooled."""
        t, h, w = item.meta["grid"]
        frames = features.reshape(t, h // self.merge * (w // self.merge), -1)
        grid = (h // self.merge, w // self.merge)
        return np.concatenate([self.compression.apply(f, grid)[0] for f in frames])

    # -- planning ----------------------------------------------------------------------------

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        pre = QwenVLPreprocessor.from_dict(preprocess["image"]) if preprocess else QwenVLPreprocessor()
        unit = pre.patch_size * pre.merge_size
        rule = (f"Qwen2-VL: each image resized to a multiple of {unit} px within {pre.min_pixels:,}..{pre.max_pixels:,} "
                f"pixels, one token per {unit}x{unit} block")
        sizes = list(image_sizes) or [(448, 448), (720, 1280)]
        rows = []
        for h, w in sizes:
            rh, rw = pre.resized_size(h, w)
            n = (rh // unit) * (rw // unit)
            rows.append(ImageTokens((h, w), 1, n, n, resolution=(rh, rw), typical="" if image_sizes else "typical"))
        return tuple(rows), rule

    @classmethod
    def compressed_tokens(cls, preprocess, row, compression):
        rh, rw = row.resolution
        pre = QwenVLPreprocessor.from_dict(preprocess["image"]) if preprocess else QwenVLPreprocessor()
        unit = pre.patch_size * pre.merge_size
        oh, ow = pool_grid((rh // unit, rw // unit), compression.tokens((rh // unit, rw // unit)))
        return replace(row, tokens_per_tile=oh * ow, tokens=row.tiles * oh * ow)  # video: per temporal step

    @classmethod
    def plan_notes(cls, rows, sized):
        """Where each image is resized to, and what the vision graph's attention over one image costs."""
        notes = [f"{r.label()} is resized to {r.resolution[0]}x{r.resolution[1]}: {4 * r.tokens:,} patches -> "
                 f"{r.tokens:,} tokens" for r in rows]
        big = max(rows, key=lambda r: r.tokens)
        scores = (4 * big.tokens) ** 2 * 4
        notes.append(f"the vision graph attends over all {4 * big.tokens:,} patches of an image at once: "
                     f"{scores / 1e6:,.1f} MB of fp32 attention scores per head (not in the activations line)")
        return notes

    @classmethod
    def video_tokens(cls, preprocess, frames, size):
        """Frames paired in time (temporal_patch_size), each pair one grid of merged 2x2 patches."""
        pre = QwenVLPreprocessor.from_dict(preprocess["video"], video=True) if preprocess else QwenVLPreprocessor()
        t, gh, gw = pre.grid_thw(*size, frames=frames)
        per_step = gh * gw // pre.merge_size**2
        return ImageTokens(tuple(size), t, per_step, t * per_step, grid=(gh // pre.merge_size, gw // pre.merge_size),
                           resolution=(gh * pre.patch_size, gw * pre.patch_size), typical="video")


FAMILY = Qwen2VL
