"""runtime/onevision.py against transformers 5.24's LLaVA-OneVision processors and model methods.

Images: bit for bit against ``LlavaOnevisionImageProcessorPil`` and (image_backend "torchvision") against
``LlavaOnevisionImageProcessor`` imported with torch standing in for torchvision's few leaf functions.
Token counts: the processor's own ``replace_image_token`` / ``replace_video_token`` run on a bare
processor object. Packing and pooling: the model's own ``pack_image_features`` / ``apply_pooling`` run on
a stand-in ``self`` that holds only the config they read.
"""

import enum
import importlib
import math
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.images import ImageError
from vlmdeploy.runtime.onevision import (
    ONEVISION_PINPOINTS,
    OnevisionImageParams,
    OnevisionVideoParams,
    image_tokens,
    max_patches,
    pack_image,
    pool_video,
    preprocess_image,
    preprocess_video,
    video_tokens,
)

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor  # noqa: E402
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel  # noqa: E402


from conftest import preprocess_photos  # noqa: E402

PHOTOS = preprocess_photos()
# A tiny OneVision geometry: 28-pixel tiles of 14-pixel patches (2x2 tokens), up to 3x3 tiles.
TINY = {"size": {"height": 28, "width": 28},
        "image_grid_pinpoints": [[28 * i, 28 * j] for i in (1, 2, 3) for j in (1, 2, 3)]}


def _vision(image_size, patch_size=14):
    return {"vision_config": {"image_size": image_size, "patch_size": patch_size}}


def _assert_same(ours, hf_out, index=0):
    want = hf_out["pixel_values"][index]
    want = want[: len(ours.pixels)]  # HF pads the tile axis of a batch with zeros
    assert ours.pixels.dtype == np.float32 and ours.pixels.shape == want.shape
    assert np.abs(ours.pixels - want).max() == 0
    assert tuple(hf_out["image_sizes"][index]) == ours.image_size


# ---------------------------------------------------------------------------------------------
# Images (PIL backend)


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("config", [{}, TINY, {**TINY, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
                                    {"size": {"shortest_edge": 56}, "image_grid_pinpoints": [[56, 112], [112, 56]]}])
def test_image_equals_hf(name, config):
    hf = LlavaOnevisionImageProcessorPil(**config)
    tile = hf.size.get("height") or hf.size["shortest_edge"]
    p = OnevisionImageParams.from_hf(hf.to_dict(), model_config=_vision(tile))
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours, hf(PHOTOS[name], return_tensors="np"))
    assert len(ours.pixels) == 1 + math.prod(ours.grid)


@pytest.mark.parametrize("config", [{}, TINY])
def test_multi_image_prompt_equals_hf(config):
    """A prompt with several images (HF: a nested list) gets one padded-to-square tile per image."""
    names = ["chelsea", "tall", "astronaut"]
    hf = LlavaOnevisionImageProcessorPil(**config)(images=[[PHOTOS[n] for n in names]], return_tensors="np")
    p = OnevisionImageParams.from_hf(LlavaOnevisionImageProcessorPil(**config).to_dict(),
                                     model_config=_vision(28 if config else 384))
    for i, name in enumerate(names):
        ours = preprocess_image(PHOTOS[name], p, multi_image=True)
        assert ours.grid is None and ours.pixels.shape[0] == 1
        _assert_same(ours, hf, i)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_image_modes_equal_hf(mode):
    image = PHOTOS["chelsea"].resize((57, 41)).convert(mode)
    if mode == "RGBA":  # real transparency: HF composites onto white
        alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
        image.putalpha(Image.fromarray(alpha))
    hf = LlavaOnevisionImageProcessorPil(**TINY)
    p = OnevisionImageParams.from_hf(hf.to_dict(), model_config=_vision(28))
    _assert_same(preprocess_image(image, p), hf(image, return_tensors="np"))


def test_params_round_trip_and_defaults():
    p = OnevisionImageParams()
    assert p.grid_pinpoints == tuple(tuple(x) for x in LlavaOnevisionImageProcessorPil.image_grid_pinpoints)
    assert p.grid_pinpoints == ONEVISION_PINPOINTS and (p.tile, p.tokens_side, p.max_num_patches) == (384, 27, 9)
    assert OnevisionImageParams.from_dict(p.to_dict()) == p
    assert OnevisionImageParams.from_hf(LlavaOnevisionImageProcessorPil().to_dict()) == p


@pytest.mark.parametrize("make, match", [
    (lambda: OnevisionImageParams(vision_aspect_ratio="anyres"), "anyres_max_N"),
    (lambda: OnevisionImageParams(grid_pinpoints=[[384, 500]]), "not multiples of the tile side"),
    (lambda: OnevisionImageParams(image_backend="cv2"), "image_backend"),
    (lambda: OnevisionImageParams.from_hf({"size": {"height": 384, "width": 336}}), "square"),
    (lambda: OnevisionImageParams.from_hf({"do_center_crop": True, "crop_size": {"height": 384, "width": 384}}),
     "center crop"),
    (lambda: OnevisionImageParams.from_hf({"image_processor_type": "LlavaNextImageProcessor"}), "not LLaVA-OneVision"),
    (lambda: OnevisionImageParams.from_hf({}, model_config=_vision(336)), "vision tower"),
    (lambda: OnevisionImageParams.from_hf({}, {"num_image_tokens": 576}), "num_image_tokens=576"),
    (lambda: OnevisionImageParams.from_hf({}, {"num_image_tokens": 729, "vision_feature_select_strategy": "default"}),
     "num_image_tokens=729"),
    (lambda: OnevisionImageParams.from_dict({"tile_size": 3}), "unknown"),
    (lambda: OnevisionImageParams.from_hf({}, model_config={"vision_config": {"image_size": 384}}), "patch_size"),
    (lambda: OnevisionImageParams.from_hf({}, {"vision_aspect_ratio": "anyres_max_4"}), "differs from the model"),
    (lambda: OnevisionImageParams.from_hf({}, {"num_image_tokens": 729}, {"vision_aspect_ratio": "anyres_max_4"}),
     "absent: 'anyres_max_9'"),
    (lambda: OnevisionImageParams(image_backend="torchvision", resample=1), "bilinear \\(2\\) or bicubic"),
])
def test_param_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_image_errors():
    p = OnevisionImageParams(tile=28, grid_pinpoints=[[28, 56]], do_convert_rgb=False)
    with pytest.raises(ImageError, match="mode 'L'"):
        preprocess_image(PHOTOS["tiny"].convert("L"), p)
    with pytest.raises(ImageError, match="PIL.Image.Image"):
        preprocess_image(np.zeros((4, 4, 3), np.uint8), p)
    with pytest.raises(ImageError, match="do_resize is off"):
        preprocess_image(PHOTOS["tiny"], OnevisionImageParams(tile=28, grid_pinpoints=[[28, 56]], do_resize=False),
                         multi_image=True)


# ---------------------------------------------------------------------------------------------
# Images (torchvision backend): transformers' own class, torch standing in for torchvision


class InterpolationMode(enum.Enum):  # torchvision.transforms.InterpolationMode
    NEAREST, NEAREST_EXACT, BILINEAR, BICUBIC = "nearest", "nearest-exact", "bilinear", "bicubic"
    BOX, HAMMING, LANCZOS = "box", "hamming", "lanczos"


def _tv_resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
    """torchvision.transforms.v2.functional.resize_image for uint8 on a CPU, bilinear or bicubic: unchanged at
    the same size, else torch's interpolate on the uint8 tensor (`_do_native_uint8_resize_on_cpu`)."""
    shape = image.shape  # [..., C, H, W]
    if tuple(size) == tuple(shape[-2:]):
        return image
    assert image.dtype == torch.uint8 and interpolation in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    x = torch.nn.functional.interpolate(image.reshape(-1, *shape[-3:]), size=list(size), mode=interpolation.value,
                                        antialias=antialias, align_corners=False)
    return x.reshape(*shape[:-2], *size)


def _tv_pad(image, padding, fill=0, padding_mode="constant"):
    """torchvision.transforms.v2.functional.pad_image, constant mode: padding [left, top, right, bottom],
    fill a number or one per channel."""
    assert padding_mode == "constant" and len(padding) == 4
    left, top, right, bottom = padding
    *lead, c, h, w = image.shape
    out = torch.empty(*lead, c, top + h + bottom, left + w + right, dtype=image.dtype)
    fill = fill if isinstance(fill, (list, tuple)) else [fill] * c
    out[...] = torch.as_tensor(fill, dtype=image.dtype).view(-1, 1, 1)
    out[..., top:top + h, left:left + w] = image
    return out


def _tv_normalize(image, mean, std, inplace=False):
    """torchvision.transforms.v2.functional.normalize_image."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def _tv_grayscale_to_rgb(image):
    return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])


@pytest.fixture(scope="module")
def hf_torchvision():
    """transformers' torchvision-backed LLaVA-OneVision image and video processors, importable and runnable
    with a stand-in torchvision whose only functions they call here are torchvision's, over torch."""
    from transformers import image_processing_backends, video_processing_utils

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.InterpolationMode, functional.resize, functional.pad = InterpolationMode, _tv_resize, _tv_pad
    functional.normalize, functional.grayscale_to_rgb = _tv_normalize, _tv_grayscale_to_rgb
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2"]
    modules = {**{n: types.ModuleType(n) for n in names}, functional.__name__: functional}
    modules["torchvision.transforms.v2"].functional = functional
    pil_to_torch = {0: InterpolationMode.NEAREST_EXACT, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
                    3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
    loaded = [f"transformers.models.llava_onevision.{m}_processing_llava_onevision" for m in ("image", "video")]
    with pytest.MonkeyPatch.context() as mp:
        for n, module in modules.items():
            mp.setitem(sys.modules, n, module)
        mp.setattr(image_processing_backends, "tvF", functional, raising=False)
        mp.setattr(video_processing_utils, "tvF", functional, raising=False)
        mp.setattr(image_processing_backends, "pil_torch_interpolation_mapping", pil_to_torch)
        yield types.SimpleNamespace(image=importlib.import_module(loaded[0]).LlavaOnevisionImageProcessor,
                                    video=importlib.import_module(loaded[1]).LlavaOnevisionVideoProcessor)
        for name in loaded:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("name", ["chelsea", "tall", "tiny", "wide"])
@pytest.mark.parametrize("config", [TINY, {**TINY, "resample": 2}, {}])
def test_torchvision_backend_equals_hf_torchvision_processor(hf_torchvision, name, config):
    hf = hf_torchvision.image(**config)
    p = OnevisionImageParams.from_hf(hf.to_dict(), image_backend="torchvision",
                                     model_config=_vision(28 if config else 384))
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours, hf(PHOTOS[name], return_tensors="np"))
    pil = preprocess_image(PHOTOS[name], OnevisionImageParams.from_dict({**p.to_dict(), "image_backend": "pil"}))
    assert np.abs(ours.pixels - pil.pixels).max() > 0  # the two backends differ


def test_torchvision_backend_multi_image_equals_hf(hf_torchvision):
    names = ["chelsea", "tall"]
    hf = hf_torchvision.image(**TINY)
    want = hf(images=[[PHOTOS[n] for n in names]], return_tensors="np")
    p = OnevisionImageParams.from_hf(hf.to_dict(), image_backend="torchvision",
                                     model_config=_vision(28))
    for i, name in enumerate(names):
        _assert_same(preprocess_image(PHOTOS[name], p, multi_image=True), want, i)


# ---------------------------------------------------------------------------------------------
# Token counts: the processor's own replace_image_token on a bare processor object


def _hf_processor(pinpoints, num_image_tokens, strategy=None, aspect="anyres_max_9"):
    """A LlavaOnevisionProcessor without tokenizer or sub-processors: the attributes its token-count
    methods read."""
    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = types.SimpleNamespace(image_grid_pinpoints=[list(p) for p in pinpoints])
    proc.num_image_tokens, proc.vision_feature_select_strategy = num_image_tokens, strategy
    proc.vision_aspect_ratio = aspect
    proc.image_token, proc.video_token = "<image>", "<video>"
    return proc


def _hf_image_tokens(proc, size, tile, batch_num_images=(1,)):
    inputs = {"batch_num_images": list(batch_num_images), "image_sizes": [list(size)] * sum(batch_num_images),
              "pixel_values": [np.zeros((1, 1, tile, tile), np.float32)]}
    return len(proc.replace_image_token(inputs, image_idx=0)) // len("<image>")


def _sizes(rng, count, high):
    sides = np.concatenate([np.arange(1, 40), rng.integers(1, high, count)])
    return [(int(h), int(w)) for h, w in zip(sides, rng.permutation(sides))] + [(1, 2000), (10000, 3), (5000, 5000)]


@pytest.mark.parametrize("tile, patch, pinpoints, aspect", [
    (384, 14, ONEVISION_PINPOINTS, "anyres_max_9"),  # published: 27x27 tokens per tile
    (28, 14, TINY["image_grid_pinpoints"], "anyres_max_9"),
    (28, 14, TINY["image_grid_pinpoints"], "anyres_max_1"),  # downscaled from 2 tiles on
    (42, 14, [[42, 84], [84, 42], [126, 126]], "anyres_max_2"),  # odd side (3)
])
def test_image_tokens_equal_hf_processor(tile, patch, pinpoints, aspect):
    p = OnevisionImageParams(grid_pinpoints=pinpoints, tile=tile, patch_size=patch, vision_aspect_ratio=aspect)
    side = tile // patch
    full = _hf_processor(pinpoints, side**2, None, aspect)
    default = _hf_processor(pinpoints, side**2 + 1, "default", aspect)  # a CLS token dropped
    downscaled = 0
    for size in _sizes(np.random.default_rng(tile), 300, 4000):
        n = p.image_tokens(size)
        assert n == _hf_image_tokens(full, size, tile) == _hf_image_tokens(default, size, tile), size
        assert p.grid(size) == LlavaOnevisionModel.__init__.__globals__["get_anyres_image_grid_shape"](
            list(size), [list(x) for x in pinpoints], tile)
        downscaled += n < side**2 + _unpadded(p, size)
    most_tiles = max(h * w for h, w in pinpoints) // tile**2
    assert (downscaled > 0) == (most_tiles > 1.21 * p.max_num_patches)  # the sweep reaches the downscale rule
    for proc in (full, default):  # several images in one prompt: one tile + a newline each
        want = _hf_image_tokens(proc, (300, 451), tile, (2,))
        assert p.image_tokens((300, 451), multi_image=True) == side**2 + 1 == want


def _unpadded(p, size):
    """Tokens of the unpadded map plus newlines, before any downscale."""
    from vlmdeploy.runtime.anyres import unpad_bounds

    rows, cols = p.grid(size)
    (t, b), (l, r) = unpad_bounds(size, (rows * p.tokens_side, cols * p.tokens_side))
    return (b - t) * (r - l) + (b - t)


def test_image_token_examples():
    """By hand, published geometry (27x27 tokens per 384 tile, anyres_max_9)."""
    p = OnevisionImageParams()
    assert p.image_tokens((384, 384)) == 729 + 27 * 27 + 27  # 1x1 grid, nothing to unpad: 1485
    # 1x2 grid -> 27x54 map; aspect 451/300 < 2: width unpadded to int(round(451 * 27 / 300, 7)) = 40
    assert p.grid((300, 451)) == (1, 2) and p.image_tokens((300, 451)) == 729 + 27 * 40 + 27
    # 2x4 grid -> 54x108 map; width to 96; sqrt(54 * 96 / (9 * 729)) = 0.89: no downscale
    assert p.grid((720, 1280)) == (2, 4) and p.image_tokens((720, 1280)) == 729 + 54 * 96 + 54
    # 3x5 grid -> 81x135; height to int(75.94) = 75 (truncated, not rounded); ratio sqrt(75 * 135 / 6561) = 1.24
    # > 1.1: bilinear to int(75 // 1.24) x int(135 // 1.24) = 60x108
    assert p.grid((1080, 1920)) == (3, 5) and p.image_tokens((1080, 1920)) == 729 + 60 * 108 + 60
    assert p.image_tokens((300, 451), multi_image=True) == image_tokens((300, 451), None, 27) == 730
    assert max_patches("anyres_max_9") == 9


# ---------------------------------------------------------------------------------------------
# Packing and pooling: the model's own methods on a stand-in self


def _model(tile, patch, pinpoints):
    vision = types.SimpleNamespace(image_size=tile, patch_size=patch)
    return types.SimpleNamespace(config=types.SimpleNamespace(vision_config=vision,
                                                              image_grid_pinpoints=[list(x) for x in pinpoints]))


@pytest.mark.parametrize("tile, patch, pinpoints, aspect", [
    (384, 14, ONEVISION_PINPOINTS, "anyres_max_9"),
    (28, 14, TINY["image_grid_pinpoints"], "anyres_max_1"),
    (42, 14, [[42, 84], [84, 42], [126, 126], [42, 252]], "anyres_max_2"),
])
def test_pack_image_equals_hf(tile, patch, pinpoints, aspect):
    p = OnevisionImageParams(grid_pinpoints=pinpoints, tile=tile, patch_size=patch, vision_aspect_ratio=aspect)
    model, side, rng = _model(tile, patch, pinpoints), tile // patch, np.random.default_rng(tile)
    sizes = [(300, 451), (1080, 1920), (1200, 90), (13, 20), (1, 3000), (tile * 6, tile * 6), (700, 2400)]
    downscaled = 0
    for size in sizes:
        grid = p.grid(size)
        features = rng.standard_normal((1 + grid[0] * grid[1], side * side, 8)).astype(np.float32)
        newline = rng.standard_normal(8).astype(np.float32)
        (want,), lens = LlavaOnevisionModel.pack_image_features(
            model, [torch.from_numpy(features)], torch.tensor([size]), torch.from_numpy(newline), aspect)
        got = pack_image(features, size, grid, newline, p.max_num_patches)
        assert got.dtype == np.float32 and got.shape == tuple(want.shape) == (p.image_tokens(size), 8), size
        assert np.abs(got - want.numpy()).max() <= 1e-6, size
        downscaled += len(got) < side**2 + _unpadded(p, size)
    assert downscaled >= 2  # the bilinear path was compared


def test_pack_multi_image_tile_equals_hf():
    features, newline = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32), np.ones(8, np.float32)
    (want,), _ = LlavaOnevisionModel.pack_image_features(
        _model(28, 14, TINY["image_grid_pinpoints"]), [torch.from_numpy(features)], torch.tensor([[300, 451]]),
        torch.from_numpy(newline))
    got = pack_image(features, (300, 451), None, newline)
    assert got.shape == (image_tokens((300, 451), None, 2), 8) and np.array_equal(got, want.numpy())


@pytest.mark.parametrize("call, match", [
    (lambda: pack_image(np.zeros((3, 4, 8)), (300, 451), (1, 3), np.zeros(8)), "must have 4 tiles"),
    (lambda: pack_image(np.zeros((3, 5, 8)), (300, 451), (1, 2), np.zeros(8)), "a square"),
    (lambda: pack_image(np.zeros((3, 4, 8)), (300, 451), (1, 2), np.zeros(7)), "newline must be \\[8\\]"),
    (lambda: pack_image(np.zeros((3, 4)), (300, 451), (1, 2), np.zeros(8)), "tiles, tokens, channels"),
    (lambda: image_tokens((300, 451), (0, 2), 2), "rows, cols"),
    (lambda: pool_video(np.zeros((2, 9, 4)), 4), "frames, 4\\*4"),
])
def test_pack_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("side", [27, 26, 5, 2, 1])
def test_pool_video_equals_hf_apply_pooling(side):
    features = np.random.default_rng(side).standard_normal((3, side * side, 16)).astype(np.float32)  # [F, T, C]
    want = LlavaOnevisionModel.apply_pooling(_model(side * 14, 14, []), torch.from_numpy(features)).numpy()
    got = pool_video(features, side)
    half = math.ceil(side / 2)
    assert got.shape == want.shape == (3, half * half, 16) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("side", [27, 2, 3])
@pytest.mark.parametrize("frames", [1, 8, 32])
def test_video_tokens_equal_hf_processor(side, frames):
    proc = _hf_processor([], side * side)
    inputs = {"pixel_values_videos": [np.zeros((frames, 1, 1, 1), np.float32)]}
    want = len(proc.replace_video_token(inputs, video_idx=0)) // len("<video>")
    assert video_tokens(frames, side) == want == frames * math.ceil(side / 2) ** 2 + 1
    assert proc._get_num_multimodal_tokens(video_sizes=[(frames, 720, 1280)])["num_video_tokens"] == [want]


# ---------------------------------------------------------------------------------------------
# Videos: transformers' own LlavaOnevisionVideoProcessor with torch standing in for torchvision


def _clip(count, size=(400, 600)):
    photo = PHOTOS["portrait"].transpose(Image.Transpose.TRANSPOSE).resize(size[::-1])
    return np.stack([np.asarray(photo.rotate(10 * i)) for i in range(count)])  # [F, H, W, 3] uint8


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("config", [{}, {"size": {"height": 28, "width": 28}, "resample": 2},
                                    {"size": {"height": 42, "width": 42}, "image_mean": [0.5] * 3,
                                     "image_std": [0.5] * 3},
                                    {"size": {"height": 56, "width": 56}, "do_normalize": False}])
def test_video_equals_hf_video_processor(hf_torchvision, count, config):
    hf = hf_torchvision.video(**config)
    p = OnevisionVideoParams.from_hf(hf.to_dict())
    assert p == OnevisionVideoParams.from_hf(config) == OnevisionVideoParams.from_dict(p.to_dict())
    clip = _clip(count)
    want = hf(videos=[clip], return_tensors="np")["pixel_values_videos"][0]
    got = preprocess_video(clip, p)
    assert got.dtype == np.float32 and got.shape == want.shape == (count, 3, p.size, p.size)
    assert np.abs(got - want).max() == 0
    assert np.array_equal(preprocess_video([Image.fromarray(f) for f in clip], p), got)  # PIL frames: the same


def test_video_sampled_by_hf_equals_uniform_indices(hf_torchvision):
    """do_sample_frames: HF's default rule (video_utils.default_sample_indices_fn) is video.py's uniform one."""
    from vlmdeploy.runtime.video import FrameSampling, load_video

    clip = _clip(9, (56, 84))
    config = {"size": {"height": 28, "width": 28}}
    for call in ({"num_frames": 4}, {"fps": 2}):
        want = hf_torchvision.video(**config)(videos=[clip], do_sample_frames=True, return_tensors="np",
                                              video_metadata={"total_num_frames": 9, "fps": 3.0}, **call)
        frames, _ = load_video(clip, video_fps=3.0, sampling=FrameSampling.from_dict(
            {"video_processor_type": "LlavaOnevisionVideoProcessor"}), **call)
        got = preprocess_video(frames, OnevisionVideoParams.from_hf(config))
        assert np.array_equal(got, want["pixel_values_videos"][0])


@pytest.mark.parametrize("make, match", [
    (lambda: OnevisionVideoParams.from_hf({"video_processor_type": "Qwen2VLVideoProcessor"}), "not LLaVA-OneVision"),
    (lambda: OnevisionVideoParams(resample=1), "bilinear \\(2\\) or bicubic \\(3\\)"),
    (lambda: preprocess_video(np.zeros((2, 8, 8), np.uint8), OnevisionVideoParams()), "uint8 array"),
    (lambda: preprocess_video(np.zeros((2, 8, 8, 3), np.uint8), OnevisionVideoParams(do_resize=False)),
     "do_resize is off"),
])
def test_video_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_onevision_does_not_import_torch_or_transformers():
    code = ("import sys, vlmdeploy.runtime.onevision\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------------
# A whole tiny processor (the recipe the tiny checkpoint uses): its prompts' <image> counts


@pytest.fixture(scope="module")
def tiny_processor():
    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(260)
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    with pytest.MonkeyPatch.context() as mp:  # no torchvision: no video processor, so skip the class check
        mp.setattr(LlavaOnevisionProcessor, "check_argument_for_proper_class", lambda *a, **k: None)
        yield LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessorPil(**TINY), tokenizer=tokenizer,
                                      video_processor=None, num_image_tokens=4, vision_feature_select_strategy="full",
                                      vision_aspect_ratio="anyres_max_1")


def test_tiny_processor_prompt_counts(tiny_processor):
    d = tiny_processor.to_dict()
    model_config = {**_vision(28), "vision_aspect_ratio": "anyres_max_1"}
    p = OnevisionImageParams.from_hf(d["image_processor"], d, model_config)
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    a, b = PHOTOS["chelsea"], PHOTOS["tall"]
    one_each = tiny_processor(text=["x <image> y", "<image> z"], images=[[a], [b]], return_tensors="np", padding=True)
    assert [int(n) for n in (one_each["input_ids"] == image_id).sum(1)] == [p.image_tokens((300, 451)),
                                                                              p.image_tokens((1200, 90))]
    shared = tiny_processor(text=["x <image> y <image>"], images=[[a, b]], return_tensors="np")
    assert (shared["input_ids"] == image_id).sum() == 2 * p.image_tokens((300, 451), multi_image=True) == 10
    assert list(shared["batch_num_images"]) == [2] and shared["pixel_values"].shape == (2, 1, 3, 28, 28)  # per image
