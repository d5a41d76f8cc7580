"""Video input: frame sampling as transformers' video processors do it, and decoding with PyAV.

numpy + Pillow only; PyAV (``pip install vlmdeploy[video]``) is imported when a file or bytes are
decoded. Budgets as for images (runtime/images.py): file bytes, pixels per frame, frames, and the
decoded pixels of the whole clip; each error names its knob.
"""

from __future__ import annotations

import io
import math
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .images import MAX_DECODED_PIXELS, ImageError, to_rgb

MAX_VIDEO_FILE_BYTES = 1 << 30  # a video file or bytes object
MAX_FRAMES = 768  # frames kept after sampling (Qwen2-VL's own max_frames)
MAX_VIDEO_DECODED_PIXELS = 256_000_000  # frames x height x width kept (768 MB as uint8 RGB)


class VideoError(ImageError):
    """A video that cannot be loaded or sampled."""


@dataclass(frozen=True)
class VideoMetadata:
    """What the decoder said about the whole video, and which frames were kept."""

    total_frames: int
    fps: float | None  # of the source; None for frames given without a rate
    duration: float | None  # seconds: total_frames / fps
    frame_indices: tuple[int, ...]  # of the kept frames, in the source

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the kept frames: HF's ``VideoMetadata.sampled_fps`` (24 with no fps).
        Qwen2.5-VL's ``second_per_grid_ts`` is temporal_patch_size / sampled_fps."""
        if self.fps is None:
            return 24.0
        return len(self.frame_indices) / self.total_frames * self.fps


# ---------------------------------------------------------------------------------------------
# Frame sampling


def sample_frame_indices(total_frames: int, video_fps: float | None, num_frames: int | None = None,
                         fps: float | None = None, min_frames: int = 4, max_frames: int = 768,
                         temporal_patch_size: int = 2) -> np.ndarray:
    """Indices of the frames to keep: transformers 5.24 ``Qwen2VLVideoProcessor.sample_frames``
    (``models/qwen2_vl/video_processing_qwen2_vl.py``; Qwen2.5-VL uses the same class).

    - ``num_frames``: rounded (half to even) to a multiple of temporal_patch_size.
    - ``fps``: total_frames / video_fps * fps, clamped to [min_frames, max_frames] and to the
      video, floored to a multiple of temporal_patch_size.
    - neither: every frame.
    Indices are ``arange(0, total, total / n)`` in float32 truncated to int, as HF's torch.arange.
    Where HF goes wrong this does not: float32 rounding can add one index equal to total_frames
    (e.g. 17 frames, n=14), which HF returns (an IndexError on arrays) and this drops; a clip
    shorter than temporal_patch_size frames makes HF divide by zero and keeps all frames here.
    """
    n = _qwen_frame_count(total_frames, video_fps, num_frames, fps, min_frames, max_frames, temporal_patch_size)
    if n is None:
        return np.arange(total_frames, dtype=np.int64)
    indices = np.arange(0, total_frames, total_frames / n).astype(np.float32).astype(np.int64)  # [n or n+1]
    return indices[indices < total_frames]


def _qwen_frame_count(total_frames, video_fps, num_frames, fps, min_frames, max_frames, temporal_patch_size):
    """Frames to sample by Qwen2-VL's rules, None for all."""
    _check_sampling_args(total_frames, video_fps, num_frames, fps)
    if num_frames is not None:
        n = round(num_frames / temporal_patch_size) * temporal_patch_size
        if n < 1:
            raise VideoError(f"num_frames={num_frames} rounds to 0 frames (a multiple of temporal_patch_size="
                             f"{temporal_patch_size}); ask for at least {temporal_patch_size}")
    elif fps is not None:
        max_frames = math.floor(min(max_frames, total_frames) / temporal_patch_size) * temporal_patch_size
        n = total_frames / video_fps * fps
        n = min(max(n, min_frames), max_frames, total_frames)
        n = math.floor(n / temporal_patch_size) * temporal_patch_size
        if n < 1:  # fewer frames than temporal_patch_size (HF: ZeroDivisionError)
            return None
    else:
        return None
    if n > total_frames:
        raise VideoError(f"num_frames={n} is more than the video's {total_frames} frames; ask for fewer frames")
    return n


def uniform_frame_indices(total_frames: int, video_fps: float | None, num_frames: int | None = None,
                          fps: float | None = None) -> np.ndarray:
    """transformers 5.24 ``video_utils.default_sample_indices_fn`` (``BaseVideoProcessor.sample_frames``,
    used by the LLaVA-OneVision / LLaVA-NeXT-Video processors): ``fps`` gives
    max(1, int(total / video_fps * fps)) frames; frame i of n is i * total // n."""
    _check_sampling_args(total_frames, video_fps, num_frames, fps)
    if num_frames is None and fps is not None:
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_frames, dtype=np.int64)
    if num_frames > total_frames:
        raise VideoError(f"num_frames={num_frames} is more than the video's {total_frames} frames; ask for fewer")
    return np.arange(num_frames, dtype=np.int64) * total_frames // num_frames


def _check_sampling_args(total_frames, video_fps, num_frames, fps) -> None:
    if num_frames is not None and fps is not None:
        raise VideoError("num_frames and fps are exclusive: sample by count or by rate, not both")
    _check_positive("total_frames", total_frames, int)
    if num_frames is not None:
        _check_positive("num_frames", num_frames, int)
    if fps is not None:
        _check_positive("fps", fps, (int, float))
        if video_fps is None:
            raise VideoError("sampling by fps needs the video's frame rate, which is unknown here "
                             "(frames given without video_fps); sample by num_frames instead")
        _check_positive("video_fps", video_fps, (int, float))


def _check_positive(name: str, value: Any, types) -> None:
    if isinstance(value, bool) or not isinstance(value, types) or not value > 0 or not math.isfinite(value):
        raise VideoError(f"{name} must be a positive {'integer' if types is int else 'number'}, got {value!r}")


UNIFORM_SAMPLING_TYPES = ("LlavaOnevisionVideoProcessor",)  # video processors on BaseVideoProcessor's rule


@dataclass(frozen=True)
class FrameSampling:
    """Which rule picks frames, with its settings (from the HF video processor's config)."""

    rule: str = "qwen2_vl"  # "qwen2_vl" (sample_frame_indices) or "uniform" (uniform_frame_indices)
    min_frames: int = 4
    max_frames: int = 768
    temporal_patch_size: int = 2

    def __post_init__(self):
        if self.rule not in ("qwen2_vl", "uniform"):
            raise ValueError(f'frame sampling rule must be "qwen2_vl" or "uniform", got {self.rule!r}')
        for name in ("min_frames", "max_frames", "temporal_patch_size"):
            _check_positive(name, getattr(self, name), int)

    @classmethod
    def from_dict(cls, d: dict) -> FrameSampling:
        """From a video (or image) processor config dict. Qwen2VLVideoProcessor (the default): its
        min_frames, max_frames and temporal_patch_size, the class defaults (4, 768, 2) for absent keys.
        LlavaOnevisionVideoProcessor: HF's generic rule (BaseVideoProcessor.sample_frames), "uniform"."""
        kind = d.get("video_processor_type") or "Qwen2VLVideoProcessor"
        if kind in UNIFORM_SAMPLING_TYPES:
            return cls(rule="uniform")
        if kind != "Qwen2VLVideoProcessor":
            raise ValueError(f"video_processor_type {kind!r} has no frame sampling rule here; allowed: "
                             f"Qwen2VLVideoProcessor, {', '.join(UNIFORM_SAMPLING_TYPES)} (use "
                             "FrameSampling(rule='uniform') for HF's generic rule)")
        keys = ("min_frames", "max_frames", "temporal_patch_size")
        return cls(rule="qwen2_vl", **{k: d[k] for k in keys if d.get(k) is not None})

    def indices(self, total_frames: int, video_fps: float | None, num_frames: int | None = None,
                fps: float | None = None) -> np.ndarray:
        if self.rule == "uniform":
            return uniform_frame_indices(total_frames, video_fps, num_frames, fps)
        return sample_frame_indices(total_frames, video_fps, num_frames, fps, self.min_frames, self.max_frames,
                                    self.temporal_patch_size)


# ---------------------------------------------------------------------------------------------
# Loading


def load_video(source: Any, num_frames: int | None = None, fps: float | None = None, *,
               sampling: FrameSampling = FrameSampling(), video_fps: float | None = None,
               max_frames: int = MAX_FRAMES, max_file_bytes: int = MAX_VIDEO_FILE_BYTES,
               max_decoded_pixels: int = MAX_VIDEO_DECODED_PIXELS) -> tuple[np.ndarray, VideoMetadata]:
    """A file path, bytes, or frames (PIL images / [H, W, 3] arrays / a [F, H, W, 3] array)
    -> (frames uint8 [F, H, W, 3], metadata).

    Frames are kept by ``num_frames`` or ``fps`` with ``sampling``'s rule (neither: all frames,
    HF's default). ``video_fps`` gives the rate of frames passed directly (for ``fps`` sampling).
    Refused: URLs, files over max_file_bytes, more than max_frames kept, a frame over
    MAX_DECODED_PIXELS pixels, more than max_decoded_pixels kept in all.
    """
    if isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        return _decode(source, num_frames, fps, sampling, max_frames, max_file_bytes, max_decoded_pixels)
    frames = _frames_array(source)  # [T, H, W, 3]
    indices = sampling.indices(len(frames), video_fps, num_frames, fps)
    _check_budget(len(indices), frames.shape[1], frames.shape[2], max_frames, max_decoded_pixels)
    duration = len(frames) / video_fps if video_fps else None
    return frames[indices], VideoMetadata(len(frames), video_fps, duration, tuple(int(i) for i in indices))


def _frames_array(source: Any) -> np.ndarray:
    """Frames given directly -> uint8 [T, H, W, 3]."""
    if isinstance(source, np.ndarray) and source.ndim == 4:
        frames = list(source)
    elif isinstance(source, (list, tuple)):
        frames = [np.asarray(to_rgb(f)) if isinstance(f, Image.Image) else f for f in source]
    else:
        raise VideoError(f"cannot load a video from a {type(source).__name__}; allowed: a path (str or "
                         "pathlib.Path), bytes, a list of frames (PIL images or uint8 [H, W, 3] arrays), "
                         "or a uint8 array [frames, height, width, 3]")
    if not frames:
        raise VideoError("a video needs at least one frame, got 0")
    for i, f in enumerate(frames):
        if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3 or 0 in f.shape:
            what = f"{f.dtype} {list(f.shape)}" if isinstance(f, np.ndarray) else type(f).__name__
            raise VideoError(f"frames[{i}] is {what}; a frame is a PIL image or a uint8 [height, width, 3] RGB array")
        if f.shape != frames[0].shape:
            raise VideoError(f"frames[{i}] is {list(f.shape)} but frames[0] is {list(frames[0].shape)}; "
                             "all frames of a video must have one size")
    return np.stack(frames)


def _check_budget(kept: int, height: int, width: int, max_frames: int, max_decoded_pixels: int) -> None:
    if height * width > MAX_DECODED_PIXELS:
        raise VideoError(f"the video's frames are {width}x{height} pixels, over the budget of "
                         f"{MAX_DECODED_PIXELS:,} pixels per frame; downscale it first")
    if kept > max_frames:
        raise VideoError(f"{kept} frames would be kept, over the limit max_frames={max_frames}; "
                         "sample fewer with num_frames= or fps=")
    if kept * height * width > max_decoded_pixels:
        raise VideoError(f"{kept} frames of {width}x{height} are {kept * height * width:,} pixels, over the limit "
                         f"max_decoded_pixels={max_decoded_pixels:,}; sample fewer frames (num_frames= or fps=)")


# ---------------------------------------------------------------------------------------------
# Decoding with PyAV


def _decode(source, num_frames, fps, sampling, max_frames, max_file_bytes, max_decoded_pixels):
    av = _import_av()
    name, data = _read_source(source, max_file_bytes)
    try:
        with av.open(io.BytesIO(data), mode="r") as container:  # a file object: no ffmpeg protocols
            if not container.streams.video:
                raise VideoError(f"{name} has no video stream")
            stream = container.streams.video[0]
            total, rate = _frame_count(container, stream), _frame_rate(stream)
            if total == 0:
                raise VideoError(f"{name} has no frames")
            indices = sampling.indices(total, rate, num_frames, fps)
            _check_budget(len(indices), stream.height, stream.width, max_frames, max_decoded_pixels)
            frames, kept = _decode_frames(container, stream, indices)
    except av.FFmpegError as e:
        raise VideoError(f"{name} is not a readable video: {e}") from e
    if not kept:
        raise VideoError(f"{name} has no decodable frames")
    duration = total / rate if rate else None
    return frames[:len(kept)], VideoMetadata(total, rate, duration, tuple(kept))


def _import_av():
    try:
        import av
    except ImportError as e:
        raise VideoError("decoding a video file needs PyAV: pip install vlmdeploy[video] "
                         "(or pass the frames as a list of images)") from e
    return av


def _read_source(source: Any, max_file_bytes: int) -> tuple[str, bytes]:
    """(name for messages, the file's bytes): regular files within the byte budget, no URLs."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if len(data) > max_file_bytes:
            raise VideoError(f"<{len(data)} bytes> is over the limit max_file_bytes={max_file_bytes:,}")
        return f"<{len(data)} bytes>", data
    path = os.fspath(source)
    if isinstance(path, str) and "://" in path:
        raise VideoError(f"{path[:80]} is a URL; vlmdeploy does not fetch videos from the network. Download it "
                         "and give the file's path or bytes")
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise VideoError(f"{path} does not exist") from e
    if not stat.S_ISREG(st.st_mode):
        raise VideoError(f"{path} is not a regular file (a directory, pipe or device); give a video file")
    if st.st_size > max_file_bytes:
        raise VideoError(f"{path} is {st.st_size:,} bytes, over the limit max_file_bytes={max_file_bytes:,}")
    with open(path, "rb") as f:
        return path, f.read(max_file_bytes + 1)


def _frame_count(container, stream) -> int:
    """The stream's frame count; containers that do not store it (Matroska, WebM) are demuxed and their
    packets counted (no decoding)."""
    if stream.frames:
        return int(stream.frames)
    count = sum(1 for packet in container.demux(stream) if packet.size)
    container.seek(0)
    return count


def _frame_rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate  # HF reads average_rate
    return float(rate) if rate else None


def _decode_frames(container, stream, indices: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """uint8 [F, H, W, 3] for the frames at ``indices`` (decoding stops after the last), and the indices
    found (fewer when the stream has fewer frames than its header says; the array's tail is then unused)."""
    wanted, last = set(int(i) for i in indices), int(indices[-1])
    frames = np.empty((len(indices), stream.height, stream.width, 3), np.uint8)  # budgeted by _check_budget
    kept = []
    stream.thread_type = "AUTO"
    for i, frame in enumerate(container.decode(stream)):
        if (frame.height, frame.width) != (stream.height, stream.width):  # what the budget was checked on
            raise VideoError(f"frame {i} is {frame.width}x{frame.height} but the stream says "
                             f"{stream.width}x{stream.height}; videos that change size are not supported")
        if i in wanted:
            frames[len(kept)] = frame.to_ndarray(format="rgb24")
            kept.append(i)
        if i >= last:
            break
    return frames, kept
