"""Encoder outputs shared across requests: image content hash + preprocessing -> embeds, LRU in bytes.

    key   = sha256(image bytes) + sha256(family, preprocess parameters, vision graph chain)
    value = (the MediaItem without its pixels: num_tokens and meta, embeds [num_tokens, C])

A hit skips decoding, preprocessing and the vision graphs. Entries larger than the whole budget are
not kept; `--vision-cache-mb 0` turns the cache off.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CachedMedia:
    item: object  # runtime.families.base.MediaItem with empty pixels
    embeds: np.ndarray  # [num_tokens, C], read-only

    @property
    def nbytes(self) -> int:
        return self.embeds.nbytes


class VisionCache:
    def __init__(self, budget_bytes: int, fingerprint: str):
        if budget_bytes < 0:
            raise ValueError(f"--vision-cache-mb must be >= 0 (0 turns the cache off), got {budget_bytes / 2**20:g}")
        self.budget, self.fingerprint = budget_bytes, fingerprint
        self._entries: OrderedDict[str, CachedMedia] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def key(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest() + self.fingerprint

    def get(self, key: str) -> CachedMedia | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: CachedMedia) -> None:
        if entry.nbytes > self.budget:
            return
        entry.embeds.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            self.bytes += entry.nbytes - (old.nbytes if old else 0)
            self._entries[key] = entry
            while self.bytes > self.budget:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)


def preprocessing_fingerprint(facts, preprocess: dict) -> str:
    """What besides the image bytes decides the embeds: the family, its parameters, the graph chain."""
    described = json.dumps([facts.family, preprocess, facts.family_params, facts.pipeline["image"]],
                           sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:16]
