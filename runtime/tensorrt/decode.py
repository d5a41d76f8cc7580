"""The GPU memory of the one decode loop (generate.DecodeLoop): KV cache, logits and token ids resident on the GPU.

    prefill: embeds [B,S,C] (host, once) -> decoder -> logits [B,S,V] -> greedy -> ids [B,1]
    step:    ids [B,1] -> embed -> [B,1,C] -> decoder (past/present in DeviceKVCache) -> logits [B,1,V] -> greedy -> ids
             ids [B] int64 -> host (the sampler's result: EOS, text); mask [B,total], positions [B,1] -> device

Greedy decoding runs the argmax engine (greedy.py) on the GPU, so only the token ids cross to the host.
Sampling with temperature > 0 copies the last logits [B, V] to the host sampler instead.
Everything is allocated once, at the limits the engines were built for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..generate import DecodeLoop
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


class DeviceMemory:
    """generate.DecodeLoop's tensors on the GPU: the KV cache, prompt embeds, logits and token ids are
    device buffers allocated once at the engines' limits; greedy picks run on the GPU (greedy.py)."""

    def __init__(self, greedy: TrtRunner, dims: ModelDims, limits: Limits):
        self.greedy, self.dims, self.limits, self.stream = greedy, dims, limits, greedy.stream
        self.kv = DeviceKVCache(dims, limits)
        rows, f = limits.max_batch, np.dtype(dims.dtype).itemsize
        self._logits = DeviceBuffer(rows * limits.max_input * dims.vocab * f)  # prefill logits are the largest
        self._embeds = DeviceBuffer(rows * limits.max_input * dims.hidden * f)
        self._ids = DeviceBuffer(rows * 8)

    def cache(self, batch: int, capacity: int) -> DeviceKVCache:
        self.kv.reset(batch, capacity)
        return self.kv

    def prompt_embeds(self, embeds: np.ndarray) -> DeviceTensor:
        b, s, _ = embeds.shape
        if b > self.limits.max_batch or s > self.limits.max_input:
            raise ProfileError(f"a batch of {b} prompt(s) of {s} tokens exceeds the engines' limits (max_batch "
                               f"{self.limits.max_batch}, max_input {self.limits.max_input}); rebuild with "
                               "`vlmdeploy build --max-batch/--max-input`")
        device = self._embeds.tensor(embeds.shape, self.dims.dtype)
        device.copy_from(embeds, self.stream)
        return device

    def logits(self, batch: int, seq: int) -> DeviceTensor:
        return self._logits.tensor((batch, seq, self.dims.vocab), self.dims.dtype)

    def step_embeds(self, batch: int) -> DeviceTensor:
        return self._embeds.tensor((batch, 1, self.dims.hidden), self.dims.dtype)

    def choose(self, logits: DeviceTensor, sampler: Sampler) -> tuple[DeviceTensor, np.ndarray]:
        """(ids [B, 1] on the device, token ids [B] on the host): the greedy engine, or the host
        sampler for temperature > 0. The ids are the only copy to the host per step."""
        b = logits.shape[0]
        ids = self._ids.tensor((b, 1), np.int64)
        if sampler.params.temperature == 0:
            ids = self.greedy.run({"logits": logits}, out={"token_ids": ids})["token_ids"]
        else:
            ids.copy_from(sampler(self._last_logits(logits))[:, None], self.stream)
        return ids, ids.numpy(self.stream)[:, 0]

    def to_host(self, logits: DeviceTensor) -> np.ndarray:
        return logits.numpy(self.stream)

    def _last_logits(self, logits: DeviceTensor) -> np.ndarray:
        """[B, V] at the last position, copied row by row (rows are S*V apart)."""
        b, s, v = logits.shape
        row = v * logits.dtype.itemsize
        host = np.empty((b, v), logits.dtype)
        for i in range(b):
            DeviceTensor(logits.ptr + (i * s + s - 1) * row, (v,), logits.dtype).copy_to(host[i], self.stream)
        self.stream.synchronize()
        return host

    def close(self) -> None:
        self.kv.free()
        for buffer in (self._logits, self._embeds, self._ids):
            buffer.free()


def device_decode_loop(directory: str | Path, embed: TrtRunner, decoder: TrtRunner, facts) -> DecodeLoop:
    """The one decode loop (generate.DecodeLoop) over the VLM's embed/decoder TrtRunners, with its
    tensors on the GPU and the greedy engine `vlmdeploy build` made."""
    greedy = TrtRunner.from_artifact(directory, greedy_spec(facts.dims), stream=decoder.stream)
    limits = load_engines(directory).limits
    return DecodeLoop(embed, decoder, facts, DeviceMemory(greedy, facts.dims, limits))
