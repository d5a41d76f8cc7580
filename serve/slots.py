"""The server's KV cache: one preallocated buffer per layer K/V with a slot (batch row) per sequence.

    buffers [2L, N, Hkv, capacity, D]     N = --max-num-seqs, capacity = --max-model-len
    mask    [N, capacity] int64           1 where a slot's column holds one of its tokens

Every running row writes the same column, the *frontier* T, in a decode step (GroupQueryAttention
in `decoder_gqa` takes one total length for the batch). A row therefore occupies a contiguous span
`[start, T)` of its slot: its prompt is copied in right-aligned to the frontier when it joins, and
the columns left of `start` are masked (garbage of earlier occupants, never read: their attention
weight is exactly 0). Positions are the position scheme's (per row, independent of the column).

    slot 0: . . [p p p g g g]      . masked, p prompt, g generated; T = 8
    slot 1: . . . . . [p p g]
    slot 2: [p p p p p g g g]

Two moves keep the spans valid, both O(cache) copies that happen rarely:
- a prompt longer than T: every row shifts right so the frontier equals the prompt length;
- the frontier at capacity: every row shifts left by the smallest start (a row never spans more
  than capacity - 1 columns, so this frees at least one).

A decode step runs the first `n` slots (n = highest occupied slot + 1): `buffers[i][:n]` is a
contiguous `[n, Hkv, capacity, D]` view, bound in place as past and present (decoder_gqa). The
portable `decoder` (past [n, H, T, D] -> present [n, H, T+1, D]) gets copies of the spans instead:
correct on every backend, O(context) copying per step.
"""

from __future__ import annotations

import numpy as np

from vlmdeploy.runtime.manifest import ModelFacts
from vlmdeploy.runtime.spec import kv_names


class SlotKVCache:
    def __init__(self, facts: ModelFacts, slots: int, capacity: int):
        d = facts.dims
        self.slots, self.capacity = slots, capacity
        self.past_names, self.present_names = kv_names(d.num_layers)
        # zeros: never-written columns are masked, but must not hold NaN bit patterns
        self.buffers = np.zeros((2 * d.num_layers, slots, d.kv_heads, capacity, d.head_dim), dtype=np.dtype(d.dtype))
        self.mask = np.zeros((slots, capacity), dtype=np.int64)
        self.frontier = 0  # T: the column the next decode step writes

    @property
    def nbytes(self) -> int:
        return self.buffers.nbytes

    def place(self, slot: int, kv: list[np.ndarray], active: list[int]) -> None:
        """Copy a prefilled row in: kv = 2L arrays [1, Hkv, S, D]; `active`: the other occupied slots."""
        s = kv[0].shape[2]
        if s > self.frontier:
            self._shift(s - self.frontier, active)
        t = self.frontier
        for buf, k in zip(self.buffers, kv):
            buf[slot, :, t - s:t] = k[0]
        self.mask[slot] = 0
        self.mask[slot, t - s:t] = 1

    def make_room(self, active: list[int]) -> None:
        """Before a decode step: a free column at the frontier (shift left by the smallest start)."""
        if self.frontier < self.capacity:
            return
        starts = [int(np.argmax(self.mask[s])) for s in active]
        self._shift(-min(starts), active)

    def reset_if_idle(self, active: list[int]) -> None:
        if not active:
            self.frontier = 0

    def _shift(self, by: int, active: list[int]) -> None:
        """Move every active row's span `by` columns (right > 0, left < 0); the frontier moves too."""
        t = self.frontier
        src, dst = (slice(0, t), slice(by, t + by)) if by > 0 else (slice(-by, t), slice(0, t + by))
        cleared = slice(0, by) if by > 0 else slice(t + by, t)
        for row in active:
            self.buffers[:, row, :, dst] = self.buffers[:, row, :, src].copy()  # [2L, H, span, D]
            self.mask[row, dst] = self.mask[row, src].copy()
            self.mask[row, cleared] = 0
        self.frontier = t + by

    def step_mask(self, n: int, active: list[int]) -> np.ndarray:
        """attention_mask [n, T+1] for a decode step: the frontier column is on for every row of the
        first n (idle rows attend to their own new column only, so nothing in them becomes NaN)."""
        t = self.frontier
        idle = [s for s in range(n) if s not in set(active)]
        self.mask[idle, :t] = 0
        self.mask[:n, t] = 1
        return self.mask[:n, : t + 1]

    def view(self, n: int, in_place: bool) -> "SlotView":
        return SlotView(self, n) if in_place else CopiedSlotView(self, n)


class SlotView:
    """The first n slots as a decoder_gqa cache: past and present are the same [n, H, capacity, D] views."""

    def __init__(self, cache: SlotKVCache, n: int):
        self.cache, self.n = cache, n
        self.length = cache.frontier

    def past(self) -> dict[str, np.ndarray]:
        return dict(zip(self.cache.past_names, (b[: self.n] for b in self.cache.buffers)))

    def present(self, new_tokens: int) -> dict[str, np.ndarray]:
        return dict(zip(self.cache.present_names, (b[: self.n] for b in self.cache.buffers)))

    def advance(self, new_tokens: int) -> None:
        self.cache.frontier += new_tokens
        self.length = self.cache.frontier


class CopiedSlotView(SlotView):
    """The first n slots for the portable decoder: past [n, H, T, D] copies, present written to
    scratch [n, H, T+1, D] and its new column copied back."""

    def past(self) -> dict[str, np.ndarray]:
        t = self.cache.frontier
        return dict(zip(self.cache.past_names, (np.ascontiguousarray(b[: self.n, :, :t]) for b in self.cache.buffers)))

    def present(self, new_tokens: int) -> dict[str, np.ndarray]:
        b, t = self.cache.buffers, self.cache.frontier
        shape = (self.n, b.shape[2], t + new_tokens, b.shape[4])
        self._scratch = [np.empty(shape, dtype=b.dtype) for _ in range(b.shape[0])]
        return dict(zip(self.cache.present_names, self._scratch))

    def advance(self, new_tokens: int) -> None:
        t = self.cache.frontier
        for buf, present in zip(self.cache.buffers, self._scratch):
            buf[: self.n, :, t:t + new_tokens] = present[:, :, t:]
        super().advance(new_tokens)


class SlotContext:
    """Each slot's decoder context (runtime/generate.py DecoderContext, batch 1, placed when its prefill
    ends) stacked for the decode step: the constant inputs and the last prompt row of the per-token ones,
    [N, ...] per input. Rows whose inputs differ in size (mllama: image count) are zero-padded to the
    largest, which the DecoderContext contract says changes no row's result. Empty for families
    without a context."""

    def __init__(self, slots: int):
        self.slots = slots
        self.arrays: dict[str, np.ndarray] = {}

    def place(self, slot: int, context) -> None:
        if context is None:
            return
        for name, x in context.step().items():  # [1, ...]
            buf = self._fit(name, x)
            buf[slot] = 0
            buf[(slot, *(slice(0, n) for n in x.shape[1:]))] = x[0]

    def feeds(self, n: int) -> dict[str, np.ndarray]:
        """The first n slots' inputs (contiguous views)."""
        return {name: buf[:n] for name, buf in self.arrays.items()}

    def _fit(self, name: str, x: np.ndarray) -> np.ndarray:
        """The slot buffer of `name`, grown (zero-padded) to hold x [1, ...]."""
        buf = self.arrays.get(name)
        shape = (self.slots, *x.shape[1:]) if buf is None else (self.slots, *np.maximum(buf.shape[1:], x.shape[1:]))
        if buf is None or tuple(shape) != buf.shape:
            grown = np.zeros(shape, x.dtype)
            if buf is not None:
                grown[tuple(slice(0, n) for n in buf.shape)] = buf
            self.arrays[name] = buf = grown
        return buf
