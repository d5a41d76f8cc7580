"""M-RoPE and the Qwen vision tower's host-side inputs, equal to transformers' own functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

from vlmdeploy.runtime.mrope import MediaSpan, rope_index, vision_inputs

GRIDS = [[(1, 4, 6)], [(1, 8, 8), (2, 6, 4)], [(3, 10, 14)], [(1, 2, 2), (1, 16, 6), (4, 4, 8)]]


@pytest.mark.parametrize("grids", GRIDS)
def test_patch_positions_and_segments_equal_hf(grids):
    got = vision_inputs(grids, merge=2)
    thw = torch.tensor(grids)
    want = get_vision_position_ids(thw, 2).numpy()  # [N, 2]
    np.testing.assert_array_equal(got.positions.reshape(-1, 2), want)
    cu = get_vision_cu_seqlens(thw).numpy()  # patch boundaries of each frame
    per_patch = np.repeat(got.segments, 4)
    np.testing.assert_array_equal(np.flatnonzero(np.diff(per_patch)) + 1, cu[1:-1])


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window", [2, 3])
def test_window_order_equals_hf(grids, window):
    got = vision_inputs(grids, merge=2, window_units=window)
    thw = torch.tensor(grids)
    index, cu = get_vision_window_index(thw, spatial_merge_size=2, window_size=window * 2 * 14, patch_size=14)
    np.testing.assert_array_equal(got.order, index.numpy())
    per_patch = np.repeat(got.windows, 4)
    np.testing.assert_array_equal(np.flatnonzero(np.diff(per_patch)) + 1, cu.numpy()[1:-1])
    np.testing.assert_array_equal(got.order[got.restore], np.arange(len(got.order)))


def _hf_rope_index(model_cls, config, ids, types, image_grids, video_grids, mask, seconds=None):
    model = model_cls.__new__(model_cls)
    torch.nn.Module.__init__(model)
    model.config = config
    kwargs = {"second_per_grid_ts": torch.tensor(seconds)} if seconds is not None else {}
    pos, _ = model.get_rope_index(torch.tensor(ids), mm_token_type_ids=torch.tensor(types),
                                  image_grid_thw=torch.tensor(image_grids) if image_grids else None,
                                  video_grid_thw=torch.tensor(video_grids) if video_grids else None,
                                  attention_mask=torch.tensor(mask), **kwargs)
    return pos.numpy()


def _prompt(layout):
    """layout: list of ('t', n) | ('i', grid) | ('v', grid) -> ids, types, spans."""
    types = []
    for kind, arg in layout:
        if kind == "t":
            types += [0] * arg
        else:
            t, h, w = arg
            types += [1 if kind == "i" else 2] * (t * h * w // 4)
    return types


LAYOUTS = [
    [("t", 5)],
    [("t", 3), ("i", (1, 4, 6)), ("t", 4)],
    [("t", 2), ("i", (1, 8, 4)), ("t", 1), ("i", (1, 2, 10)), ("t", 6)],
    [("t", 2), ("v", (3, 4, 4)), ("t", 2), ("i", (1, 6, 6)), ("t", 3)],
]


@pytest.mark.parametrize("v25", [False, True])
def test_rope_index_equals_hf_batch_left_padded(v25):
    import transformers

    name = "Qwen2_5_VL" if v25 else "Qwen2VL"
    config = getattr(transformers, f"{name}Config")(vision_config={"spatial_merge_size": 2, "tokens_per_second": 4}
                                                   if v25 else {"spatial_merge_size": 2})
    model_cls = getattr(transformers, f"{name}Model")
    rows = [_prompt(lay) for lay in LAYOUTS]
    width = max(map(len, rows)) + 2
    types = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        types[b, width - len(r):], mask[b, width - len(r):] = r, 1
    image_grids = [a for lay in LAYOUTS for k, a in lay if k == "i"]
    video_grids = [a for lay in LAYOUTS for k, a in lay if k == "v"]
    seconds = [0.5] * len(video_grids) if v25 else None
    want = _hf_rope_index(model_cls, config, np.where(mask, 5, 0), types, image_grids, video_grids, mask, seconds)
    interval = 4 * 0.5 if v25 else 1.0
    for b, lay in enumerate(LAYOUTS):
        spans = [MediaSpan(1 if k == "i" else 2, a, interval if k == "v" else 1.0) for k, a in lay if k != "t"]
        got = rope_index(np.array(rows[b]), spans, merge=2)
        np.testing.assert_array_equal(got, want[:, b, width - len(rows[b]):])


def test_rope_index_refuses_a_run_without_its_item():
    with pytest.raises(ValueError, match="no item"):
        rope_index(np.array([0, 1, 1, 0]), [], merge=2)
    with pytest.raises(ValueError, match="does not match its grid"):
        rope_index(np.array([0, 1, 1, 0]), [MediaSpan(1, (1, 4, 4))], merge=2)
