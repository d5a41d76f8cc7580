"""The decode loop: prefill, then one token per step, KV cache written in place by the decoder.

Rows are left-padded; positions follow HF `generate`: cumsum(mask) - 1 (0 at pads) in prefill,
last position + 1 after. Finished rows keep running (their tokens are ignored), as in HF.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .kv_cache import KVCache, SharedKVCache
from .runners import Runner
from .sampling import Sampler
from .spec import ModelDims


@dataclass
class StepStats:
    """Where decode time goes: graph time vs everything else in the step."""

    steps: int = 0
    step_s: float = 0.0
    graph_s: float = 0.0
    prefill_s: float = 0.0

    @property
    def overhead_per_step_s(self) -> float:
        return (self.step_s - self.graph_s) / self.steps if self.steps else 0.0


@dataclass
class Batch:
    """A left-padded batch ready for prefill."""

    embeds: np.ndarray  # [B, S, C]
    mask: np.ndarray  # [B, S] int64, 0 at left pads
    stats: StepStats = field(default_factory=StepStats)


# decoder graph name -> the KV cache layout it reads and writes
CACHE_LAYOUTS = {"decoder": KVCache, "decoder_gqa": SharedKVCache}


class Decoder:
    """Drives the embed graph and one decoder graph (`decoder` or `decoder_gqa`) for one batch."""

    def __init__(self, embed: Runner, decoder: Runner, dims: ModelDims):
        self.embed, self.decoder, self.dims = embed, decoder, dims
        self.cache_cls = CACHE_LAYOUTS[decoder.spec.name]

    def _cache(self, batch: int, capacity: int, dtype):
        d = self.dims
        return self.cache_cls(d.num_layers, batch, d.kv_heads, d.head_dim, capacity, dtype)

    def prefill_logits(self, batch: Batch) -> np.ndarray:
        """One decoder pass over the prompt: logits [B, S, V]."""
        b, s, _ = batch.embeds.shape
        cache = self._cache(b, s, batch.embeds.dtype)
        positions = np.maximum(np.cumsum(batch.mask, axis=1) - 1, 0).astype(np.int64)  # [B, S]
        return self._run(cache, batch.embeds, batch.mask, positions, batch.stats, out_logits=None)

    def tokens(self, batch: Batch, max_new_tokens: int, sampler: Sampler) -> Iterator[np.ndarray]:
        """Yields the sampled token ids [B] of each step."""
        b, s, _ = batch.embeds.shape
        capacity = s + max_new_tokens
        cache = self._cache(b, capacity, batch.embeds.dtype)
        mask = np.zeros((b, capacity), dtype=np.int64)  # [B, capacity]
        mask[:, :s] = batch.mask
        positions = np.maximum(np.cumsum(batch.mask, axis=1) - 1, 0).astype(np.int64)  # [B, S]
        t0 = time.perf_counter()
        logits = self._run(cache, batch.embeds, mask[:, :s], positions, batch.stats, out_logits=None)
        batch.stats.prefill_s = time.perf_counter() - t0
        next_pos = positions[:, -1:] + 1  # [B, 1]
        step_logits = np.empty((b, 1, self.dims.vocab), dtype=batch.embeds.dtype)  # decode logits, reused
        for step in range(max_new_tokens):
            tokens = sampler(logits[:, -1, :])
            yield tokens
            if step == max_new_tokens - 1:
                return  # the last token never needs a decoder pass
            t0 = time.perf_counter()
            mask[:, cache.length] = 1
            embeds = self.embed.run({"input_ids": tokens[:, None]})["inputs_embeds"]  # [B, 1, C]
            batch.stats.graph_s += self.embed.last_run_s
            logits = self._run(cache, embeds, mask[:, : cache.length + 1], next_pos, batch.stats, step_logits)
            next_pos = next_pos + 1
            batch.stats.steps += 1
            batch.stats.step_s += time.perf_counter() - t0

    def _run(self, cache, embeds, mask, positions, stats: StepStats, out_logits) -> np.ndarray:
        new = embeds.shape[1]
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": np.ascontiguousarray(mask),
            "position_ids": positions,
            **cache.past(),
        }
        out = cache.present(new)
        if out_logits is not None:
            out = {"logits": out_logits, **out}
        result = self.decoder.run(feeds, out=out)
        if out_logits is not None:  # a decode step
            stats.graph_s += self.decoder.last_run_s
        cache.advance(new)
        return result["logits"]
