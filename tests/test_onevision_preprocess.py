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


def _photos():
    chelsea, coffee = Image.fromarray(skdata.chelsea()), Image.fromarray(skdata.coffee())
    astronaut = Image.fromarray(skdata.astronaut())
    return {
        "chelsea": chelsea,  # 451x300
        "astronaut": astronaut,  # 512x512
        "portrait": coffee.transpose(Image.Transpose.TRANSPOSE),  # 400x600
        "tiny": chelsea.resize((20, 13)),
        "wide": astronaut.resize((1000, 60)),
        "tall": coffee.resize((90, 1200)),
    }


PHOTOS = _photos()
# A tiny OneVision geometry: 28-pixel tiles of 14-pixel patches (2x2 tokens), up to 3x3 tiles.
TINY = {"size": {"height": 28, "width": 28},
        "image_grid_pinpoints": [[28 * i, 28 * j] for i in (1, 2, 3) for j in (1, 2, 3)]}


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
    p = OnevisionImageParams.from_hf(hf.to_dict(), model_config={"vision_config": {"image_size": hf.size.get(
        "height") or hf.size["shortest_edge"]}})
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours, hf(PHOTOS[name], return_tensors="np"))
    assert len(ours.pixels) == 1 + math.prod(ours.grid)


@pytest.mark.parametrize("config", [{}, TINY])
def test_multi_image_prompt_equals_hf(config):
    """A prompt with several images (HF: a nested list) gets one padded-to-square tile per image."""
    names = ["chelsea", "tall", "astronaut"]
    hf = LlavaOnevisionImageProcessorPil(**config)(images=[[PHOTOS[n] for n in names]], return_tensors="np")
    p = OnevisionImageParams.from_hf(LlavaOnevisionImageProcessorPil(**config).to_dict(),
                                     model_config={"vision_config": {"image_size": 28 if config else 384}})
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
    p = OnevisionImageParams.from_hf(hf.to_dict(), model_config={"vision_config": {"image_size": 28}})
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
    (lambda: OnevisionImageParams.from_hf({}, model_config={"vision_config": {"image_size": 336}}), "vision tower"),
    (lambda: OnevisionImageParams.from_hf({}, {"num_image_tokens": 576}), "num_image_tokens=576"),
    (lambda: OnevisionImageParams.from_hf({}, {"num_image_tokens": 729, "vision_feature_select_strategy": "default"}),
     "num_image_tokens=729"),
    (lambda: OnevisionImageParams.from_dict({"tile_size": 3}), "unknown"),
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
    out[...] = torch.as_tensor(fill if isinstance(fill, (list, tuple)) else [fill] * c, dtype=image.dtype).view(-1, 1, 1)
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
                                     model_config={"vision_config": {"image_size": 28 if config else 384}})
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours, hf(PHOTOS[name], return_tensors="np"))
    pil = preprocess_image(PHOTOS[name], OnevisionImageParams.from_dict({**p.to_dict(), "image_backend": "pil"}))
    assert np.abs(ours.pixels - pil.pixels).max() > 0  # the two backends differ


def test_torchvision_backend_multi_image_equals_hf(hf_torchvision):
    names = ["chelsea", "tall"]
    hf = hf_torchvision.image(**TINY)
    want = hf(images=[[PHOTOS[n] for n in names]], return_tensors="np")
    p = OnevisionImageParams.from_hf(hf.to_dict(), image_backend="torchvision",
                                     model_config={"vision_config": {"image_size": 28}})
    for i, name in enumerate(names):
        _assert_same(preprocess_image(PHOTOS[name], p, multi_image=True), want, i)
