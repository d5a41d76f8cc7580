"""runtime/idefics3.py against transformers 5.24's Idefics3 / SmolVLM processors and vision embeddings.

Images: bit for bit against ``Idefics3ImageProcessorPil`` and ``SmolVLMImageProcessorPil`` (pixel_values,
pixel_attention_mask, rows/cols). Prompt text: whole tiny Idefics3Processor and SmolVLMProcessor (tiny
tokenizer with the row/col, global and fake tokens) give the token ids our expansion tokenizes to. Patch
positions: a tiny Idefics3Model's own get_image_features, with its position embedding made the identity,
reports the patch mask and position ids it computed from pixel masks with padding.
"""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.idefics3 import (
    Idefics3Params,
    image_prompt,
    longest_edge_size,
    patch_positions,
    preprocess_image,
    vision_encoder_size,
)
from vlmdeploy.runtime.images import ImageError

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers import (  # noqa: E402
    Idefics3Config,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    SmolVLMImageProcessorPil,
    SmolVLMProcessor,
)
from transformers.models.idefics3.modeling_idefics3 import Idefics3Model  # noqa: E402


from conftest import preprocess_photos  # noqa: E402

PHOTOS = preprocess_photos()
TINY = {"size": {"longest_edge": 84}, "max_image_size": {"longest_edge": 28}}  # up to 3x3 tiles of 28
CONFIGS = {
    "default": {},  # 1456 longest edge, 364-pixel tiles, LANCZOS
    "tiny": TINY,
    "tiny-bicubic-clip": {**TINY, "resample": 3, "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]},
    "tiny-odd-edge": {"size": {"longest_edge": 70}, "max_image_size": {"longest_edge": 28}},  # not a tile multiple
    "tiny-no-split": {**TINY, "do_image_splitting": False},
    "tiny-no-resize": {**TINY, "do_resize": False},
}
PROCESSORS = {"idefics3": Idefics3ImageProcessorPil, "smolvlm": SmolVLMImageProcessorPil}


def _assert_same(ours, want):
    want = np.asarray(want)
    assert ours.dtype == want.dtype and ours.shape == want.shape, (ours.dtype, want.dtype, ours.shape, want.shape)
    assert np.abs(ours.astype(np.float64) - want).max() == 0


def _check_image(ours, hf_out, sample, index, start=0):
    n = len(ours.pixels)
    _assert_same(ours.pixels, hf_out["pixel_values"][sample, start:start + n])
    _assert_same(ours.pixel_mask, hf_out["pixel_attention_mask"][sample, start:start + n])


# ---------------------------------------------------------------------------------------------
# Images


# The two classes are the same code: SmolVLM's is run on the defaults and the tiny geometry.
CASES = [("idefics3", c) for c in sorted(CONFIGS)] + [("smolvlm", "default"), ("smolvlm", "tiny")]


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("kind, config", CASES)
def test_image_equals_hf(kind, name, config):
    hf = PROCESSORS[kind](**CONFIGS[config])
    p = Idefics3Params.from_hf(hf.to_dict())
    want = hf(PHOTOS[name], return_tensors="np", return_row_col_info=True)
    ours = preprocess_image(PHOTOS[name], p)
    _check_image(ours, want, 0, 0)
    assert want["pixel_values"].shape[1] == len(ours.pixels) == p.num_tiles(PHOTOS[name].size[::-1])
    assert (want["rows"][0][0], want["cols"][0][0]) == ours.grid == p.grid(PHOTOS[name].size[::-1])


def test_batch_padding_adds_only_zero_images():
    """A prompt with fewer images than another's gets all-zero images and masks (the model drops them)."""
    hf = Idefics3ImageProcessorPil(**TINY)
    p = Idefics3Params.from_hf(hf.to_dict())
    a, b, c = PHOTOS["chelsea"], PHOTOS["tall"], PHOTOS["tiny"]
    want = hf([[a, b], [c]], return_tensors="np")
    ours = [preprocess_image(im, p) for im in (a, b, c)]
    _check_image(ours[0], want, 0, 0)
    _check_image(ours[1], want, 0, 1, start=len(ours[0].pixels))
    _check_image(ours[2], want, 1, 0)
    n = len(ours[2].pixels)
    assert want["pixel_values"].shape[1] == len(ours[0].pixels) + len(ours[1].pixels) > n
    assert not want["pixel_values"][1, n:].any() and not want["pixel_attention_mask"][1, n:].any()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_image_modes_equal_hf(mode):
    image = PHOTOS["chelsea"].resize((57, 41)).convert("L" if mode == "I;16" else mode)
    if mode == "RGBA":  # real transparency: HF composites onto white
        alpha = np.tile(np.linspace(0, 255, image.width, dtype=np.uint8), (image.height, 1))
        image.putalpha(Image.fromarray(alpha))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image).astype(np.uint16) * 200)
    hf = Idefics3ImageProcessorPil(**TINY)
    _check_image(preprocess_image(image, Idefics3Params.from_hf(hf.to_dict())), hf(image, return_tensors="np"), 0, 0)


# ---------------------------------------------------------------------------------------------
# Sizes and grids from (h, w): HF's own functions, and the pixels' grid


def _sizes(rng, count, high):
    sides = np.concatenate([np.arange(1, 30), rng.integers(1, high, count)])
    return [(int(h), int(w)) for h, w in zip(sides, rng.permutation(sides))] + [(1, 2000), (5000, 3), (364, 364)]


@pytest.mark.parametrize("edges", [(1456, 364), (2048, 512), (84, 28), (70, 28), (5000, 364)])
def test_sizes_equal_hf(edges):
    from transformers.models.idefics3 import image_processing_pil_idefics3 as hf_mod

    hf = Idefics3ImageProcessorPil(size={"longest_edge": edges[0]}, max_image_size={"longest_edge": edges[1]})
    p = Idefics3Params.from_hf(hf.to_dict())
    hf.resize = lambda image, size, **kw: np.empty((3, size.height, size.width), np.uint8)  # the size HF asks for
    for h, w in _sizes(np.random.default_rng(sum(edges)), 200, 6000):
        image = np.zeros((3, h, w), np.uint8)  # only its shape is read
        size = hf_mod.get_resize_output_image_size(image, resolution_max_side=edges[0])
        assert longest_edge_size((h, w), edges[0]) == size
        try:
            ve = vision_encoder_size(size, edges[1])
        except ImageError:
            continue  # a 1-pixel sliver: HF's resize would fail
        assert hf.resize_for_vision_encoder(np.zeros((3, *size), np.uint8), edges[1], resample=0).shape[1:] == ve
        split = ve[0] > edges[1] or ve[1] > edges[1]  # HF's split_images rule
        grid = (ve[0] // edges[1], ve[1] // edges[1]) if split else (0, 0)
        assert p.grid((h, w)) == grid and p.num_tiles((h, w)) == grid[0] * grid[1] + 1


@pytest.mark.parametrize("config", ["tiny", "tiny-odd-edge"])
def test_grid_follows_the_pixels_not_get_number_of_image_patches(config):
    """HF's get_number_of_image_patches (what _get_num_multimodal_tokens counts with) rounds the first
    resize's side up where the pixels round int(longest / aspect): with a longest edge that is not a tile
    multiple the two disagree. The prompt HF's processor writes follows the pixels; so does ours."""
    hf = Idefics3ImageProcessorPil(**CONFIGS[config])
    p = Idefics3Params.from_hf(hf.to_dict())
    sizes = [(h, w) for h in range(20, 120, 7) for w in range(20, 120, 9)]
    for size in sizes:
        out = hf(Image.fromarray(np.full((*size, 3), 128, np.uint8)), return_tensors="np", return_row_col_info=True)
        assert (out["rows"][0][0], out["cols"][0][0]) == p.grid(size)
    differs = [s for s in sizes if hf.get_number_of_image_patches(*s)[1:] != p.grid(s)]
    assert (len(differs) > 0) == (config == "tiny-odd-edge")  # e.g. 28x38: helper (2, 3), pixels (3, 3)


# ---------------------------------------------------------------------------------------------
# The prompt text: whole tiny processors


ROW_COL = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
SPECIALS = ("<image>", "<pad>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL)


def tiny_tokenizer():
    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(400, specials=SPECIALS)


@pytest.fixture(scope="module")
def tiny_processors():
    pytest.importorskip("num2words")  # SmolVLMProcessor refuses to start without it
    ip = {"size": {"longest_edge": 84}, "max_image_size": {"longest_edge": 28}}
    with pytest.MonkeyPatch.context() as mp:  # no torchvision: no video processor, so skip the class check
        mp.setattr(SmolVLMProcessor, "check_argument_for_proper_class", lambda *a, **k: None)
        yield {"idefics3": Idefics3Processor(Idefics3ImageProcessorPil(**ip), tiny_tokenizer(), image_seq_len=4),
               "smolvlm": SmolVLMProcessor(SmolVLMImageProcessorPil(**ip), tiny_tokenizer(), None, image_seq_len=4)}


def _expand(text, grids, p):
    parts = text.split(p.image_token)
    assert len(parts) == len(grids) + 1
    return parts[0] + "".join(image_prompt(*g, p) + rest for g, rest in zip(grids, parts[1:]))


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_tiny_processor_prompt_equals_ours(tiny_processors, kind):
    proc = tiny_processors[kind]
    d = proc.to_dict()
    p = Idefics3Params.from_hf(d["image_processor"], d)
    assert p.image_seq_len == 4 and p.tile == 28
    texts = ["User:<image>What is this?<end_of_utterance>\nAssistant:", "a <image> b <image>\nc"]
    images = [[PHOTOS["chelsea"]], [PHOTOS["tiny"], PHOTOS["tall"]]]
    out = proc(text=texts, images=images, return_tensors="np", padding=True)
    flat = [im for sample in images for im in sample]
    grids = [p.grid(im.size[::-1]) for im in flat]
    assert grids == [(2, 3), (2, 3), (3, 1)]
    tok = proc.tokenizer
    want = tok([_expand(texts[0], grids[:1], p), _expand(texts[1], grids[1:], p)], return_tensors="np", padding=True)
    assert np.array_equal(out["input_ids"], want["input_ids"])
    assert np.array_equal(out["attention_mask"], want["attention_mask"])
    image_id = tok.convert_tokens_to_ids("<image>")
    assert (out["input_ids"] == image_id).sum() == sum(p.image_token_count(im.size[::-1]) for im in flat)
    ours = [preprocess_image(im, p) for im in flat]
    _check_image(ours[0], out, 0, 0)
    _check_image(ours[1], out, 1, 0)
    _check_image(ours[2], out, 1, 1, start=len(ours[1].pixels))


def test_tiny_processor_unsplit_prompt(tiny_processors):
    proc = tiny_processors["idefics3"]
    p = Idefics3Params.from_hf(proc.to_dict()["image_processor"], proc.to_dict())
    out = proc(text=["x<image>y"], images=[[PHOTOS["chelsea"]]], do_image_splitting=False, return_tensors="np")
    assert np.array_equal(out["input_ids"], proc.tokenizer(["x" + image_prompt(0, 0, p) + "y"],
                                                          return_tensors="np")["input_ids"])


def test_image_prompt_text():
    p = Idefics3Params(image_seq_len=2)
    whole = "<fake_token_around_image><global-img><image><image><fake_token_around_image>"
    assert image_prompt(0, 0, p) == whole
    tile = "<fake_token_around_image><row_{}_col_{}><image><image>"
    assert image_prompt(2, 1, p) == tile.format(1, 1) + "\n" + tile.format(2, 1) + "\n\n" + whole
    with pytest.raises(ValueError, match="both 0"):
        image_prompt(0, 2, p)
    with pytest.raises(ValueError, match="rows must be an integer >= 0"):
        image_prompt(-1, 1, p)


# ---------------------------------------------------------------------------------------------
# Patch positions: a tiny Idefics3Model's own get_image_features


def _tiny_config(image_size=28, patch_size=7, cls=Idefics3Config, image_token_id=248):
    vision = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": image_size, "patch_size": patch_size}
    text = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 400}
    return cls(vision_config=vision, text_config=text, scale_factor=2, image_token_id=image_token_id)


@pytest.mark.parametrize("kind", ["idefics3", "smolvlm"])
def test_tiny_model_takes_our_prompt_and_pixels(tiny_processors, kind):
    """The tiny recipe (config above + tiny processor) is consistent: the model accepts our expanded prompt
    with our pixels and masks (its placeholder count check)."""
    from transformers import Idefics3ForConditionalGeneration, SmolVLMConfig, SmolVLMForConditionalGeneration

    proc = tiny_processors[kind]
    model_cls, config_cls = {"idefics3": (Idefics3ForConditionalGeneration, Idefics3Config),
                             "smolvlm": (SmolVLMForConditionalGeneration, SmolVLMConfig)}[kind]
    config = _tiny_config(cls=config_cls, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"))
    d = proc.to_dict()
    p = Idefics3Params.from_hf(d["image_processor"], d, config.to_dict())
    torch.manual_seed(0)
    model = model_cls(config).eval()
    images = [PHOTOS["chelsea"], PHOTOS["tiny"]]
    grids = [p.grid(im.size[::-1]) for im in images]
    ids = proc.tokenizer([_expand("x<image>y<image>", grids, p)], return_tensors="pt")
    ours = [preprocess_image(im, p) for im in images]
    pixels = torch.from_numpy(np.concatenate([o.pixels for o in ours]))[None]  # [1, tiles, 3, 28, 28]
    mask = torch.from_numpy(np.concatenate([o.pixel_mask for o in ours]))[None]
    with torch.no_grad():
        logits = model(**ids, pixel_values=pixels, pixel_attention_mask=mask).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 400)


def _hf_positions(pixel_mask, image_size=28, patch_size=7):
    """(patch_attention_mask, position_ids) HF computes inside get_image_features, read off the embeddings:
    patch embedding zeroed, position embedding row i = (i, 0, ...)."""
    torch.manual_seed(0)
    model = Idefics3Model(_tiny_config(image_size, patch_size)).eval()
    emb = model.vision_model.embeddings
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.zero_()
        emb.position_embedding.weight[:, 0] = torch.arange(emb.num_positions, dtype=torch.float32)
    seen = {}

    def hook(module, args, kwargs, output):
        seen["mask"], seen["ids"] = kwargs["patch_attention_mask"], output[..., 0]
        raise _Seen  # the rest (encoder, connector) is not needed, and the connector wants square maps

    emb.register_forward_hook(hook, with_kwargs=True)
    n, h, w = pixel_mask.shape
    pixels = torch.ones(1, n, 3, h, w)  # no all-zero image: none is dropped
    with torch.no_grad(), pytest.raises(_Seen):
        model.get_image_features(pixels, pixel_attention_mask=torch.as_tensor(pixel_mask)[None])
    return seen["mask"].numpy(), seen["ids"].round().long().numpy()


class _Seen(Exception):
    pass


def _masks(h, w, boxes):
    masks = np.zeros((len(boxes), h, w), np.int64)
    for m, (bh, bw) in zip(masks, boxes):
        m[:bh, :bw] = 1
    return masks


@pytest.mark.parametrize("h, w, boxes", [
    (28, 28, [(28, 28), (14, 28), (28, 7), (1, 1), (15, 22)]),  # full, padded bottom/right, partial patches
    (56, 42, [(56, 42), (30, 41), (7, 42), (55, 8)]),  # larger than the tower's image: buckets cap
    (31, 26, [(31, 26), (20, 26), (9, 3)]),  # remainder rows and columns dropped, as unfold
    (70, 70, [(70, 70), (63, 35), (13, 69)]),  # 10x10 patches onto 4x4 buckets
])
def test_patch_positions_equal_hf(h, w, boxes):
    masks = _masks(h, w, boxes)
    want_mask, want_ids = _hf_positions(masks)
    patch_mask, ids = patch_positions(masks, 7, 4)
    assert np.array_equal(patch_mask, want_mask) and ids.dtype == np.int64
    assert np.array_equal(ids, want_ids)
    assert (ids[~patch_mask.reshape(len(ids), -1)] == 0).all()


def test_full_tiles_are_not_always_arange_in_hf():
    """With 19 patches a side, HF's float32 buckets put some full-tile patches in their neighbour's bucket:
    position ids of a full tile are not 0..360. Ours are HF's (so the vision graph must take them as an input,
    not assume arange)."""
    masks = np.ones((1, 133, 133), np.int64)  # 19 x 19 patches of 7
    want_mask, want_ids = _hf_positions(masks, image_size=133, patch_size=7)
    _, ids = patch_positions(masks, 7, 19)
    assert np.array_equal(ids, want_ids) and not np.array_equal(ids[0], np.arange(19 * 19))


def test_patch_positions_irregular_masks_equal_hf():
    """Masks no processor makes (holes, an empty first column, all off) still match HF patch for patch."""
    masks = _masks(28, 28, [(28, 28)] * 3)
    masks[0, 10:16, 10:16] = 0  # a hole
    masks[1, :, :7] = 0  # the first patch column off: its row count is 0 (HF: inf / nan coordinates)
    masks[2] = 0
    want_mask, want_ids = _hf_positions(masks)
    patch_mask, ids = patch_positions(masks, 7, 4)
    assert np.array_equal(patch_mask, want_mask) and np.array_equal(ids, want_ids)


@pytest.mark.parametrize("side", [1, 2, 3, 7, 24, 27, 32, 37, 64, 100])
def test_bucket_boundaries_equal_torch(side):
    from vlmdeploy.runtime.idefics3 import _torch_arange_f32

    want = torch.arange(1 / side, 1.0, 1 / side).numpy()
    assert np.array_equal(_torch_arange_f32(1 / side, 1.0, 1 / side), want)


def test_patch_positions_for_a_real_geometry():
    """SmolVLM-256M: 512-pixel tiles of 16-pixel patches, 32 buckets a side; a full tile is 0..1023."""
    _, ids = patch_positions(np.ones((1, 512, 512), np.int64), 16, 32)
    assert np.array_equal(ids[0], np.arange(1024))


def test_patch_position_errors():
    with pytest.raises(ValueError, match="pixel_mask must be \\[images, height, width\\]"):
        patch_positions(np.ones((28, 28)), 7, 4)
    with pytest.raises(ValueError, match="smaller than one 7-pixel patch"):
        patch_positions(np.ones((1, 5, 28), np.int64), 7, 4)
    with pytest.raises(ValueError, match="num_patches_per_side must be a positive integer"):
        patch_positions(np.ones((1, 28, 28), np.int64), 7, 0)


# ---------------------------------------------------------------------------------------------
# Configs


def test_from_hf_checks_the_model_config():
    ip = Idefics3ImageProcessorPil(**TINY).to_dict()
    config = _tiny_config().to_dict()  # 28 / 7 = 4x4 patches, scale 2 -> 4 tokens a tile
    assert Idefics3Params.from_hf(ip, {"image_seq_len": 4}, config).image_seq_len == 4
    with pytest.raises(ValueError, match="image_seq_len=169 but the model makes 4 tokens"):
        Idefics3Params.from_hf(ip, {}, config)
    with pytest.raises(ValueError, match="max_image_size is 364 but the vision tower takes 28x28"):
        Idefics3Params.from_hf(Idefics3ImageProcessorPil().to_dict(), {"image_seq_len": 4}, config)


def test_params_round_trip_and_defaults():
    p = Idefics3Params()
    assert (p.longest_edge, p.tile, p.resample, p.image_seq_len, p.do_image_splitting) == (1456, 364, 1, 169, True)
    assert Idefics3Params.from_dict(p.to_dict()) == p
    assert Idefics3Params.from_hf(Idefics3ImageProcessorPil().to_dict()) == p
    assert Idefics3Params.from_hf(SmolVLMImageProcessorPil().to_dict()) == p
    assert Idefics3Params.from_hf({"image_processor_type": "SmolVLMImageProcessorFast"}) == p


@pytest.mark.parametrize("make, match", [
    (lambda: Idefics3Params(tile=0), "tile must be a positive integer"),
    (lambda: Idefics3Params(resample=9), "resample must be a PIL code"),
    (lambda: Idefics3Params(image_std=(0.5, 0.0, 0.5)), "image_std must not contain 0"),
    (lambda: Idefics3Params(image_token=""), "image_token must be a non-empty string"),
    (lambda: Idefics3Params.from_dict({"rows": 3}), "unknown Idefics3Params keys \\['rows'\\]"),
    (lambda: Idefics3Params.from_hf({"image_processor_type": "CLIPImageProcessor"}), "is not Idefics3's"),
    (lambda: Idefics3Params.from_hf({"size": {"height": 448, "width": 448}}), "size must be"),
])
def test_param_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_image_errors():
    p = Idefics3Params(longest_edge=84, tile=28)
    with pytest.raises(ImageError, match="expected a PIL.Image.Image"):
        preprocess_image(np.zeros((28, 28, 3), np.uint8), p)
    with pytest.raises(ImageError, match="do_convert_rgb is off"):
        preprocess_image(PHOTOS["tiny"].convert("L"), Idefics3Params(do_convert_rgb=False))
    with pytest.raises(ImageError, match="empty image"):
        p.grid((0, 5))


def test_idefics3_does_not_import_torch_or_transformers():
    code = ("import sys, vlmdeploy.runtime.idefics3\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
