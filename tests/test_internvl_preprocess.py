"""runtime/internvl.py against transformers 5.24's GotOcr2 image processors and InternVLProcessor.

Images: bit for bit against ``GotOcr2ImageProcessorPil`` and (image_backend "torchvision") against
``GotOcr2ImageProcessor`` imported with torch standing in for torchvision's few leaf functions, called with
crop_to_patches=True as InternVLProcessor calls them (and without); video frames against InternVLVideoProcessor
the same way. Tile counts: HF's own
get_optimal_tiled_canvas / get_number_of_image_patches on many sizes. Prompt text: a whole tiny
InternVLProcessor (tiny Qwen-style tokenizer with <img>, </img>, <IMG_CONTEXT>) gives the token ids our
expansion tokenizes to.
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
from vlmdeploy.runtime.internvl import (
    InternVLParams,
    image_prompt,
    num_tiles,
    preprocess_image,
    preprocess_video,
    tile_grid,
    video_prompt,
)

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLProcessor  # noqa: E402
from transformers.models.got_ocr2 import image_processing_pil_got_ocr2 as hf_got  # noqa: E402


from conftest import preprocess_photos  # noqa: E402

PHOTOS = preprocess_photos()
TINY = {"size": {"height": 28, "width": 28}}  # 28-pixel tiles
CONFIGS = {
    "default": {},  # 384-pixel tiles, 1..12
    "tiny": TINY,
    "tiny-2..4-bilinear": {**TINY, "min_patches": 2, "max_patches": 4, "resample": 2},
    "tiny-3..6-halves": {**TINY, "min_patches": 3, "max_patches": 6, "image_mean": 0.5, "image_std": [0.5] * 3},
    "rect-1..6": {"size": {"height": 28, "width": 42}, "max_patches": 6},
    "no-rescale-no-norm": {**TINY, "do_rescale": False, "do_normalize": False, "max_patches": 4},
}


def _params(hf, **kw):
    return InternVLParams.from_hf(hf.to_dict(), **kw)


def _assert_same(ours, want):
    want = np.asarray(want)
    assert ours.dtype == np.float32 and ours.shape == want.shape, (ours.shape, want.shape)
    assert np.abs(ours - want).max() == 0


# ---------------------------------------------------------------------------------------------
# Images (PIL backend)


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_image_equals_hf(name, config):
    hf = GotOcr2ImageProcessorPil(**CONFIGS[config])
    p = _params(hf)
    want = hf(PHOTOS[name], crop_to_patches=True, return_tensors="np")  # as InternVLProcessor calls it
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours, want["pixel_values"])
    assert list(want["num_patches"]) == [len(ours)] == [p.num_tiles(PHOTOS[name].size[::-1])]


@pytest.mark.parametrize("name", ["chelsea", "tall", "tiny"])
def test_image_without_tiles_equals_hf(name):
    """crop_to_patches off (or max_patches 1): the image resized to one tile."""
    hf = GotOcr2ImageProcessorPil(**TINY)
    want = hf(PHOTOS[name], crop_to_patches=False, return_tensors="np")["pixel_values"]
    _assert_same(preprocess_image(PHOTOS[name], InternVLParams.from_dict({**_params(hf).to_dict(),
                                                                          "crop_to_patches": False})), want)
    hf1 = GotOcr2ImageProcessorPil(**TINY, max_patches=1)
    _assert_same(preprocess_image(PHOTOS[name], _params(hf1)), hf1(PHOTOS[name], crop_to_patches=True,
                                                                   return_tensors="np")["pixel_values"])
    assert len(want) == 1


def test_tiles_are_the_canvas_row_major_then_the_thumbnail():
    image = PHOTOS["chelsea"]  # 451x300: aspect 1.5 -> 3 cols x 2 rows
    p = InternVLParams(tile=(28, 28), max_patches=6, do_normalize=False, do_rescale=False)
    tiles = preprocess_image(image, p).astype(np.uint8).transpose(0, 2, 3, 1)  # [7, 28, 28, 3]
    assert p.grid((300, 451)) == (2, 3) and len(tiles) == 7
    canvas = np.asarray(image.resize((84, 56), Image.Resampling.BICUBIC))
    assert np.array_equal(tiles[4], canvas[28:, 28:56])  # row 1, col 1
    assert np.array_equal(tiles[-1], np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_image_modes_equal_hf(mode):
    image = PHOTOS["chelsea"].resize((57, 41)).convert("L" if mode == "I;16" else mode)
    if mode == "RGBA":  # real transparency: HF composites onto white
        alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
        image.putalpha(Image.fromarray(alpha))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    hf = GotOcr2ImageProcessorPil(**TINY, max_patches=4)
    _assert_same(preprocess_image(image, _params(hf)), hf(image, crop_to_patches=True,
                                                          return_tensors="np")["pixel_values"])


# ---------------------------------------------------------------------------------------------
# Tile counts from (h, w): HF's own functions


def _sizes(rng, count, high):
    sides = np.concatenate([np.arange(1, 30), rng.integers(1, high, count)])
    return [(int(h), int(w)) for h, w in zip(sides, rng.permutation(sides))] + [(1, 2000), (5000, 3), (448, 448)]


@pytest.mark.parametrize("tile", [(448, 448), (28, 28), (28, 42)])
@pytest.mark.parametrize("patches", [(1, 12), (1, 6), (2, 4), (3, 9), (1, 1), (4, 4)])
def test_tile_counts_equal_hf(tile, patches):
    hf = GotOcr2ImageProcessorPil(size={"height": tile[0], "width": tile[1]}, min_patches=patches[0],
                                  max_patches=patches[1], crop_to_patches=True)
    p = _params(hf)
    for size in _sizes(np.random.default_rng(sum(tile) + patches[1]), 150, 3000):
        cols, rows = hf_got.get_optimal_tiled_canvas(size, tile, *patches)
        assert tile_grid(size, tile, *patches) == (cols, rows)
        assert p.num_tiles(size) == hf.get_number_of_image_patches(*size) == (num_tiles((rows, cols))
                                                                              if patches[1] > 1 else 1)


def test_tile_grid_examples():
    assert tile_grid((300, 451), (448, 448), 1, 12) == (3, 2)  # 1.50 -> 3:2
    assert tile_grid((448, 448), (448, 448), 1, 12) == (1, 1)  # 1:1 ties with 2:2 but the image is small
    assert tile_grid((800, 800), (448, 448), 1, 12) == (2, 2)  # area > half of 2x2 tiles' (not 3x3's): 2:2
    assert tile_grid((1000, 1000), (448, 448), 1, 12) == (3, 3)  # over half of 3x3 tiles' area (4x4 is over 12)
    assert num_tiles((1, 1)) == 1 and num_tiles((2, 3)) == 7


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


def _tv_normalize(image, mean, std, inplace=False):
    """torchvision.transforms.v2.functional.normalize_image."""
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return (image.sub_(mean) if inplace else image.sub(mean)).div_(std)


def _tv_grayscale_to_rgb(image):
    return image if image.shape[-3] == 3 else image.expand(*image.shape[:-3], 3, *image.shape[-2:])


@pytest.fixture(scope="module")
def hf_torchvision():
    """transformers' GotOcr2ImageProcessor (torchvision backend) and InternVLVideoProcessor, importable and
    runnable with a stand-in torchvision whose only functions they call here are torchvision's, over torch."""
    from transformers import image_processing_backends, video_processing_utils

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.InterpolationMode, functional.resize = InterpolationMode, _tv_resize
    functional.normalize, functional.grayscale_to_rgb = _tv_normalize, _tv_grayscale_to_rgb
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.v2"]
    modules = {**{n: types.ModuleType(n) for n in names}, functional.__name__: functional}
    modules["torchvision.transforms.v2"].functional = functional
    pil_to_torch = {0: InterpolationMode.NEAREST_EXACT, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
                    3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}
    loaded = ["transformers.models.got_ocr2.image_processing_got_ocr2",
              "transformers.models.internvl.video_processing_internvl"]
    with pytest.MonkeyPatch.context() as mp:
        for n, module in modules.items():
            mp.setitem(sys.modules, n, module)
        mp.setattr(image_processing_backends, "tvF", functional, raising=False)
        mp.setattr(video_processing_utils, "tvF", functional, raising=False)
        mp.setattr(image_processing_backends, "pil_torch_interpolation_mapping", pil_to_torch)
        yield types.SimpleNamespace(image=importlib.import_module(loaded[0]).GotOcr2ImageProcessor,
                                    video=importlib.import_module(loaded[1]).InternVLVideoProcessor)
        for name in loaded:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("name", ["chelsea", "tall", "tiny", "wide", "astronaut"])
@pytest.mark.parametrize("config", ["tiny", "tiny-2..4-bilinear", "rect-1..6", "default"])
def test_torchvision_backend_equals_hf_torchvision_processor(hf_torchvision, name, config):
    hf = hf_torchvision.image(**CONFIGS[config])
    p = _params(hf, image_backend="torchvision")
    want = hf(PHOTOS[name], crop_to_patches=True, return_tensors="np")
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours, want["pixel_values"])
    assert list(want["num_patches"]) == [len(ours)]
    pil = preprocess_image(PHOTOS[name], InternVLParams.from_dict({**p.to_dict(), "image_backend": "pil"}))
    assert np.abs(ours - pil).max() > 0  # the two backends differ


def test_torchvision_backend_one_tile_equals_hf(hf_torchvision):
    """The torchvision class tiles even at max_patches=1 (one tile, no thumbnail) and resizes when not tiling."""
    for kw, crop in (({"max_patches": 1}, True), ({}, False)):
        hf = hf_torchvision.image(**TINY, **kw)
        p = InternVLParams.from_dict({**_params(hf, image_backend="torchvision").to_dict(), "crop_to_patches": crop})
        want = hf(PHOTOS["chelsea"], crop_to_patches=crop, return_tensors="np")["pixel_values"]
        _assert_same(preprocess_image(PHOTOS["chelsea"], p), want)


def _clip(count, size=(50, 70)):
    photo = PHOTOS["portrait"].resize(size[::-1])
    return np.stack([np.asarray(photo.rotate(10 * i)) for i in range(count)])  # [F, H, W, 3] uint8


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("config", [{}, {"size": {"height": 28, "width": 28}, "resample": 2},
                                    {"size": {"height": 28, "width": 42}, "image_mean": [0.5] * 3,
                                     "image_std": [0.5] * 3}])
def test_video_equals_hf_video_processor(hf_torchvision, count, config):
    hf = hf_torchvision.video(**config)
    p = InternVLParams.from_hf_video(hf.to_dict())
    assert p == InternVLParams.from_hf_video(config) and not p.crop_to_patches
    clip = _clip(count)
    want = hf(videos=[clip], return_tensors="np")["pixel_values_videos"][0]
    got = preprocess_video(clip, p)
    _assert_same(got, want)
    assert np.array_equal(preprocess_video([Image.fromarray(f) for f in clip], p), got)  # PIL frames: the same


def test_video_errors():
    with pytest.raises(ValueError, match="use params from InternVLParams.from_hf_video"):
        preprocess_video(_clip(1), InternVLParams())
    p = InternVLParams.from_hf_video({})
    with pytest.raises(ImageError, match="a video is a uint8 array"):
        preprocess_video(np.zeros((2, 8, 8), np.uint8), p)
    with pytest.raises(ValueError, match="is not InternVL's"):
        InternVLParams.from_hf_video({"video_processor_type": "Qwen2VLVideoProcessor"})


# ---------------------------------------------------------------------------------------------
# The prompt text: a whole tiny InternVLProcessor


SPECIAL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}


def tiny_tokenizer():
    """A Qwen-style tiny tokenizer with InternVL's image tokens as named extra special tokens (as the -hf
    checkpoints' tokenizer_config.json has them)."""
    from transformers import PreTrainedTokenizerFast

    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
    base = build_tiny_tokenizer(300, qwen=True, specials=specials)
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", padding_side="left", clean_up_tokenization_spaces=False,
                                   extra_special_tokens=SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tiny_processor():
    with pytest.MonkeyPatch.context() as mp:  # no torchvision: no video processor, so skip the class check
        mp.setattr(InternVLProcessor, "check_argument_for_proper_class", lambda *a, **k: None)
        yield InternVLProcessor(image_processor=GotOcr2ImageProcessorPil(**TINY, max_patches=6),
                                tokenizer=tiny_tokenizer(), video_processor=None, image_seq_length=4)


def _expand(text, tiles, p):
    """Each placeholder (the context token) replaced, in order, by image_prompt."""
    parts = text.split(p.context_image_token)
    assert len(parts) == len(tiles) + 1
    return parts[0] + "".join(image_prompt(n, p) + rest for n, rest in zip(tiles, parts[1:]))


def test_tiny_processor_prompt_equals_ours(tiny_processor):
    tok = tiny_processor.tokenizer
    d = tiny_processor.to_dict()
    p = InternVLParams.from_hf(d["image_processor"], d, special_tokens=SPECIAL_TOKENS)
    assert p.image_seq_length == 4 and p.max_patches == 6
    texts = ["<|im_start|>user\n<IMG_CONTEXT>\nWhat is this?<|im_end|>\n", "a <IMG_CONTEXT>\nb <IMG_CONTEXT>\n c"]
    images = [PHOTOS["chelsea"], PHOTOS["tall"], PHOTOS["astronaut"]]
    out = tiny_processor(text=texts, images=images, return_tensors="np", padding=True)
    tiles = [p.num_tiles(im.size[::-1]) for im in images]
    assert tiles == [7, 7, 5]  # 3x2 + thumbnail, 1x6 + thumbnail, 2x2 + thumbnail
    want = tok([_expand(texts[0], tiles[:1], p), _expand(texts[1], tiles[1:], p)], return_tensors="np", padding=True)
    assert np.array_equal(out["input_ids"], want["input_ids"])
    assert np.array_equal(out["attention_mask"], want["attention_mask"])
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert (out["input_ids"] == context).sum() == 4 * sum(tiles)
    assert out["pixel_values"].shape == (sum(tiles), 3, 28, 28)
    _assert_same(np.concatenate([preprocess_image(im, p) for im in images]), out["pixel_values"])
    counts = tiny_processor._get_num_multimodal_tokens(image_sizes=[im.size[::-1] for im in images])
    assert counts.num_image_tokens == [p.image_tokens(im.size[::-1]) for im in images]


@pytest.mark.parametrize("frames", [1, 4])
def test_video_prompt_equals_hf(tiny_processor, frames):
    d = tiny_processor.to_dict()
    p = InternVLParams.from_hf(d["image_processor"], d, special_tokens=SPECIAL_TOKENS)
    inputs = {"pixel_values_videos": [np.zeros((frames, 3, 28, 28), np.float32)]}
    assert tiny_processor.replace_video_token(inputs, 0) == video_prompt(frames, p)
    assert video_prompt(2, p) == "Frame1: <img>" + "<IMG_CONTEXT>" * 4 + "</img>\nFrame2: <img>" + \
        "<IMG_CONTEXT>" * 4 + "</img>"


def test_image_prompt_text():
    p = InternVLParams(image_seq_length=2)
    assert image_prompt(3, p) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    with pytest.raises(ValueError, match="num_tiles must be a positive integer"):
        image_prompt(0, p)


# ---------------------------------------------------------------------------------------------
# Configs


def _tiny_internvl_config(**kw):
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 28, "patch_size": 7}
    text = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 300}
    kw = {"image_token_id": 298, "image_seq_length": 4, **kw}
    return InternVLConfig(vision_config=vision, text_config=text, **kw)


def test_tiny_model_takes_our_prompt_and_pixels(tiny_processor):
    """The tiny recipe (config above + tiny processor) is consistent: InternVLForConditionalGeneration accepts
    our expanded prompt with our pixels (its placeholder count check) and its get_image_features makes
    image_seq_length tokens a tile."""
    from transformers import InternVLForConditionalGeneration

    tok = tiny_processor.tokenizer
    config = _tiny_internvl_config(image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    d = tiny_processor.to_dict()
    p = InternVLParams.from_hf(d["image_processor"], d, config.to_dict(), special_tokens=SPECIAL_TOKENS)
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(config).eval()
    image = PHOTOS["portrait"]
    ids = tok([_expand("x <IMG_CONTEXT>\ny", [p.num_tiles(image.size[::-1])], p)], return_tensors="pt")
    pixels = torch.from_numpy(preprocess_image(image, p))
    with torch.no_grad():
        features = model.model.get_image_features(pixels).pooler_output
        logits = model(**ids, pixel_values=pixels).logits
    assert features.shape == (len(pixels), p.image_seq_length, 32)
    assert logits.shape == (1, ids["input_ids"].shape[1], 300)


def test_from_hf_checks_the_model_config():
    ip = GotOcr2ImageProcessorPil(**TINY).to_dict()
    config = _tiny_internvl_config().to_dict()  # 28 / 7 = 4x4 patches, pixel shuffle 0.5 -> 4 tokens a tile
    assert InternVLParams.from_hf(ip, {"image_seq_length": 4}, config).image_seq_length == 4
    with pytest.raises(ValueError, match="image_seq_length=16 but the model makes 4 tokens"):
        InternVLParams.from_hf(ip, {"image_seq_length": 16}, config)
    with pytest.raises(ValueError, match="vision tower takes 448x448"):
        InternVLParams.from_hf(GotOcr2ImageProcessorPil().to_dict(), {"image_seq_length": 4},
                               _tiny_internvl_config().to_dict() | {"vision_config": {"image_size": 448}})


def test_params_round_trip_and_defaults():
    p = InternVLParams()
    assert (p.tile, p.min_patches, p.max_patches, p.crop_to_patches, p.image_seq_length) == ((384, 384), 1, 12,
                                                                                              True, 256)
    assert InternVLParams.from_dict(p.to_dict()) == p
    assert InternVLParams.from_hf(GotOcr2ImageProcessorPil().to_dict()) == p
    assert InternVLParams.from_hf({"image_processor_type": "GotOcr2ImageProcessorFast", "size": None}) == p


@pytest.mark.parametrize("make, match", [
    (lambda: InternVLParams(min_patches=5, max_patches=4), "min_patches \\(5\\) is over max_patches \\(4\\)"),
    (lambda: InternVLParams(max_patches=0), "max_patches must be a positive integer"),
    (lambda: InternVLParams(tile=(28,)), "tile must be \\(height, width\\)"),
    (lambda: InternVLParams(image_backend="cv2"), "image_backend must be one of"),
    (lambda: InternVLParams(image_backend="torchvision", resample=1), "bilinear \\(2\\) or bicubic"),
    (lambda: InternVLParams(image_std=(0.5, 0.0, 0.5)), "image_std must not contain 0"),
    (lambda: InternVLParams.from_dict({"tiles": 3}), "unknown InternVLParams keys \\['tiles'\\]"),
    (lambda: InternVLParams.from_hf({"image_processor_type": "CLIPImageProcessor"}), "is not InternVL's"),
    (lambda: InternVLParams.from_hf({"size": {"shortest_edge": 448}}), "size must be"),
])
def test_param_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_image_errors():
    p = InternVLParams(tile=(28, 28))
    with pytest.raises(ImageError, match="expected a PIL.Image.Image"):
        preprocess_image(np.zeros((28, 28, 3), np.uint8), p)
    with pytest.raises(ImageError, match="must already be 28x28"):
        preprocess_image(PHOTOS["tiny"], InternVLParams(tile=(28, 28), crop_to_patches=False, do_resize=False))
    with pytest.raises(ImageError, match="do_convert_rgb is off"):
        preprocess_image(PHOTOS["tiny"].convert("L"), InternVLParams(do_convert_rgb=False))
    with pytest.raises(ImageError, match="empty image"):
        tile_grid((0, 5), (28, 28), 1, 6)


def test_internvl_does_not_import_torch_or_transformers():
    code = ("import sys, vlmdeploy.runtime.internvl\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
