"""runtime/idefics2.py against transformers 5.24's Idefics2 processor and vision embeddings.

Images: bit for bit against ``Idefics2ImageProcessorPil`` (pixel_values, pixel_attention_mask), one image and
a batch of differently sized images. Prompt text: a whole tiny Idefics2Processor gives the token ids our
expansion tokenizes to. Patch inputs: a tiny Idefics2Model's own get_image_features, its position embedding
made the identity, reports the patch mask and position ids it computed, and the mask it hands the perceiver.
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.idefics2 import (
    Idefics2Params,
    expand_prompt,
    image_prompt,
    pad_images,
    patch_inputs,
    preprocess_image,
    resized_size,
)
from vlmdeploy.runtime.images import ImageError

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import Idefics2Config, Idefics2ImageProcessorPil, Idefics2Processor  # noqa: E402
from transformers.models.idefics2 import image_processing_pil_idefics2 as hf_mod  # noqa: E402
from transformers.models.idefics2.modeling_idefics2 import (  # noqa: E402
    Idefics2ForConditionalGeneration,
    Idefics2Model,
)


from conftest import preprocess_photos  # noqa: E402

PHOTOS = preprocess_photos(wide=(1000, 61), tall=(91, 1200))
TINY = {"size": {"shortest_edge": 14, "longest_edge": 42}, "do_image_splitting": True}
CONFIGS = {
    "default": {},  # 378..980, BILINEAR, no splitting
    "split": {"do_image_splitting": True},
    "tiny": TINY,
    "tiny-bicubic-clip": {**TINY, "resample": 3, "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]},
    "tiny-no-split": {**TINY, "do_image_splitting": False},
    "tiny-no-resize": {**TINY, "do_resize": False},
}


def _assert_same(ours, want):
    want = np.asarray(want)
    assert ours.dtype == want.dtype and ours.shape == want.shape, (ours.dtype, want.dtype, ours.shape, want.shape)
    assert np.abs(ours.astype(np.float64) - want).max() == 0


# ---------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_image_equals_hf(name, config):
    hf = Idefics2ImageProcessorPil(**CONFIGS[config])
    p = Idefics2Params.from_hf(hf.to_dict())
    want = hf(PHOTOS[name], return_tensors="np")
    ours = preprocess_image(PHOTOS[name], p)
    _assert_same(ours.pixels, want["pixel_values"][0])
    _assert_same(ours.pixel_mask, want["pixel_attention_mask"][0])
    sizes = p.crop_sizes(PHOTOS[name].size[::-1])
    assert len(ours.pixels) == len(sizes) == p.num_crops
    assert [tuple(np.argwhere(m).max(0) + 1) for m in ours.pixel_mask] == sizes


def test_crops_of_one_image_are_padded_to_the_largest():
    """Split crops of a small image are raised to shortest_edge on their own; the whole image is not square:
    the quarters are padded (mask 0) to the whole's width."""
    p = Idefics2Params(do_image_splitting=True)
    ours = preprocess_image(PHOTOS["chelsea"], p)
    assert p.crop_sizes((300, 451)) == [(378, 378)] * 4 + [(378, 451)]
    assert ours.pixels.shape == (5, 3, 378, 451) and not ours.pixel_mask[0, :, 378:].any()


def test_batch_padding_equals_hf():
    """Different sizes in one call: every crop padded to the batch's largest H and W; the shorter prompt's
    missing images are all zeros (the model drops them)."""
    hf = Idefics2ImageProcessorPil(**TINY)
    p = Idefics2Params.from_hf(hf.to_dict())
    a, b, c = PHOTOS["wide"], PHOTOS["tall"], PHOTOS["tiny"]
    want = hf([[a, b], [c]], return_tensors="np")
    pixels, masks = pad_images([preprocess_image(im, p) for im in (a, b, c)])
    assert pixels.shape[0] == 15 and want["pixel_values"].shape[:2] == (2, 10)
    _assert_same(pixels[:10], want["pixel_values"][0])
    _assert_same(masks[:10], want["pixel_attention_mask"][0])
    _assert_same(pixels[10:], want["pixel_values"][1, :5])
    _assert_same(masks[10:], want["pixel_attention_mask"][1, :5])
    assert not want["pixel_values"][1, 5:].any() and not want["pixel_attention_mask"][1, 5:].any()
    assert (masks.sum((1, 2)) < masks[0].size).any()  # something was padded


def test_batch_padding_unsplit_equals_hf():
    hf = Idefics2ImageProcessorPil()
    p = Idefics2Params.from_hf(hf.to_dict())
    images = [PHOTOS["chelsea"], PHOTOS["portrait"], PHOTOS["wide"]]
    want = hf([[im] for im in images], return_tensors="np")
    pixels, masks = pad_images([preprocess_image(im, p) for im in images])
    _assert_same(pixels, want["pixel_values"][:, 0])
    _assert_same(masks, want["pixel_attention_mask"][:, 0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_image_modes_equal_hf(mode):
    image = PHOTOS["chelsea"].resize((57, 41)).convert("L" if mode == "I;16" else mode)
    if mode == "RGBA":  # real transparency: HF composites onto white
        alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
        image.putalpha(Image.fromarray(alpha))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    hf = Idefics2ImageProcessorPil(**TINY)
    ours = preprocess_image(image, Idefics2Params.from_hf(hf.to_dict()))
    want = hf(image, return_tensors="np")
    _assert_same(ours.pixels, want["pixel_values"][0])
    _assert_same(ours.pixel_mask, want["pixel_attention_mask"][0])


@pytest.mark.parametrize("edges", [(378, 980), (14, 42), (1, 5000), (500, 500)])
def test_resized_size_equals_hf(edges):
    from transformers.image_utils import SizeDict

    rng = np.random.default_rng(sum(edges))
    sides = np.concatenate([np.arange(1, 30), rng.integers(1, 6000, 300)])
    size = SizeDict(shortest_edge=edges[0], longest_edge=edges[1])
    for h, w in zip(sides, rng.permutation(sides)):
        want = hf_mod.get_resize_output_image_size(np.zeros((3, h, w), np.uint8), size)
        assert resized_size((int(h), int(w)), *edges) == want


# ---------------------------------------------------------------------------------------------
# The prompt text: a whole tiny processor


SPECIALS = ("<image>", "<pad>", "<fake_token_around_image>", "<end_of_utterance>")
TEXTS = [
    "User:<image>What is this?<end_of_utterance>\nAssistant:",
    "a <image><image>\nb<image> c",  # consecutive images share a fake token
    "<image>x<fake_token_around_image><fake_token_around_image>y <image>",  # fakes the user wrote
    "no image here",
]


def _tiny_processor(split):
    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    ip = Idefics2ImageProcessorPil(size={"shortest_edge": 14, "longest_edge": 42}, do_image_splitting=split)
    return Idefics2Processor(ip, build_tiny_tokenizer(400, specials=SPECIALS), image_seq_len=4)


@pytest.mark.parametrize("split", [False, True])
def test_tiny_processor_prompt_equals_ours(split):
    proc = _tiny_processor(split)
    d = proc.to_dict()
    p = Idefics2Params.from_hf(d["image_processor"], d)
    assert p.image_seq_len == 4 and p.num_crops == (5 if split else 1)
    images = [[PHOTOS["chelsea"]], [PHOTOS["tiny"], PHOTOS["tall"], PHOTOS["wide"]], [PHOTOS["portrait"]] * 2, []]
    out = proc(text=TEXTS, images=images, return_tensors="np", padding=True)
    want = proc.tokenizer([expand_prompt(t, p) for t in TEXTS], return_tensors="np", padding=True)
    assert np.array_equal(out["input_ids"], want["input_ids"])
    assert np.array_equal(out["attention_mask"], want["attention_mask"])
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert (out["input_ids"] == image_id).sum() == 6 * p.image_token_count()


def test_expand_prompt_text():
    p = Idefics2Params(image_seq_len=2, do_image_splitting=True)
    f, i = "<fake_token_around_image>", "<image>"
    assert image_prompt(2, p) == f"{f}{i}{i}{f}{i}{i}{f}"
    assert expand_prompt("x<image>y", p) == f"x{image_prompt(5, p)} y"  # a space before text
    assert expand_prompt("<image><image>", p) == image_prompt(10, p)  # one fake between the two images
    assert expand_prompt("<image>\n<image><s>", p) == f"{image_prompt(5, p)}\n{image_prompt(5, p)}<s>"
    with pytest.raises(ValueError, match="n_crops must be a positive integer"):
        image_prompt(0, p)


def test_tiny_model_takes_our_prompt_and_pixels():
    """The tiny recipe (config below + tiny processor) is consistent: the model accepts our expanded prompt
    with our padded pixels and masks (its placeholder count check)."""
    proc = _tiny_processor(True)
    config = _tiny_config(image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"))
    d = proc.to_dict()
    p = Idefics2Params.from_hf(d["image_processor"], d, config.to_dict())
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(config).eval()
    images = [PHOTOS["chelsea"], PHOTOS["tall"]]
    ids = proc.tokenizer([expand_prompt("x<image>y<image>", p)], return_tensors="pt")
    pixels, masks = pad_images([preprocess_image(im, p) for im in images])
    with torch.no_grad():
        logits = model(**ids, pixel_values=torch.from_numpy(pixels)[None],
                       pixel_attention_mask=torch.from_numpy(masks)[None]).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 400)


# ---------------------------------------------------------------------------------------------
# Patch inputs: a tiny Idefics2Model's own get_image_features


def _tiny_config(image_size=28, patch_size=7, image_token_id=398):
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": patch_size}
    perceiver = {"hidden_size": 32, "rms_norm_eps": 1e-5, "resampler_n_latents": 4, "resampler_depth": 1,
                 "resampler_n_heads": 2, "resampler_head_dim": 8, "num_key_value_heads": 1}
    text = {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 400, "rms_norm_eps": 1e-5}
    return Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                          image_token_id=image_token_id)


class _Seen(Exception):
    pass


def _hf_patch_inputs(pixel_mask, pixels=None, image_size=28, patch_size=7):
    """(patch mask, position ids, the perceiver's attention_mask) HF computes inside get_image_features, read
    off the embeddings (patch embedding zeroed, position embedding row i = (i, 0, ...)) and the connector."""
    torch.manual_seed(0)
    model = Idefics2Model(_tiny_config(image_size, patch_size)).eval()
    emb = model.vision_model.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.zero_()
        emb.position_embedding.weight[:, 0] = torch.arange(emb.num_positions, dtype=torch.float32)
    seen = {}

    def on_embeddings(module, args, kwargs, output):
        seen["mask"], seen["ids"] = kwargs["patch_attention_mask"], output[..., 0]

    def on_connector(module, args, kwargs):
        seen["perceiver_mask"] = kwargs["attention_mask"]
        raise _Seen

    emb.register_forward_hook(on_embeddings, with_kwargs=True)
    model.connector.register_forward_pre_hook(on_connector, with_kwargs=True)
    n, h, w = pixel_mask.shape
    pixels = torch.ones(1, n, 3, h, w) if pixels is None else torch.as_tensor(pixels)[None]
    with torch.no_grad(), pytest.raises(_Seen):
        model.get_image_features(pixels, pixel_attention_mask=torch.as_tensor(pixel_mask)[None])
    return (seen["mask"].reshape(len(seen["mask"]), -1).numpy(), seen["ids"].round().long().numpy(),
            seen["perceiver_mask"].numpy())


def _masks(h, w, boxes):
    masks = np.zeros((len(boxes), h, w), np.int64)
    for m, (bh, bw) in zip(masks, boxes):
        m[:bh, :bw] = 1
    return masks


@pytest.mark.parametrize("h, w, boxes", [
    (28, 28, [(28, 28), (14, 28), (28, 7), (6, 6), (15, 22)]),  # full, padded, partial patches are off
    (56, 42, [(56, 42), (30, 41), (7, 42), (55, 8)]),  # larger than the tower's image: buckets cap
    (31, 26, [(31, 26), (20, 26), (9, 13)]),  # remainder rows and columns dropped, as unfold
    (70, 70, [(70, 70), (63, 35), (13, 69)]),  # 10x10 patches onto 4x4 buckets
])
def test_patch_inputs_equal_hf(h, w, boxes):
    masks = _masks(h, w, boxes)
    want_mask, want_ids, want_perceiver = _hf_patch_inputs(masks)
    patch_mask, ids = patch_inputs(masks, 7, 4)
    assert patch_mask.dtype == bool and ids.dtype == np.int64
    assert np.array_equal(patch_mask, want_mask) and np.array_equal(ids, want_ids)
    assert np.array_equal(patch_mask, want_perceiver)  # the perceiver gets the same flattened mask
    assert (ids[~patch_mask] == 0).all()


def test_partial_patches_are_off_unlike_idefics3():
    from vlmdeploy.runtime.idefics3 import patch_positions

    masks = _masks(28, 28, [(15, 22)])  # 2 full patch rows, 3 full columns; 3 x 4 touched
    assert patch_inputs(masks, 7, 4)[0].sum() == 6 and patch_positions(masks, 7, 4)[0].sum() == 12


def test_hf_drops_all_zero_images():
    """real_images_inds: an image whose pixels are all 0.0 is removed with its mask before the vision tower
    (a prompt-padding image, or any real image that normalizes to exact zeros)."""
    masks = _masks(28, 28, [(28, 28), (28, 28), (14, 21)])
    pixels = np.ones((3, 3, 28, 28), np.float32)
    pixels[1] = 0.0
    want_mask, want_ids, _ = _hf_patch_inputs(masks, pixels)
    patch_mask, ids = patch_inputs(masks[[0, 2]], 7, 4)
    assert len(want_mask) == 2 and np.array_equal(patch_mask, want_mask) and np.array_equal(ids, want_ids)


def test_patch_inputs_for_real_images():
    """Our preprocessed, padded photos through HF's own computation."""
    p = Idefics2Params.from_hf(Idefics2ImageProcessorPil(**TINY).to_dict())
    pixels, masks = pad_images([preprocess_image(PHOTOS[k], p) for k in ("wide", "tall")])
    want_mask, want_ids, _ = _hf_patch_inputs(masks, pixels)
    patch_mask, ids = patch_inputs(masks, 7, 4)
    assert np.array_equal(patch_mask, want_mask) and np.array_equal(ids, want_ids)
    assert not patch_mask.all()


def test_patch_inputs_for_a_real_geometry():
    """idefics2-8b: 980-pixel tower of 14-pixel patches (70 buckets a side), images 378..980 a side padded to
    the batch's largest: positions spread each image over all 70 buckets."""
    masks = _masks(980, 742, [(378, 378), (378, 742), (980, 640)])
    want_mask, want_ids, _ = _hf_patch_inputs(masks, image_size=980, patch_size=14)
    patch_mask, ids = patch_inputs(masks, 14, 70)
    assert np.array_equal(patch_mask, want_mask) and np.array_equal(ids, want_ids)
    assert list(ids[0, :3]) == [0, 2, 5]  # a 27 x 27 image spread over 70 buckets: k * 70 // 27, not k


def test_no_pad_single_image_equals_hf():
    """do_pad off: HF returns no pixel_attention_mask (the model then takes every pixel); the pixels are ours."""
    hf = Idefics2ImageProcessorPil(do_pad=False)
    want = hf(PHOTOS["portrait"], return_tensors="np")
    ours = preprocess_image(PHOTOS["portrait"], Idefics2Params.from_hf(hf.to_dict()))
    assert "pixel_attention_mask" not in want and ours.pixel_mask.all()
    _assert_same(ours.pixels, want["pixel_values"][0])


# ---------------------------------------------------------------------------------------------
# Configs and errors


def test_from_hf_checks_the_model_config():
    ip = Idefics2ImageProcessorPil(**TINY).to_dict()
    config = _tiny_config().to_dict()  # 4 perceiver latents, 7-pixel patches
    assert Idefics2Params.from_hf(ip, {"image_seq_len": 4}, config).image_seq_len == 4
    with pytest.raises(ValueError, match="image_seq_len=64 but the perceiver makes 4 tokens"):
        Idefics2Params.from_hf(ip, {}, config)
    small = {**ip, "size": {"shortest_edge": 5, "longest_edge": 42}}
    with pytest.raises(ValueError, match="shortest_edge=5 is below the vision patch_size 7"):
        Idefics2Params.from_hf(small, {"image_seq_len": 4}, config)


def test_params_round_trip_and_defaults():
    p = Idefics2Params()
    assert (p.shortest_edge, p.longest_edge, p.resample, p.image_seq_len) == (378, 980, 2, 64)
    assert (p.do_image_splitting, p.do_pad) == (False, True)
    assert Idefics2Params.from_dict(p.to_dict()) == p
    assert Idefics2Params.from_hf(Idefics2ImageProcessorPil().to_dict()) == p
    assert Idefics2Params.from_hf({"image_processor_type": "Idefics2ImageProcessorFast"}) == p


@pytest.mark.parametrize("make, match", [
    (lambda: Idefics2Params(shortest_edge=0), "shortest_edge must be a positive integer"),
    (lambda: Idefics2Params(shortest_edge=500, longest_edge=400), "must not exceed longest_edge"),
    (lambda: Idefics2Params(resample=9), "resample must be a PIL code"),
    (lambda: Idefics2Params(do_pad=1), "do_pad must be true or false"),
    (lambda: Idefics2Params(image_std=(0.5, 0.0, 0.5)), "image_std must not contain 0"),
    (lambda: Idefics2Params(fake_image_token=""), "fake_image_token must be a non-empty string"),
    (lambda: Idefics2Params.from_dict({"tile": 3}), "unknown Idefics2Params keys \\['tile'\\]"),
    (lambda: Idefics2Params.from_hf({"image_processor_type": "Idefics3ImageProcessor"}), "is not Idefics2's"),
    (lambda: Idefics2Params.from_hf({"size": {"longest_edge": 980}}), "size must be"),
])
def test_param_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_image_errors():
    p = Idefics2Params(do_image_splitting=True)
    with pytest.raises(ImageError, match="expected a PIL.Image.Image"):
        preprocess_image(np.zeros((28, 28, 3), np.uint8), p)
    with pytest.raises(ImageError, match="do_convert_rgb is off"):
        preprocess_image(PHOTOS["tiny"].convert("L"), Idefics2Params(do_convert_rgb=False))
    with pytest.raises(ImageError, match="cannot be split into 4 crops"):
        preprocess_image(PHOTOS["tiny"].resize((1, 9)), p)
    with pytest.raises(ValueError, match="non-empty list of Idefics2Image"):
        pad_images([])
    with pytest.raises(ValueError, match="smaller than one 7-pixel patch"):
        patch_inputs(np.ones((1, 5, 28), np.int64), 7, 4)


def test_idefics2_does_not_import_torch_or_transformers():
    code = ("import sys, vlmdeploy.runtime.idefics2\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
