"""Requests -> `PreparedPrompt` (prompt embeds [S, C]), in the request's thread, through the vision cache.

The same steps as `VLM._prepare` for one row (placeholder check, family preprocessing, vision chain,
tokenize, embed, scatter), except that each image's embeds come from `VisionCache` when it has them.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from vlmdeploy.runtime.images import load_image
from vlmdeploy.runtime.text import chat_prompt_adds_special_tokens
from vlmdeploy.runtime.vlm import _Request

from .engine import PreparedPrompt
from .vision_cache import CachedMedia, VisionCache, preprocessing_fingerprint


class PromptBuilder:
    def __init__(self, vlm, vision_cache_bytes: int):
        self.vlm = vlm
        self.cache = VisionCache(vision_cache_bytes, preprocessing_fingerprint(vlm.facts, vlm.manifest.preprocess))
        # one vision run at a time: each already uses every ONNX Runtime thread, so parallel runs only
        # oversubscribe the cores and slow the decode steps running beside them
        self._vision_turn = threading.Lock()

    def chat(self, messages: list[dict]) -> PreparedPrompt:
        """vLLM-style messages (images as {"type": "image", "image": bytes}) through the chat template."""
        prompt, images = self.vlm.render_chat(messages)
        return self._prepare(_Request(prompt, images, chat_prompt_adds_special_tokens(prompt, self.vlm.text.bos_token)))

    def raw(self, prompt: str) -> PreparedPrompt:
        """A raw prompt (no template), special tokens added as HF's processor does."""
        return self._prepare(_Request(prompt, []))

    def _prepare(self, request: _Request) -> PreparedPrompt:
        vlm = self.vlm
        vlm._check_placeholders(request)  # cheap checks before any image is read
        media = self._media(request.images)  # [CachedMedia per image]
        ids = vlm._tokenize(request, [m.item for m in media])  # [S]
        embeds = vlm._embed_row(ids, [m.embeds for m in media])  # [S, C]
        return PreparedPrompt(embeds, len(ids), len(media))

    def _media(self, images: list[bytes]) -> list[CachedMedia]:
        """Each image's item and embeds: from the cache, or preprocessed and encoded (misses in one run)."""
        keys = [self.cache.key(data) for data in images]
        found = [self.cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        items = [self.vlm.family.prepare(load_image(images[i])) for i in missing]
        with self._vision_turn:
            embeds = self.vlm.family.embed_media(items, self.vlm._run_graph)  # [num_tokens_i, C]
        for i, item, e in zip(missing, items, embeds):
            found[i] = CachedMedia(dataclasses.replace(item, pixels=np.empty((0,), np.float32)), e)
            self.cache.put(keys[i], found[i])
        return found
