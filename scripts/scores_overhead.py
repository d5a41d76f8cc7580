"""What the vision graph's attention_scores output costs when no request compresses (docs/PERFORMANCE.md
"Visual-token compression"): ONNX Runtime computes every output of a graph whatever the caller fetches
(microsoft/onnxruntime#16483), so a scored vision graph pays for the scores on every image.

An InternViT-300M-shaped tower (InternVL3-1B/2B: 448 px tiles of 14 px patches, 1024 hidden, 16 heads,
4096 MLP; random weights), cut to `--layers` layers, exported as the InternVL vision graph with and
without scores; one tile, `--threads` threads, the two graphs interleaved, median of `--runs`. The
scores are one extra q/k projection and one softmax of the feature layer, whatever the depth: the
full tower's overhead is this absolute cost over 24 layers' time (per layer x 24).

    .venv/bin/python scripts/scores_overhead.py [--layers 2] [--runs 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmdeploy.export.internvl import InternVisionGraph
from vlmdeploy.export.onnx_export import export_graph
from vlmdeploy.runtime.spec import GraphSpec, TensorSpec

FULL_DEPTH = 24  # InternViT-300M


def tower(layers: int):
    import transformers

    cfg = transformers.InternVLVisionConfig(hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16,
                                            intermediate_size=4096, image_size=448, patch_size=14)
    torch.manual_seed(0)
    return transformers.InternVLVisionModel(cfg).eval()


def spec(scored: bool) -> GraphSpec:
    outputs = (TensorSpec("image_features", "float32", ("num_images", 1024, 1024)),)
    if scored:
        outputs += (TensorSpec("attention_scores", "float32", ("num_images", 1024)),)
    return GraphSpec("vision", (TensorSpec("pixel_values", "float32", ("num_images", 3, 448, 448)),), outputs)


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    model = tower(args.layers)
    example = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 448, 448)).astype(np.float32)}
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scored in (False, True):
            path = Path(tmp) / f"vision_{scored}.onnx"
            export_graph(InternVisionGraph(model, -1, "default", scores=scored).eval(), spec(scored), example, path, 23)
            sessions[scored] = session(path, args.threads)
        tile = {"pixel_values": example["pixel_values"][:1]}
        times = {False: [], True: []}
        for _ in range(args.runs + 1):  # the first round warms up
            for scored, s in sessions.items():
                start = time.perf_counter()
                s.run(None, tile)
                times[scored].append(time.perf_counter() - start)
    plain, scored = (statistics.median(times[k][1:]) for k in (False, True))
    per_layer = plain / args.layers
    print(f"{args.layers} layers, 1 tile, {args.threads} threads, median of {args.runs}: without scores "
          f"{plain * 1e3:.0f} ms, with {scored * 1e3:.0f} ms: +{(scored - plain) * 1e3:.0f} ms")
    print(f"full {FULL_DEPTH}-layer tower ~{per_layer * FULL_DEPTH * 1e3:.0f} ms: the scores add "
          f"{(scored - plain) / (per_layer * FULL_DEPTH):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
