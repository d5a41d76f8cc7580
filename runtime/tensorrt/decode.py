"""The decode loop of generate.Decoder with the KV cache, logits and token ids resident on the GPU.

    prefill: embeds [B,S,C] (host, once) -> decoder -> logits [B,S,V] -> greedy -> ids [B,1]
    step:    ids [B,1] -> embed -> [B,1,C] -> decoder (past/present in DeviceKVCache) -> logits [B,1,V] -> greedy -> ids
             ids [B] int64 -> host (the sampler's result: EOS, text); mask [B,total], positions [B,1] -> device

Greedy decoding runs the argmax engine (greedy.py) on the GPU, so only the token ids cross to the host.
Sampling with temperature > 0 copies the last logits [B, V] to the host sampler instead.
Everything is allocated once, at the limits the engines were built for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from ..generate import Batch
from ..sampling import Sampler
from ..spec import ModelDims, kv_names
from .cuda import DeviceBuffer, DeviceTensor
from .engines import load_engines
from .greedy import greedy_spec
from .profiles import Limits, ProfileError
from .runner import TrtRunner


class DeviceKVCache:
    """kv_cache.KVCache's scheme on the GPU: per layer and K/V two flat regions; the past [B,H,P,D] is a
    prefix view of one, the graph writes present [B,H,P+S,D] into the other, then they swap."""

    def __init__(self, dims: ModelDims, limits: Limits):
        self.dims = dims
        self.past_names, self.present_names = kv_names(dims.num_layers)
        self.itemsize = np.dtype(dims.dtype).itemsize
        per_tensor = limits.max_batch * dims.kv_heads * limits.max_context * dims.head_dim
        self.buffers = [DeviceBuffer(2 * dims.num_layers * per_tensor * self.itemsize) for _ in range(2)]
        self.limits = limits
        self.reset(1, 1)

    def reset(self, batch: int, capacity: int) -> None:
        if batch > self.limits.max_batch or capacity > self.limits.max_context:
            raise ProfileError(f"batch {batch} x {capacity} tokens exceeds the engines' limits (max_batch "
                             f"{self.limits.max_batch}, max_context {self.limits.max_context}); rebuild with larger limits")
        self.batch, self.capacity, self.length, self._cur = batch, capacity, 0, 0

    def _views(self, buffer: int, length: int) -> list[DeviceTensor]:
        d = self.dims
        region = self.batch * d.kv_heads * self.capacity * d.head_dim * self.itemsize  # one layer's K (or V)
        shape = (self.batch, d.kv_heads, length, d.head_dim)
        return [self.buffers[buffer].tensor(shape, d.dtype, i * region) for i in range(2 * d.num_layers)]

    def past(self) -> dict[str, DeviceTensor]:
        return dict(zip(self.past_names, self._views(self._cur, self.length)))

    def present(self, new_tokens: int) -> dict[str, DeviceTensor]:
        if self.length + new_tokens > self.capacity:
            raise ValueError(f"KV cache full: {self.length} cached + {new_tokens} new > capacity {self.capacity}")
        return dict(zip(self.present_names, self._views(1 - self._cur, self.length + new_tokens)))

    def advance(self, new_tokens: int) -> None:
        self._cur, self.length = 1 - self._cur, self.length + new_tokens

    def free(self) -> None:
        for b in self.buffers:
            b.free()


class DeviceDecoder:
    """generate.Decoder's interface (prefill_logits, tokens) over TrtRunners that share one stream."""

    def __init__(self, embed: TrtRunner, decoder: TrtRunner, greedy: TrtRunner, dims: ModelDims, limits: Limits):
        self.embed, self.decoder, self.greedy, self.dims, self.limits = embed, decoder, greedy, dims, limits
        self.stream = decoder.stream
        self.kv = DeviceKVCache(dims, limits)
        rows, f = limits.max_batch, np.dtype(dims.dtype).itemsize
        self._logits = DeviceBuffer(rows * limits.max_input * dims.vocab * f)  # prefill logits are the largest
        self._embeds = DeviceBuffer(rows * limits.max_input * dims.hidden * f)
        self._ids = DeviceBuffer(rows * 8)

    @classmethod
    def for_artifact(cls, directory: str | Path, runners: dict, dims: ModelDims) -> "DeviceDecoder":
        """From the VLM's embed/decoder TrtRunners plus the greedy engine `vlmdeploy build` made."""
        greedy = TrtRunner.from_artifact(directory, greedy_spec(dims), stream=runners["decoder"].stream)
        limits = load_engines(directory).limits
        return cls(runners["embed"], runners["decoder"], greedy, dims, limits)

    def prefill_logits(self, batch: Batch) -> np.ndarray:
        """Logits [B, S, V] of one pass over the prompt, copied to the host."""
        b, s, _ = batch.embeds.shape
        self.kv.reset(b, s)
        positions = np.maximum(np.cumsum(batch.mask, axis=1) - 1, 0).astype(np.int64)
        return self._forward(self._upload_embeds(batch.embeds), batch.mask, positions).numpy(self.stream)

    def tokens(self, batch: Batch, max_new_tokens: int, sampler: Sampler) -> Iterator[np.ndarray]:
        """Yields the sampled token ids [B] of each step."""
        b, s, _ = batch.embeds.shape
        capacity = s + max_new_tokens
        self.kv.reset(b, capacity)
        mask = np.zeros((b, capacity), dtype=np.int64)  # [B, capacity], host; a [B, total] prefix goes up per step
        mask[:, :s] = batch.mask
        positions = np.maximum(np.cumsum(batch.mask, axis=1) - 1, 0).astype(np.int64)  # [B, S]
        t0 = time.perf_counter()
        logits = self._forward(self._upload_embeds(batch.embeds), mask[:, :s], positions)
        next_pos = positions[:, -1:] + 1  # [B, 1]
        for step in range(max_new_tokens):
            ids = self._choose(logits, sampler)  # [B, 1] on the device
            tokens = ids.numpy(self.stream)[:, 0]  # the only copy to the host; waits for the GPU
            self._account(batch, step, time.perf_counter() - t0)
            yield tokens
            if step == max_new_tokens - 1:
                return  # the last token never needs a decoder pass
            t0 = time.perf_counter()
            mask[:, self.kv.length] = 1
            step_embeds = self._embeds.tensor((b, 1, self.dims.hidden), self.dims.dtype)
            embeds = self.embed.run({"input_ids": ids}, out={"inputs_embeds": step_embeds})["inputs_embeds"]
            logits = self._forward(embeds, mask[:, : self.kv.length + 1], next_pos)
            next_pos = next_pos + 1

    @staticmethod
    def _account(batch: Batch, step: int, seconds: float) -> None:
        """Step 0 is the prefill (time to the first token); later steps are decode steps."""
        if step == 0:
            batch.stats.prefill_s = seconds
        else:
            batch.stats.steps += 1
            batch.stats.step_s += seconds

    def _forward(self, embeds: DeviceTensor, mask: np.ndarray, positions: np.ndarray) -> DeviceTensor:
        """One decoder pass; logits [B, S, V] stay on the device, present is written into the cache."""
        b, s = positions.shape
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ascontiguousarray(mask), "position_ids": positions,
                 **self.kv.past()}
        logits = self._logits.tensor((b, s, self.dims.vocab), self.dims.dtype)
        self.decoder.run(feeds, out={"logits": logits, **self.kv.present(s)})
        self.kv.advance(s)
        return logits

    def _choose(self, logits: DeviceTensor, sampler: Sampler) -> DeviceTensor:
        """Next token ids [B, 1] on the device: the greedy engine, or the host sampler for temperature > 0."""
        b = logits.shape[0]
        ids = self._ids.tensor((b, 1), np.int64)
        if sampler.params.temperature == 0:
            return self.greedy.run({"logits": logits}, out={"token_ids": ids})["token_ids"]
        ids.copy_from(sampler(self._last_logits(logits))[:, None], self.stream)
        return ids

    def _last_logits(self, logits: DeviceTensor) -> np.ndarray:
        """[B, V] at the last position, copied row by row (rows are S*V apart)."""
        b, s, v = logits.shape
        row = v * logits.dtype.itemsize
        host = np.empty((b, v), logits.dtype)
        for i in range(b):
            DeviceTensor(logits.ptr + (i * s + s - 1) * row, (v,), logits.dtype).copy_to(host[i], self.stream)
        self.stream.synchronize()
        return host

    def _upload_embeds(self, embeds: np.ndarray) -> DeviceTensor:
        b, s, _ = embeds.shape
        if b > self.limits.max_batch or s > self.limits.max_input:
            raise ProfileError(f"a batch of {b} prompt(s) of {s} tokens exceeds the engines' limits (max_batch "
                               f"{self.limits.max_batch}, max_input {self.limits.max_input}); rebuild with "
                               "`vlmdeploy build --max-batch/--max-input`")
        device = self._embeds.tensor(embeds.shape, self.dims.dtype)
        device.copy_from(embeds, self.stream)
        return device

    def close(self) -> None:
        self.kv.free()
        for buffer in (self._logits, self._embeds, self._ids):
            buffer.free()
