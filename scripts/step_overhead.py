"""Per-step decode overhead outside the graphs, at several context lengths.

    python scripts/step_overhead.py ARTIFACT_DIR [--contexts 64 512 2048] [--steps 32]

For each context length, a prompt of that many tokens is prefilled and `--steps` tokens are decoded
greedily. A step's time is split into the time inside ONNX Runtime's run call (embed + decoder
graphs) and everything else (feed checks, binding the cache views, mask update, sampling).
If the cache were copied or reallocated per step, "outside" would grow with the context.
"""

from __future__ import annotations

import argparse
import statistics

from vlmdeploy.runtime.vlm import VLM


def measure(vlm: VLM, context: int, steps: int) -> dict:
    prompt = "hi " * max(1, context - 2)
    ids = vlm.text.encode(prompt)
    prompt = vlm.text.decode(ids[: context - 1])  # about `context` tokens
    runs = []
    for _ in range(3):
        r = vlm.generate(prompt, max_new_tokens=steps + 1, ignore_eos=True)
        runs.append(r)
    t = [r.timings for r in runs]
    return {
        "context": runs[0].prompt_tokens,
        "step_ms": statistics.median(1000 / x.decode_tokens_per_s for x in t),
        "outside_graph_ms": statistics.median(1000 * x.decode_step_overhead_s for x in t),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    p.add_argument("--steps", type=int, default=32)
    args = p.parse_args()
    vlm = VLM.load(args.dir)
    vlm.generate("warm up", max_new_tokens=4, ignore_eos=True)
    print(f"{'context':>8} {'step ms':>9} {'outside graph ms':>17} {'outside %':>10}")
    for c in args.contexts:
        m = measure(vlm, c, args.steps)
        print(f"{m['context']:>8} {m['step_ms']:>9.2f} {m['outside_graph_ms']:>17.3f} {100 * m['outside_graph_ms'] / m['step_ms']:>9.1f}%")


if __name__ == "__main__":
    main()
