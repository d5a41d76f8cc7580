"""Random feeds for each graph at given dims, built from the spec and the model facts (numpy only).

Used by export validation (ONNX Runtime vs PyTorch) and by `vlmdeploy check`.
"""

from __future__ import annotations

import numpy as np

from .manifest import ModelFacts
from .spec import kv_names


def sample_feeds(graph: str, dims: dict[str, int], facts: ModelFacts, rng: np.random.Generator) -> dict:
    """Random inputs for one graph at the given dims (validation and `check`)."""
    return SAMPLERS[graph](dims, facts, rng)


def _float(shape, facts, rng):
    return rng.standard_normal(shape).astype(facts.dims.dtype)


def _vision(dims, facts, rng):
    return {"pixel_values": _float((dims["num_images"], 3, *facts.dims.image_size), facts, rng)}


def _projector(dims, facts, rng):
    d = facts.dims
    return {"image_features": _float((dims["num_images"], d.vision_tokens, d.vision_hidden), facts, rng)}


def _embed(dims, facts, rng):
    return {"input_ids": rng.integers(0, facts.dims.vocab, (dims["batch"], dims["seq"]), dtype=np.int64)}


def _decoder(dims, facts, rng):
    """Left-padded rows: row b has `b` leading pads (capped), positions as HF generate computes them."""
    d, b, s, p = facts.dims, dims["batch"], dims["seq"], dims["past"]
    total = p + s
    mask = np.ones((b, total), dtype=np.int64)
    for row in range(b):
        mask[row, : min(row, total - 1)] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, p:]
    feeds = {
        "inputs_embeds": _float((b, s, d.hidden), facts, rng),
        "attention_mask": mask,
        "position_ids": positions.astype(np.int64),
    }
    for name in kv_names(d.num_layers)[0]:
        feeds[name] = _float((b, d.kv_heads, p, d.head_dim), facts, rng)
    return feeds


def _decoder_gqa(dims, facts, rng):
    """The portable decoder's feeds with each past copied into a [B, H, capacity, D] buffer."""
    feeds = _decoder(dims, facts, rng)
    b, p, capacity = dims["batch"], dims["past"], dims["capacity"]
    d = facts.dims
    for name in kv_names(d.num_layers)[0]:
        buffer = np.zeros((b, d.kv_heads, capacity, d.head_dim), dtype=d.dtype)
        buffer[:, :, :p] = feeds[name]
        feeds[name] = buffer
    return feeds


def bound_outputs(graph: str, feeds: dict) -> dict:
    """Output buffers a graph must write into: decoder_gqa's present IS its past (shared buffer)."""
    if graph != "decoder_gqa":
        return {}
    past, present = kv_names(len([n for n in feeds if n.startswith("past_key_values.")]) // 2)
    return {out: feeds[inp] for inp, out in zip(past, present)}


SAMPLERS = {"vision": _vision, "projector": _projector, "embed": _embed, "decoder": _decoder, "decoder_gqa": _decoder_gqa}

# Shapes each graph is validated at after export (and run at by `vlmdeploy check`).
VALIDATION_DIMS = {
    "vision": [{"num_images": 1}, {"num_images": 3}],
    "projector": [{"num_images": 1}, {"num_images": 2}],
    "embed": [{"batch": 1, "seq": 7}, {"batch": 3, "seq": 2}],
    "decoder": [
        {"batch": 1, "seq": 6, "past": 0},
        {"batch": 2, "seq": 5, "past": 0},
        {"batch": 2, "seq": 1, "past": 9},
        {"batch": 3, "seq": 3, "past": 4},
    ],
    # the runtime drives decoder_gqa with prefill (past 0) and one-token steps only
    "decoder_gqa": [
        {"batch": 1, "seq": 6, "past": 0, "capacity": 9},
        {"batch": 2, "seq": 5, "past": 0, "capacity": 8},
        {"batch": 2, "seq": 1, "past": 9, "capacity": 12},
        {"batch": 3, "seq": 1, "past": 4, "capacity": 5},
    ],
}

# Example sizes for torch.onnx.export: all >= 2 so nothing specializes to 0/1.
EXPORT_DIMS = {
    "vision": {"num_images": 2},
    "projector": {"num_images": 2},
    "embed": {"batch": 2, "seq": 3},
    "decoder": {"batch": 2, "seq": 3, "past": 4},
}

