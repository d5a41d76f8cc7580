"""TensorRT optimization profiles, derived from the graph spec and the build limits (never typed per model).

A profile gives each named dynamic dim one (min, opt, max) range; every tensor that shares the name
gets that same range, which is what TensorRT requires (NVIDIA/TensorRT#1808). A graph with a KV
cache (a `dim_sums` entry, total = past + seq) gets two profiles, because prefill and decode live
in disjoint shape regimes:

    prefill: seq 1..max_input   past 0..0              total = past + seq
    decode:  seq 1..1           past 0..max_context-1  total = past + seq

Every other graph gets one profile over its dims (vision: num_images 1..max_images x rows_per_image,
the rows one image takes: 1 for LLaVA, base + tiles for LLaVA-NeXT; Qwen2-VL's num_units likewise,
rows_per_image being the merged units of the largest image; mllama's tile_rows 1..the vision graph's
rows per tile, fewer under visual-token compression). Dim names and their limits come
from the manifest, so no family has code here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

from ..spec import GraphSpec, SpecError


class ProfileError(SpecError):
    """Shapes outside every optimization profile an engine was built with; names tensor, shape and ranges."""


@dataclass(frozen=True)
class Limits:
    """What the engines must accept; each field is one `vlmdeploy build` flag."""

    max_batch: int  # sequences per generate_batch call
    max_images: int  # images per vision call (all rows of a batch together)
    max_context: int  # prompt + generated tokens
    max_input: int  # prompt tokens in one prefill
    typical_input: int  # the prefill length TensorRT tunes for (profile opt)
    rows_per_image: int = 1  # vision-graph rows one image takes at most (manifest limits; LLaVA-NeXT: 1 + tiles)
    tile_rows: int = 1  # cross K/V rows per tile at most (manifest limits; mllama: the vision graph's, uncompressed)

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_input > self.max_context:
            raise ValueError(f"max_input {self.max_input} > max_context {self.max_context}; a prompt must fit the context")

    @classmethod
    def for_model(cls, facts, max_batch: int = 1, max_images: int = 4, max_context: int | None = None,
                  max_input: int | None = None) -> "Limits":
        """Defaults from the manifest's model facts: the full context, a prompt up to the context."""
        max_context = max_context or facts.context_length
        if max_context > facts.context_length:
            raise ValueError(f"max_context {max_context} > the model's context length {facts.context_length}")
        max_input = max_input or max_context
        typical = min(max_input, facts.tokens_per_image + 64)  # one image and a short question
        limits = dict(getattr(facts, "limits", None) or {})
        return cls(max_batch, max_images, max_context, max_input, typical, limits.get("rows_per_image", 1),
                   limits.get("tile_rows") or 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Limits":
        return cls(**d)


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"invalid range min={self.min} opt={self.opt} max={self.max}: need 0 <= min <= opt <= max")

    def __contains__(self, value: int) -> bool:
        return self.min <= value <= self.max

    def __str__(self) -> str:
        return f"{self.min}..{self.max}"


@dataclass(frozen=True)
class Profile:
    """One TensorRT optimization profile: a range per named dim of the graph."""

    name: str
    dims: Mapping[str, DimRange]

    def accepts(self, dims: Mapping[str, int]) -> bool:
        return all(d not in self.dims or v in self.dims[d] for d, v in dims.items())

    def shapes(self, spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shape of every input: what TensorRT's IOptimizationProfile.set_shape takes."""
        out = {}
        for t in spec.inputs:
            rng = [self.dims[d] if isinstance(d, str) else DimRange(d, d, d) for d in t.shape]
            out[t.name] = tuple(tuple(getattr(r, k) for r in rng) for k in ("min", "opt", "max"))
        return out

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(f"{d} {r}" for d, r in self.dims.items())

    def to_dict(self) -> dict:
        return {"name": self.name, "dims": {d: [r.min, r.opt, r.max] for d, r in self.dims.items()}}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Profile":
        return cls(d["name"], {k: DimRange(*v) for k, v in d["dims"].items()})


# Range of each dim name the graph specs use, from the limits. A new dim name must be added here.
def _dim_ranges(limits: Limits) -> dict[str, DimRange]:
    return {
        "num_images": DimRange(1, limits.rows_per_image, limits.max_images * limits.rows_per_image),
        # Qwen2-VL: merged 2x2-patch units of all images of a call (rows_per_image: one image's most)
        "num_units": DimRange(1, limits.rows_per_image, limits.max_images * limits.rows_per_image),
        # mllama: image slots of one batch row (the cross K/V and cross-attention mask; text only: 1 zero slot)
        "images": DimRange(1, 1, limits.max_images),
        # mllama: cross K/V rows per tile, 1 + K under visual-token compression (opt: uncompressed)
        "tile_rows": DimRange(1, limits.tile_rows, limits.tile_rows),
        "batch": DimRange(1, 1, limits.max_batch),
        "seq": DimRange(1, limits.typical_input, limits.max_input),
    }


def _kv_phases(limits: Limits) -> dict[str, dict[str, DimRange]]:
    """The two regimes of a KV-cache graph: seq and past ranges of prefill and decode."""
    return {
        "prefill": {"seq": DimRange(1, limits.typical_input, limits.max_input), "past": DimRange(0, 0, 0)},
        "decode": {"seq": DimRange(1, 1, 1), "past": DimRange(0, limits.max_context // 2, limits.max_context - 1)},
    }


def derive_profiles(spec: GraphSpec, limits: Limits) -> list[Profile]:
    """The profiles `vlmdeploy build` gives this graph."""
    if not spec.dim_sums:
        return [Profile("all", _ranges_for(spec, _dim_ranges(limits)))]
    return [Profile(phase, _ranges_for(spec, {**_dim_ranges(limits), **ranges}))
            for phase, ranges in _kv_phases(limits).items()]


def _ranges_for(spec: GraphSpec, known: dict[str, DimRange]) -> dict[str, DimRange]:
    out = {}
    for d in spec.dim_names():
        if d in spec.dim_sums:
            a, b = (known[p] for p in spec.dim_sums[d])
            out[d] = DimRange(a.min + b.min, a.opt + b.opt, a.max + b.max)
        elif d in known:
            out[d] = known[d]
        else:
            raise ValueError(f"graph {spec.name!r}: no profile range for dynamic dim {d!r}; "
                             f"known dims: {sorted(known)} (add it to profiles._dim_ranges)")
    return out


def check_profiles(spec: GraphSpec, profiles: list[Profile]) -> list[str]:
    """Problems with profiles for this graph (empty = fine): coverage, one range per name, sums."""
    problems = []
    for p in profiles:
        problems += [f"profile {p.name!r}: {m}" for m in _profile_problems(spec, p)]
    return problems


def _profile_problems(spec: GraphSpec, p: Profile) -> list[str]:
    input_dims = [d for t in spec.inputs for d in t.shape if isinstance(d, str)]
    missing = sorted({d for d in input_dims if d not in p.dims})
    if missing:
        return [f"no range for dynamic dims {missing} of the inputs"]
    problems = shared_dim_problems(spec, p.shapes(spec))
    for total, (a, b) in spec.dim_sums.items():
        if total in p.dims and a in p.dims and b in p.dims:
            t, x, y = p.dims[total], p.dims[a], p.dims[b]
            if (t.min, t.opt, t.max) != (x.min + y.min, x.opt + y.opt, x.max + y.max):
                problems.append(f"{total} {t} (opt {t.opt}) is not {a} + {b} = {x.min + y.min}..{x.max + y.max} "
                                f"(opt {x.opt + y.opt})")
    return problems


def shared_dim_problems(spec: GraphSpec, shapes: Mapping[str, tuple]) -> list[str]:
    """Per-input (min, opt, max) shapes, as handed to TensorRT: every input is covered, fixed axes keep their
    size, and every tensor sharing a dim name gets the same range on that axis (NVIDIA/TensorRT#1808)."""
    seen: dict[str, tuple[tuple[int, int, int], str]] = {}
    problems = []
    for t in spec.inputs:
        if t.name not in shapes:
            problems.append(f"input {t.name!r} has no shapes in the profile")
            continue
        lo, opt, hi = (tuple(s) for s in shapes[t.name])
        for axis, d in enumerate(t.shape):
            triple = (lo[axis], opt[axis], hi[axis])
            if isinstance(d, int) and triple != (d, d, d):
                problems.append(f"input {t.name!r} axis {axis} is fixed at {d} but the profile gives {triple}")
            elif isinstance(d, str) and d in seen and seen[d][0] != triple:
                problems.append(f"dim {d!r} is {seen[d][0]} on {seen[d][1]} but {triple} on {t.name!r}")
            elif isinstance(d, str):
                seen.setdefault(d, (triple, repr(t.name)))
    return problems


def envelope(name: str, profiles: list[Profile]) -> Profile:
    """One profile covering all of them (for ONNX Runtime's TensorRT EP, which takes one range per input)."""
    dims = profiles[0].dims.keys()
    return Profile(name, {d: DimRange(min(p.dims[d].min for p in profiles), max(p.dims[d].opt for p in profiles),
                                      max(p.dims[d].max for p in profiles)) for d in dims})


def select_profile(spec: GraphSpec, profiles: list[Profile], dims: Mapping[str, int]) -> int:
    """Index of the first profile that accepts these dims; ProfileError naming tensor, shape and ranges."""
    for i, p in enumerate(profiles):
        if p.accepts(dims):
            return i
    raise ProfileError(_outside_message(spec, profiles, dims))


def _outside_message(spec: GraphSpec, profiles: list[Profile], dims: Mapping[str, int]) -> str:
    closest = min(profiles, key=lambda p: sum(d in p.dims and v not in p.dims[d] for d, v in dims.items()))
    bad = next(d for d, v in dims.items() if d in closest.dims and v not in closest.dims[d])
    tensor = next(t for t in spec.inputs if bad in t.shape)
    shape = [dims[d] if isinstance(d, str) else d for d in tensor.shape]
    ranges = "; ".join(p.describe() for p in profiles)
    return (f"graph {spec.name!r} input {tensor.name!r}: shape {shape} ({bad}={dims[bad]}) is outside every "
            f"optimization profile of the engine ({ranges}); rebuild with larger limits "
            "(vlmdeploy build --max-batch/--max-images/--max-context)")
