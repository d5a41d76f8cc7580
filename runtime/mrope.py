"""Qwen2-VL's multimodal rotary positions (M-RoPE), computed on the host in numpy.

Text tokens get one position repeated on the three axes (temporal, height, width); the tokens of
an image or video get their grid coordinates, offset by the position where the item starts. The
next text token continues at `start + max(h, w) / merge`. A transcription of transformers'
`Qwen2VLModel.get_rope_index` (Qwen2.5-VL: videos space their temporal axis by
`tokens_per_second * seconds_per_grid`), checked position by position against it in the tests.

    token types [S] (0 text, 1 image, 2 video) + the items' grids -> positions [3, S]

The vision tower's own inputs (patch coordinates, attention segments, Qwen2.5-VL's window order)
are in `vision_inputs` below: what HF computes inside the tower from `grid_thw`, done here so
the vision graph is plain tensor ops (no loops, no data-dependent shapes; TensorRT takes it).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

Grid = tuple[int, int, int]  # (t, h, w) in patches, before the spatial merge


@dataclass(frozen=True)
class MediaSpan:
    """One image or video in a prompt: its kind (1 image, 2 video), grid and temporal spacing."""

    kind: int
    grid: Grid
    time_interval: float = 1.0  # Qwen2.5-VL videos: tokens_per_second * seconds per temporal patch


def rope_index(token_types: np.ndarray, spans: list[MediaSpan], merge: int) -> np.ndarray:
    """token_types [S] int (0 text, 1 image, 2 video; pads removed) -> positions [3, S] int64.
    `spans`: the items of the prompt; each run of image (video) tokens takes the next image (video)."""
    pieces, pos = [], 0
    queues = {kind: iter([s for s in spans if s.kind == kind]) for kind in (1, 2)}
    for kind, group in itertools.groupby(token_types.tolist()):
        n = len(list(group))
        if kind == 0:
            pieces.append(np.broadcast_to(np.arange(pos, pos + n), (3, n)))
            pos += n
            continue
        span = next(queues.get(kind, iter(())), None)
        if span is None:
            raise ValueError(f"the prompt has a run of {n} {'image' if kind == 1 else 'video'} tokens with no item for it")
        grid_positions = _grid_positions(pos, span, merge)
        if grid_positions.shape[1] != n:
            raise ValueError(f"a media run of {n} tokens does not match its grid {span.grid} (merge {merge}: "
                             f"{grid_positions.shape[1]} tokens)")
        pieces.append(grid_positions)
        pos += max(span.grid[1], span.grid[2]) // merge
    return np.concatenate(pieces, axis=1).astype(np.int64) if pieces else np.zeros((3, 0), np.int64)


def _grid_positions(start: int, span: MediaSpan, merge: int) -> np.ndarray:
    """[3, t*h*w/merge²]: (start + t*interval, start + row, start + col) for each merged token, t-major."""
    t, h, w = span.grid[0], span.grid[1] // merge, span.grid[2] // merge
    temporal = (np.arange(t) * span.time_interval).astype(np.int64) + start
    tt, hh, ww = np.meshgrid(temporal, np.arange(h) + start, np.arange(w) + start, indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


def left_pad_positions(rows: list[np.ndarray], width: int) -> np.ndarray:
    """Per-row positions [3, S_i] (or 1-D schemes' [S_i]) -> [3, B, width] ([B, width]), zeros at the
    left pads (as HF fills them)."""
    out = np.zeros((*rows[0].shape[:-1], len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        out[..., b, width - r.shape[-1]:] = r
    return out


# ---- the vision tower's host-side inputs --------------------------------------------------------


@dataclass(frozen=True)
class VisionInputs:
    """What the vision graph takes beside the pixels, for all items of a call concatenated.

    positions [U, M, 2]: (row, col) patch coordinates for the rotary embedding (M = merge² patches
    per merged unit U); segments [U]: attention runs within a segment (one per frame of each item);
    windows [U]: Qwen2.5-VL's window attention segments; order [U]: the unit order the graph sees
    (Qwen2.5-VL groups each window's units together); restore [U]: its inverse, applied to the output."""

    positions: np.ndarray
    segments: np.ndarray
    windows: np.ndarray | None = None
    order: np.ndarray | None = None
    restore: np.ndarray | None = None


def vision_inputs(grids: list[Grid], merge: int, window_units: int | None = None) -> VisionInputs:
    """`window_units`: Qwen2.5-VL's window side in merged units (window_size // merge // patch); None: Qwen2-VL."""
    positions = np.concatenate([_patch_positions(g, merge) for g in grids])  # [U, M, 2]
    frame_units = [g[1] * g[2] // merge**2 for g in grids for _ in range(g[0])]
    segments = np.repeat(np.arange(len(frame_units)), frame_units)  # [U]
    if window_units is None:
        return VisionInputs(positions, segments)
    order, windows = _window_order(grids, merge, window_units)
    return VisionInputs(positions[order], segments[order], windows, order, np.argsort(order))


def _patch_positions(grid: Grid, merge: int) -> np.ndarray:
    """[t*h*w/merge², merge², 2]: (row, col) of each patch in HF's merge-block order, per frame."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1, merge * merge)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1, merge * merge)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1, 1)).astype(np.int64)


def _window_order(grids: list[Grid], merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's `get_vision_window_index`: units regrouped window by window (windows of side x
    side units, per frame, row-major), and the window each reordered unit belongs to."""
    order, windows, offset, window_id = [], [], 0, 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // side), -(-gw // side)
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        for frame, wy, wx in itertools.product(range(t), range(nh), range(nw)):
            units = index[frame, wy * side:(wy + 1) * side, wx * side:(wx + 1) * side].ravel()
            order.append(units + offset)
            windows.append(np.full(units.size, window_id))
            window_id += 1
        offset += t * gh * gw
    return np.concatenate(order), np.concatenate(windows)
