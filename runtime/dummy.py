"""Random feeds for any graph at given dims, derived from its spec and the model facts (numpy only).

Used by export validation (ONNX Runtime vs PyTorch) and by `vlmdeploy check`. Inputs are drawn by
role: floats ~ N(0, 1), `input_ids` in the vocabulary, a decoder's `attention_mask` left-padded
(row b has b leading pads) with `position_ids` from the manifest's position scheme, and a
capacity-sized KV buffer (decoder_gqa) zero beyond `past`.
"""

from __future__ import annotations

import numpy as np

from .manifest import ModelFacts
from .positions import position_scheme
from .spec import GraphSpec, kv_names


def sample_feeds(spec: GraphSpec, dims: dict[str, int], facts: ModelFacts, rng: np.random.Generator) -> dict:
    """Random inputs for `spec` at `dims` (derived dims such as total = past + seq filled in here)."""
    dims = with_sums(spec, dims)
    feeds = {t.name: _draw(t, t.concrete_shape(dims), facts, rng) for t in spec.inputs}
    if "attention_mask" in feeds:
        feeds.update(_mask_and_positions(dims, facts))
    if "capacity" in dims:
        for name in (n for n in feeds if n.startswith("past_key_values.")):
            feeds[name][:, :, dims["past"]:] = 0  # slots not yet written
    return feeds


def with_sums(spec: GraphSpec, dims: dict[str, int]) -> dict[str, int]:
    """Fill derived dims (total = past + seq)."""
    dims = dict(dims)
    for total, (a, b) in spec.dim_sums.items():
        dims.setdefault(total, dims[a] + dims[b])
    if "capacity" in dims and "total" not in dims:
        dims["total"] = dims["past"] + dims["seq"]
    return dims


def _draw(t, shape, facts: ModelFacts, rng) -> np.ndarray:
    if t.name == "input_ids":
        return rng.integers(0, facts.dims.vocab, shape, dtype=np.int64)
    if t.dtype in ("float32", "float16"):
        return rng.standard_normal(shape).astype(t.dtype)
    return np.zeros(shape, dtype=t.np_dtype)  # replaced by role below


def _mask_and_positions(dims: dict, facts: ModelFacts) -> dict:
    """Left-padded rows: row b has `b` leading pads (capped); positions as HF generate computes them."""
    b, s, total = dims["batch"], dims["seq"], dims["total"]
    mask = np.ones((b, total), dtype=np.int64)
    for row in range(b):
        mask[row, : min(row, total - 1)] = 0
    positions = position_scheme(facts.positions).prefill(mask)[..., total - s:]
    if positions.ndim == 3:  # M-RoPE: make the three axes differ, as an image's grid positions do
        positions = positions + np.array([0, 2, 5])[:, None, None] * (positions > 0)
    return {"attention_mask": mask, "position_ids": np.ascontiguousarray(positions)}


def bound_outputs(spec: GraphSpec, feeds: dict) -> dict:
    """Output buffers a graph must write into: a capacity-sized KV input's present IS its past (shared buffer)."""
    if not any("capacity" in t.shape for t in spec.inputs):
        return {}
    past, present = kv_names(len([n for n in feeds if n.startswith("past_key_values.")]) // 2)
    return {out: feeds[inp] for inp, out in zip(past, present)}


# The shapes a graph is validated at after export (and run at by `vlmdeploy check`), by its dims.
KV_VALIDATION = [
    {"batch": 1, "seq": 6, "past": 0},
    {"batch": 2, "seq": 5, "past": 0},
    {"batch": 2, "seq": 1, "past": 9},
    {"batch": 3, "seq": 3, "past": 4},
]
# the runtime drives a shared-buffer decoder with prefill (past 0) and one-token steps only
SHARED_KV_VALIDATION = [
    {"batch": 1, "seq": 6, "past": 0, "capacity": 9},
    {"batch": 2, "seq": 5, "past": 0, "capacity": 8},
    {"batch": 2, "seq": 1, "past": 9, "capacity": 12},
    {"batch": 3, "seq": 1, "past": 4, "capacity": 5},
]


def validation_dims(spec: GraphSpec) -> list[dict[str, int]]:
    names = set(spec.dim_names()) - set(spec.dim_sums) - {"total"}
    if "capacity" in names or "past" in names:
        # other dims of a KV graph (mllama's image slots) alternate 1 and 2
        extra = sorted(names - {"batch", "seq", "past", "capacity"})
        runs = SHARED_KV_VALIDATION if "capacity" in names else KV_VALIDATION
        return [{**d, **{e: 1 + i % 2 for e in extra}} for i, d in enumerate(runs)]
    return [{d: 7 if d == "seq" else 1 for d in names}, {d: 2 if d == "seq" else 3 for d in names}]


def export_dims(spec: GraphSpec) -> dict[str, int]:
    """Example sizes for torch.onnx.export: all >= 2 so nothing specializes to 0/1."""
    sizes = {"seq": 3, "past": 4}
    return {d: sizes.get(d, 2) for d in set(spec.dim_names()) - set(spec.dim_sums)}
