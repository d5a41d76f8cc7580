"""Visual-token compression (runtime/compress.py): each method equal to a PyTorch transcription of it on a
tiny model's vision outputs; the vision graph's attention_scores equal to HF's output_attentions; compressed
prompts consistent (token counts, LLaVA-NeXT's packing, Qwen2-VL's M-RoPE positions) and generation with K
tokens equal to HF `generate` fed the same K embeddings; clear errors for what a family or artifact cannot do."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import noise_image, photo
from vlmdeploy.runtime import anyres
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.compress import Compression, parse_visual_tokens, pool_grid
from vlmdeploy.runtime.families import family_class
from vlmdeploy.runtime.vlm import VLM, PromptError

LLAVA = "USER: <image>\nWhat is shown here? ASSISTANT:"


# ---- references (PyTorch) ---------------------------------------------------------------------------


def torch_pool(x: np.ndarray, grid, out) -> np.ndarray:
    """[T, C] on grid -> [oh*ow, C] by torch's adaptive_avg_pool2d."""
    t = torch.from_numpy(x).reshape(*grid, -1).permute(2, 0, 1)[None]  # [1, C, h, w]
    return torch.nn.functional.adaptive_avg_pool2d(t, out)[0].permute(1, 2, 0).reshape(-1, x.shape[-1]).numpy()


def torch_topk(x: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    keep = stable_top(torch.from_numpy(scores), k).sort().values
    return torch.from_numpy(x)[keep].numpy()


def stable_top(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest along the last axis, ties to the earlier (torch.topk leaves ties unspecified; mllama's
    padded tiles score all 0)."""
    return torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :k]


def torch_visionzip(x: np.ndarray, scores: np.ndarray, dominant: int, contextual: int) -> np.ndarray:
    """VisionZip's merge (github.com/dvlab-research/VisionZip, `visionzip/clip_encoder.py`) in its own
    tensor form, with the contextual token the mean of its group (target + the tokens assigned to it)."""
    h, s = torch.from_numpy(x)[None], torch.from_numpy(scores)[None]  # [1, T, C], [1, T]
    top = stable_top(s, dominant).sort(dim=1).values
    mask = torch.ones_like(s, dtype=torch.bool).scatter_(1, top, False)
    kept = h.gather(1, top[..., None].expand(-1, -1, h.shape[-1]))
    rest = h.masked_select(mask[..., None]).view(1, -1, h.shape[-1])  # [1, R, C]
    metric = rest / rest.norm(dim=-1, keepdim=True)
    step = max(1, rest.shape[1] // contextual)
    targets = torch.arange(0, rest.shape[1], step)[:contextual]
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool)
    is_target[targets] = True
    similarity = metric[:, ~is_target] @ metric[:, targets].transpose(1, 2)  # [1, R-c, c]
    assign = torch.zeros_like(similarity).scatter_(2, similarity.argmax(2, keepdim=True), 1.0)
    counts = assign.sum(1)[..., None]  # [1, c, 1]
    merged = (assign.transpose(1, 2) @ rest[:, ~is_target] + rest[:, targets]) / (counts + 1)
    return torch.cat([kept, merged], dim=1)[0].numpy()


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(exported_factory):
    return exported_factory("mha-default-l2")  # CLIP 56/14: a 4x4 grid, feature layer -2, CLS dropped


@pytest.fixture(scope="module")
def vision_outputs(tiny_llava):
    """The tiny model's projector output [16, C] and vision attention scores [16] for one photo."""
    vlm = VLM.load(tiny_llava.artifact)
    pixels = vlm.family.prepare(photo()).pixels
    out = vlm.runners["vision"].run({"pixel_values": pixels})
    embeds = vlm.runners["projector"].run({"image_features": out["image_features"]})["image_embeds"]
    return embeds[0], out["attention_scores"][0]


# ---- the methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, grid", [(16, (4, 4)), (8, (4, 2)), (4, (2, 2)), (2, (2, 1)), (1, (1, 1))])
def test_pool_equals_torch_adaptive_avg_pool(vision_outputs, k, grid):
    x, _ = vision_outputs
    assert pool_grid((4, 4), k) == grid
    got, where = Compression("pool", keep=k).apply(x, (4, 4))
    np.testing.assert_allclose(got, torch_pool(x, (4, 4), grid), rtol=1e-6, atol=1e-7)
    assert (where == -1).all()


def test_pool_uneven_bins_equal_torch():
    x = np.random.default_rng(0).standard_normal((5 * 7, 3)).astype(np.float32)
    got, _ = Compression("pool", keep=12).apply(x, (5, 7))  # 3x4: overlapping bins
    np.testing.assert_allclose(got, torch_pool(x, (5, 7), (3, 4)), rtol=1e-6, atol=1e-7)
    assert pool_grid((12, 12), 72) == (12, 6) and pool_grid((12, 12), 36) == (6, 6) and pool_grid((12, 12), 18) == (6, 3)


@pytest.mark.parametrize("k", [1, 4, 7, 16])
def test_topk_equals_torch(vision_outputs, k):
    x, scores = vision_outputs
    got, where = Compression("topk", keep=k).apply(x, (4, 4), scores)
    np.testing.assert_array_equal(got, torch_topk(x, scores, k))
    assert list(where) == sorted(where) and len(set(where.tolist())) == k


@pytest.mark.parametrize("k", [2, 6, 12])
def test_merge_equals_torch_visionzip(vision_outputs, k):
    x, scores = vision_outputs
    contextual = max(1, round(k * 10 / 64))
    got, where = Compression("merge", keep=k).apply(x, (4, 4), scores)
    np.testing.assert_allclose(got, torch_visionzip(x, scores, k - contextual, contextual), rtol=1e-5, atol=1e-6)
    assert len(where) == k


# ---- the vision graph's attention output ------------------------------------------------------------


@pytest.mark.parametrize("name, cls_row", [("mha-default-l2", True), ("llava-qwen2-siglip", False)])
def test_attention_scores_equal_hf_output_attentions(exported_factory, name, cls_row):
    """CLIP: the [CLS] row of the feature layer's head-mean attention (CLS column dropped, 'default');
    SigLIP (no CLS, 'full'): the attention each token receives, averaged over queries."""
    exp = exported_factory(name)
    vlm = VLM.load(exp.artifact)
    pixels = vlm.family.prepare(noise_image(3)).pixels
    got = vlm.runners["vision"].run({"pixel_values": pixels})["attention_scores"]
    cfg, tower = exp.model.config, exp.model.model.vision_tower
    layer = cfg.vision_feature_layer % (cfg.vision_config.num_hidden_layers + 1)  # hidden_states index
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        probs = tower(torch.from_numpy(pixels), output_attentions=True).attentions[layer - 1].mean(1)  # [1, S, S]
    tower.set_attn_implementation("sdpa")
    want = probs[:, 0, 1:] if cls_row else probs.mean(1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want.numpy(), atol=2e-6)


# ---- prompts and generation -------------------------------------------------------------------------


def _hf_tokens(exp, image, kept: np.ndarray, new_tokens: int, kept_at: list[int] | None = None,
               full_tokens: int = 16) -> list[int]:
    """HF generate on inputs_embeds: the prompt with len(kept) image tokens holding `kept` [K, C].
    `kept_at`: each kept token's index among the image's `full_tokens`; then the prompt takes the
    positions it has uncompressed (text after the image continues as if all were there), and the
    reference is HF's forward with those position_ids, greedy, one token at a time."""
    tok, model = exp.processor.tokenizer, exp.model
    ids = torch.tensor([tok(LLAVA.replace("<image>", "<image>" * len(kept)))["input_ids"]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        image = ids[0] == model.config.image_token_id
        embeds[0, image] = torch.from_numpy(kept)
        if kept_at is None:
            out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None)
            return out[0, -new_tokens:].tolist()
        s0, after = int(image.nonzero()[0]), int(image.nonzero()[-1]) + 1
        positions = torch.cat([torch.arange(s0), s0 + torch.tensor(kept_at),
                               s0 + full_tokens + torch.arange(ids.shape[1] - after)])[None]
        tokens, past = [], None
        for _ in range(new_tokens):
            out = model(inputs_embeds=embeds, position_ids=positions, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            tokens.append(token)
            embeds, positions = model.get_input_embeddings()(torch.tensor([[token]])), positions[:, -1:] + 1
    return tokens


@pytest.mark.parametrize("method, k", [("pool", 4), ("topk", 6), ("merge", 5)])
def test_llava_generation_with_k_tokens_equals_hf(tiny_llava, method, k):
    """HF's own image features and attentions, compressed by the PyTorch references, fed to HF generate."""
    exp, image = tiny_llava, photo()
    vlm = VLM.load(exp.artifact, visual_tokens=k, compression=method)
    got = vlm.generate(LLAVA, [image], max_new_tokens=8, ignore_eos=True)
    full = VLM.load(exp.artifact).generate(LLAVA, [image], max_new_tokens=1)
    assert got.prompt_tokens == full.prompt_tokens - 16 + k
    pixels = exp.processor.image_processor([image], return_tensors="pt")["pixel_values"]
    tower = exp.model.model.vision_tower
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        feats = exp.model.model.get_image_features(pixel_values=pixels)
        feats = (feats.pooler_output if hasattr(feats, "pooler_output") else feats)
        feats = (feats[0] if isinstance(feats, (list, tuple)) else feats).reshape(-1, exp.model.config.text_config.hidden_size)
        probs = tower(pixels, output_attentions=True).attentions[exp.model.config.vision_config.num_hidden_layers - 2]
    tower.set_attn_implementation("sdpa")
    x, scores = feats.numpy(), probs.mean(1)[0, 0, 1:].numpy()
    kept = {"pool": lambda: torch_pool(x, (4, 4), (2, 2)), "topk": lambda: torch_topk(x, scores, k),
            "merge": lambda: torch_visionzip(x, scores, k - 1, 1)}[method]()
    # each kept token at its uncompressed position: pool, its 2x2 bin's first of the 4x4 grid; topk, its
    # own; merge, the dominant ones their own and the contextual token its target's (the first of the rest)
    top = stable_top(torch.from_numpy(scores), k - (method == "merge")).sort().values.tolist()
    kept_at = {"pool": [0, 2, 8, 10], "topk": top, "merge": top + [min(set(range(16)) - set(top))]}[method]
    assert got.token_ids == _hf_tokens(exp, image, kept, 8, kept_at=kept_at)


@pytest.mark.parametrize("method", ["pool", "topk"])
def test_llava_compressed_positions_keep_the_uncompressed_layout(tiny_llava, method):
    """4 of 16 tokens: the image's tokens sit at their uncompressed positions (pool: its bins' first) and
    the text after it where it would be; a left-padded batch with a text-only row gives each row's
    answer alone; the server (its vision cache hit included) answers as VLM.generate."""
    vlm = VLM.load(tiny_llava.artifact, visual_tokens=4, compression=method)
    ids = vlm.text.encode(LLAVA.replace("<image>", "<image>" * 4))
    s0 = ids.index(vlm.facts.media["image"].token_id)
    if method == "pool":  # known before any graph runs (the planner's view)
        want = [*range(s0), *(s0 + np.array([0, 2, 8, 10])), *range(s0 + 16, s0 + 16 + len(ids) - s0 - 4)]
        np.testing.assert_array_equal(vlm.family.prompt_positions(np.array(ids), []), want)
    prompts, images = [LLAVA, "USER: Say something. ASSISTANT:"], [[photo()], []]
    batch = vlm.generate_batch(prompts, images, max_new_tokens=6, ignore_eos=True)
    alone = [vlm.generate(p, i, max_new_tokens=6, ignore_eos=True) for p, i in zip(prompts, images)]
    assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
    from vlmdeploy.serve.prepare import PromptBuilder

    builder = PromptBuilder(VLM.load(tiny_llava.artifact, visual_tokens=4, compression=method), 64 * 2**20)
    first, second = (builder._prepare(vlm._request(LLAVA, [photo()], (), None, None)) for _ in range(2))
    assert builder.cache.hits == 1  # the second prompt's image came from the vision cache
    batch, _, _ = vlm._prepare([vlm._request(LLAVA, [photo()], (), None, None)])
    for prepared in (first, second):
        np.testing.assert_array_equal(prepared.positions, batch.positions)
        np.testing.assert_array_equal(prepared.embeds, batch.embeds[0])


def test_llava_next_pooled_tiles_pack_as_hf(exported_factory):
    """Each 2x2-token tile pooled to 1 token: the count is LlavaNextProcessor's for a patch twice as large,
    and the packed embeds equal HF's pack_image_features on the pooled tiles with that patch size."""
    exp = exported_factory("llava_next-llama-clip")
    vlm = VLM.load(exp.artifact, visual_tokens=0.25)
    image = photo(size=(60, 36))
    item = vlm.family.compressed(vlm.family.prepare(image))
    params = vlm.family.params
    assert item.num_tokens == anyres.num_image_tokens((36, 60), anyres.AnyresParams(**{**params.__dict__, "patch_size": 28}))
    features = np.random.default_rng(1).standard_normal((item.pixels.shape[0], 4, 64)).astype(np.float32)
    got = vlm.family.pack_item(item, features, None)
    pooled = torch.from_numpy(features).mean(1, keepdim=True)  # [n, 1, C]
    cfg = exp.model.config.vision_config
    cfg.patch_size *= 2
    try:
        want, lens = exp.model.model.pack_image_features([pooled], torch.tensor([[36, 60]]), "default",
                                                         torch.from_numpy(vlm.family.newline))
    finally:
        cfg.patch_size //= 2
    want = want[0] if isinstance(want, (list, tuple)) else want
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    result = vlm.generate(LLAVA, [image], max_new_tokens=3)
    assert result.prompt_tokens == VLM.load(exp.artifact).generate(LLAVA, [image], max_new_tokens=1).prompt_tokens \
        - anyres.num_image_tokens((36, 60), params) + item.num_tokens


def test_qwen2_vl_pooled_positions_are_the_pooled_grid(exported_factory):
    """An 8x6 merged-token image pooled to 4x3: the prompt holds 12 image tokens at the M-RoPE positions
    HF's get_rope_index gives an image of that grid, and the text after continues from them."""
    from test_mrope import _hf_rope_index
    from transformers import Qwen2VLModel

    exp = exported_factory("qwen2_vl")
    vlm = VLM.load(exp.artifact, visual_tokens=0.25)
    prompt = "<|vision_start|><|image_pad|><|vision_end|>Describe it."
    image = noise_image(5, size=(6 * 28, 8 * 28))  # (w, h)
    item = vlm.family.compressed(vlm.family.prepare(image))
    assert item.meta["grid"] == (1, 16, 12) and item.meta["compressed"] == (4, 3) and item.num_tokens == 12
    ids = vlm._tokenize(type("R", (), {"prompt": prompt, "add_special_tokens": True})(), [item])
    positions = vlm.family.prompt_positions(ids, [item])
    types = (ids == vlm.facts.media["image"].token_id).astype(np.int64)
    assert types.sum() == 12
    want = _hf_rope_index(Qwen2VLModel, exp.model.config, ids[None], types[None], [(1, 8, 6)], None,
                          np.ones((1, len(ids)), np.int64))
    np.testing.assert_array_equal(positions, want[:, 0])
    result = vlm.generate(prompt, [image], max_new_tokens=3)
    assert result.prompt_tokens == len(ids)


# ---- options and errors -----------------------------------------------------------------------------


def test_bad_options_name_what_is_allowed(tiny_llava, exported_factory):
    cases = [
        (dict(visual_tokens=17, compression="topk"), r"17 is more than an image's 16 visual tokens .*allowed: 1\.\.16"),
        (dict(visual_tokens=7), r"pool cannot make 7 tokens from a 4x4 grid"),
        (dict(visual_tokens=0), r"an int >= 1"),
        (dict(visual_tokens=1.5), r"ratio must be in \(0, 1\]"),
        (dict(visual_tokens=4, compression="zip"), r"'zip' is not known; allowed: pool, topk, merge"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            VLM.load(tiny_llava.artifact, **kwargs)
    qwen = exported_factory("qwen2_vl").artifact
    with pytest.raises(ValueError, match=r"qwen2_vl family cannot apply visual-token compression 'topk' \(its vision graph "
                                         r".*no attention_scores output.*M-RoPE.*takes: pool"):
        VLM.load(qwen, visual_tokens=4, compression="topk")
    family = VLM.load(tiny_llava.artifact).family
    with pytest.raises(ValueError, match=r"has no attention_scores output; re-export"):
        family.check_compression(Compression("merge", keep=4), scored=False)
    for name, why in [("blip2", "learned query tokens"), ("idefics2", "fixed number of learned latents")]:
        with pytest.raises(ValueError, match=f"the {name} family cannot apply .*{why}.*methods it takes: none"):
            family_class(name).refuse(Compression("pool", keep=4), family_class(name).compression_methods)
    assert parse_visual_tokens("25%") == 0.25 and parse_visual_tokens("0.5") == 0.5 and parse_visual_tokens("36") == 36
    with pytest.raises(ValueError, match=r"a count of tokens per image \(36\), or a fraction"):
        parse_visual_tokens("many")


def test_cli_run_and_plan_see_the_smaller_count(tiny_llava, tmp_path, capsys):
    image = tmp_path / "cat.png"
    photo().save(image)
    assert main(["run", str(tiny_llava.artifact), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--json", "--visual-tokens", "25%", "--compression", "merge"]) == 0
    compressed = json.loads(capsys.readouterr().out)
    assert main(["run", str(tiny_llava.artifact), "--image", str(image), "--prompt", "Hi", "--max-new-tokens", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] - compressed["prompt_tokens"] == 12
    assert main(["plan", str(tiny_llava.artifact), "--visual-tokens", "4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [v["tokens"] for v in plan["visual_tokens"]] == [4]


def test_server_prompts_hold_the_kept_count(tiny_llava):
    """`vlmdeploy serve --visual-tokens 4 --compression topk`: the server's prompts (what its engine
    schedules and caches) hold 4 visual tokens per image instead of 16."""
    import io

    from vlmdeploy.serve.app import Server, ServeConfig
    from vlmdeploy.serve.cli import add_arguments, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args([str(tiny_llava.artifact), "--visual-tokens", "4", "--compression", "topk"]))
    assert (config.visual_tokens, config.compression) == (4, "topk")
    buf = io.BytesIO()
    photo().save(buf, format="PNG")
    messages = [{"role": "user", "content": [{"type": "image", "image": buf.getvalue()}, {"type": "text", "text": "Hi"}]}]
    counts = []
    for cfg in (config, ServeConfig(str(tiny_llava.artifact))):
        server = Server(cfg)
        server.load()
        assert server.load_error is None
        counts.append(server.builder.chat(messages).prompt_tokens)
    assert counts[1] - counts[0] == 12


def test_qwen2_vl_plan_counts_compressed_video_as_the_runtime(exported_factory):
    """The planner's video row under --visual-tokens: every temporal step's pooled grid, as the runtime."""
    from vlmdeploy.export import plan

    vlm = VLM.load(exported_factory("qwen2_vl").artifact, visual_tokens=0.25)
    frames = np.zeros((4, 112, 168, 3), np.uint8)
    video = vlm.family.compressed(vlm.family.prepare_video(frames, fps=2.0))
    workload = plan.Workload(video_frames=4, video_size=(112, 168), compression=Compression("pool", ratio=0.25))
    row = plan._video_row(type(vlm.family), vlm.manifest.preprocess, workload)
    assert row.tokens == video.num_tokens == row.tiles * row.tokens_per_tile < vlm.family.prepare_video(frames, fps=2.0).num_tokens


def test_mllama_graphs_take_any_rows_per_tile():
    """mllama's rows per tile are the dynamic dim tile_rows of cross_kv's input and of the decoder's cross K/V,
    bounded by the vision graph's P in the manifest limits (TensorRT's profile range); generation with
    compressed tiles: tests/test_compress_mllama.py."""
    from vlmdeploy.export.mllama import cross_kv_names, mllama_graph_specs
    from vlmdeploy.runtime.spec import ModelDims
    from vlmdeploy.runtime.tensorrt.profiles import Limits, derive_profiles

    dims = ModelDims((28, 28), 5, 16, 32, 300, 4, 2, 8, "float32")
    specs = mllama_graph_specs(dims, num_cross=2, max_tiles=4)
    assert specs["vision"].outputs[0].shape == ("num_images", 4, 5, 16)
    assert specs["cross_kv"].inputs[0].shape == ("batch", "images", 4, "tile_rows", 16)
    decoder_kv = {t.name: t.shape for t in specs["decoder"].inputs}
    assert all(decoder_kv[n] == ("batch", 2, "images", 4, "tile_rows", 8) for n in cross_kv_names(2))
    limits = Limits(max_batch=2, max_images=2, max_context=32, max_input=32, typical_input=8, tile_rows=5)
    for profile in derive_profiles(specs["decoder"], limits):
        assert (profile.dims["tile_rows"].min, profile.dims["tile_rows"].max) == (1, 5)


def test_server_vision_cache_never_reuses_another_compressions_embeds(tiny_llava):
    """pool 4 and topk 4 make items with equal fields (4 tokens, the same grid); the vision cache keys
    them apart, so embeds computed under one setting are never served under the other."""
    from vlmdeploy.serve.prepare import CachedVisionFamily
    from vlmdeploy.serve.vision_cache import VisionCache, preprocessing_fingerprint

    vlm = VLM.load(tiny_llava.artifact)
    cache = VisionCache(1 << 20, preprocessing_fingerprint(vlm.facts, vlm.manifest.preprocess))
    family = vlm.family
    cached = CachedVisionFamily(family, cache)
    item = family.prepare(photo())
    got, want = [], []
    for method in ("pool", "topk", "pool"):
        family.compression = Compression(method, keep=4)
        compressed = family.compressed(item)
        got.append(cached.embed_media([compressed], vlm._run_graph)[0])
        want.append(family.embed_media([compressed], vlm._run_graph)[0])
    assert (cache.misses, cache.hits) == (2, 1)  # the second pool is the first's entry
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert not np.array_equal(got[0], got[1])
