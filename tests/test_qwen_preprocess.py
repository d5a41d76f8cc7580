"""runtime/qwen_images.py and runtime/video.py against transformers 5.24's Qwen2-VL processors.

Images: bit for bit against ``Qwen2VLImageProcessorPil``. Videos: HF's ``Qwen2VLVideoProcessor``
cannot be built without torchvision, but its module imports with a stand-in torchvision, so its
own ``patchify`` and ``sample_frames`` (and video_utils' ``default_sample_indices_fn``) are the
references; the per-frame resize/normalize reference is the PIL image processor's.
"""

import enum
import importlib
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.images import ImageError
from vlmdeploy.runtime.resize_aa import resize_uint8_aa
from vlmdeploy.runtime.qwen_images import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    QwenVLPreprocessor,
    pad_frames,
    patchify,
    smart_resize,
    tokens_for,
)
from vlmdeploy.runtime.video import (
    FrameSampling,
    VideoError,
    load_video,
    sample_frame_indices,
    uniform_frame_indices,
)

skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.video_utils import VideoMetadata as HFVideoMetadata  # noqa: E402
from transformers.video_utils import default_sample_indices_fn  # noqa: E402

TOKENS = 28 * 28  # pixels per merged token


def _photos():
    chelsea, coffee = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())
    astronaut = Image.fromarray(skdata.astronaut())
    return {
        "chelsea": chelsea,  # 451x300
        "astronaut": astronaut,  # 512x512
        "coffee": coffee,  # 600x400
        "portrait": coffee.transpose(Image.Transpose.TRANSPOSE),  # 400x600
        "odd": astronaut.resize((333, 211)),
        "tiny": chelsea.resize((20, 13)),  # upscaled to min_pixels
        "wide": astronaut.resize((1000, 6)),  # aspect 167 (under HF's 200)
        "large": coffee.resize((1400, 1100)),  # downscaled to max_pixels
    }


PHOTOS = _photos()


def _assert_same_as_hf(ours, hf_out):
    patches, grid = ours
    assert grid == tuple(hf_out["image_grid_thw"][0])
    assert patches.dtype == np.float32 and patches.shape == hf_out["pixel_values"].shape
    assert np.abs(patches - hf_out["pixel_values"]).max() == 0


# ---------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("pixels", ["default", "small", "published"])
def test_image_equals_hf(name, pixels):
    config = {"default": {}, "small": {"min_pixels": 16 * TOKENS, "max_pixels": 64 * TOKENS},
              "published": {"min_pixels": 3136, "max_pixels": 12845056}}[pixels]
    hf = Qwen2VLImageProcessorPil(**config)
    pre = QwenVLPreprocessor.from_dict(hf.to_dict())
    _assert_same_as_hf(pre.image(PHOTOS[name]), hf(PHOTOS[name]))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_image_modes_equal_hf(mode):
    image = PHOTOS["odd"].convert(mode)
    if mode == "RGBA":  # real transparency: HF composites onto white
        alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
        image.putalpha(Image.fromarray(alpha))
    hf = Qwen2VLImageProcessorPil()
    _assert_same_as_hf(QwenVLPreprocessor.from_dict(hf.to_dict()).image(image), hf(image))


@pytest.mark.parametrize("lo, hi", [(4 * TOKENS, 16 * TOKENS), (256 * TOKENS, 512 * TOKENS), (3136, 3136)])
def test_per_call_pixels_equal_hf_call_size(lo, hi):
    hf = Qwen2VLImageProcessorPil()
    pre = QwenVLPreprocessor.from_dict(hf.to_dict())
    for name in ("chelsea", "portrait", "tiny"):
        want = hf(PHOTOS[name], size={"shortest_edge": lo, "longest_edge": hi})
        _assert_same_as_hf(pre.image(PHOTOS[name], min_pixels=lo, max_pixels=hi), want)


@pytest.mark.parametrize("config", [
    {"min_pixels": 3136, "max_pixels": 50000, "size": {"shortest_edge": 1, "longest_edge": 2}},  # top level wins
    {"min_pixels": 5000, "max_pixels": 90000, "size": {"min_pixels": 1, "max_pixels": 2}},  # 4.4x legacy size
    {"size": {"shortest_edge": 8000, "longest_edge": 40000}, "resample": 2, "image_mean": 0.5, "image_std": 0.25},
    {"max_pixels": 60000, "do_normalize": False, "rescale_factor": 0.5},
    {"max_pixels": 60000, "do_rescale": None},  # null flag: off, as HF
    {"min_pixels": 200 * TOKENS, "max_pixels": 100 * TOKENS},  # min over max: allowed, max applies first
    {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
     "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "max_pixels": 80000},
])
def test_configs_read_as_hf(config):
    hf = Qwen2VLImageProcessorPil(**config)
    pre = QwenVLPreprocessor.from_dict(config)
    assert QwenVLPreprocessor.from_dict(pre.to_dict()) == pre
    for name in ("chelsea", "tiny"):
        _assert_same_as_hf(pre.image(PHOTOS[name]), hf(PHOTOS[name]))


def test_no_resize_equals_hf_and_is_still_limited():
    hf = Qwen2VLImageProcessorPil(do_resize=False)
    pre = QwenVLPreprocessor.from_dict(hf.to_dict())
    image = PHOTOS["coffee"].resize((84, 56))
    _assert_same_as_hf(pre.image(image), hf(image))
    with pytest.raises(ValueError, match="not a multiple of patch_size\\*merge_size = 28"):
        pre.image(PHOTOS["coffee"])
    with pytest.raises(ValueError, match="over the limit of 3,136"):
        QwenVLPreprocessor(do_resize=False, max_pixels=3136, max_pixels_limit=3136).image(image)


def test_to_dict_builds_the_same_hf_processor():
    pre = QwenVLPreprocessor(min_pixels=5000, max_pixels=70000, resample=2)
    hf = Qwen2VLImageProcessorPil(**pre.to_dict())
    _assert_same_as_hf(pre.image(PHOTOS["coffee"]), hf(PHOTOS["coffee"]))


def test_qwen2_5_vl_uses_the_qwen2_vl_classes():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    assert IMAGE_PROCESSOR_MAPPING_NAMES["qwen2_5_vl"] == IMAGE_PROCESSOR_MAPPING_NAMES["qwen2_vl"]
    assert VIDEO_PROCESSOR_MAPPING_NAMES["qwen2_5_vl"] == VIDEO_PROCESSOR_MAPPING_NAMES["qwen2_vl"]


def test_smart_resize_equals_hf_on_a_sweep():
    rng = np.random.default_rng(0)
    sides = np.unique(np.concatenate([np.arange(1, 80), rng.integers(1, 5000, 300)]))
    for lo, hi in [(IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (784, 784 * 16)]:
        for h in sides:
            for w in rng.choice(sides, 12):
                h, w = int(h), int(w)
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_grid_thw_and_tokens_without_pixels():
    pre = QwenVLPreprocessor()
    assert pre.grid_thw(720, 1280) == (1, 52, 92)  # smart_resize(720, 1280) = (728, 1288); 14-pixel patches
    assert pre.grid_thw(720, 1280, frames=32) == (16, 52, 92)
    assert pre.grid_thw(720, 1280, frames=33) == (17, 52, 92)  # the last frame repeated
    assert tokens_for((1, 52, 92), 2) == 1196 and tokens_for((16, 52, 92), 2) == 16 * 1196
    patches, grid = pre.image(PHOTOS["chelsea"])
    assert grid == pre.grid_thw(300, 451) and len(patches) == np.prod(grid)


# ---------------------------------------------------------------------------------------------
# Videos: transformers' own Qwen2VLVideoProcessor, run with torch standing in for torchvision


class InterpolationMode(enum.Enum):  # torchvision.transforms.InterpolationMode
    NEAREST, NEAREST_EXACT, BILINEAR, BICUBIC = "nearest", "nearest-exact", "bilinear", "bicubic"
    BOX, HAMMING, LANCZOS = "box", "hamming", "lanczos"


def _torchvision_resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
    """torchvision.transforms.v2.functional.resize_image for uint8 on a CPU, bilinear (AVX2) or bicubic:
    unchanged at the same size, else torch's interpolate on the uint8 tensor (`_do_native_uint8_resize_on_cpu`)."""
    shape = image.shape  # [..., C, H, W]
    if tuple(size) == tuple(shape[-2:]):
        return image
    assert image.dtype == torch.uint8 and interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    x = torch.nn.functional.interpolate(image.reshape(-1, *shape[-3:]), size=list(size), mode=interpolation.value,
                                        antialias=antialias, align_corners=False)
    return x.reshape(*shape[:-2], *size)


def _torchvision_normalize(image, mean, std, inplace=False):
    """torchvision.transforms.v2.functional.normalize_image."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def _torchvision_grayscale_to_rgb(image):
    return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])


@pytest.fixture(scope="module")
def hf_torchvision():
    """transformers' torchvision-backed Qwen2-VL processor modules, runnable: imported with a stand-in
    torchvision whose only functions they call here (resize, normalize, grayscale_to_rgb) are torchvision's,
    over torch."""
    from transformers import image_processing_backends, video_processing_utils

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.InterpolationMode, functional.resize = InterpolationMode, _torchvision_resize
    functional.normalize, functional.grayscale_to_rgb = _torchvision_normalize, _torchvision_grayscale_to_rgb
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2"]
    modules = {**{n: types.ModuleType(n) for n in names}, functional.__name__: functional}
    modules["torchvision.transforms.v2"].functional = functional
    pil_to_torch = {0: InterpolationMode.NEAREST_EXACT, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
                    3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
    loaded = [f"transformers.models.qwen2_vl.{m}_processing_qwen2_vl" for m in ("video", "image")]
    with pytest.MonkeyPatch.context() as mp:
        for n, module in modules.items():
            mp.setitem(sys.modules, n, module)
        mp.setattr(image_processing_backends, "tvF", functional, raising=False)
        mp.setattr(video_processing_utils, "tvF", functional, raising=False)
        mp.setattr(image_processing_backends, "pil_torch_interpolation_mapping", pil_to_torch)
        yield types.SimpleNamespace(video=importlib.import_module(loaded[0]).Qwen2VLVideoProcessor,
                                    image=importlib.import_module(loaded[1]).Qwen2VLImageProcessor)
        for name in loaded:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def hf_video(hf_torchvision):
    return hf_torchvision.video


def _hf_video(hf_video, clip, config, **call):
    """HF's pixel_values_videos [N, C*T*P*P] and video_grid_thw (t, h, w) for one clip."""
    out = hf_video(**config)(videos=clip, return_tensors="np", **{"cap_pixels_per_frame": False, **call})
    return out["pixel_values_videos"], tuple(out["video_grid_thw"][0])


def _clip(count):
    return np.stack([np.asarray(PHOTOS["coffee"].rotate(10 * i)) for i in range(count)])  # [F, 400, 600, 3] uint8


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("hw, temporal, merge", [((28, 56), 2, 2), ((84, 28), 2, 2), ((42, 42), 3, 1),
                                                  ((56, 28), 1, 2)])
def test_pad_and_patchify_equal_hf(hf_video, frames, hw, temporal, merge):
    x = np.random.default_rng(frames).standard_normal((frames, 3, *hw)).astype(np.float32)  # [F, C, H, W]
    want, gt, gh, gw = hf_video.patchify(None, torch.from_numpy(x)[None], 14, merge, temporal)
    got = patchify(pad_frames(x, temporal), 14, merge, temporal)
    assert got.shape == want[0].shape and (gt, gh, gw) == (-(-frames // temporal), hw[0] // 14, hw[1] // 14)
    assert np.array_equal(got, want[0].numpy())


@pytest.mark.parametrize("count", [1, 2, 5])
@pytest.mark.parametrize("config", [
    {},
    {"max_pixels": 200 * TOKENS, "resample": 2},
    {"min_pixels": 600 * TOKENS},  # upscaled
    {"min_pixels": 3136, "max_pixels": 12845056, "image_processor_type": "Qwen2VLImageProcessor"},  # as published
    {"max_pixels": 100 * TOKENS, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
])
def test_video_equals_hf_video_processor(hf_video, count, config):
    clip = _clip(count)
    pre = QwenVLPreprocessor.from_dict(hf_video(**config).to_dict(), video=True)
    assert pre == QwenVLPreprocessor.from_dict(config, video=True)
    want, want_grid = _hf_video(hf_video, clip, config)
    patches, grid = pre.video(clip)
    assert grid == want_grid and patches.shape == want.shape and np.abs(patches - want).max() == 0
    assert np.array_equal(pre.video([Image.fromarray(f) for f in clip])[0], patches)  # PIL frames: the same
    assert grid == pre.grid_thw(400, 600, frames=count)


@pytest.mark.parametrize("name", ["chelsea", "portrait", "tiny", "large"])
@pytest.mark.parametrize("config", [{}, {"max_pixels": 100 * TOKENS, "resample": 2}])
def test_torchvision_backend_equals_hf_torchvision_image_processor(hf_torchvision, name, config):
    hf = hf_torchvision.image(**config)
    pre = QwenVLPreprocessor.from_dict({**hf.to_dict(), "image_backend": "torchvision"})
    _assert_same_as_hf(pre.image(PHOTOS[name]), hf(PHOTOS[name], return_tensors="np"))
    pil_patches, _ = QwenVLPreprocessor.from_dict(config).image(PHOTOS[name])
    assert np.abs(pre.image(PHOTOS[name])[0] - pil_patches).max() > 0  # the two backends differ


def test_video_cap_pixels_per_frame_equals_hf(hf_video):
    clip, config = _clip(6), {"max_video_tokens": 300}
    want, want_grid = _hf_video(hf_video, clip, config, cap_pixels_per_frame=True)
    pre = QwenVLPreprocessor.from_dict({**config, "cap_pixels_per_frame": True}, video=True)
    patches, grid = pre.video(clip)
    assert grid == want_grid and np.abs(patches - want).max() == 0
    assert grid != _hf_video(hf_video, clip, config)[1]  # the cap changed the size


@pytest.mark.parametrize("call", [{"fps": 2}, {"num_frames": 4}, {"fps": 0.5}])
def test_sampled_video_equals_hf(hf_video, call):
    """HF samples frames of an array video when do_sample_frames is on (metadata gives its fps)."""
    clip = _clip(9)
    want, want_grid = _hf_video(hf_video, clip, {}, do_sample_frames=True,
                                video_metadata={"total_num_frames": 9, "fps": 3.0}, **call)
    frames, meta = load_video(clip, video_fps=3.0, **call)
    patches, grid = QwenVLPreprocessor.from_dict({}, video=True).video(frames)
    assert grid == want_grid and np.abs(patches - want).max() == 0


@pytest.mark.parametrize("resample", [2, 3])
def test_resize_uint8_aa_equals_torch(resample):
    photo = skdata.astronaut()[:301, :457]  # [301, 457, 3]
    for size in [(301, 200), (150, 457), (308, 448), (28, 56), (602, 700), (900, 140), (3, 5)]:
        mode = InterpolationMode.BICUBIC if resample == 3 else InterpolationMode.BILINEAR
        want = _torchvision_resize(torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous(), size, mode)
        got = resize_uint8_aa(photo, size, resample)
        assert np.array_equal(got, want[0].permute(1, 2, 0).numpy()), size
    pil = np.asarray(Image.fromarray(photo).resize((448, 308), resample))
    assert 0 < np.abs(pil.astype(int) - resize_uint8_aa(photo, (308, 448), resample)).max() <= 2  # not Pillow's


@pytest.mark.parametrize("count, repeats", [(2, 1), (3, 2), (4, 2), (7, 4)])
def test_video_of_one_picture_is_the_image_repeated(count, repeats):
    """HF treats an image as temporal_patch_size equal frames: the verified image path anchors video().
    At a size smart_resize keeps (no resampling), only the float32 rounding of the normalization differs
    (the video processor fuses rescale into mean/std)."""
    picture = PHOTOS["chelsea"].resize((448, 308))  # smart_resize(308, 448) == (308, 448)
    pre = QwenVLPreprocessor(min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    image_patches, (t, h, w) = pre.image(picture)
    patches, grid = pre.video([picture] * count)
    assert grid == (repeats, h, w) and t == 1
    assert np.abs(patches - np.tile(image_patches, (repeats, 1))).max() < 2e-6
    assert np.array_equal(patches[: len(image_patches)], patches[-len(image_patches):])


def test_video_defaults_differ_from_images_and_fall_back_like_hf():
    """Absent keys take the video class's size; a checkpoint with only preprocessor_config.json gives its
    min/max_pixels to videos too (HF loads the video processor from that file)."""
    video = QwenVLPreprocessor.from_dict({}, video=True)
    assert (video.min_pixels, video.max_pixels) == (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS)
    published = {"min_pixels": 3136, "max_pixels": 12845056, "image_processor_type": "Qwen2VLImageProcessor"}
    video = QwenVLPreprocessor.from_dict(published, video=True)
    assert (video.min_pixels, video.max_pixels) == (3136, 12845056)


# ---------------------------------------------------------------------------------------------
# Frame sampling


def _hf_sample(hf_video, total, video_fps, **kw):
    metadata = HFVideoMetadata(total_num_frames=total, fps=video_fps)
    return hf_video().sample_frames(metadata, **kw).numpy()


@pytest.mark.parametrize("total, video_fps, kw, want", [
    (100, 30.0, {"fps": 2}, [0, 16, 33, 50, 66, 83]),  # 6.67 frames -> 6
    (10, 24.0, {"num_frames": 5}, [0, 2, 5, 7]),  # round(2.5) = 2 -> 4 frames
    (10, 24.0, {"num_frames": 7}, [0, 1, 2, 3, 5, 6, 7, 8]),  # round(3.5) = 4 -> 8 frames
    (10, 10.0, {"fps": 1}, [0, 2, 5, 7]),  # 1 frame, raised to min_frames 4
    (9, 3.0, {}, list(range(9))),  # neither: all frames (HF's default)
    (1000, 10.0, {"fps": 5, "max_frames": 64}, [int(np.float32(i * 15.625)) for i in range(64)]),
    (7, 30.0, {"fps": 30}, [0, 1, 2, 3, 4, 5]),  # 7 frames, floored to 6: 0, 1.17, 2.33, 3.5, 4.67, 5.83
    (30, 24.0, {"num_frames": 10}, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]),
])
def test_sample_frame_indices_by_hand(hf_video, total, video_fps, kw, want):
    assert sample_frame_indices(total, video_fps, **kw).tolist() == want
    if kw:  # neither: HF does not sample (do_sample_frames off); its sample_frames would compare None > int
        assert _hf_sample(hf_video, total, video_fps, **kw).tolist() == want


def test_sample_frame_indices_equal_hf_on_a_sweep(hf_video):
    for total in range(2, 90):
        for video_fps in (1.0, 7.5, 24.0, 29.97):
            for kw in [{"num_frames": n} for n in range(2, total + 1, 3)] + [{"fps": f} for f in (0.5, 1, 2, 4)]:
                try:
                    want = _hf_sample(hf_video, total, video_fps, **kw)
                except ValueError as e:  # num_frames rounded up past the video
                    with pytest.raises(ValueError, match="is more than the video's"):
                        sample_frame_indices(total, video_fps, **kw)
                    assert "exceeds" in str(e)
                    continue
                got = sample_frame_indices(total, video_fps, **kw)
                if len(want) and want[-1] == total:  # HF's float32 overshoot: one index past the end
                    want = want[:-1]
                assert got.tolist() == want.tolist(), (total, video_fps, kw)


def test_hf_overshoots_and_ours_does_not(hf_video):
    want = _hf_sample(hf_video, 17, 24.0, num_frames=14)
    assert len(want) == 15 and want[-1] == 17  # HF: 15 indices for 14 frames, the last past the end
    got = sample_frame_indices(17, 24.0, num_frames=14)
    assert len(got) == 14 and got.tolist() == want[:-1].tolist()


def test_uniform_frame_indices_equal_hf():
    for total in range(1, 70):
        for kw in [{}] + [{"num_frames": n} for n in range(1, total + 1)] + [{"fps": f} for f in (0.3, 1, 2.5)]:
            meta = HFVideoMetadata(total_num_frames=total, fps=24.0)
            want = default_sample_indices_fn(meta, **kw)
            assert uniform_frame_indices(total, 24.0, **kw).tolist() == want.tolist(), (total, kw)


@pytest.mark.parametrize("call, match", [
    (lambda: sample_frame_indices(10, 24.0, num_frames=4, fps=2), "exclusive"),
    (lambda: sample_frame_indices(10, None, fps=2), "frame rate"),
    (lambda: sample_frame_indices(10, 24.0, num_frames=12), "more than the video's 10 frames"),
    (lambda: sample_frame_indices(10, 24.0, num_frames=1), "rounds to 0"),
    (lambda: sample_frame_indices(0, 24.0), "total_frames must be a positive integer"),
    (lambda: sample_frame_indices(10, 24.0, fps=-1), "fps must be a positive number"),
    (lambda: uniform_frame_indices(5, 24.0, num_frames=6), "more than the video's 5 frames"),
    (lambda: FrameSampling(rule="linspace"), "qwen2_vl"),
])
def test_sampling_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_frame_sampling_from_hf_config(hf_video):
    config = {"min_frames": 2, "max_frames": 10, "video_processor_type": "Qwen2VLVideoProcessor"}
    sampling = FrameSampling.from_dict(config)
    assert (sampling.min_frames, sampling.max_frames, sampling.temporal_patch_size) == (2, 10, 2)
    for total, video_fps, fps in [(100, 30.0, 0.1), (100, 30.0, 5), (40, 24.0, 2)]:
        metadata = HFVideoMetadata(total_num_frames=total, fps=video_fps)
        want = hf_video(**config).sample_frames(metadata, fps=fps).numpy()
        assert sampling.indices(total, video_fps, fps=fps).tolist() == want.tolist()
    assert FrameSampling.from_dict({}) == FrameSampling()
    with pytest.raises(ValueError, match="InternVLVideoProcessor.*no frame sampling rule"):
        FrameSampling.from_dict({"video_processor_type": "InternVLVideoProcessor"})
    assert FrameSampling.from_dict({"video_processor_type": "LlavaOnevisionVideoProcessor"}).rule == "uniform"


def test_a_clip_shorter_than_a_temporal_patch_keeps_its_frame():
    assert sample_frame_indices(1, 24.0, fps=2).tolist() == [0]  # HF: ZeroDivisionError


# ---------------------------------------------------------------------------------------------
# Decoding with PyAV

COLOURS = [(20 * i, 255 - 20 * i, (67 * i) % 256) for i in range(12)]


def _write_video(path, codec, pix_fmt, rate=24):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for colour in COLOURS:
            frame = np.empty((48, 64, 3), np.uint8)
            frame[:] = colour
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module", params=[("clip.mov", "png", "rgb24"), ("clip.mkv", "ffv1", "bgr0")])
def lossless_clip(request, tmp_path_factory):
    """12 frames of 64x48, one colour each, 24 fps. Matroska does not store the frame count (it is counted)."""
    name, codec, pix_fmt = request.param
    return _write_video(tmp_path_factory.mktemp("video") / name, codec, pix_fmt)


@pytest.mark.parametrize("kw, indices", [
    ({}, list(range(12))),
    ({"num_frames": 4}, [0, 3, 6, 9]),
    ({"fps": 12}, [0, 2, 4, 6, 8, 10]),  # 12 / 24 * 12 = 6 frames
    ({"fps": 1}, [0, 3, 6, 9]),  # 0.5 frames, raised to min_frames 4
])
def test_load_video_samples_the_right_frames(lossless_clip, kw, indices):
    frames, meta = load_video(lossless_clip, **kw)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), 48, 64, 3)
    assert [tuple(f[24, 32]) for f in frames] == [COLOURS[i] for i in indices]
    assert (frames == frames[:, :1, :1]).all()  # each frame one colour
    assert meta.total_frames == 12 and meta.fps == 24.0 and meta.duration == 0.5
    assert meta.frame_indices == tuple(indices)
    assert meta.sampled_fps == len(indices) / 12 * 24


def test_load_video_from_bytes_and_uniform_rule(lossless_clip):
    frames, meta = load_video(lossless_clip.read_bytes(), num_frames=5, sampling=FrameSampling(rule="uniform"))
    assert meta.frame_indices == (0, 2, 4, 7, 9)
    assert [tuple(f[0, 0]) for f in frames] == [COLOURS[i] for i in (0, 2, 4, 7, 9)]


def test_load_video_lossy_codec_keeps_order(tmp_path):
    path = _write_video(tmp_path / "clip.mp4", "libx264", "yuv444p")
    frames, meta = load_video(path, num_frames=6)
    assert meta.frame_indices == (0, 2, 4, 6, 8, 10)
    got = np.array([f[24, 32] for f in frames], np.int64)
    want = np.array([COLOURS[i] for i in meta.frame_indices], np.int64)
    assert np.abs(got - want).max() <= 8


def test_load_video_from_frames():
    pictures = [Image.new("RGB", (32, 16), c) for c in COLOURS[:6]]
    frames, meta = load_video(pictures, num_frames=2)
    assert frames.shape == (2, 16, 32, 3) and meta.frame_indices == (0, 3) and meta.fps is None
    assert meta.sampled_fps == 24.0  # HF's value without a frame rate
    frames, meta = load_video(np.stack([np.asarray(p) for p in pictures]), fps=2, video_fps=4.0)
    assert meta.frame_indices == (0, 1, 3, 4) and meta.duration == 1.5  # 3 frames -> min_frames 4
    rgba = [p.convert("RGBA") for p in pictures]
    assert np.array_equal(load_video(rgba)[0], load_video(pictures)[0])


def test_video_budgets_name_their_knob(lossless_clip, tmp_path):
    with pytest.raises(VideoError, match="max_frames=8; sample fewer with num_frames= or fps="):
        load_video(lossless_clip, max_frames=8)
    with pytest.raises(VideoError, match="max_decoded_pixels=10,000"):
        load_video(lossless_clip, num_frames=4, max_decoded_pixels=10_000)
    with pytest.raises(VideoError, match="max_file_bytes=100"):
        load_video(lossless_clip, max_file_bytes=100)
    with pytest.raises(VideoError, match="max_file_bytes=100"):
        load_video(lossless_clip.read_bytes(), max_file_bytes=100)
    with pytest.raises(VideoError, match="max_frames=3"):
        load_video([np.zeros((4, 4, 3), np.uint8)] * 5, max_frames=3)


@pytest.mark.parametrize("source, match", [
    ("https://example.com/clip.mp4", "is a URL"),
    ("/nonexistent/clip.mp4", "does not exist"),
    ("/tmp", "not a regular file"),
    (b"not a video at all" * 10, "not a readable video"),
    (42, "allowed: a path"),
    ([], "at least one frame"),
    ([np.zeros((4, 4), np.uint8)], r"frames\[0\] is uint8 \[4, 4\]"),
    ([np.zeros((4, 4, 3), np.float32)], "a uint8"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)], "must have one size"),
])
def test_bad_video_sources(source, match):
    pytest.importorskip("av")
    with pytest.raises(VideoError, match=match):
        load_video(source)


def test_missing_pyav_says_how_to_install(monkeypatch, lossless_clip):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoError, match=r"pip install vlmdeploy\[video\]"):
        load_video(lossless_clip)


# ---------------------------------------------------------------------------------------------
# Bad images, requests and configs


def test_request_over_the_limit_is_refused():
    pre = QwenVLPreprocessor(max_pixels=64 * TOKENS, max_pixels_limit=256 * TOKENS)
    assert pre.image(PHOTOS["coffee"], max_pixels=256 * TOKENS)[1] == (1, 26, 38)  # within the limit
    with pytest.raises(ValueError, match=r"requested max_pixels 200,705 is over the limit .*max_pixels_limit"):
        pre.image(PHOTOS["coffee"], max_pixels=256 * TOKENS + 1)
    with pytest.raises(ValueError, match=r"requested min_pixels 235,200 is over the limit of 200,704 .*smaller min_"):
        pre.image(PHOTOS["tiny"], min_pixels=300 * TOKENS)
    capped = QwenVLPreprocessor(max_pixels=100_000, max_pixels_limit=100_000)
    with pytest.raises(ValueError, match=r"20x13 image resizes to 420x280 = 117,600 pixels, over the limit of 100,000"):
        capped.image(PHOTOS["tiny"], min_pixels=100_000)  # ceil overshoots
    with pytest.raises(ValueError, match="requested max_pixels 1,003,521 is over the limit of 1,003,520"):
        QwenVLPreprocessor().image(PHOTOS["tiny"], max_pixels=IMAGE_MAX_PIXELS + 1)  # no limit set: the config's
    with pytest.raises(ValueError, match="requested max_pixels must be a positive integer"):
        pre.image(PHOTOS["coffee"], max_pixels=0)
    with pytest.raises(ValueError, match="over max_pixels_limit"):
        QwenVLPreprocessor(max_pixels=10**6, max_pixels_limit=10**5)


def test_resize_overshooting_the_limit_is_refused():
    """smart_resize can exceed max_pixels (ceil on the min_pixels side): the limit holds on the result."""
    pre = QwenVLPreprocessor(min_pixels=TOKENS, max_pixels=4 * TOKENS, max_pixels_limit=4 * TOKENS)
    assert smart_resize(1000, 5, 28, TOKENS, 4 * TOKENS) == (420, 28)  # 15 tokens for a max of 4
    with pytest.raises(ValueError, match=r"resizes to 28x420 = 11,760 pixels, over the limit of 3,136"):
        pre.grid_thw(1000, 5)


@pytest.mark.parametrize("image, match", [
    (Image.new("RGB", (0, 5)), "empty"),
    (Image.new("RGB", (1005, 5)), "aspect ratio of 201.0; Qwen2-VL preprocessing allows at most 200"),
    (np.zeros((5, 5, 3), np.uint8), "expected a PIL.Image.Image"),
])
def test_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        QwenVLPreprocessor().image(image)


def test_bad_video_frames():
    pre = QwenVLPreprocessor()
    with pytest.raises(ImageError, match="at least one frame"):
        pre.video([])
    with pytest.raises(ImageError, match=r"uint8 \[frames, height, width, 3\]"):
        pre.video(np.zeros((2, 28, 28, 3), np.float32))
    with pytest.raises(ImageError, match="one size"):
        pre.video([Image.new("RGB", (28, 28)), Image.new("RGB", (56, 28))])


@pytest.mark.parametrize("config, match", [
    ({"image_processor_type": "CLIPImageProcessor"}, "not a Qwen2-VL processor"),
    ({"image_processor": {}}, "whole processor config"),
    ({"size": {"shortest_edge": 3136}}, "exactly \"shortest_edge\""),
    ({"size": 448}, "size must be"),
    ({"max_pixels": "big"}, "max_pixels must be a positive integer"),
    ({"min_pixels": 0}, "min_pixels must be a positive integer"),
    ({"patch_size": 0}, "patch_size must be a positive integer"),
    ({"do_resize": "yes"}, "do_resize must be true or false"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std must not contain 0"),
    ({"image_mean": [0.5, 0.5]}, "3 values"),
    ({"resample": 9}, "resample must be a PIL code"),
    ({"image_backend": "cv2"}, 'image_backend must be "pil" or "torchvision"'),
])
def test_bad_configs(config, match):
    with pytest.raises(ValueError, match=match):
        QwenVLPreprocessor.from_dict(config)


def test_modules_import_neither_torch_transformers_nor_av():
    code = ("import sys, vlmdeploy.runtime.qwen_images, vlmdeploy.runtime.video; "
            "bad = [m for m in ('torch', 'transformers', 'av') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
