"""The KV cache: allocated once per generation, written by the decoder graph in place.

Two layouts, one per decoder graph:
- `SharedKVCache` (decoder_gqa): one `[B, H, capacity, D]` buffer per layer K/V, bound as both
  the past input and the present output; GroupQueryAttention appends the new entries in place.
- `KVCache` (the portable decoder, also TensorRT's): ping-pong buffers, below.

The standard-op decoder takes `past [B, H, P, D]` and returns `present [B, H, P+S, D]` (TensorRT
needs this portable form). A `[B, H, capacity, D]` buffer sliced to `[:, :, :P]` is not contiguous,
so it cannot be fed without a copy. Instead each layer's K and V live in two flat buffers of
`B*H*capacity*D` elements. The first `B*H*P*D` elements of one buffer, viewed as `[B, H, P, D]`,
are contiguous and are the past; the graph writes present straight into the other buffer (bound
as its output), and the roles swap. Per step the runtime allocates nothing and copies nothing; the
only O(context) work left is the Concat inside the graph.

    step t:   buffer[cur] --past [B,H,P,D]--> decoder --present [B,H,P+S,D]--> buffer[1-cur]
    step t+1: buffer[1-cur] is the past
"""

from __future__ import annotations

import numpy as np

from .spec import kv_names


class KVCache:
    """Ping-pong layout for the portable decoder (past [B,H,P,D] in, present [B,H,P+S,D] out)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype):
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.capacity = capacity
        self.past_names, self.present_names = kv_names(num_layers)
        per_tensor = batch * kv_heads * capacity * head_dim
        self._flat = np.empty((2, 2 * num_layers, per_tensor), dtype=dtype)  # [buffer, layer*(k,v), elems]
        self._cur = 0
        self.length = 0  # tokens cached

    @property
    def nbytes(self) -> int:
        return self._flat.nbytes

    def _views(self, buffer: int, length: int) -> list[np.ndarray]:
        n = self.batch * self.kv_heads * length * self.head_dim
        shape = (self.batch, self.kv_heads, length, self.head_dim)
        return [self._flat[buffer, i, :n].reshape(shape) for i in range(2 * self.num_layers)]

    def past(self) -> dict[str, np.ndarray]:
        """Feeds: past_key_values.{i}.key/value, each [B, H, length, D], views into the cache."""
        return dict(zip(self.past_names, self._views(self._cur, self.length)))

    def present(self, new_tokens: int) -> dict[str, np.ndarray]:
        """Output buffers for present.{i}.key/value, each [B, H, length + new_tokens, D]."""
        total = self.length + new_tokens
        if total > self.capacity:
            raise ValueError(f"KV cache full: {self.length} cached + {new_tokens} new > capacity {self.capacity}")
        return dict(zip(self.present_names, self._views(1 - self._cur, total)))

    def advance(self, new_tokens: int) -> None:
        """The graph has written present; it becomes the past of the next step."""
        self._cur = 1 - self._cur
        self.length += new_tokens


class SharedKVCache:
    """One buffer per layer K/V, [B, H, capacity, D]; past and present are the same memory."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, dtype):
        self.capacity = capacity
        self.past_names, self.present_names = kv_names(num_layers)
        # zeros: never-written slots are masked, but must not hold NaN bit patterns
        self._buffers = np.zeros((2 * num_layers, batch, kv_heads, capacity, head_dim), dtype=dtype)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self._buffers.nbytes

    def past(self) -> dict[str, np.ndarray]:
        return dict(zip(self.past_names, self._buffers))

    def present(self, new_tokens: int) -> dict[str, np.ndarray]:
        if self.length + new_tokens > self.capacity:
            raise ValueError(f"KV cache full: {self.length} cached + {new_tokens} new > capacity {self.capacity}")
        return dict(zip(self.present_names, self._buffers))

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens
