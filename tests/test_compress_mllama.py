"""Visual-token compression for mllama (cross-attention): each tile's vision rows ([CLS] + a 2x2 patch grid
in the tiny model) become [CLS] + K pooled patches, so the cross K/V hold tiles x (1 + K) rows. Greedy
tokens equal HF's language model fed HF's own vision states compressed by the PyTorch reference and a
cross-attention mask expanded to the kept rows; the planner counts the K/V the runtime holds; the server
batches compressed rows; bad counts and methods name what is allowed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import photo
from test_compress import torch_pool, torch_topk, torch_visionzip
from vlmdeploy.runtime.compress import Compression
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 12
GRID = (2, 2)  # the tiny tower: 28-px tiles of 14-px patches, P = 1 + 4 rows per tile
CASES = {"photo": ("<|image|>What is it?", lambda: [photo("chelsea", (150, 100))]),
         "two images": ("<|image|>a<|image|> Compare.", lambda: [photo("coffee", (40, 30)), photo("astronaut", (60, 130))])}


@pytest.fixture(scope="module")
def exp(exported_factory):
    return exported_factory("mllama")


def hf_vision(exp, prompt, images):
    """(processor inputs, HF's vision states [I*T, P, Cvo], HF's eager attention in the tower's last layer
    reduced as the vision graph's attention_scores: each tile's [CLS] row, head-averaged, over its own
    tile's patches [I*T, P-1])."""
    from vlmdeploy.export.mllama import last_vision_layer

    model, inputs = exp.model, exp.processor(text=[prompt], images=[images], return_tensors="pt")
    tower, caught = model.model.vision_model, {}
    hook = last_vision_layer(tower).self_attn.register_forward_hook(lambda m, a, out: caught.update(probs=out[1]))
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            states = tower(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                           aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state  # [1, I, T, P, Cvo]
    finally:
        tower.set_attn_implementation("sdpa")
        hook.remove()
    tiles, p = states.shape[2], states.shape[3]
    probs = caught["probs"].mean(1)  # [I, S, S], S = T x Pp
    pp = probs.shape[-1] // tiles
    scores = torch.stack([probs[:, t * pp, t * pp + 1: t * pp + p] for t in range(tiles)], dim=1)  # [I, T, P-1]
    return inputs, states.reshape(-1, p, states.shape[-1]).numpy(), scores.reshape(-1, p - 1).numpy()


def hf_tokens(exp, inputs, kept: np.ndarray, new_tokens: int) -> list[int]:
    """HF's language model reading kept [I*T, R, Cvo] (projected as MllamaModel does) through HF's mask
    expanded to R rows; greedy, the last mask row repeated for each new token as HF generate does."""
    from transformers import DynamicCache
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    model, rows = exp.model, kept.shape[1]
    lm, mask = model.model.language_model, inputs["cross_attention_mask"]  # [1, S, I, T]
    ids, cache, out = inputs["input_ids"], DynamicCache(), []
    with torch.no_grad():
        cross = model.model.multi_modal_projector(torch.from_numpy(kept)).reshape(-1, rows, lm.config.hidden_size)
        for _ in range(new_tokens):
            m, row_mask = _prepare_cross_attention_mask(mask[:, -ids.shape[1]:], rows, model.dtype)
            h = lm(input_ids=ids, cross_attention_states=None if out else cross, cross_attention_mask=m,
                   full_text_row_masked_out_mask=row_mask, cache=cache, use_cache=True).last_hidden_state
            ids = model.lm_head(h[:, -1:]).argmax(-1)  # [1, 1]
            out.append(int(ids))
    return out


def hf_compressed_tokens(exp, prompt, images, compress, new_tokens: int) -> list[int]:
    """HF's tiles compressed by `compress(patches [P-1, Cvo], scores [P-1])` -> [K, Cvo], each tile's [CLS] row kept."""
    inputs, states, scores = hf_vision(exp, prompt, images)
    kept = np.stack([np.concatenate([t[:1], compress(t[1:], s)]) for t, s in zip(states, scores)])  # [I*T, 1+K, Cvo]
    return hf_tokens(exp, inputs, kept, new_tokens)


REFERENCES = {"pool": lambda k: lambda x, s: torch_pool(x, GRID, {1: (1, 1), 2: (2, 1), 4: GRID}[k]),
              "topk": lambda k: lambda x, s: torch_topk(x, s, k),
              "merge": lambda k: lambda x, s: torch_visionzip(x, s, k - 1, 1)}


@pytest.mark.parametrize("case, method, k", [("photo", "pool", 1), ("two images", "pool", 2), ("photo", "topk", 2),
                                             ("two images", "topk", 1), ("two images", "merge", 2)])
def test_compressed_generation_equals_hf(exp, case, method, k):
    prompt, images = CASES[case]
    vlm = VLM.load(exp.artifact, visual_tokens=k, compression=method)
    got = vlm.generate(prompt, images(), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert got == hf_compressed_tokens(exp, prompt, images(), REFERENCES[method](k), NEW_TOKENS)


def test_attention_scores_equal_hf_eager_attention(exp):
    """The vision graph's attention_scores: HF's own attention probabilities (output of the last layer's
    eager attention), each tile's [CLS] row over its patches."""
    prompt, images = CASES["two images"]
    inputs, states, want = hf_vision(exp, prompt, images())
    vlm = VLM.load(exp.artifact)
    i, t = inputs["aspect_ratio_ids"].shape[1], inputs["aspect_ratio_mask"].shape[2]
    out = vlm.runners["vision"].run({"pixel_values": inputs["pixel_values"][0].numpy(),
                                     "aspect_ratio_ids": inputs["aspect_ratio_ids"][0].numpy(),
                                     "aspect_ratio_mask": inputs["aspect_ratio_mask"][0].numpy()})
    np.testing.assert_allclose(out["vision_states"].reshape(states.shape), states, atol=1e-4)
    np.testing.assert_allclose(out["attention_scores"].reshape(i * t, -1), want, atol=1e-5)


def test_cross_kv_rows_and_plan_equal_the_runtime(exp):
    """25% of a 2x2 grid: 1 patch + [CLS] = 2 rows per tile (of 5); `plan --visual-tokens` counts those bytes."""
    from vlmdeploy.export.plan import Workload, plan_artifact
    from vlmdeploy.runtime.vlm import _Request

    compression = Compression("pool", ratio=0.25)
    vlm = VLM.load(exp.artifact, visual_tokens=0.25)
    prompt, images = CASES["two images"]
    batch, _, _ = vlm._prepare([_Request(prompt, images())] * 2)
    kv = batch.context.constant
    d, tiles = vlm.facts.dims, vlm.facts.family_params["max_image_tiles"]
    assert {x.shape for x in kv.values()} == {(2, d.kv_heads, 2, tiles, 2, d.head_dim)}
    plan = plan_artifact(exp.artifact, Workload(context=64, batch=2, images=2, compression=compression))
    full = plan_artifact(exp.artifact, Workload(context=64, batch=2, images=2))
    assert plan.get("cross-attention K/V").nbytes == sum(x.nbytes for x in kv.values())
    assert plan.get("cross-attention K/V").nbytes * 5 == full.get("cross-attention K/V").nbytes * 2
    assert [v.tokens_per_tile for v in plan.visual] == [2] and "(4 tiles x 2 after pool 0.25 per tile)" in \
        plan.get("cross-attention K/V").detail


def test_text_only_with_compression_equals_without(exp):
    """No image: one zero image slot of 1 + K rows per tile; the cross layers stay the identity."""
    full = VLM.load(exp.artifact).generate("Tell me a story.", [], max_new_tokens=6, ignore_eos=True)
    pooled = VLM.load(exp.artifact, visual_tokens=1).generate("Tell me a story.", [], max_new_tokens=6, ignore_eos=True)
    assert pooled.token_ids == full.token_ids


def test_bad_options_name_what_is_allowed(exp):
    from vlmdeploy.runtime.families.mllama import Mllama

    cases = [(dict(visual_tokens=5), r"5 is more than an image's 4 visual tokens \(2x2\); allowed: 1\.\.4"),
             (dict(visual_tokens=3), r"pool cannot make 3 tokens from a 2x2 grid"),
             (dict(visual_tokens=2, compression="zip"), r"'zip' is not known; allowed: pool, topk, merge")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            VLM.load(exp.artifact, **kwargs)
    vlm = VLM.load(exp.artifact)
    limits = {k: v for k, v in vlm.facts.limits.items() if k != "tile_rows"}  # an artifact from before tile_rows
    old = Mllama(dataclasses.replace(vlm.facts, limits=limits), vlm.manifest.preprocess, {})
    with pytest.raises(ValueError, match=r"fix the rows per tile .*re-export it"):
        old.check_compression(Compression("pool", keep=1), scored=False)


def test_server_batches_compressed_rows(exp):
    """The server's slots hold each row's compressed cross K/V (rows with 2, 1 and 0 images, zero-padded to
    2 image slots); every answer equals `VLM.chat`'s with the same compression."""
    import queue

    from test_serve_families import _messages, _png, _text
    from vlmdeploy.runtime.sampling import SamplingParams
    from vlmdeploy.serve.engine import Engine
    from vlmdeploy.serve.prepare import PromptBuilder

    vlm = VLM.load(exp.artifact, verify=False, visual_tokens=1)
    a, b = photo("chelsea", (150, 100)), photo("astronaut", (60, 130))
    jobs = [([a, b], 8), ([b], 6), ([], 7)]
    expected = [vlm.chat(_messages(imgs, lambda im: im), max_new_tokens=n, ignore_eos=True).text for imgs, n in jobs]
    engine, builder = Engine(vlm, max_num_seqs=3, prefill_chunk=5, prefill_tokens_per_step=5), PromptBuilder(vlm, 1 << 20)
    events = [queue.Queue() for _ in jobs]
    for (imgs, n), q in zip(jobs, events):
        engine.submit(builder.chat(_messages(imgs, _png)), SamplingParams(max_new_tokens=n, ignore_eos=True), q.put)
    got = [_text(q) for q in events]
    engine.stop()
    assert got == expected
    assert engine.context.arrays["cross_key_values.0.key"].shape[2:5] == (2, 4, 2)  # images, tiles, 1 + K rows


def test_the_reference_keeping_every_patch_is_hf_generate(exp):
    """The reference harness itself: pooling 2x2 to 2x2 keeps every row, and its tokens are HF generate's."""
    from conftest import hf_generate_batch

    prompt, images = CASES["two images"]
    want = hf_generate_batch(exp, [prompt], [images()], NEW_TOKENS)[0]
    assert hf_compressed_tokens(exp, prompt, images(), REFERENCES["pool"](4), NEW_TOKENS) == want
    assert hf_compressed_tokens(exp, prompt, images(), REFERENCES["pool"](1), NEW_TOKENS) != want  # what is dropped matters
