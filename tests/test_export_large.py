"""LLaVA-1.5-7B-shaped export on this machine (issue 14), `make test-large`; not in the default run.

Writes the seeded random fp16 checkpoint with LLaVA-1.5-7B's config (14.1 GB, `make bigckpt`),
exports it with `vlmdeploy export --dtype fp16` (validation on) in a child process whose process
tree is sampled for peak RSS, and checks: peak RSS <= 1.2x the weights, the four graphs and their
validation records, `vlmdeploy check`'s checks (backend ort-cpu-mapped: plain ort-cpu makes float32
copies of fp16 weights, 27 GB here), and that the runtime's cached decode loop generates the same
tokens as recomputing the whole sequence with the portable decoder at every step, up to ties within
fp16 noise (random weights: the tokens are noise, their agreement is not). Needs ~30 GB of disk under $VLMDEPLOY_LARGE_DIR
(default: pytest's tmp dir) and ~17 GB of free memory; ~20 min on 2 cores.
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


def test_llava_7b_fp16_exports_within_1_2x_its_weights(large_dir):
    from vlmdeploy.export import bigckpt
    from vlmdeploy.runtime.check import check_artifact

    em = _export_memory_script()
    ckpt, out = large_dir / "ckpt-7b", large_dir / "art-7b"
    bigckpt.write_checkpoint("llava", ckpt, cfg=em.size_config("7b"), log=lambda m: None)
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    exe = Path(sys.executable).with_name("vlmdeploy")
    run = em.run_sampled([str(exe), "export", "--model", str(ckpt), "--out", str(out), "--dtype", "fp16"],
                         large_dir / "export.log")
    print(json.dumps({"weights_bytes": weights, **run}))
    assert run["rc"] == 0, (large_dir / "export.log").read_text()[-3000:]
    assert run["peak_hwm_bytes"] <= 1.2 * weights, run
    assert run["wall_s"] <= 30 * 60, run
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
