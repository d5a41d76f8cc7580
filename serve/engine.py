"""Continuous batching: one background thread owns the decoder and a slot KV cache (serve/slots.py).

    submit(prompt embeds [S, C], sampling) --> waiting queue (at most --max-queue)
    scheduler thread, each iteration:
        drop cancelled sequences (a client hung up): their slots are free from this step on
        waiting sequences take free slots and start prefilling, alone, into their own batch-1 cache
        prefill: chunks of --prefill-chunk tokens, oldest sequence first, at most
            --prefill-tokens-per-step per iteration (at least one chunk), so a long prompt delays
            the running rows by one chunk per step, not by its whole prefill; a finished prefill
            copies its K/V into the slot and samples the first token
        one decode step over slots [0, n): ids [n, 1] -> embed -> decoder -> logits [n, 1, V]
        each row: its own Sampler -> token -> `Row.push` (EOS, stop strings, detokenizer) -> event

Every row's prefill runs alone in fixed chunk boundaries, and its decode steps see only its own span of the cache (other
rows and masked columns get attention weight exactly 0), so a greedy answer is the same whether the
row ran alone or in a busy batch. Positions come from the artifact's position scheme.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vlmdeploy.runtime.generate import HostMemory
from vlmdeploy.runtime.sampling import Sampler, SamplingParams
from vlmdeploy.runtime.session import Row
from vlmdeploy.runtime.text import IncrementalDetokenizer

from .slots import SlotContext, SlotKVCache

log = logging.getLogger("vlmdeploy.serve")


class QueueFull(RuntimeError):
    """More requests waiting than --max-queue."""


@dataclass(frozen=True)
class PreparedPrompt:
    """A request's prompt, ready for prefill."""

    embeds: np.ndarray  # [S, C]: token embeddings with the image features scattered in
    prompt_tokens: int
    images: int = 0
    positions: np.ndarray | None = None  # [..., 1, S] from the family (M-RoPE); None: the position scheme's
    context: object = None  # runtime.generate.DecoderContext (mllama: cross K/V + mask), batch 1; None: none


@dataclass(frozen=True)
class Event:
    """What a sequence tells its client: new text, then one final event (finish_reason or error)."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sequence:
    """One request inside the scheduler."""

    prompt: PreparedPrompt
    params: SamplingParams
    emit: Callable[[Event], None]
    row: Row
    max_new: int
    sampler: Sampler
    slot: int | None = None
    prefill: "Prefill | None" = None  # while its prompt is being prefilled
    next_id: int = 0  # the last sampled token: the next decode step's input
    sampled: int = 0
    cancelled: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float = 0.0

    @property
    def done(self) -> bool:
        return self.row.finish_reason is not None


class Prefill:
    """One sequence's prompt going through the decoder in chunks, into its own batch-1 cache.

    embeds [S, C] -> chunks [1, <= chunk, C] (past = the chunks before) -> logits [1, V] of the last
    position and K/V [1, H, S, D] per layer, which the scheduler copies into the sequence's slot."""

    def __init__(self, prompt: PreparedPrompt, memory: HostMemory, positions_scheme):
        self.embeds, self.memory = prompt.embeds[None], memory  # [1, S, C]
        s = prompt.embeds.shape[0]
        self.mask = np.ones((1, s), dtype=np.int64)
        given = prompt.positions
        self.positions = positions_scheme.prefill(self.mask) if given is None else given  # [1, S] or [3, 1, S]
        self.cache = memory.cache(1, s)
        self.context = prompt.context
        self.filled = 0
        self.logits: np.ndarray | None = None  # [1, V] once done

    @property
    def done(self) -> bool:
        return self.logits is not None

    def run_chunk(self, loop, chunk: int) -> int:
        """The next chunk; returns its token count."""
        s = self.mask.shape[1]
        a, b = self.filled, min(self.filled + chunk, s)
        embeds = np.ascontiguousarray(self.embeds[:, a:b])
        positions = np.ascontiguousarray(self.positions[..., a:b])
        extra = self.context.chunk(a, b) if self.context is not None else None
        logits = loop._forward(self.memory, self.cache, embeds, self.mask[:, :b], positions, extra)  # [1, b-a or 1, V]
        self.filled = b
        if b == s:
            self.logits = logits[:, -1].copy()
        return b - a

    def kv(self) -> list[np.ndarray]:
        """2L arrays [1, H, S, D]."""
        past, s = self.cache.past(), self.mask.shape[1]
        return [past[name][:, :, :s] for name in self.cache.past_names]


class EngineMetrics:
    """Hooks the engine calls; serve/metrics.py records them in Prometheus. Default: nothing."""

    def first_token(self, seq: Sequence, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...


class Engine:
    """The scheduler: `submit` from any thread; a background thread prefills and decodes."""

    def __init__(self, vlm, max_num_seqs: int = 8, max_queue: int = 64, max_model_len: int | None = None,
                 prefill_chunk: int = 256, prefill_tokens_per_step: int = 256, metrics: EngineMetrics | None = None):
        if vlm.decoder.shared_memory is not None:
            raise ValueError(f"vlmdeploy serve runs on host memory (ONNX Runtime backends); backend {vlm.backend!r} "
                             "keeps its decode loop on the GPU: use --backend ort-cpu, ort-cuda or ort-trt")
        facts = vlm.facts
        self.max_model_len = _check_len(max_model_len or facts.context_length, facts.context_length)
        self.vlm, self.facts, self.loop = vlm, facts, vlm.decoder
        self.max_queue, self.prefill_chunk, self.prefill_tokens_per_step = max_queue, prefill_chunk, prefill_tokens_per_step
        self.metrics = metrics or EngineMetrics()
        self.cache = SlotKVCache(facts, max_num_seqs, self.max_model_len)
        self.context = SlotContext(max_num_seqs)  # per-slot decoder inputs besides the KV (mllama's cross K/V)
        self.in_place = vlm.decoder_graph == "decoder_gqa"
        self.memory = HostMemory(vlm.decoder_graph, facts)
        self.positions = self.loop.positions
        self._positions: np.ndarray | None = None  # [..., N, 1]: each slot's next position
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()  # slot taken, prompt going through in chunks
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.peak_running = 0  # most rows decoded together so far
        self.cancelled = 0  # sequences dropped because their client left
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vlmdeploy-scheduler", daemon=True)
        self._thread.start()

    # ---- called from request threads ----------------------------------------------------------

    def submit(self, prompt: PreparedPrompt, params: SamplingParams, emit: Callable[[Event], None],
               arrived: float | None = None) -> Sequence:
        """Queue a request; `emit` is called from the scheduler thread with each Event. `arrived`
        (time.perf_counter) starts its time to first token; default: now."""
        if prompt.prompt_tokens >= self.max_model_len:
            raise ValueError(f"prompt is {prompt.prompt_tokens} tokens but --max-model-len is {self.max_model_len}; "
                             f"at most {self.max_model_len - 1} prompt tokens leave room for one new token")
        seq = Sequence(prompt, params, emit, self._row(prompt, params),
                       min(params.max_new_tokens, self.max_model_len - prompt.prompt_tokens), Sampler(params))
        seq.t_submit = arrived if arrived is not None else seq.t_submit
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting, the most this server queues "
                                f"(--max-queue {self.max_queue}); retry later")
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The client left: the sequence's slot is freed at the next step boundary."""
        with self._wake:
            seq.cancelled = True
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    @property
    def slots_in_use(self) -> int:
        return len(self.running) + len(self.prefilling)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def _row(self, prompt: PreparedPrompt, params: SamplingParams) -> Row:
        return Row(prompt.prompt_tokens, IncrementalDetokenizer(self.vlm.text), params.stop)

    # ---- the scheduler thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self.waiting or self.prefilling or self.running):
                    self._wake.wait()
                if self._stopping:
                    return
                self._drop_cancelled()
                self._admit_waiting()
            try:
                self._iteration()
            except Exception as e:  # a bug or a backend failure: fail the rows, keep serving
                log.exception("scheduler step failed")
                self._fail_all(f"internal error in the decode loop: {type(e).__name__}: {e}")

    def _iteration(self) -> None:
        """Prefill chunks within the budget, then one decode step for the running rows."""
        self._prefill_chunks()
        if self.running:
            self._step()
        self.cache.reset_if_idle(sorted(self.running))

    def _drop_cancelled(self) -> None:
        for name in ("waiting", "prefilling"):
            queue = getattr(self, name)
            kept = deque(s for s in queue if not s.cancelled)
            self.cancelled += len(queue) - len(kept)
            setattr(self, name, kept)
        for slot, seq in list(self.running.items()):
            if seq.cancelled:
                del self.running[slot]
                self.cancelled += 1

    def _admit_waiting(self) -> None:
        """Waiting sequences take the free slots (lowest first) and start prefilling."""
        taken = set(self.running) | {s.slot for s in self.prefilling}
        free = sorted(set(range(self.cache.slots)) - taken)
        while self.waiting and free:
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)
            seq.prefill = Prefill(seq.prompt, self.memory, self.positions)
            self.prefilling.append(seq)

    def _prefill_chunks(self) -> None:
        """Chunks of the prefilling sequences, oldest first, until this step's token budget is spent
        (at least one chunk). A sequence's chunk boundaries never depend on the others."""
        budget = self.prefill_tokens_per_step
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            try:
                budget -= seq.prefill.run_chunk(self.loop, self.prefill_chunk)
                if seq.prefill.done:
                    self.prefilling.popleft()
                    self._start_decoding(seq)
            except Exception as e:
                log.exception("prefill failed")
                self.prefilling.popleft()
                self.running.pop(seq.slot, None)
                seq.emit(Event(error=f"prefill failed: {type(e).__name__}: {e}"))

    def _start_decoding(self, seq: Sequence) -> None:
        """Copy the prefilled K/V into the sequence's slot, sample its first token."""
        self.cache.place(seq.slot, seq.prefill.kv(), sorted(self.running))
        self.context.place(seq.slot, seq.prefill.context)
        self._set_positions(seq.slot, self.positions.first_step(seq.prefill.positions))
        logits, seq.prefill = seq.prefill.logits, None
        self.running[seq.slot] = seq
        self._accept(seq, logits)
        self.metrics.first_token(seq, seq.t_last - seq.t_submit)

    def _set_positions(self, slot: int, first: np.ndarray) -> None:
        if self._positions is None:
            self._positions = np.zeros((*first.shape[:-2], self.cache.slots, 1), dtype=first.dtype)
        self._positions[..., slot:slot + 1, :] = first

    def _step(self) -> None:
        """One decode step over slots [0, n); every running row gets one token."""
        active = sorted(self.running)
        self.peak_running = max(self.peak_running, len(active))
        self.cache.make_room(active)
        n = active[-1] + 1
        ids = np.zeros((n, 1), dtype=np.int64)
        for slot in active:
            ids[slot, 0] = self.running[slot].next_id
        embeds = self.loop.embed.run({"input_ids": ids})["inputs_embeds"]  # [n, 1, C]
        mask = self.cache.step_mask(n, active)  # [n, T+1]
        positions = np.ascontiguousarray(self._positions[..., :n, :])  # [n, 1] (or [3, n, 1])
        logits = self.loop._forward(self.memory, self.cache.view(n, self.in_place), embeds, mask, positions,
                                    self.context.feeds(n))
        self._positions = self.positions.next_step(self._positions)
        for slot in active:
            self._accept(self.running[slot], logits[slot:slot + 1, -1])

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        """logits [1, V] -> the row's next token; emits its text; frees the slot when it finishes."""
        token = int(seq.sampler(logits)[0])
        now = time.perf_counter()
        if seq.sampled:
            self.metrics.next_token(now - seq.t_last)
        seq.sampled, seq.next_id, seq.t_last = seq.sampled + 1, token, now
        eos = set() if seq.params.ignore_eos else set(self.facts.eos_token_ids)
        text = seq.row.push(token, eos)
        if not seq.done and seq.sampled >= seq.max_new:
            text += seq.row.finish("length")
        if not seq.done:
            if text:
                seq.emit(Event(text))
            return
        del self.running[seq.slot]
        seq.emit(Event(text, seq.row.finish_reason, prompt_tokens=seq.prompt.prompt_tokens,
                       completion_tokens=seq.sampled))

    def _fail_all(self, message: str) -> None:
        for seq in [*self.running.values(), *self.prefilling]:
            seq.emit(Event(error=message))
        self.running.clear()
        self.prefilling.clear()
        self.cache.reset_if_idle([])


def _check_len(max_model_len: int, context_length: int) -> int:
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or not 2 <= max_model_len <= context_length:
        raise ValueError(f"--max-model-len must be an int from 2 to the model's context length {context_length}, "
                         f"got {max_model_len!r}")
    return max_model_len
