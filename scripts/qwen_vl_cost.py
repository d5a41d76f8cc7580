"""What an image costs on the CPU with Qwen2-VL: pixels -> patches -> visual tokens -> vision ms -> prefill ms.

A seeded random Qwen2-VL with Qwen2-VL-2B's widths (ViT 1280 wide, 16 heads; Qwen2 1536 wide,
12 heads, 2 KV heads, MLP 8960) and reduced depth (--vision-layers, --text-layers; the vocabulary
too), exported with the real exporter, then timed through the torch-free runtime (ONNX Runtime,
--threads). Vision and prefill time grow linearly with depth, so the full model's cost is the
per-layer figure times its depth (printed as an estimate, marked as such).

    .venv/bin/python scripts/qwen_vl_cost.py --out artifacts/qwen-cost [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = [(224, 224), (448, 448), (640, 480), (1280, 720)]  # (width, height)
FULL = {"vision_layers": 32, "text_layers": 28}  # Qwen2-VL-2B


def build(out: Path, vision_layers: int, text_layers: int) -> None:
    import torch
    import transformers

    from vlmdeploy.export.exporter import export_model
    from vlmdeploy.export.tiny import qwen_vl_processor
    from vlmdeploy.export.recipes import TinyConfig
    from vlmdeploy.export.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(4096, qwen=True)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
           ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
           ("vision_end_token_id", "<|vision_end|>"))}
    config = transformers.Qwen2VLConfig(
        vision_config=dict(depth=vision_layers, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
        text_config=dict(vocab_size=4096, hidden_size=1536, intermediate_size=8960, num_hidden_layers=text_layers,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
        **ids)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    cfg = TinyConfig(family="qwen2_vl", text_model="qwen2", min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        qwen_vl_processor(cfg, tokenizer).save_pretrained(tmp)
        export_model(tmp, out)


def measure(out: Path, threads: int, repeats: int) -> list[dict]:
    from vlmdeploy.runtime.vlm import VLM

    vlm = VLM.load(out, threads=threads)
    prompt = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"
    rows = []
    rng = np.random.default_rng(0)
    for w, h in SIZES:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        item = vlm.family.prepare(image)
        vision, prefill = [], []
        for _ in range(repeats):
            r = vlm.generate(prompt, [image], max_new_tokens=1, ignore_eos=True)
            vision.append(r.timings.vision_s)
            prefill.append(r.timings.prefill_s)
        t, gh, gw = item.meta["grid"]
        rows.append({"image": f"{w}x{h}", "resized": f"{gw * 14}x{gh * 14}", "patches": t * gh * gw,
                     "tokens": item.num_tokens, "prompt": r.prompt_tokens,
                     "vision_ms": 1e3 * statistics.median(vision), "prefill_ms": 1e3 * statistics.median(prefill)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("artifacts/qwen-cost"))
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    if not (a.out / "manifest.json").exists():
        build(a.out, a.vision_layers, a.text_layers)
    rows = measure(a.out, a.threads, a.repeats)
    sv, st = FULL["vision_layers"] / a.vision_layers, FULL["text_layers"] / a.text_layers
    print(f"Qwen2-VL-2B widths, {a.vision_layers} ViT + {a.text_layers} text layers measured; "
          f"x{sv:g} / x{st:g} for the full depth (estimate). ONNX Runtime, {a.threads} threads, median of {a.repeats}.")
    print("| image | resized to | patches | visual tokens | prompt tokens | vision ms | prefill ms | est. 2B vision s | est. 2B prefill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['image']} | {r['resized']} | {r['patches']:,} | {r['tokens']:,} | {r['prompt']:,} | {r['vision_ms']:,.0f} | "
              f"{r['prefill_ms']:,.0f} | {r['vision_ms'] * sv / 1e3:,.1f} | {r['prefill_ms'] * st / 1e3:,.1f} |")


if __name__ == "__main__":
    main()
