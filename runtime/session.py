"""One generation in progress: its rows, the text they stream, stop strings and EOS, and timings.

`Generation` drives a VLM's decode loop for a batch of requests; iterating it yields each row's new
text per step (what `VLM.stream` passes on); `results()` gives the finished rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

from .generate import StepStats
from .sampling import Sampler, SamplingParams
from .text import IncrementalDetokenizer


@dataclass
class Timings:
    time_to_first_token_s: float = 0.0
    prefill_s: float = 0.0
    vision_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_step_overhead_s: float = 0.0  # per step, outside the embed/decoder graphs
    total_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "timings": self.timings.to_dict(),
        }


@dataclass
class Row:
    """One sequence of a batch while it generates."""

    prompt_tokens: int
    detok: IncrementalDetokenizer
    stop: tuple[str, ...]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: int = 0  # characters of `text` already streamed

    def push(self, token: int, eos: set[int]) -> str:
        """Accept a token; return the text that is now final (stop strings and EOS not included)."""
        if token in eos:
            return self.finish("stop")
        self.token_ids.append(token)
        return self._append(self.detok.push(token))

    def finish(self, reason: str) -> str:
        """End the row; text held back (incomplete character, possible stop-string prefix) is released."""
        self.finish_reason = reason
        return self._append(self.detok.flush())

    def _append(self, new: str) -> str:
        before = len(self.text)
        self.text += new
        cut = stop_index(self.text, self.stop, before)
        if cut is not None:
            self.text, self.finish_reason = self.text[:cut], "stop"
        # while running, hold back a tail that could still become the start of a stop string
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self._emitted, len(self.text) - hold)
        out, self._emitted = self.text[self._emitted:end], end
        return out

    def result(self, timings: "Timings") -> "GenerationResult":
        return GenerationResult(self.token_ids, self.text, self.finish_reason or "length", self.prompt_tokens, timings)


class Generation:
    """One batch generation; iterating it runs the decode loop and yields each row's new text."""

    def __init__(self, vlm, requests: list, params: SamplingParams):  # vlm: runtime.vlm.VLM
        self.t_start = time.perf_counter()
        self.vlm, self.params = vlm, params
        self.batch, prompt_lens, vision_s = vlm._prepare(requests)
        self.rows = [Row(n, IncrementalDetokenizer(vlm.text), params.stop) for n in prompt_lens]
        self.timings = Timings(vision_s=vision_s)

    def __iter__(self) -> Iterator[list[str]]:
        f, p = self.vlm.facts, self.params
        max_new = min(p.max_new_tokens, f.context_length - self.batch.embeds.shape[1])
        eos = set() if p.ignore_eos else set(f.eos_token_ids)
        t_first = None
        for tokens in self.vlm.decoder.tokens(self.batch, max_new, Sampler(p)):
            t_first = t_first or time.perf_counter()
            yield [r.push(int(t), eos) if r.finish_reason is None else "" for r, t in zip(self.rows, tokens)]
            if all(r.finish_reason for r in self.rows):
                break
        yield [r.finish("length") if r.finish_reason is None else "" for r in self.rows]
        fill_timings(self.timings, self.batch.stats, self.t_start, t_first)

    def results(self) -> list["GenerationResult"]:
        return [r.result(self.timings) for r in self.rows]


def stop_index(text: str, stops: tuple[str, ...], new_from: int) -> int | None:
    """Index where the first stop string starts, searching only where new text could complete one."""
    hits = [i for s in stops if (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def fill_timings(t: Timings, stats: StepStats, t_start: float, t_first: float | None) -> None:
    t_end = time.perf_counter()
    t.time_to_first_token_s = (t_first or t_end) - t_start
    t.prefill_s = stats.prefill_s
    t.total_s = t_end - t_start
    t.decode_tokens_per_s = stats.steps / stats.step_s if stats.step_s else 0.0
    t.decode_step_overhead_s = stats.overhead_per_step_s
