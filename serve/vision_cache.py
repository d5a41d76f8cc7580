"""Encoder outputs shared across requests: preprocessed image content + preprocessing -> embeds, LRU in bytes.

    key   = sha256(the item's pixels, its token count, kind and family metadata, the visual-token
                   compression the embeds are made under)
            + sha256(family, preprocess parameters, vision graph chain)
    value = embeds [num_tokens, C] (read-only)

The key hashes the preprocessing's output, so the same picture sent again (any encoding) hits, and
two requests that preprocess it differently (other sizes, other parameters) do not. A hit skips
the vision graphs, the expensive part; decoding and resizing still run. Entries larger than the
whole budget are not kept; `--vision-cache-mb 0` turns the cache off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from collections import OrderedDict

import numpy as np


class VisionCache:
    def __init__(self, budget_bytes: int, fingerprint: str):
        if budget_bytes < 0:
            raise ValueError(f"--vision-cache-mb must be >= 0 (0 turns the cache off), got {budget_bytes / 2**20:g}")
        self.budget, self.fingerprint = budget_bytes, fingerprint
        self._entries: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()  # embeds, kept_at
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def key(self, item, compression=None) -> str:
        """A MediaItem's key: every field (pixels by content), the compression (runtime/compress.py
        `Compression`, None: none; pool and topk can give items with equal fields) and the preprocessing
        fingerprint."""
        h = hashlib.sha256()
        for f in dataclasses.fields(item):
            _digest(h, f.name, getattr(item, f.name))
        _digest(h, "compression", None if compression is None else dataclasses.asdict(compression))
        return h.hexdigest() + self.fingerprint

    def get(self, key: str) -> np.ndarray | None:
        entry = self.lookup(key)
        return None if entry is None else entry[0]

    def lookup(self, key: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(embeds, kept_at: where compression's kept tokens sit in the uncompressed grid, or None)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, embeds: np.ndarray, kept_at: np.ndarray | None = None) -> None:
        if embeds.nbytes > self.budget:
            return
        embeds.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            self.bytes += embeds.nbytes - (old[0].nbytes if old is not None else 0)
            self._entries[key] = (embeds, kept_at)
            while self.bytes > self.budget:
                _, (evicted, _) = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)


def _digest(h, name: str, value) -> None:
    h.update(name.encode())
    if isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _digest(h, str(k), value[k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _digest(h, str(i), v)
    else:
        h.update(repr(value).encode())


def preprocessing_fingerprint(facts, preprocess: dict) -> str:
    """What besides the item decides the embeds: the family, its parameters, the graph chain."""
    described = json.dumps([facts.family, preprocess, facts.family_params, facts.pipeline["image"]],
                           sort_keys=True, default=str)
    return hashlib.sha256(described.encode()).hexdigest()[:16]
