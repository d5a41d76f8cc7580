"""Position schemes: the `position_ids` a decoder is fed, named by `manifest.model.positions`.

`cumsum` is HF `generate`'s rule for 1-D rotary or learned positions with left padding:
prefill positions are cumsum(mask) - 1 (0 at pads), each decode step adds 1 to the row's last.
`mrope` is Qwen2-VL's: positions [3, B, S] (temporal, height, width). A prompt's positions come
from its image and video grids (runtime/mrope.py, given to the loop with the batch); without media
they are cumsum's on all three axes. Each decode step continues every axis from the row's last
position + 1, as HF `generate` does.
"""

from __future__ import annotations

import numpy as np


class CumsumPositions:
    def prefill(self, mask: np.ndarray) -> np.ndarray:
        """mask [B, S] int64 (0 at left pads) -> positions [B, S] int64."""
        return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)

    def first_step(self, prefill_positions: np.ndarray) -> np.ndarray:
        """Positions [..., B, 1] of the first generated token."""
        return prefill_positions[..., -1:] + 1

    def next_step(self, positions: np.ndarray) -> np.ndarray:
        return positions + 1


class MRopePositions(CumsumPositions):
    def prefill(self, mask: np.ndarray) -> np.ndarray:
        """Text-only rows: mask [B, S] -> [3, B, S], cumsum's on each axis."""
        return np.ascontiguousarray(np.broadcast_to(super().prefill(mask), (3, *mask.shape)))


SCHEMES = {"cumsum": CumsumPositions, "mrope": MRopePositions}


def position_scheme(name: str):
    if name not in SCHEMES:
        raise ValueError(f"position scheme {name!r} is not one of {sorted(SCHEMES)}")
    return SCHEMES[name]()
