"""mllama (cross-attention fusion): a seeded tiny checkpoint exported by the real exporter, then the
torch-free runtime against HF `generate` (greedy, EOS off) through the portable decoder (decoder_gqa
declines mllama): a non-square photo (tiles of a 2x1 canvas), two images in one prompt, text only (the
cross layers skipped, as HF does), a left-padded batch of the three (absent image slots run through the
vision model as HF pads them); prefill logits within 1e-4; the cross K/V computed once per request;
`check --tensorrt`. Preprocessing and the cross-attention mask vs HF: tests/test_mllama_preprocess.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_generate_batch, photo
from vlmdeploy.runtime.vlm import VLM

NEW_TOKENS = 16
CASES = {"photo": ("<|image|>What is it?", lambda: [photo("chelsea", (150, 100))]),
         "two images": ("<|image|>a<|image|> Compare.", lambda: [photo("coffee", (40, 30)), photo("astronaut", (60, 130))]),
         "text only": ("Tell me a story.", lambda: [])}


@pytest.fixture(scope="module")
def exp(exported_factory):
    return exported_factory("mllama")


@pytest.fixture(scope="module")
def vlm(exp):
    return VLM.load(exp.artifact)


def hf_generate(exp, prompts, images):
    return hf_generate_batch(exp, prompts, images, NEW_TOKENS, nested=True)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_hf(exp, vlm, case):
    prompt, images = CASES[case]
    want = hf_generate(exp, [prompt], [images()])[0]
    assert vlm.generate(prompt, images(), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want


def test_left_padded_batch_equals_hf(exp, vlm):
    prompts, images = [p for p, _ in CASES.values()], [i() for _, i in CASES.values()]
    want = hf_generate(exp, prompts, images)
    assert len({tuple(w) for w in want}) == 3  # the rows differ: the images matter
    got = vlm.generate_batch(prompts, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert [g.token_ids for g in got] == want


def test_images_change_the_tokens(vlm):
    """The cross-attention path is live: another image gives other tokens (HF inits the gates to 0)."""
    prompt, images = CASES["photo"]
    a = vlm.generate(prompt, images(), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    b = vlm.generate(prompt, [photo("coffee", (150, 100))], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    assert a != b


@pytest.mark.parametrize("case", ["photo", "two images"])
def test_prefill_logits_match_hf(exp, vlm, case):
    prompt, images = CASES[case]
    inputs = exp.processor(text=[prompt], images=[images()], return_tensors="pt")
    with torch.no_grad():
        ref = exp.model(**inputs).logits[0].numpy()
    ours = vlm.prefill_logits(prompt, images())[0]
    assert ours.shape == ref.shape and np.max(np.abs(ours - ref)) <= 1e-4


def test_cross_kv_runs_once_per_request(exp):
    """The vision chain and the cross K/V run once, before prefill; decode steps reuse them."""
    vlm = VLM.load(exp.artifact, verify=False)
    calls = {"vision": 0, "cross_kv": 0}
    for name in calls:
        runner, run = vlm.runners[name], vlm.runners[name].run

        def counted(feeds, *a, _name=name, _run=run, **k):
            calls[_name] += 1
            return _run(feeds, *a, **k)

        runner.run = counted
    prompt, images = CASES["two images"]
    out = vlm.generate(prompt, images(), max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(out.token_ids) == NEW_TOKENS and calls == {"vision": 1, "cross_kv": 1}
    vlm.generate(*CASES["text only"][:1], max_new_tokens=4, ignore_eos=True)
    assert calls == {"vision": 1, "cross_kv": 1}  # no image: zero cross K/V, no vision run


def test_manifest_and_check_tensorrt(exp, vlm):
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.tensorrt.build import BuildOptions

    f, graphs = vlm.facts, vlm.manifest.graphs
    assert f.family == "mllama" and f.pipeline == {"image": ["vision", "cross_kv"], "embed": "embed", "decoders": ["decoder"]}
    assert f.family_params["cross_attention_layers"] == [1, 3] and f.dims.num_layers == len(f.kv_layers) == 2
    assert f.image_token_id == f.dims.vocab and f.input_vocab == f.dims.vocab + 8  # as Llama-3.2-Vision: not a logit
    assert [n for n in graphs["decoder"].input_names if n.startswith("cross_")] == [
        "cross_attention_mask", *(f"cross_key_values.{j}.{kv}" for j in (0, 1) for kv in ("key", "value"))]
    assert not any(n.startswith("cross") for n in graphs["decoder"].output_names)  # inputs only: never rewritten
    report = check_artifact(exp.artifact, tensorrt=("10", BuildOptions()))
    assert report.passed, report.failed


def test_wrong_image_count_is_refused(vlm):
    from vlmdeploy.runtime.vlm import PromptError

    with pytest.raises(PromptError, match="image"):
        vlm.generate("<|image|>two?<|image|>", [photo("chelsea", (40, 30))], max_new_tokens=2)


def test_plan_counts_cross_kv_apart_from_the_context(exp, vlm):
    """`vlmdeploy plan DIR`: the KV cache row covers the self-attention layers only; the cross K/V row is
    exactly what the runtime holds for a request, whatever the context."""
    from vlmdeploy.export.plan import Workload, plan_artifact
    from vlmdeploy.runtime.vlm import _Request

    prompt, images = CASES["two images"]
    batch, _, _ = vlm._prepare([_Request(prompt, images())] * 2)
    held = sum(x.nbytes for x in batch.context.constant.values())
    plans = [plan_artifact(exp.artifact, Workload(context=c, batch=2, images=2)) for c in (64, 256)]
    assert [p.get("cross-attention K/V").nbytes for p in plans] == [held, held]
    d = vlm.facts.dims
    assert plans[0].get("KV cache").nbytes == 2 * d.num_layers * d.kv_heads * d.head_dim * 4 * 64 * 2


def test_scheduler_pads_rows_with_fewer_images(exp):
    """The server's slots hold each row's cross K/V; rows with 2, 1 and 0 images decode together (the
    fewer-image rows zero-padded to 2 image slots) and every answer equals `VLM.chat`'s."""
    import queue

    from test_serve_families import _messages, _png, _text
    from vlmdeploy.runtime.sampling import SamplingParams
    from vlmdeploy.serve.engine import Engine
    from vlmdeploy.serve.prepare import PromptBuilder

    vlm = VLM.load(exp.artifact, verify=False)
    a, b = photo("chelsea", (150, 100)), photo("astronaut", (60, 130))
    jobs = [([a, b], 10), ([b], 8), ([], 9), ([b, a], 7)]
    expected = [vlm.chat(_messages(imgs, lambda im: im), max_new_tokens=n, ignore_eos=True).text for imgs, n in jobs]
    engine, builder = Engine(vlm, max_num_seqs=4, prefill_chunk=5, prefill_tokens_per_step=5), PromptBuilder(vlm, 1 << 20)
    events = [queue.Queue() for _ in jobs]
    for (imgs, n), q in zip(jobs, events):
        engine.submit(builder.chat(_messages(imgs, _png)), SamplingParams(max_new_tokens=n, ignore_eos=True), q.put)
    got = [_text(q) for q in events]
    engine.stop()
    assert got == expected and engine.context.arrays["cross_attention_mask"].shape[2] == 2


def test_check_reports_a_context_the_decoder_does_not_take(exp, monkeypatch):
    """`vlmdeploy check` runs the family's decoder context against the decoder spec."""
    from vlmdeploy.runtime.check import check_artifact
    from vlmdeploy.runtime.families.mllama import Mllama

    real = Mllama.decoder_context

    def float_mask(self, ids, items, run):
        ctx = real(self, ids, items, run)
        ctx.per_token["cross_attention_mask"] = ctx.per_token["cross_attention_mask"].astype(np.float32)
        return ctx

    monkeypatch.setattr(Mllama, "decoder_context", float_mask)
    report = check_artifact(exp.artifact)
    assert any("'cross_attention_mask' is float32" in line for line in report.failed), report.failed
