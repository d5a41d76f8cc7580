"""Requests -> `PreparedPrompt` (prompt embeds [S, C]), in the request's thread, through the vision cache.

The runtime's own `VLM._prepare` does the work for one row (placeholder checks, the family's
preprocessing, the vision chain, tokenize, embed, scatter, and the family's prompt positions where
it has them, e.g. M-RoPE). The server's VLM is its own, and its family is wrapped once so that
`embed_media` answers each item from the `VisionCache` when it can and runs the vision graphs
(one run at a time) for the rest.
"""

from __future__ import annotations

import threading

from vlmdeploy.runtime.vlm import _Request

from .engine import PreparedPrompt
from .vision_cache import VisionCache, preprocessing_fingerprint


class PromptBuilder:
    def __init__(self, vlm, vision_cache_bytes: int):
        self.vlm = vlm
        self.cache = VisionCache(vision_cache_bytes, preprocessing_fingerprint(vlm.facts, vlm.manifest.preprocess))
        vlm.family = CachedVisionFamily(vlm.family, self.cache)

    def chat(self, messages: list[dict], min_pixels: int | None = None, max_pixels: int | None = None) -> PreparedPrompt:
        """vLLM-style messages (images as {"type": "image", "image": bytes}, videos as {"type": "video",
        "video": bytes}) through the chat template; min/max_pixels for families that size each image."""
        return self._prepare(self.vlm._chat_request(messages, min_pixels, max_pixels))

    def raw(self, prompt: str) -> PreparedPrompt:
        """A raw prompt (no template), special tokens added as HF's processor does."""
        return self._prepare(_Request(prompt, []))

    def _prepare(self, request) -> PreparedPrompt:
        batch, prompt_lens, _ = self.vlm._prepare([request])  # embeds [1, S, C]
        positions = getattr(batch, "positions", None)  # [3, 1, S] from the media grids, or None: the scheme's
        return PreparedPrompt(batch.embeds[0], prompt_lens[0], len(request.images) + len(request.videos), positions,
                              batch.context)


class CachedVisionFamily:
    """A runtime family whose `embed_media` goes through the vision cache; the rest is the family's."""

    def __init__(self, family, cache: VisionCache):
        self._family, self._cache = family, cache
        # one vision run at a time: each already uses every ONNX Runtime thread, so parallel runs only
        # oversubscribe the cores and slow the decode steps running beside them
        self._vision_turn = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._family, name)

    def embed_media(self, items: list, run) -> list:
        """Each item's embeds [num_tokens, C]: cached ones as they are, the others in one vision run."""
        keys = [self._cache.key(item, self._family.compression) for item in items]
        entries = [self._cache.lookup(k) for k in keys]
        found = [None if e is None else e[0] for e in entries]
        for item, entry in zip(items, entries):  # cached: what compression kept, for the prompt's positions
            if entry is not None and entry[1] is not None:
                item.meta["kept_at"] = entry[1]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            with self._vision_turn:
                fresh = self._family.embed_media([items[i] for i in missing], run)
            for i, embeds in zip(missing, fresh):
                found[i] = embeds
                self._cache.put(keys[i], embeds, items[i].meta.get("kept_at"))
        return found
