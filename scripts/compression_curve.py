"""The visual-token compression curve of an exported shapes model (docs/PERFORMANCE.md "Visual-token
compression"): exact match on the held-out questions and time to first token at 100%, 50%, 25% and
12.5% of the visual tokens, for each method, side by side in one run (one process, ONNX Runtime on
`--threads`; the TTFT rounds interleave the settings, median of `--rounds`).

    .venv/bin/vlmdeploy export --model shapes-hd --out artifacts/shapes-hd
    .venv/bin/python scripts/compression_curve.py artifacts/shapes-hd [--n 500] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

from vlmdeploy.demo import shapes
from vlmdeploy.demo.evaluate import evaluate_artifact, picture_size
from vlmdeploy.demo.scorecard import PROMPT
from vlmdeploy.runtime.compress import METHODS
from vlmdeploy.runtime.vlm import VLM

RATIOS = (1.0, 0.5, 0.25, 0.125)


def settings(methods) -> list[tuple[str, float | None]]:
    """(method, keep ratio); the full row once (None: no compression)."""
    return [("none", None)] + [(m, r) for r in RATIOS[1:] for m in methods]


def ttft(vlm: VLM, example) -> dict:
    """One request, one new token: time to first token and its parts (s)."""
    r = vlm.generate(PROMPT.format(question=example.question), [example.image], max_new_tokens=1)
    t = r.timings
    return {"ttft": t.time_to_first_token_s, "prefill": t.prefill_s, "vision": t.vision_s, "prompt": r.prompt_tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="an exported shapes / shapes-hd artifact")
    p.add_argument("--n", type=int, default=500, help="held-out questions per setting (0: TTFT only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15, help="TTFT runs per setting (interleaved; median)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args(argv)
    vlms = {s: VLM.load(args.dir, threads=args.threads, visual_tokens=s[1], compression=s[0] if s[1] else "pool")
            for s in settings(args.methods)}
    size = picture_size(next(iter(vlms.values())))
    questions = list(shapes.examples("heldout", args.rounds, size=size))
    times = {s: [] for s in vlms}
    for s, vlm in vlms.items():
        ttft(vlm, questions[0])  # warm-up
    for q in questions:  # interleaved: every setting sees the same question in the same round
        for s, vlm in vlms.items():
            times[s].append(ttft(vlm, q))
    rows = []
    for s, vlm in vlms.items():
        exact = evaluate_artifact(args.dir, args.n, threads=args.threads, vlm=vlm).summary()["accuracy"] if args.n else 0.0
        med = {k: statistics.median(t[k] for t in times[s]) for k in ("ttft", "prefill", "vision", "prompt")}
        best = {f"{k}_min_s": min(t[k] for t in times[s]) for k in ("ttft", "prefill", "vision")}
        tokens = vlm.family.compressed(vlm.family.prepare(questions[0].image)).num_tokens if s[1] else \
            vlm.family.prepare(questions[0].image).num_tokens
        rows.append({"method": s[0], "ratio": s[1] or 1.0, "visual_tokens": tokens, "exact": exact,
                     **{f"{k}_s": v for k, v in med.items() if k != "prompt"}, **best, "prompt_tokens": med["prompt"]})
        print(f"  {s[0]:6s} {s[1] or 1.0:<6} {rows[-1]['exact']:.3f}  ttft {med['ttft'] * 1e3:.1f} ms", flush=True)
    print(table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def table(rows: list[dict], args) -> str:
    full = rows[0]
    lines = [f"{args.dir}: {args.n} held-out questions, TTFT median (min) of {args.rounds} (1 image, 1 new token), "
             f"{args.threads} threads",
             "", "| method | kept | visual tokens | prompt tokens | exact match | of full | TTFT ms | prefill ms | "
             "vision ms | prefill speed-up | TTFT speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda r, k: f"{r[k + '_s'] * 1e3:.1f} ({r[k + '_min_s'] * 1e3:.1f})"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['ratio']:.1%} | {r['visual_tokens']} | {r['prompt_tokens']:.0f} | "
                     f"{r['exact']:.1%} | {r['exact'] / max(full['exact'], 1e-9):.1%} | {ms(r, 'ttft')} | {ms(r, 'prefill')} | "
                     f"{ms(r, 'vision')} | {full['prefill_s'] / r['prefill_s']:.2f}x ({full['prefill_min_s'] / r['prefill_min_s']:.2f}x) | "
                     f"{full['ttft_s'] / r['ttft_s']:.2f}x ({full['ttft_min_s'] / r['ttft_min_s']:.2f}x) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
