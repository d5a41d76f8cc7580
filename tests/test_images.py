"""runtime/images.py against transformers' PIL-backend image processors (CLIP, Llava, SigLIP,
BiT), bit for bit."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.images import (
    ImageError,
    ImagePreprocessor,
    hf_image_processor_kinds,
    load_image,
)

skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")
# The PIL classes are what `CLIPImageProcessor` / `LlavaImageProcessor` resolve to without
# torchvision; naming them keeps the reference the same when torchvision is present.
from transformers import (  # noqa: E402
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    LlavaImageProcessorPil,
    SiglipImageProcessorPil,
    BlipImageProcessorPil,
)

CLIP, LLAVA = "CLIPImageProcessor", "LlavaImageProcessor"
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------------------------------------
# Images


def _rgb(a):
    return Image.fromarray(a)


def _photos():
    chelsea, coffee = _rgb(skdata.chelsea()), _rgb(skdata.coffee())
    astronaut = _rgb(skdata.astronaut())
    return {
        "chelsea": chelsea,  # 451x300 landscape
        "astronaut": astronaut,  # square
        "coffee": coffee,  # 600x400 landscape
        "portrait": coffee.transpose(Image.Transpose.TRANSPOSE),  # 400x600
        "trunc_round": chelsea.resize((300, 457)),  # 30*457/300 = 45.7: int() != round()
        "odd": astronaut.resize((333, 211)),
        "tiny": chelsea.resize((20, 13)),  # smaller than every crop used
        "sliver": astronaut.resize((5, 1)),
        "wide": astronaut.resize((400, 6)),
        "tall": coffee.resize((6, 400)),
        "one_high": chelsea.resize((120, 1)),
        "one_wide": coffee.resize((1, 90)),
    }


def _with_alpha(rgb, mode):
    a = np.asarray(rgb)
    h, w = a.shape[:2]
    alpha = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))  # [h, w], 0 -> 255
    alpha[: h // 4] = 0  # a fully transparent band
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), Image.fromarray(alpha)))
    return Image.fromarray(np.dstack([a, alpha]), "RGBA")


def _png_roundtrip(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return load_image(buf.getvalue())


def _modes():
    cat = _rgb(skdata.chelsea())
    p = cat.quantize(64)
    p_trans = p.copy()
    p_trans.info["transparency"] = int(np.asarray(p)[150, 200])  # a colour used on the cat
    l_trans = cat.convert("L")
    l_trans.info["transparency"] = int(np.asarray(l_trans)[150, 200])
    rgba_palette = _with_alpha(cat, "RGBA").quantize(64, method=Image.Quantize.FASTOCTREE)
    ramp = (np.arange(300 * 451, dtype=np.uint32).reshape(300, 451) * 7 % 65536).astype(np.uint16)
    return {
        "RGBA": _with_alpha(cat, "RGBA"),
        "LA": _with_alpha(cat, "LA"),
        "L": cat.convert("L"),
        "L+transparency": l_trans,
        "CMYK": cat.convert("CMYK"),
        "P": p,
        "P+transparency": p_trans,
        "P+transparency.png": _png_roundtrip(p_trans),
        "RGBA.png": _png_roundtrip(_with_alpha(cat, "RGBA")),
        "P+rgba_palette": rgba_palette,  # alpha only in the palette: HF ignores it
        "P+rgba_palette.png": _png_roundtrip(rgba_palette),  # alpha now a tRNS chunk: composited
        "PA": _with_alpha(cat, "RGBA").convert("PA"),
        "I;16": Image.fromarray(ramp),
        "I": Image.fromarray(ramp.astype(np.int32)),
        "1": cat.convert("1"),
    }


@pytest.fixture(scope="module")
def images():
    return {**_photos(), **_modes()}


# ---------------------------------------------------------------------------------------------
# Numerical parity with HF


def _hw(h, w):
    return {"height": h, "width": w}


HF_CASES = {
    "clip336": lambda: CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=_hw(336, 336)),
    "llava_pad336": lambda: LlavaImageProcessorPil(
        do_pad=True, size={"shortest_edge": 336}, crop_size=_hw(336, 336)
    ),
    "clip_small": lambda: CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size=_hw(28, 28)),
    "llava_pad_small": lambda: LlavaImageProcessorPil(do_pad=True, size=30, crop_size=28),
    "hw_then_pad_crop": lambda: CLIPImageProcessorPil(size=_hw(21, 41), crop_size=_hw(28, 27)),
    "no_resize_crop": lambda: CLIPImageProcessorPil(do_resize=False, crop_size=_hw(29, 28)),
    "llava_pad_no_crop": lambda: LlavaImageProcessorPil(do_pad=True, do_center_crop=False, size=30),
    "bilinear": lambda: CLIPImageProcessorPil(size=30, crop_size=28, resample=2),
    "nearest": lambda: CLIPImageProcessorPil(size=30, crop_size=28, resample=0),
    "lanczos": lambda: CLIPImageProcessorPil(size=30, crop_size=28, resample=1),
    "rescale_only": lambda: CLIPImageProcessorPil(size=30, crop_size=28, do_normalize=False),
    "normalize_only": lambda: CLIPImageProcessorPil(size=30, crop_size=28, do_rescale=False),
}


def _assert_exact(hf, pre, images):
    """Our pixel_values equal HF's bit for bit, image by image."""
    names = list(images)
    expected = hf(images=[images[n] for n in names], return_tensors="np")["pixel_values"]
    got = pre([images[n] for n in names])
    assert got.dtype == expected.dtype == np.float32
    assert got.shape == expected.shape == (len(names), 3, *pre.output_size)
    bad = {n: float(np.abs(got[i] - expected[i]).max())
           for i, n in enumerate(names) if not np.array_equal(got[i], expected[i])}
    assert not bad, f"not bit-exact (max abs diff per image): {bad}"


@pytest.mark.parametrize("case", HF_CASES)
def test_matches_hf(case, images):
    hf = HF_CASES[case]()
    _assert_exact(hf, ImagePreprocessor.from_hf_config(hf.to_dict()), images)


def test_rgba_is_composited_on_white(images):
    """The difference from a plain convert("RGB") is real, so the RGBA case tests something."""
    pre = ImagePreprocessor.from_hf_config(HF_CASES["clip_small"]().to_dict())
    rgba = images["RGBA"]
    assert np.abs(pre([rgba]) - pre([rgba.convert("RGB")])).max() > 0.5


def test_default_class_names_use_the_pil_backend():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        assert transformers.CLIPImageProcessor is CLIPImageProcessorPil
        assert transformers.LlavaImageProcessor is LlavaImageProcessorPil
    else:
        pytest.skip("torchvision installed: the default class is the torchvision backend")


# ---------------------------------------------------------------------------------------------
# Config parsing

LLAVA_HF_4X = {  # preprocessor_config.json as transformers 4.x wrote it for llava-1.5
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": MEAN,
    "image_processor_type": "CLIPImageProcessor",
    "image_std": STD,
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
PROCESSOR_5X = {  # processor_config.json as transformers 5.x writes it
    "image_processor": {
        "do_pad": True,
        "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336},
        "do_convert_rgb": True,
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "do_center_crop": True,
        "image_mean": MEAN,
        "image_std": STD,
        "image_processor_type": "LlavaImageProcessor",
    },
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}
CONFIGS = {
    "llava_hf_4x": (LLAVA_HF_4X, CLIPImageProcessorPil),
    "processor_5x": (PROCESSOR_5X["image_processor"], LlavaImageProcessorPil),
    "feature_extractor_ints": (
        {"feature_extractor_type": "CLIPFeatureExtractor", "size": 30, "crop_size": 28},
        CLIPImageProcessorPil,
    ),
    "fast_defaults_only": ({"image_processor_type": LLAVA + "Fast"}, LlavaImageProcessorPil),
    "clip_fast_lists": (
        {"image_processor_type": CLIP + "Fast", "size": [24, 40], "crop_size": [20, 30]},
        CLIPImageProcessorPil,
    ),
    "int_size_default_to_square": (
        {"image_processor_type": CLIP, "size": 32, "default_to_square": True, "crop_size": 28},
        CLIPImageProcessorPil,
    ),
    "nulls_turn_steps_off": (
        {
            "image_processor_type": LLAVA,
            "size": _hw(32, 48),
            "do_center_crop": None,
            "crop_size": None,
            "do_normalize": None,
            "do_pad": None,
        },
        LlavaImageProcessorPil,
    ),
    "use_square_size": (
        {"image_processor_type": CLIP, "use_square_size": True, "size": {"shortest_edge": 64}},
        CLIPImageProcessorPil,
    ),
    "scalar_mean_std": (
        {"image_processor_type": CLIP, "image_mean": 0.5, "image_std": 0.25, "size": 30,
         "crop_size": 28},
        CLIPImageProcessorPil,
    ),
}
EXPECTED_SIZE = {
    "llava_hf_4x": (336, 336),
    "processor_5x": (336, 336),
    "feature_extractor_ints": (28, 28),
    "fast_defaults_only": (224, 224),
    "clip_fast_lists": (20, 30),
    "int_size_default_to_square": (28, 28),
    "nulls_turn_steps_off": (32, 48),
    "use_square_size": (224, 224),  # HF takes the class default 224, not size
    "scalar_mean_std": (28, 28),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_from_hf_config_matches_hf_from_dict(name, images):
    d, hf_cls = CONFIGS[name]
    pre = ImagePreprocessor.from_hf_config(d)
    assert pre.output_size == EXPECTED_SIZE[name]
    subset = {k: images[k] for k in ("chelsea", "portrait", "tiny", "RGBA")}
    _assert_exact(hf_cls.from_dict(dict(d)), pre, subset)


def test_from_hf_config_fields():
    clip = ImagePreprocessor.from_hf_config(LLAVA_HF_4X)
    llava = ImagePreprocessor.from_hf_config(PROCESSOR_5X["image_processor"])
    assert (clip.shortest_edge, clip.crop_size, clip.resample) == (336, (336, 336), 3)
    assert not clip.do_pad
    assert llava.do_pad and llava.image_mean == tuple(MEAN) and llava.image_std == tuple(STD)
    defaults = ImagePreprocessor.from_hf_config({"image_processor_type": CLIP + "Pil"})
    assert defaults == ImagePreprocessor() and defaults.output_size == (224, 224)


def test_clip_do_pad_is_not_pad_to_square():
    """CLIP's do_pad pads a batch to its largest image (a no-op at a fixed size), not to square."""
    pre = ImagePreprocessor.from_hf_config({**LLAVA_HF_4X, "do_pad": True})
    assert not pre.do_pad


def test_to_dict_round_trip():
    for pre in (ImagePreprocessor.from_hf_config(d) for d, _ in CONFIGS.values()):
        stored = json.loads(json.dumps(pre.to_dict()))
        assert ImagePreprocessor.from_dict(stored) == pre
        assert all(not isinstance(v, tuple) for v in stored.values())


@pytest.mark.parametrize(
    "d, words",
    [
        ({"image_processor_type": "ViTImageProcessor"}, ["unsupported image_processor_type", "CLIP"]),
        ({"size": {"shortest_edge": 336}}, ["unsupported image_processor_type", "None"]),
        (PROCESSOR_5X, ['"image_processor" dict']),
        ({**LLAVA_HF_4X, "size": {"shortest_edge": 336, "longest_edge": 500}}, ["unsupported size"]),
        ({**LLAVA_HF_4X, "size": {"width": 336}}, ["unsupported size", "height"]),
        ({**LLAVA_HF_4X, "crop_size": {"shortest_edge": 336}}, ["unsupported crop_size"]),
        ({**LLAVA_HF_4X, "resample": 9}, ["resample", "9", "bicubic"]),
        ({**LLAVA_HF_4X, "image_mean": [0.5, 0.5]}, ["image_mean", "3 values"]),
        ({**LLAVA_HF_4X, "do_resize": "yes"}, ["do_resize", "true, false or null"]),
        ({**LLAVA_HF_4X, "do_center_crop": False}, ["fixed size"]),
        ({**LLAVA_HF_4X, "size": None}, ["do_resize needs exactly one of shortest_edge"]),
        ({**LLAVA_HF_4X, "image_std": [0.5, 0.0, 0.5]}, ["image_std must not contain 0"]),
    ],
)
def test_from_hf_config_rejects(d, words):
    with pytest.raises(ValueError) as err:
        ImagePreprocessor.from_hf_config(d)
    for word in words:
        assert word in str(err.value)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown image preprocessor keys.*'size'"):
        ImagePreprocessor.from_dict({**ImagePreprocessor().to_dict(), "size": 3})


# ---------------------------------------------------------------------------------------------
# Calling


def test_empty_batch_and_single_image(images):
    pre = ImagePreprocessor.from_hf_config(CONFIGS["feature_extractor_ints"][0])
    empty = pre([])
    assert empty.shape == (0, 3, 28, 28) and empty.dtype == np.float32
    assert np.array_equal(pre(images["chelsea"]), pre([images["chelsea"]]))


def test_call_rejects_bad_inputs(images):
    pre = ImagePreprocessor(shortest_edge=30, crop_size=(28, 28))
    with pytest.raises(ImageError, match=r"images\[1\] is a str; expected a PIL.Image.Image"):
        pre([images["chelsea"], "cat.jpg"])
    with pytest.raises(ImageError, match=r"images\[0\] is empty"):
        pre([Image.new("RGB", (0, 4))])
    with pytest.raises(ImageError, match=r"mode 'L' but do_convert_rgb is off"):
        ImagePreprocessor(do_convert_rgb=False, shortest_edge=30, crop_size=(28, 28))([images["L"]])


def test_lazily_opened_truncated_image_fails_clearly():
    lazy = Image.open(io.BytesIO(_jpeg_bytes()[:5000]))  # header parses, data is cut
    with pytest.raises(ImageError, match=r"images\[0\] is not a readable image.*truncated"):
        ImagePreprocessor()([lazy])


# ---------------------------------------------------------------------------------------------
# Loading


def _jpeg_bytes():
    buf = io.BytesIO()
    _rgb(skdata.chelsea()).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes():
    buf = io.BytesIO()
    _with_alpha(_rgb(skdata.chelsea()), "RGBA").save(buf, "PNG")
    return buf.getvalue()


def test_load_image_sources(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(_png_bytes())
    for source in (path, str(path), path.read_bytes(), Image.open(path)):
        image = load_image(source)
        assert image.mode == "RGBA" and image.size == (451, 300)  # alpha kept for compositing
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(path)))


def test_load_image_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    _rgb(skdata.chelsea()).save(path, "JPEG", exif=exif)
    assert load_image(path).size == (300, 451)
    assert load_image(path, exif_transpose=False).size == (451, 300)


@pytest.mark.parametrize(
    "name, content, words",
    [
        ("cat.jpg", lambda: _jpeg_bytes()[:5000], ["cat.jpg is not a readable image (truncated file)"]),
        ("cat.png", lambda: _png_bytes()[:20000], ["cat.png is not a readable image (truncated file)"]),
        ("notes.jpg", lambda: b"a text file\n", ["notes.jpg is not a readable image", "format"]),
        ("empty.png", lambda: b"", ["empty.png is not a readable image"]),
    ],
)
def test_load_image_bad_files(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content())
    with pytest.raises(ImageError) as err:
        load_image(path)
    for word in words:
        assert word in str(err.value)


def test_load_image_missing_and_wrong_sources(tmp_path):
    with pytest.raises(ImageError, match=r"missing\.jpg does not exist"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="is a directory"):
        load_image(tmp_path)
    truncated = r"<5000 bytes> is not a readable image \(truncated file\)"
    with pytest.raises(ImageError, match=truncated):
        load_image(_jpeg_bytes()[:5000])
    with pytest.raises(ImageError, match="allowed: a path"):
        load_image(42)


def test_images_module_imports_neither_torch_nor_transformers():
    code = (
        "import sys, vlmdeploy.runtime.images; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# SigLIP and BiT (DINOv2): bit-exact against HF, from to_dict() and from save_pretrained's JSON

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FAMILY_CASES = {
    "siglip224": lambda: SiglipImageProcessorPil(),
    "siglip384": lambda: SiglipImageProcessorPil(size=_hw(384, 384)),
    "siglip28": lambda: SiglipImageProcessorPil(size=_hw(28, 28)),
    "siglip_rect_bilinear": lambda: SiglipImageProcessorPil(size=_hw(20, 36), resample=2),
    "dinov2": lambda: BitImageProcessorPil(
        size={"shortest_edge": 256}, crop_size=_hw(224, 224),
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    ),
    "bit_defaults": lambda: BitImageProcessorPil(),
    "blip_defaults": lambda: BlipImageProcessorPil(),  # BLIP-2: 384x384, no crop, CLIP mean/std
    "blip_tiny_bilinear": lambda: BlipImageProcessorPil(size=_hw(28, 36), resample=2),
    "bit_tiny": lambda: BitImageProcessorPil(
        size={"shortest_edge": 32}, crop_size=_hw(28, 28),
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
    ),
}
FAMILY_SIZE = {"siglip224": (224, 224), "siglip384": (384, 384), "siglip28": (28, 28),
               "siglip_rect_bilinear": (20, 36), "dinov2": (224, 224),
               "bit_defaults": (224, 224), "bit_tiny": (28, 28), "blip_defaults": (384, 384),
               "blip_tiny_bilinear": (28, 36)}


def _saved_config(hf, tmp_path) -> dict:
    """A bare image processor's save_pretrained writes preprocessor_config.json, nothing else."""
    hf.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocessor_config.json"]
    return json.loads((tmp_path / "preprocessor_config.json").read_text())


@pytest.mark.parametrize("source", ["to_dict", "preprocessor_config.json"])
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_siglip_bit_match_hf_exactly(case, source, images, tmp_path):
    hf = FAMILY_CASES[case]()
    d = hf.to_dict() if source == "to_dict" else _saved_config(hf, tmp_path)
    pre = ImagePreprocessor.from_hf_config(d)
    assert pre.output_size == FAMILY_SIZE[case]
    _assert_exact(hf, pre, images)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "a": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _siglip_processor(hf):
    from transformers import SiglipProcessor

    return SiglipProcessor(image_processor=hf, tokenizer=_tiny_tokenizer())


def _llava_processor(hf):  # e.g. a LLaVA-style model on a DINOv2 tower
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=hf, tokenizer=_tiny_tokenizer(), patch_size=14)


@pytest.mark.parametrize(
    "case, make", [("siglip28", _siglip_processor), ("bit_tiny", _llava_processor)]
)
def test_nested_processor_config_matches_hf_exactly(case, make, images, tmp_path):
    """5.x save_pretrained of a whole processor nests the image processor in
    processor_config.json and writes no preprocessor_config.json."""
    hf = FAMILY_CASES[case]()
    make(hf).save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    pre = ImagePreprocessor.from_hf_config(saved["image_processor"])
    _assert_exact(hf, pre, {k: images[k] for k in ("chelsea", "tall", "RGBA", "P+transparency")})


@pytest.mark.parametrize(
    "kind, hf_cls",
    [
        (CLIP, CLIPImageProcessorPil),
        (LLAVA, LlavaImageProcessorPil),
        ("SiglipImageProcessor", SiglipImageProcessorPil),
        ("BitImageProcessor", BitImageProcessorPil),
        ("BlipImageProcessor", BlipImageProcessorPil),
    ],
)
def test_class_defaults_match_hf(kind, hf_cls):
    """A config naming only the type takes the same defaults as transformers' class."""
    assert ImagePreprocessor.from_hf_config({"image_processor_type": kind}) == (
        ImagePreprocessor.from_hf_config(hf_cls().to_dict())
    )


def test_siglip_composites_rgba_on_white(images):
    pre = ImagePreprocessor.from_hf_config(FAMILY_CASES["siglip28"]().to_dict())
    rgba = images["RGBA"]
    assert np.abs(pre([rgba]) - pre([rgba.convert("RGB")])).max() > 0.5


def test_siglip_bit_fields():
    siglip = ImagePreprocessor.from_hf_config(FAMILY_CASES["siglip384"]().to_dict())
    assert (siglip.size_hw, siglip.shortest_edge) == ((384, 384), None)
    assert not siglip.do_center_crop and siglip.crop_size is None
    assert siglip.image_mean == siglip.image_std == (0.5, 0.5, 0.5) and siglip.resample == 3
    dino = ImagePreprocessor.from_hf_config(FAMILY_CASES["dinov2"]().to_dict())
    assert (dino.shortest_edge, dino.crop_size, dino.resample) == (256, (224, 224), 3)
    assert dino.image_mean == tuple(IMAGENET_MEAN) and not dino.do_pad


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_siglip_bit_to_dict_round_trip(case):
    pre = ImagePreprocessor.from_hf_config(FAMILY_CASES[case]().to_dict())
    stored = json.loads(json.dumps(pre.to_dict()))
    assert ImagePreprocessor.from_dict(stored) == pre
    assert sorted(stored) == sorted(OLD_FORMAT["llava_hf_4x"])  # same keys as before SigLIP/BiT


SIGLIP_SO400M = {  # preprocessor_config.json of a published SigLIP checkpoint (4.x layout)
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 384, "width": 384},
}
DINOV2_BASE = {  # preprocessor_config.json of a published DINOv2 checkpoint
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": IMAGENET_MEAN,
    "image_processor_type": "BitImageProcessor",
    "image_std": IMAGENET_STD,
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


@pytest.mark.parametrize(
    "d, hf_cls, size",
    [
        (SIGLIP_SO400M, SiglipImageProcessorPil, (384, 384)),
        (DINOV2_BASE, BitImageProcessorPil, (224, 224)),
        ({"image_processor_type": "SiglipImageProcessorFast", "size": [24, 40]},
         SiglipImageProcessorPil, (24, 40)),
        ({"image_processor_type": "BitImageProcessorPil", "size": 32, "crop_size": 28,
          "image_mean": 0.5, "image_std": 0.25}, BitImageProcessorPil, (28, 28)),
        ({"image_processor_type": "SiglipImageProcessor", "size": _hw(28, 28),
          "do_center_crop": True, "crop_size": _hw(20, 24)}, SiglipImageProcessorPil, (20, 24)),
        ({"image_processor_type": "BitImageProcessor", "size": _hw(30, 40), "do_center_crop": None,
          "do_normalize": None, "do_convert_rgb": True}, BitImageProcessorPil, (30, 40)),
        ({"image_processor_type": "SiglipImageProcessor", "size": _hw(28, 28), "do_pad": True},
         SiglipImageProcessorPil, (28, 28)),
        ({"image_processor_type": "BitImageProcessor", "size": 30, "crop_size": 28,
          "do_pad": True, "pad_size": 28}, BitImageProcessorPil, (28, 28)),
    ],
)
def test_siglip_bit_configs_match_hf_from_dict(d, hf_cls, size, images):
    pre = ImagePreprocessor.from_hf_config(d)
    assert pre.output_size == size
    subset = {k: images[k] for k in ("chelsea", "portrait", "tiny", "wide", "RGBA", "L", "I;16")}
    _assert_exact(hf_cls.from_dict(dict(d)), pre, subset)


# Dicts written by ImagePreprocessor.to_dict() before SigLIP/BiT support (artifacts exported then
# must still load), with the HF configs they were made from.
OLD_FORMAT = {
    "llava_hf_4x": {
        "do_convert_rgb": True, "do_pad": False, "do_resize": True, "shortest_edge": 336,
        "size_hw": None, "resample": 3, "do_center_crop": True, "crop_size": [336, 336],
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
    "processor_5x": {
        "do_convert_rgb": True, "do_pad": True, "do_resize": True, "shortest_edge": 336,
        "size_hw": None, "resample": 3, "do_center_crop": True, "crop_size": [336, 336],
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
    "nulls_turn_steps_off": {
        "do_convert_rgb": True, "do_pad": False, "do_resize": True, "shortest_edge": None,
        "size_hw": [32, 48], "resample": 3, "do_center_crop": False, "crop_size": None,
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": False,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    },
}


@pytest.mark.parametrize("name", OLD_FORMAT)
def test_old_format_dict_still_loads(name, images):
    d, hf_cls = CONFIGS[name]
    old = ImagePreprocessor.from_dict(json.loads(json.dumps(OLD_FORMAT[name])))
    assert old == ImagePreprocessor.from_hf_config(d)
    assert old.to_dict() == OLD_FORMAT[name]  # and is still written the same way
    subset = {k: images[k] for k in ("chelsea", "portrait", "tiny", "RGBA", "P+transparency")}
    _assert_exact(hf_cls.from_dict(dict(d)), old, subset)


def test_hf_image_processor_kinds():
    kinds = hf_image_processor_kinds()
    assert isinstance(kinds, tuple) and list(kinds) == sorted(set(kinds))
    bases = {"CLIPImageProcessor", "LlavaImageProcessor", "SiglipImageProcessor",
             "BitImageProcessor", "BlipImageProcessor"}
    assert set(kinds) == {b + s for b in bases for s in ("", "Fast", "Pil")}
    for kind in kinds:
        ImagePreprocessor.from_hf_config({"image_processor_type": kind})  # each is accepted
        base = kind.removesuffix("Fast").removesuffix("Pil")
        assert hasattr(transformers, base + "Pil"), kind  # a real transformers class
    with pytest.raises(ValueError) as err:
        ImagePreprocessor.from_hf_config({"image_processor_type": "ViTImageProcessor"})
    assert all(kind in str(err.value) for kind in kinds)


@pytest.mark.parametrize(
    "d, words",
    [
        ({"feature_extractor_type": "ViTFeatureExtractor"},
         ["unsupported feature_extractor_type 'ViTFeatureExtractor'", "SiglipImageProcessor"]),
        ({**SIGLIP_SO400M, "size": 384}, ["fixed size"]),  # int size = shortest_edge, no crop
        ({**SIGLIP_SO400M, "do_center_crop": True}, ["do_center_crop needs crop_size"]),
        ({**SIGLIP_SO400M, "do_pad": True, "pad_size": [400, 400]},
         ["do_pad with pad_size", "(384, 384)", "pad_size null"]),
        ({**DINOV2_BASE, "do_pad": True, "pad_size": {"shortest_edge": 3}},
         ["unsupported pad_size"]),
        ({**DINOV2_BASE, "resample": None}, ["do_resize needs resample"]),
    ],
)
def test_siglip_bit_rejects(d, words):
    with pytest.raises(ValueError) as err:
        ImagePreprocessor.from_hf_config(d)
    for word in words:
        assert word in str(err.value)


def test_parallel_map_keeps_order_spreads_work_and_raises_the_first_error(monkeypatch):
    import os
    import threading

    from vlmdeploy.runtime import images as images_mod

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # two cores, whatever the host has
    barrier = threading.Barrier(2, timeout=10)  # both items must be in flight at once, else this times out

    def work(x):
        barrier.wait()
        return x * 10, threading.current_thread().name

    out = images_mod.parallel_map(work, [1, 2])
    assert [v for v, _ in out] == [10, 20] and all(n.startswith("vlmdeploy-preprocess") for _, n in out)
    # nested: a call from a pool thread runs in that thread (no waits on a pool it occupies)
    nested = images_mod.parallel_map(lambda x: images_mod.parallel_map(lambda y: y + x, [1, 2, 3]), list(range(6)))
    assert nested == [[1 + x, 2 + x, 3 + x] for x in range(6)]

    def fail(x):
        if x in (3, 5):
            raise ValueError(f"bad item {x}")
        return x

    with pytest.raises(ValueError, match="bad item 3"):
        images_mod.parallel_map(fail, list(range(8)))
    assert images_mod.parallel_map(str, [7]) == ["7"]


def test_value_table_normalization_equals_hf_arithmetic_for_every_byte():
    """The per-channel table of 256 values is HF's rescale (float64 -> float32) and normalize (float32)."""
    pre = ImagePreprocessor(shortest_edge=4, crop_size=(4, 4), image_mean=(0.1, 0.5, 0.9), image_std=(0.3, 0.2, 0.7))
    pixels = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)  # every value in every channel
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    want = ((x - np.asarray(pre.image_mean, np.float32)) / np.asarray(pre.image_std, np.float32)).transpose(2, 0, 1)
    assert np.array_equal(pre._normalized(pixels), want)
