"""runtime/mllama.py against transformers 5.24's MllamaImageProcessorPil and MllamaProcessor.

Images: bit for bit (pixel_values, aspect_ratio_ids, aspect_ratio_mask) on photos of several sizes and
aspects, one image and batches of rows with different image counts. The canvas rule on many sizes against
HF's own functions. The prompt text and the cross-attention mask: a whole tiny MllamaProcessor.
(transformers' torchvision backend cannot run here: no torchvision builds against this CPU torch.)
"""

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.images import ImageError
from vlmdeploy.runtime.mllama import (
    MllamaParams,
    cross_attention_mask,
    fit_to_canvas,
    optimal_canvas,
    pack_images,
    preprocess_image,
    prompt_text,
    supported_aspect_ratios,
)

skdata = pytest.importorskip("skimage.data")
pytest.importorskip("transformers")
from transformers import MllamaImageProcessorPil, MllamaProcessor  # noqa: E402
from transformers.models.mllama import image_processing_pil_mllama as hf_mod  # noqa: E402


from conftest import preprocess_photos  # noqa: E402

PHOTOS = preprocess_photos(wide=(1000, 61), tall=(91, 1200))
CONFIGS = {
    "default": {},  # 224 tiles, 4 at most, BILINEAR
    "tiny": {"size": {"height": 28, "width": 28}, "max_image_tiles": 4},
    "tiny-6-bicubic-clip": {"size": {"height": 28, "width": 28}, "max_image_tiles": 6, "resample": 3,
                            "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]},
    "one-tile": {"size": {"height": 56, "width": 56}, "max_image_tiles": 1},
}


def _assert_same(ours, want):
    want = np.asarray(want)
    assert ours.dtype == want.dtype and ours.shape == want.shape, (ours.dtype, want.dtype, ours.shape, want.shape)
    assert np.abs(ours.astype(np.float64) - want).max() == 0


def _ours(hf, rows):
    p = MllamaParams.from_hf(hf.to_dict())
    return pack_images([[preprocess_image(im, p) for im in row] for row in rows], p.max_image_tiles)


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_image_equals_hf(name, config):
    hf = MllamaImageProcessorPil(**CONFIGS[config])
    want = hf(PHOTOS[name], return_tensors="np")
    ours = _ours(hf, [[PHOTOS[name]]])
    _assert_same(ours.pixel_values, want["pixel_values"])
    _assert_same(ours.aspect_ratio_ids, want["aspect_ratio_ids"])
    _assert_same(ours.aspect_ratio_mask, want["aspect_ratio_mask"])
    assert ours.num_tiles == want["num_tiles"]


def test_batch_of_rows_with_different_image_counts_equals_hf():
    """Two images in one row, one in another, none in a third: absent images and tiles are zeros, id 0,
    mask only on tile 0."""
    hf = MllamaImageProcessorPil(**CONFIGS["tiny"])
    rows = [[PHOTOS["wide"], PHOTOS["chelsea"]], [PHOTOS["tall"]], []]
    want = hf(rows, return_tensors="np")
    ours = _ours(hf, rows)
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        _assert_same(getattr(ours, key), want[key])
    assert ours.aspect_ratio_ids[2].tolist() == [0, 0] and ours.aspect_ratio_mask[2].tolist() == [[1, 0, 0, 0]] * 2
    assert ours.num_tiles == want["num_tiles"]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_image_modes_equal_hf(mode):
    image = PHOTOS["chelsea"].resize((57, 41)).convert(mode)
    if mode == "RGBA":  # real transparency: HF composites onto white
        image.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 57, dtype=np.uint8), (41, 1))))
    hf = MllamaImageProcessorPil(**CONFIGS["tiny"])
    _assert_same(_ours(hf, [[image]]).pixel_values, hf(image, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("max_tiles,tile", [(4, 224), (4, 28), (6, 28), (1, 56), (8, 14)])
def test_canvas_rule_equals_hf(max_tiles, tile):
    assert supported_aspect_ratios(max_tiles) == tuple(hf_mod.get_all_supported_aspect_ratios(max_tiles))
    rng = np.random.default_rng(max_tiles * tile)
    sides = np.concatenate([np.arange(1, 40), rng.integers(1, 3000, 200)])
    for h, w in zip(sides, rng.permutation(sides)):
        h, w = int(h), int(w)
        canvas = hf_mod.get_optimal_tiled_canvas(h, w, max_tiles, tile)
        assert optimal_canvas((h, w), max_tiles, tile) == tuple(int(c) for c in canvas)
        assert fit_to_canvas((h, w), canvas, tile) == hf_mod.get_image_size_fit_to_canvas(h, w, *canvas, tile)


def test_params_refuse_what_hf_refuses():
    with pytest.raises(ValueError, match="square tiles"):
        MllamaParams.from_hf({"size": {"height": 28, "width": 56}})
    with pytest.raises(ValueError, match="do_pad must be true"):
        MllamaParams.from_hf({"do_pad": False})
    with pytest.raises(ValueError, match="not Mllama's"):
        MllamaParams.from_hf({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="max_image_tiles must be a positive integer"):
        MllamaParams(max_image_tiles=0)
    with pytest.raises(ImageError, match="empty"):
        preprocess_image(Image.new("RGB", (0, 5)), MllamaParams())


# ---------------------------------------------------------------------------------------------
# The prompt text and the cross-attention mask: a whole tiny processor


TEXTS = [
    "<|image|>What is this?",  # BOS goes after the leading image token
    "a <|image|><|image|> b <|image|> c",  # a run of two images reads on past the run
    "<|image|>x<|image|>y",
    "no image here",
]
IMAGES = [[PHOTOS["chelsea"]], [PHOTOS["tiny"], PHOTOS["tall"], PHOTOS["wide"]], [PHOTOS["portrait"]] * 2, []]


def _tiny_processor():
    from vlmdeploy.export.tiny import MLLAMA_SPECIALS
    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(400, specials=MLLAMA_SPECIALS)
    return MllamaProcessor(MllamaImageProcessorPil(**CONFIGS["tiny"]), tokenizer)


def test_tiny_processor_text_and_mask_equal_ours():
    proc = _tiny_processor()
    tok = proc.tokenizer
    proc.tokenizer.padding_side = "left"
    out = proc(text=TEXTS, images=IMAGES, return_tensors="np", padding=True)
    p = MllamaParams.from_hf(proc.image_processor.to_dict())
    image_id = tok.convert_tokens_to_ids(p.image_token)
    rows = [tok(prompt_text(t, tok.bos_token, p.image_token))["input_ids"] for t in TEXTS]
    s = max(map(len, rows))
    assert [r[-len(ids):].tolist() for r, ids in zip(out["input_ids"], rows)] == rows
    want = out["cross_attention_mask"]  # [B, S, I, T]
    for b, (ids, images) in enumerate(zip(rows, IMAGES)):
        tiles = [preprocess_image(im, p).num_tiles for im in images]
        mask = cross_attention_mask(ids, image_id, tiles, p.max_image_tiles, num_images=want.shape[2])
        assert not want[b, : s - len(ids)].any()  # left pads read no image
        _assert_same(mask, want[b, s - len(ids):])
    reads = [np.flatnonzero(want[1, :, i, 0]) for i in range(3)]  # row 1: "a <img><img> b <img> c"
    assert reads[0][-1] == reads[1][-1] == reads[2][0] - 1 and reads[0][0] == reads[1][0] - 1  # the run reads on


def test_prompt_text_inserts_bos_as_hf():
    from transformers.models.mllama.processing_mllama import build_string_from_input

    for text in ["<|image|><|image|>hi", "hi <|image|>", "<s>already", "", "<|image|>"]:
        assert prompt_text(text, "<s>", "<|image|>") == build_string_from_input(text, "<s>", "<|image|>")


def test_mask_needs_one_image_per_token():
    with pytest.raises(ValueError, match="holds 1 <\\|image\\|> tokens but 2 images"):
        cross_attention_mask([5, 9, 7], 9, [1, 2], 4)
