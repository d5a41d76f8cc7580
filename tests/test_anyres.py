"""runtime/anyres.py against transformers' LLaVA-NeXT image processor (PIL backend), processor
and model (tiny, seeded random weights)."""

import functools
import json

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime import anyres
from vlmdeploy.runtime.anyres import AnyresParams
from vlmdeploy.runtime.images import ImageError

skdata = pytest.importorskip("skimage.data")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
# The PIL class is what `LlavaNextImageProcessor` resolves to without torchvision; naming it keeps
# the reference the same when torchvision is present.
from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor  # noqa: E402
from transformers.image_processing_utils import select_best_resolution as hf_select  # noqa: E402

from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

SMALL_PINPOINTS = [[28, 56], [56, 28], [56, 56], [28, 84], [84, 28]]
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# name -> (tile side, patch size, pinpoints)
SETTINGS = {"small": (28, 14, SMALL_PINPOINTS), "llava-v1.6": (336, 14, V16_PINPOINTS)}
PROCESSOR_FIELDS = {"patch_size": 14, "vision_feature_select_strategy": "default",
                    "num_additional_image_tokens": 1}


# ---------------------------------------------------------------------------------------------
# Images and HF objects


@functools.lru_cache(maxsize=None)
def _photos():
    chelsea = Image.fromarray(skdata.chelsea())  # 451x300 (w x h)
    astronaut = Image.fromarray(skdata.astronaut())  # 512x512
    coffee = Image.fromarray(skdata.coffee())  # 600x400
    a = np.asarray(astronaut)
    alpha = np.tile(np.linspace(0, 255, a.shape[1]).astype(np.uint8), (a.shape[0], 1))
    return {
        "chelsea": chelsea,
        "astronaut": astronaut,
        "coffee": coffee,
        "very_wide": coffee.resize((900, 120)),
        "very_tall": chelsea.resize((90, 700)),
        "tiny_20x13": chelsea.resize((20, 13)),
        "tiny_13x20": chelsea.resize((13, 20)),
        "odd_crop": astronaut.crop((17, 40, 350, 251)),  # 333x211
        "RGBA": Image.fromarray(np.dstack([a, alpha]), "RGBA"),
        "L": chelsea.convert("L"),
    }


@functools.lru_cache(maxsize=None)
def _tokenizer():
    return build_tiny_tokenizer(256)


def _image_processor(setting):
    side, _, pinpoints = SETTINGS[setting]
    return LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                      image_grid_pinpoints=pinpoints)


@functools.lru_cache(maxsize=None)
def _hf(setting):
    """(image processor, processor, our params from its saved dicts)."""
    side, patch, pinpoints = SETTINGS[setting]
    ip = _image_processor(setting)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=_tokenizer(), **PROCESSOR_FIELDS)
    model_config = {"image_grid_pinpoints": pinpoints, "vision_config": {"image_size": side, "patch_size": patch}}
    return ip, proc, AnyresParams.from_hf(ip.to_dict(), PROCESSOR_FIELDS, model_config)


def _hf_token_count(proc, images):
    ids = proc(text="<image>" * len(images), images=images, return_tensors="np")["input_ids"]
    return int((ids == proc.image_token_id).sum())


# ---------------------------------------------------------------------------------------------
# Preprocessing


@pytest.mark.parametrize("setting", SETTINGS)
def test_preprocess_equals_hf_exactly(setting):
    ip, _, p = _hf(setting)
    photos = _photos()
    batch = ip(list(photos.values()), return_tensors="np")  # tile axis padded to the batch max
    for i, (name, image) in enumerate(photos.items()):
        pixel_values, image_size = anyres.preprocess(image, p)
        n = len(pixel_values)
        assert pixel_values.dtype == np.float32, name
        assert n == anyres.num_tiles(image_size, p), name
        assert image_size == tuple(int(x) for x in batch["image_sizes"][i]), name
        assert np.array_equal(pixel_values, batch["pixel_values"][i][:n]), name
        assert not batch["pixel_values"][i][n:].any(), name  # HF's batch padding is all zeros


def test_preprocess_single_image_has_no_padding():
    ip, _, p = _hf("llava-v1.6")
    image = _photos()["very_wide"]
    hf = ip(image, return_tensors="np")["pixel_values"][0]
    ours, size = anyres.preprocess(image, p)
    assert size == (120, 900)
    assert ours.shape == hf.shape == (4, 3, 336, 336)  # base + a 1x3 grid (336x1008)
    assert np.array_equal(ours, hf)


def test_select_best_resolution_equals_hf():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    sizes += [(336, 672), (672, 336), (1344, 1344), (1, 1), (1008, 336), (500, 1000)]  # exact fits, ties
    for pinpoints in (SMALL_PINPOINTS, V16_PINPOINTS):
        for size in sizes:
            assert anyres.select_best_resolution(size, pinpoints) == tuple(hf_select(size, pinpoints)), size


def test_preprocess_rejects_bad_input():
    _, _, p = _hf("small")
    with pytest.raises(ImageError, match="PIL"):
        anyres.preprocess(np.zeros((4, 4, 3), np.uint8), p)
    with pytest.raises(ImageError, match="empty"):
        anyres.preprocess(Image.new("RGB", (0, 5)), p)
    no_convert = AnyresParams.from_dict({**p.to_dict(), "do_convert_rgb": False})
    with pytest.raises(ImageError, match="mode 'L'"):
        anyres.preprocess(_photos()["L"], no_convert)


# ---------------------------------------------------------------------------------------------
# Token counts


@pytest.mark.parametrize("setting", SETTINGS)
def test_num_image_tokens_equals_processor(setting):
    _, proc, p = _hf(setting)
    counts = {}
    for name, image in _photos().items():
        size = (image.height, image.width)
        counts[name] = anyres.num_image_tokens(size, p)
        assert counts[name] == _hf_token_count(proc, [image]), name
    two = [_photos()["chelsea"], _photos()["very_tall"]]  # one prompt, two images
    assert counts["chelsea"] + counts["very_tall"] == _hf_token_count(proc, two)


def test_num_image_tokens_1344_square_llava_v16():
    """5 tiles x 576 = 2,880 features before unpadding; a square image needs no unpadding, and
    the 2x2 grid is 48x48 features + 48 newlines: 576 + 2,304 + 48 = 2,928."""
    _, proc, p = _hf("llava-v1.6")
    image = _photos()["astronaut"].resize((1344, 1344))
    assert anyres.num_tiles((1344, 1344), p) * p.tokens_per_tile == 2880
    assert anyres.num_image_tokens((1344, 1344), p) == 2928 == _hf_token_count(proc, [image])


# ---------------------------------------------------------------------------------------------
# Feature packing against a tiny LlavaNextForConditionalGeneration

TINY_SIDE, TINY_PATCH = 56, 14  # 4x4 tokens per tile: unpadding crops whole feature rows
TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112], [56, 168], [168, 56]]


@functools.lru_cache(maxsize=None)
def _tiny_model():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(image_size=TINY_SIDE, patch_size=TINY_PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=256)
    image_token = _tokenizer().convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=TINY_PINPOINTS,
                             image_token_index=image_token)
    model = LlavaNextForConditionalGeneration(config).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": TINY_SIDE},
                                    crop_size={"height": TINY_SIDE, "width": TINY_SIDE},
                                    image_grid_pinpoints=TINY_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=_tokenizer(), **PROCESSOR_FIELDS)
    params = AnyresParams.from_hf(ip.to_dict(), PROCESSOR_FIELDS, config.to_dict())
    return model, proc, params


def test_pack_features_equals_model(monkeypatch):
    model, proc, p = _tiny_model()
    images = [_photos()["chelsea"], _photos()["very_tall"]]  # unpadded along rows / along columns
    inputs = proc(text="<image> a<image> b", images=images, return_tensors="pt")
    captured = []
    original = model.model.pack_image_features

    def spy(image_features, image_sizes, **kwargs):  # per-image [tiles, T, C] projector output
        captured.extend(f.detach().clone() for f in image_features)
        return original(image_features, image_sizes, **kwargs)

    monkeypatch.setattr(model.model, "pack_image_features", spy)
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
        model(**inputs)  # HF itself checks its token count against the features
    newline = model.model.image_newline.detach().numpy()
    for image, feats, hf in zip(images, captured, packed):
        size = (image.height, image.width)
        ours = anyres.pack_features(feats.numpy(), size, p, newline)
        assert ours.shape == (anyres.num_image_tokens(size, p), 32) == tuple(hf.shape)
        assert np.abs(ours - hf.numpy()).max() <= 1e-6


def test_pack_features_from_our_pixels_equals_model():
    """Our pixel_values through HF's vision tower + projector + packing == our packing of the
    same features: the tile order and sizes line up end to end."""
    model, _, p = _tiny_model()
    image = _photos()["coffee"]
    pixel_values, size = anyres.preprocess(image, p)
    with torch.no_grad():
        hf = model.model.get_image_features(torch.from_numpy(pixel_values)[None], torch.tensor([size]))
        hidden = model.model.vision_tower(torch.from_numpy(pixel_values), output_hidden_states=True)
        feats = model.model.multi_modal_projector(hidden.hidden_states[-2][:, 1:])  # "default", layer -2
    ours = anyres.pack_features(feats.numpy(), size, p, model.model.image_newline.detach().numpy())
    assert np.abs(ours - hf.pooler_output[0].numpy()).max() <= 1e-6


def test_pack_features_rejects_wrong_shape():
    _, _, p = _tiny_model()
    size = (300, 451)
    n = anyres.num_tiles(size, p)
    with pytest.raises(ValueError, match="must be"):
        anyres.pack_features(np.zeros((n, 17, 8), np.float32), size, p, np.zeros(8, np.float32))  # CLS kept
    with pytest.raises(ValueError, match="must be"):
        anyres.pack_features(np.zeros((n + 1, 16, 8), np.float32), size, p, np.zeros(8, np.float32))


# ---------------------------------------------------------------------------------------------
# Configs


def _saved(tmp_path, setting):
    """The dicts save_pretrained writes for our processor + a LlavaNextConfig."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    side, patch, pinpoints = SETTINGS[setting]
    _, proc, _ = _hf(setting)
    proc.save_pretrained(tmp_path)
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=side, patch_size=patch),
                             image_grid_pinpoints=pinpoints, image_token_index=254)
    config.save_pretrained(tmp_path)
    return json.loads((tmp_path / "processor_config.json").read_text()), json.loads(
        (tmp_path / "config.json").read_text())


@pytest.mark.parametrize("setting", SETTINGS)
def test_from_hf_round_trip(tmp_path, setting):
    processor, config = _saved(tmp_path, setting)
    p = AnyresParams.from_hf(None, processor, config)  # 5.x: image processor nested
    assert p == AnyresParams.from_dict({**_hf(setting)[2].to_dict(), "image_token_index": 254})
    assert AnyresParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    # 4.x layout: preprocessor_config.json beside a processor_config.json without it
    legacy = {k: v for k, v in processor.items() if k != "image_processor"}
    assert AnyresParams.from_hf(processor["image_processor"], legacy, config) == p
    side = SETTINGS[setting][0]
    assert (p.crop_size, p.shortest_edge, p.patch_size, p.tokens_per_tile) == ((side, side), side, 14,
                                                                              (side // 14) ** 2)


def test_from_hf_applies_hf_class_defaults():
    """Absent keys take LlavaNextImageProcessor's / LlavaNextConfig's class defaults."""
    ip_dict = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    p = AnyresParams.from_hf(ip_dict, {"patch_size": 14}, {})  # LlavaNextConfig(): CLIP-L/14-336
    hf = LlavaNextImageProcessorPil(**ip_dict)
    assert p.grid_pinpoints == tuple(map(tuple, hf.image_grid_pinpoints))
    assert (p.image_mean, p.image_std) == (tuple(hf.image_mean), tuple(hf.image_std))
    assert (p.resample, p.rescale_factor, p.do_pad) == (int(hf.resample), hf.rescale_factor, hf.do_pad)
    assert (p.vision_feature_select_strategy, p.vision_feature_layer, p.image_token_index) == ("default", -2, 32000)
    assert p == AnyresParams()  # the llava-v1.6 values


@pytest.mark.parametrize("processor, model, match", [
    ({"patch_size": 14, "vision_feature_select_strategy": "default"}, {}, "num_additional_image_tokens=0"),
    ({"patch_size": 14, "num_additional_image_tokens": 1}, {}, "num_additional_image_tokens=1"),
    ({"patch_size": 16}, {}, "patch_size"),
    ({}, {"image_grid_pinpoints": [[336, 672]]}, "differ"),
    ({}, {"vision_config": {"image_size": 224, "patch_size": 14}}, "vision tower takes 224"),
])
def test_from_hf_rejects_what_hf_model_cannot_run(processor, model, match):
    ip_dict = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    with pytest.raises(ValueError, match=match):
        AnyresParams.from_hf(ip_dict, processor, model)


def test_hf_processor_default_strategy_without_extra_token_is_off_by_one():
    """Why from_hf rejects strategy "default" with num_additional_image_tokens=0: HF's processor
    then expands one <image> into one token fewer than the model's features."""
    _, proc, p = _hf("llava-v1.6")
    off = LlavaNextProcessor(image_processor=proc.image_processor, tokenizer=_tokenizer(), patch_size=14,
                             vision_feature_select_strategy="default")
    image = _photos()["chelsea"]
    assert _hf_token_count(off, [image]) == anyres.num_image_tokens((300, 451), p) - 1


def test_params_validation():
    with pytest.raises(ValueError, match="multiples of the tile side"):
        AnyresParams(grid_pinpoints=((336, 500),))
    with pytest.raises(ValueError, match="square"):
        AnyresParams(crop_size=(336, 224))
    with pytest.raises(ValueError, match="unknown"):
        AnyresParams.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="strategy"):
        AnyresParams(vision_feature_select_strategy="cls")


def test_module_is_torch_free():
    import subprocess
    import sys

    code = "import sys, vlmdeploy.runtime.anyres; print('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
