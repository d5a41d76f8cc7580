"""The decode loop, one for every backend: prefill, then one token per step, KV cache written in place.

    prefill: embeds [B,S,C] -> decoder -> logits -> choose -> ids [B,1]
    step:    ids [B,1] -> embed -> [B,1,C] -> decoder (past/present in the cache) -> logits -> choose -> ids

Where tensors live is the `memory`'s business: `HostMemory` (numpy arrays bound through ONNX
Runtime's IOBinding) here, `DeviceMemory` (runtime/tensorrt/decode.py: cache, logits and ids on the
GPU). The loop only sees its interface. Rows are left-padded; positions come from the manifest's
position scheme (runtime/positions.py). Finished rows keep running (their tokens are ignored), as in HF.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .kv_cache import KVCache, SharedKVCache
from .manifest import ModelFacts
from .positions import position_scheme
from .runners import Runner
from .sampling import Sampler


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
    positions: np.ndarray | None = None  # [3, B, S] from the media grids (M-RoPE); None: the scheme's from the mask
    context: "DecoderContext | None" = None  # decoder inputs besides the self-attention KV (mllama's cross K/V)

    def prompt_positions(self, scheme) -> np.ndarray:
        return self.positions if self.positions is not None else scheme.prefill(self.mask)

    def prefill_feeds(self) -> dict[str, np.ndarray]:
        return self.context.prefill() if self.context is not None else {}

    def step_feeds(self) -> dict[str, np.ndarray]:
        return self.context.step() if self.context is not None else {}


@dataclass
class DecoderContext:
    """Decoder inputs a request adds beside the self-attention KV cache, left-padded like the batch:
    `constant` ones are fed unchanged to every pass (mllama: each cross-attention layer's K/V, computed
    once per request); `per_token` ones have a row per prompt token [B, S, ...] (mllama: the
    cross-attention mask), and every decode step feeds the last prompt token's row again (HF's
    `_update_model_kwargs_for_generation` repeats it).

    Contract (what the server's slot batching relies on, serve/slots.py SlotContext): zero-padding any
    input along a non-batch axis leaves every row's result unchanged (mllama: a zero image slot has
    zero K/V and is read by no token)."""

    constant: dict[str, np.ndarray] = field(default_factory=dict)
    per_token: dict[str, np.ndarray] = field(default_factory=dict)

    def prefill(self) -> dict[str, np.ndarray]:
        return {**self.constant, **self.per_token}

    def step(self) -> dict[str, np.ndarray]:
        return {**self.constant, **{k: np.ascontiguousarray(v[:, -1:]) for k, v in self.per_token.items()}}

    def chunk(self, start: int, end: int) -> dict[str, np.ndarray]:
        """The feeds of prompt tokens [start, end) (chunked prefill)."""
        return {**self.constant, **{k: np.ascontiguousarray(v[:, start:end]) for k, v in self.per_token.items()}}


# decoder graph name -> the KV cache layout it reads and writes
CACHE_LAYOUTS = {"decoder": KVCache, "decoder_gqa": SharedKVCache}


class HostMemory:
    """The loop's tensors as numpy arrays (ONNX Runtime on the CPU; IOBinding writes in place)."""

    def __init__(self, decoder_graph: str, facts: ModelFacts):
        self.cache_cls, self.dims = CACHE_LAYOUTS[decoder_graph], facts.dims
        self._step_logits = None

    def cache(self, batch: int, capacity: int):
        d = self.dims
        return self.cache_cls(d.num_layers, batch, d.kv_heads, d.head_dim, capacity, np.dtype(d.dtype))

    def prompt_embeds(self, embeds: np.ndarray) -> np.ndarray:
        return embeds

    def logits(self, batch: int, seq: int) -> np.ndarray | None:
        """Decode steps write into one reused [B, 1, V] buffer; prefill lets the backend allocate."""
        if seq != 1:
            return None
        if self._step_logits is None or self._step_logits.shape[0] != batch:
            self._step_logits = np.empty((batch, 1, self.dims.vocab), dtype=self.dims.dtype)
        return self._step_logits

    def step_embeds(self, batch: int) -> None:
        return None

    def choose(self, logits: np.ndarray, sampler: Sampler) -> tuple[np.ndarray, np.ndarray]:
        """(ids [B, 1] for the embed graph, token ids [B] on the host)."""
        tokens = sampler(logits[:, -1, :])
        return tokens[:, None], tokens

    def to_host(self, logits) -> np.ndarray:
        return logits


class DecodeLoop:
    """Drives the embed graph and one decoder graph over a batch; `memory` places the tensors."""

    def __init__(self, embed: Runner, decoder: Runner, facts: ModelFacts, memory=None, prefill: Runner | None = None):
        """`memory`: one shared memory (the GPU's, allocated once at the engines' limits: generations
        take turns on it); None: fresh host memory per generation, so threads can share the loop.
        `prefill`: a graph with the decoder's inputs and outputs that runs every pass of more than one
        token (the prompt; the server's prefill chunks), e.g. decoder_gqa_int8; decode steps run `decoder`."""
        self.embed, self.decoder, self.facts, self.prefill = embed, decoder, facts, prefill or decoder
        self.shared_memory = memory
        self._turn = threading.Lock()
        self.positions = position_scheme(facts.positions)

    @contextlib.contextmanager
    def _memory(self):
        if self.shared_memory is None:
            yield HostMemory(self.decoder.spec.name, self.facts)
            return
        with self._turn:
            yield self.shared_memory

    def prefill_logits(self, batch: Batch) -> np.ndarray:
        """One decoder pass over the prompt: logits [B, S, V] on the host."""
        b, s, _ = batch.embeds.shape
        with self._memory() as memory:
            cache = memory.cache(b, s)
            embeds = memory.prompt_embeds(batch.embeds)
            return memory.to_host(self._forward(memory, cache, embeds, batch.mask, batch.prompt_positions(self.positions),
                                                batch.prefill_feeds()))

    def tokens(self, batch: Batch, max_new_tokens: int, sampler: Sampler) -> Iterator[np.ndarray]:
        """Yields the sampled token ids [B] of each step."""
        with self._memory() as memory:
            yield from self._tokens(memory, batch, max_new_tokens, sampler)

    def _tokens(self, memory, batch: Batch, max_new_tokens: int, sampler: Sampler) -> Iterator[np.ndarray]:
        b, s, _ = batch.embeds.shape
        cache = memory.cache(b, s + max_new_tokens)
        mask = np.zeros((b, s + max_new_tokens), dtype=np.int64)  # [B, capacity]; a [B, total] prefix per step
        mask[:, :s] = batch.mask
        positions = batch.prompt_positions(self.positions)  # [B, S] or [3, B, S]
        t0 = time.perf_counter()
        logits = self._forward(memory, cache, memory.prompt_embeds(batch.embeds), mask[:, :s], positions,
                               batch.prefill_feeds())
        positions = self.positions.first_step(positions)  # [..., B, 1]
        step_feeds = batch.step_feeds()
        for step in range(max_new_tokens):
            ids, tokens = memory.choose(logits, sampler)
            self._account(batch.stats, step, time.perf_counter() - t0)
            yield tokens
            if step == max_new_tokens - 1:
                return  # the last token never needs a decoder pass
            t0 = time.perf_counter()
            mask[:, cache.length] = 1
            embeds = self.embed.run({"input_ids": ids}, out=_out("inputs_embeds", memory.step_embeds(b)))
            logits = self._forward(memory, cache, embeds["inputs_embeds"], mask[:, : cache.length + 1], positions,
                                   step_feeds)
            batch.stats.graph_s += self.embed.last_run_s + self.decoder.last_run_s
            positions = self.positions.next_step(positions)

    @staticmethod
    def _account(stats: StepStats, step: int, seconds: float) -> None:
        """Step 0 is the prefill (time to the first token); later steps are decode steps."""
        if step == 0:
            stats.prefill_s = seconds
        else:
            stats.steps += 1
            stats.step_s += seconds

    def _forward(self, memory, cache, embeds, mask: np.ndarray, positions: np.ndarray, extra: dict | None = None):
        """One decoder pass; present is written into the cache, which then advances. `extra`: the
        request's other decoder inputs (Batch.context)."""
        b, s = positions.shape[-2:]  # [B, S], or [3, B, S] for 3-D schemes
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ascontiguousarray(mask), "position_ids": positions,
                 **cache.past(), **(extra or {})}
        out = {**_out("logits", memory.logits(b, s)), **cache.present(s)}
        logits = (self.prefill if s > 1 else self.decoder).run(feeds, out=out)["logits"]  # compute- vs bandwidth-bound
        cache.advance(s)
        return logits


def _out(name: str, buffer) -> dict:
    return {} if buffer is None else {name: buffer}


# The name the rest of the code (and tests) know the host loop by.
Decoder = DecodeLoop
