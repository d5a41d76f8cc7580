"""LLaVA-1.5-7B-shaped export on this machine (issue 14), `make test-large`; not in the default run.

Writes the seeded random fp16 checkpoint with LLaVA-1.5-7B's config (14.1 GB, `make bigckpt`; or
takes `make export-memory SIZE=7b`'s from $VLMDEPLOY_LARGE_DIR), exports it with `vlmdeploy export
--dtype fp16` (validation on) in a child process whose process tree is sampled for peak RSS, and
checks: peak RSS <= 1.2x the weights (issue 14) and <= 0.3x (the page trimmer's curve) and within
`plan --export`'s estimate, the four graphs and their validation records, `vlmdeploy check`'s checks (backend ort-cpu-mapped: plain ort-cpu makes float32
copies of fp16 weights, 27 GB here), and that the runtime's cached decode loop generates the same
tokens as recomputing the whole sequence with the portable decoder at every step, up to ties within
fp16 noise (random weights: the tokens are noise, their agreement is not). Then a truncated copy
(the same widths, 4 vision and 2 text layers) against HF `generate`. Needs ~35 GB of disk under
$VLMDEPLOY_LARGE_DIR (default: pytest's tmp dir) and ~8 GB of free memory (the export itself ~2.5 GB).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _export_memory_script():
    spec = importlib.util.spec_from_file_location("export_memory", ROOT / "scripts" / "export_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def large_dir(tmp_path_factory):
    given = os.environ.get("VLMDEPLOY_LARGE_DIR")
    root = Path(given) / "test-large" if given else tmp_path_factory.mktemp("large")
    root.mkdir(parents=True, exist_ok=True)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint_7b(large_dir):
    """The seeded 7B-shaped checkpoint: `make export-memory SIZE=7b`'s ($VLMDEPLOY_LARGE_DIR/ckpt-7b, the
    same generator and seed) when it is there, else written here and deleted once exported."""
    from vlmdeploy.export import bigckpt

    given = large_dir.parent / "ckpt-7b"
    if os.environ.get("VLMDEPLOY_LARGE_DIR") and (given / "model.safetensors.index.json").exists():
        yield given, False
        return
    ckpt = large_dir / "ckpt-7b"
    bigckpt.write_checkpoint("llava", ckpt, cfg=_export_memory_script().size_config("7b"), log=lambda m: None)
    yield ckpt, True
    shutil.rmtree(ckpt, ignore_errors=True)


def test_llava_7b_fp16_exports_within_its_memory_targets(large_dir, checkpoint_7b):
    from vlmdeploy.export.export_plan import export_needs
    from vlmdeploy.runtime.check import check_artifact

    em = _export_memory_script()
    (ckpt, ours), out = checkpoint_7b, large_dir / "art-7b"
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    exe = Path(sys.executable).with_name("vlmdeploy")
    run = em.run_sampled([str(exe), "export", "--model", str(ckpt), "--out", str(out), "--dtype", "fp16"],
                         large_dir / "export.log")
    print(json.dumps({"weights_bytes": weights, **run, "validation_max_abs_diff": em.validation_diffs(out),
                      "load_average": os.getloadavg()}))
    assert run["rc"] == 0, (large_dir / "export.log").read_text()[-3000:]
    assert run["peak_hwm_bytes"] <= 1.2 * weights, run  # issue 14's target
    assert run["peak_hwm_bytes"] <= 0.3 * weights, run  # the trimmed curve: no whole graph resident
    assert run["peak_hwm_bytes"] <= export_needs(str(ckpt), "fp16").ram_bytes, run  # what `export` checks holds
    assert run["wall_s"] <= 30 * 60, run
    if ours:
        shutil.rmtree(ckpt)  # the artifact's checks below need no checkpoint; free 14 GB of disk

    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"vision", "projector", "embed", "decoder"}
    assert manifest["model"]["dims"]["num_layers"] == 32 and manifest["model"]["dims"]["hidden"] == 4096
    for record in manifest["validation"].values():
        assert record["reference"] == "pytorch float32 arithmetic on the float16 weights"
        assert all(r["max_abs_diff"] <= r["tolerance"] for r in record["runs"])
    report = check_artifact(out, backend="ort-cpu-mapped")  # ort-cpu would hold fp32 copies: 2x 13.5 GB
    assert report.passed, report.failed
    _cached_decode_equals_recompute(out)
    shutil.rmtree(out)  # 14 GB of disk for the truncated copy's exports


def _cached_decode_equals_recompute(out: Path, new_tokens: int = 3) -> None:
    """Greedy tokens of the runtime's decode loop (KV cache) == argmax of a fresh full-sequence pass
    of the portable decoder after each token."""
    from PIL import Image

    from vlmdeploy.runtime.generate import Batch, DecodeLoop
    from vlmdeploy.runtime.vlm import VLM

    vlm = VLM.load(out, backend="ort-cpu-mapped")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    tokens = vlm.generate(prompt, [image], max_new_tokens=new_tokens, ignore_eos=True).token_ids
    assert len(tokens) == new_tokens
    batch, _, _ = vlm._prepare([vlm._request(prompt, [image], (), None, None)])
    embed = vlm.runners[vlm.facts.pipeline["embed"]]
    loop = DecodeLoop(embed, vlm.runners["decoder"], vlm.facts)  # the same sessions: one mapping of the weights
    embeds, mask = batch.embeds, batch.mask
    for step, token in enumerate(tokens):
        logits = loop.prefill_logits(Batch(embeds, mask))[0, -1].astype(np.float64)  # [V]
        # equal, or a tie within fp16 noise: random weights leave top logits ~1e-3 apart, and the cached
        # step and the full pass round differently (measured: 0.5B equal; 7B differed at a step)
        tolerance = 0.02 * max(1.0, float(np.abs(logits).max()))
        assert logits[token] >= logits.max() - tolerance, (step, token, int(logits.argmax()), logits.max() - logits[token])
        print(f"step {step}: token {token}, recompute argmax {int(logits.argmax())}, gap {logits.max() - logits[token]:.3g}")
        row = embed.run({"input_ids": np.array([[token]], np.int64)})["inputs_embeds"]  # [1, 1, C]
        embeds, mask = np.concatenate([embeds, row], 1), np.concatenate([mask, np.ones((1, 1), mask.dtype)], 1)


def test_truncated_7b_widths_generate_hf_greedy_tokens(large_dir):
    """LLaVA-1.5-7B's widths (CLIP ViT-L/14-336, Llama 4096 wide, vocab 32064) cut to 4 vision and 2
    text layers: the runtime's greedy tokens against HF `generate` on the same checkpoint. fp32 export:
    equal token for token (HF fp32). fp16 export: HF has no usable fp16 CPU path, so HF runs float32
    arithmetic on the fp16 weights (the same checkpoint loaded as float32) while the runtime's graphs
    round activations to fp16; the tokens must be equal or, where they part, ours must be within fp16
    noise of HF's best at that step (random weights leave near-ties; counted and printed)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlmdeploy.export import bigckpt
    from vlmdeploy.export.exporter import export_model
    from vlmdeploy.runtime.vlm import VLM

    from conftest import hf_generate_greedy, photo

    em = _export_memory_script()
    ckpt = large_dir / "ckpt-7b-trunc"
    bigckpt.write_checkpoint("llava", ckpt, cfg=em.size_config("7b-trunc"), log=lambda m: None)
    prompt, image, new = "USER: <image>\nWhat is shown? ASSISTANT:", photo("chelsea"), 8
    processor = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    want = hf_generate_greedy(model, inputs, new)[0]
    for dtype in ("fp32", "fp16"):
        export_model(str(ckpt), large_dir / f"art-trunc-{dtype}", dtype=dtype, log=lambda m: None, machine=None)
    for decoder in ("decoder", "decoder_gqa"):
        got = VLM.load(large_dir / "art-trunc-fp32", decoder=decoder).generate(prompt, [image], max_new_tokens=new,
                                                                              ignore_eos=True).token_ids
        print(f"fp32 {decoder}: {got}, HF {want}")
        assert got == want, (decoder, got, want)
    got16 = VLM.load(large_dir / "art-trunc-fp16", backend="ort-cpu-mapped").generate(
        prompt, [image], max_new_tokens=new, ignore_eos=True).token_ids
    print(f"fp16 decoder: {got16}, HF fp32 arithmetic {want}")
    _within_fp16_noise_of_hf(model, inputs, got16)


def _within_fp16_noise_of_hf(model, inputs, tokens: list[int]) -> None:
    """Each of `tokens`, fed back as HF would, is HF's argmax or within 0.02 x max|logit| of it."""
    import torch

    ids = inputs["input_ids"]
    for step, token in enumerate(tokens):
        with torch.no_grad():
            out = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)})
        logits = out.logits[0, -1].double()
        gap = float(logits.max() - logits[token])
        print(f"fp16 step {step}: token {token}, HF argmax {int(logits.argmax())}, gap {gap:.3g}")
        assert gap <= 0.02 * max(1.0, float(logits.abs().max())), (step, token, int(logits.argmax()), gap)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
