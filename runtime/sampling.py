"""Sampling parameters and the token sampler (numpy; HF's order: temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_number("temperature", self.temperature, ">= 0 (0 = greedy)", lambda t: t >= 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda p: 0 < p <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "an int >= 0 or None")
        _check_int("top_k", self.top_k, 0, "an int >= 0 (0 = off)")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "SamplingParams":
        """The keyword arguments of generate/stream/chat; an unknown one is named with the allowed ones."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            hint = " (sampling is on when temperature > 0)" if "do_sample" in unknown else ""
            raise ValueError(f"unknown sampling argument(s) {unknown}{hint}; allowed: {allowed}")
        if "stop" in kwargs:  # a str, a list of str, or None
            kwargs = {**kwargs, "stop": _stop_tuple(kwargs["stop"])}
        return cls(**kwargs)


def _stop_tuple(stop) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, (list, tuple)):
        return tuple(stop)
    raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")


def _check_int(name: str, value, low: int, allowed: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {allowed or f'an int >= {low}'}, got {value!r}")


def _check_number(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {allowed}, got {type(value).__name__} {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B] (int64)."""
        if self.params.temperature == 0:
            return np.argmax(logits, axis=-1).astype(np.int64)
        return np.array([self._sample_row(row) for row in logits], dtype=np.int64)

    def _sample_row(self, logits: np.ndarray) -> int:
        p = self.params
        scores = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < scores.size:
            kth = np.partition(scores, -p.top_k)[-p.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = _softmax(scores)
        if p.top_p < 1.0:
            probs = _top_p(probs, p.top_p)
        return int(self.rng.choice(probs.size, p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def _top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one)."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = order[mass_before < top_p]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()
