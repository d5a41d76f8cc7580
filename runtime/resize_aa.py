"""torch's antialiased uint8 resize, in numpy: what transformers' video processors resize frames with.

transformers' video processors run torchvision's ``resize(..., antialias=True)``; on a CPU, for
uint8 frames with bicubic (or, with AVX2, bilinear) interpolation, torchvision calls
``torch.nn.functional.interpolate(antialias=True)`` on the uint8 tensor, whose kernel is a port of
Pillow's resampler with int16 fixed-point weights (Pillow uses 22-bit int32 ones, so the two differ
by 1-2 levels on a few pixels in a thousand). This reproduces torch's kernel exactly: weights from
the filter in float64, scaled to int16 at the largest precision that fits, a horizontal pass then a
vertical one, each rounded and clipped to uint8.
"""

from __future__ import annotations

import numpy as np

TORCH_RESAMPLES = {2: "bilinear", 3: "bicubic"}  # PIL codes this module reproduces


def resize_uint8_aa(pixels: np.ndarray, size: tuple[int, int], resample: int = 3) -> np.ndarray:
    """[H, W, C] uint8 -> [h, w, C] uint8, as ``F.interpolate(x, (h, w), mode, antialias=True)``."""
    if resample not in TORCH_RESAMPLES:
        raise ValueError(f"video frames are resized as torchvision does, with bilinear (2) or bicubic (3) "
                         f"resampling; got resample={resample}")
    h, w = size
    x = pixels
    if x.shape[1] != w:
        x = _resize_axis(x, w, 1, resample)  # horizontal first, as torch (and Pillow)
    if x.shape[0] != h:
        x = _resize_axis(x, h, 0, resample)
    return x


def _resize_axis(x: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    """One separable pass: int32 sums of int16 weights (as torch; |sum| < 2**24), rounded, shifted,
    clipped to uint8. One multiply-add per filter tap over whole rows (~0.1 s for a 1080p frame)."""
    in_size = x.shape[axis]
    start, weights, precision = _int16_weights(in_size, out_size, resample)  # [out], [out, K]
    src = np.ascontiguousarray(np.moveaxis(x, axis, 0))  # uint8 [in, ...]
    acc = np.full((out_size, *src.shape[1:]), 1 << (precision - 1), np.int32)  # [out, ...]
    term = np.empty_like(acc)
    shape = (-1,) + (1,) * (src.ndim - 1)
    for k, tap in enumerate(weights.astype(np.int32).T):
        np.multiply(src[np.minimum(start + k, in_size - 1)], tap.reshape(shape), out=term)  # past the end: weight 0
        acc += term
    np.right_shift(acc, precision, out=acc)
    return np.moveaxis(np.clip(acc, 0, 255).astype(np.uint8), 0, axis)


def _int16_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index [out], int16-valued weights [out, K], precision bits), as torch computes them."""
    weights, start = _float_weights(in_size, out_size, resample)
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    return start, np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64), precision


def _float_weights(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized filter weights [out, K] (float64) and first input index [out]."""
    scale = in_size / out_size
    half_width = 2.0 if resample == 3 else 1.0  # interp_size / 2
    support = half_width * scale if scale >= 1.0 else half_width
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    start = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate toward 0
    count = np.minimum((center + support + 0.5).astype(np.int64), in_size) - start
    k = np.arange(count.max())
    weights = _filter((k[None, :] + start[:, None] - center[:, None] + 0.5) * inv_scale, resample)
    weights[k[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for j in k:  # summed in order, as the C loop
        total += weights[:, j]
    nonzero = total != 0
    weights[nonzero] /= total[nonzero, None]
    return weights, start


def _filter(x: np.ndarray, resample: int) -> np.ndarray:
    x = np.abs(x)
    if resample == 2:
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Keys' cubic with a = -0.5, as torch's antialiased bicubic (and Pillow)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
