"""`vlmdeploy bench`: this runtime side by side with HF transformers eager (and onnxruntime-genai when
installed) on the same weights, in one run.

Each runner lives in its own worker process (clean load time and peak RSS); the parent sends it
one measurement at a time and interleaves runners, so drift on the machine hits all of them.
Decode rates are steady-state: (tokens after the first) / (time from the first to the last token).
The weight-streaming floor is (bytes of decoder weights read per step) / (read bandwidth measured
in the same run with a multi-threaded GEMV).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT = "USER: <image>\nDescribe the picture. ASSISTANT:"


# ---------------------------------------------------------------------------------------------
# workers: each answers {"op": ...} lines on stdin with one JSON line on stdout


class OursWorker:
    def __init__(self, artifact: str, options: str):
        """`options`: JSON of VLM.load's keyword arguments (decoder, visual_tokens, compression)."""
        from vlmdeploy.runtime.vlm import VLM

        self.vlm = VLM.load(artifact, verify=False, threads=_threads(), **json.loads(options))

    def ttft(self, image_seed: int) -> float:
        t0 = time.perf_counter()
        next(iter(self.vlm.stream(PROMPT, [_image(image_seed)], max_new_tokens=1, ignore_eos=True)), None)
        return time.perf_counter() - t0

    def decode(self, ids: list[list[int]], new_tokens: int) -> list[float]:
        """Token timestamps of a greedy generation from the given token ids (text only)."""
        from vlmdeploy.runtime.generate import Batch
        from vlmdeploy.runtime.sampling import Sampler, SamplingParams

        embeds = self.vlm.runners["embed"].run({"input_ids": np.asarray(ids, np.int64)})["inputs_embeds"]
        batch = Batch(embeds, np.ones(embeds.shape[:2], np.int64))
        sampler = Sampler(SamplingParams(max_new_tokens=new_tokens))
        return [time.perf_counter() for _ in self.vlm.decoder.tokens(batch, new_tokens, sampler)]

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        from vlmdeploy.runtime.generate import Batch
        from vlmdeploy.runtime.sampling import Sampler, SamplingParams

        embeds = self.vlm.runners["embed"].run({"input_ids": np.asarray([ids], np.int64)})["inputs_embeds"]
        batch = Batch(embeds, np.ones(embeds.shape[:2], np.int64))
        return [int(t[0]) for t in self.vlm.decoder.tokens(batch, new_tokens, Sampler(SamplingParams(max_new_tokens=new_tokens)))]


class HFWorker:
    def __init__(self, checkpoint: str):
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        torch.set_num_threads(_threads())
        self.torch = torch
        self.model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()  # default (sdpa) attention
        self.model.generation_config.eos_token_id = None
        self.processor = AutoProcessor.from_pretrained(checkpoint)

    def _generate(self, inputs: dict, new_tokens: int) -> list[float]:
        stamps: list[float] = []

        class Streamer:
            def put(self, value):  # first call: the prompt; then one call per new token
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with self.torch.no_grad():
            self.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, streamer=Streamer())
        return stamps[1:]

    def ttft(self, image_seed: int) -> float:
        t0 = time.perf_counter()
        inputs = self.processor(images=[_image(image_seed)], text=[PROMPT], return_tensors="pt")
        return self._generate(inputs, 1)[0] - t0

    def decode(self, ids: list[list[int]], new_tokens: int) -> list[float]:
        input_ids = self.torch.tensor(ids)
        return self._generate({"input_ids": input_ids, "attention_mask": self.torch.ones_like(input_ids)}, new_tokens)


class GenaiWorker:
    """onnxruntime-genai on the same language-model weights (text only: it has no LLaVA vision path)."""

    def __init__(self, model_dir: str):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(model_dir)

    def ttft(self, image_seed: int) -> None:
        return None

    def decode(self, ids: list[list[int]], new_tokens: int) -> list[float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids[0]) + new_tokens, do_sample=False, batch_size=len(ids))
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(ids, np.int32))
        stamps = []
        for _ in range(new_tokens):
            if not stamps:
                gen.get_next_tokens()  # the first token is sampled from the prefill logits
            else:
                gen.generate_next_token()
            stamps.append(time.perf_counter())
        return stamps


WORKERS = {"ours": OursWorker, "hf": HFWorker, "genai": GenaiWorker}


def _threads() -> int:
    """Threads every side uses: `--threads` (passed to the worker processes in the environment), else
    every core this process may run on."""
    given = os.environ.get("VLMDEPLOY_BENCH_THREADS")
    return int(given) if given else len(os.sched_getaffinity(0))


def _image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (360, 480, 3), dtype=np.uint8))


def peak_rss_bytes() -> int:
    """VmHWM of this process (ru_maxrss would include the parent's peak: it survives exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker_main(kind: str, arg: str, extra: str | None) -> None:
    t0 = time.perf_counter()
    worker = WORKERS[kind](arg, extra) if extra else WORKERS[kind](arg)
    _reply({"load_s": time.perf_counter() - t0})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "rss":
            _reply({"peak_rss_bytes": peak_rss_bytes()})
            continue
        _reply({"value": getattr(worker, cmd["op"])(*cmd["args"])})


def _reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# parent


@dataclass
class Runner:
    name: str
    proc: subprocess.Popen
    load_s: float
    weight_bytes: int | None  # decoder weights read per decode step
    ttft_only: bool = False  # a compression setting: only time to first token differs from its artifact's runner

    def call(self, op: str, *args):
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"bench worker {self.name} died (see its stderr above)")
        return json.loads(reply)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def start(name: str, kind: str, arg: str, extra: str | None = None, weight_bytes: int | None = None,
          ttft_only: bool = False) -> Runner:
    cmd = [sys.executable, "-m", "vlmdeploy.export.bench", "--worker", kind, arg] + ([extra] if extra else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    first = proc.stdout.readline()
    if not first:
        raise RuntimeError(f"bench worker {name} failed to start: {' '.join(cmd)}")
    return Runner(name, proc, json.loads(first)["load_s"], weight_bytes, ttft_only)


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s streamed by a multi-threaded float32 GEMV over a matrix far larger than the caches."""
    cols = 16384
    a = np.random.default_rng(0).standard_normal((int(gib * (1 << 30)) // (4 * cols), cols), dtype=np.float32)
    x = np.ones(cols, np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ x
        times.append(time.perf_counter() - t0)
    return a.nbytes / min(times)


def rate(stamps: list[float], batch: int = 1) -> float:
    """Steady-state tokens/s (per batch, aggregated over rows)."""
    return batch * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def token_ids(vocab: int, length: int, rows: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, min(vocab, 240), (rows, length)).tolist()


# ---------------------------------------------------------------------------------------------
# artifacts: one checkpoint, exported fp32 and int8, and (optionally) onnxruntime-genai's model


# bench variants of the fp32 export (`vlmdeploy quantize`): decode-speed weights, TTFT int8 compute
VARIANTS = {
    "int8": {"scheme": "int8"},
    "int4": {"scheme": "int4"},
    "int8-compute": {"scheme": None, "vision": True, "prefill": True},  # fp32 decode, int8 image graphs + prefill
}


def prepare(recipe: str, root: Path, quantize: list[str], log) -> dict[str, Path]:
    """Checkpoint + artifacts under `root`, built once and reused."""
    from .exporter import export_model
    from .quantize import quantize_artifact
    from .recipes import load_recipe
    from .tiny import build_tiny_checkpoint

    paths = {"checkpoint": root / "checkpoint", "fp32": root / "fp32"}
    cfg = load_recipe(recipe).random_init
    if cfg is None:
        raise ValueError(f"bench needs a random-init recipe (bench, tiny); {recipe} has real weights")
    if not (paths["checkpoint"] / "config.json").is_file():
        log(f"building the {recipe} checkpoint (seeded random weights)")
        build_tiny_checkpoint(cfg, paths["checkpoint"])
    if not (paths["fp32"] / "manifest.json").is_file():
        log("exporting fp32")
        export_model(str(paths["checkpoint"]), paths["fp32"], log=log)
    for variant in quantize:
        paths[variant] = root / variant
        if not (paths[variant] / "manifest.json").is_file():
            log(f"deriving {variant} from the fp32 export")
            quantize_artifact(paths["fp32"], paths[variant], log=log, **VARIANTS[variant])
    if _has_genai():
        paths["genai"] = root / "genai"
        if not (paths["genai"] / "genai_config.json").is_file():
            log("building the onnxruntime-genai model from the same language-model weights")
            build_genai(paths["checkpoint"], paths["genai"], root / "genai-src")
        _set_genai_threads(paths["genai"] / "genai_config.json", _threads())
    return paths


def _has_genai() -> bool:
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return False
    return True


def build_genai(checkpoint: Path, out: Path, scratch: Path) -> None:
    """The LLaVA's language model saved as a LlamaForCausalLM, then onnxruntime-genai's builder."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    llama = LlamaForCausalLM(llava.config.get_text_config())
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    llama.save_pretrained(scratch)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(scratch)
    subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(scratch), "-o", str(out),
         "-p", "fp32", "-e", "cpu", "-c", str(scratch / "cache")],
        check=True, stdout=subprocess.DEVNULL,
    )


def _set_genai_threads(config_path: Path, threads: int) -> None:
    """Same thread count as the other runners (genai reads it from its config file)."""
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))


def weight_bytes(artifact: Path, graph: str) -> int:
    return sum(p.stat().st_size for p in artifact.glob(f"{graph}.onnx*"))


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    runs: int
    contexts: tuple[int, ...]
    new_tokens: int
    batch: int


def measure(runners: list[Runner], plan: Plan, vocab: int, log) -> dict[str, dict[str, list[float]]]:
    """Interleaved: every run measures every runner once per metric."""
    results: dict[str, dict[str, list[float]]] = {r.name: {} for r in runners}
    log("warm-up (not recorded): first calls allocate and touch every weight")
    for r in runners:
        r.call("ttft", 99)
        if not r.ttft_only:
            r.call("decode", token_ids(vocab, plan.contexts[0], 1, 99), 4)
    for run in range(plan.runs):
        log(f"run {run + 1}/{plan.runs}")
        for metric, call in _metrics(plan, vocab, seed=run):
            for r in runners:
                if r.ttft_only and metric != "ttft_s":
                    continue
                value = call(r)
                if value is not None:
                    results[r.name].setdefault(metric, []).append(value)
    for r in runners:
        results[r.name]["load_s"] = [r.load_s]
        results[r.name]["peak_rss_gb"] = [r.call("rss")["peak_rss_bytes"] / 1e9]
    return results


def _metrics(plan: Plan, vocab: int, seed: int):
    yield "ttft_s", lambda r: r.call("ttft", seed)["value"]
    for c in plan.contexts:
        ids = token_ids(vocab, c, 1, seed)
        yield f"tok_s@{c}", lambda r, ids=ids: rate(r.call("decode", ids, plan.new_tokens)["value"])
    ids = token_ids(vocab, plan.contexts[0], plan.batch, seed)
    yield f"b{plan.batch}_tok_s@{plan.contexts[0]}", lambda r: rate(r.call("decode", ids, plan.new_tokens)["value"], plan.batch)


def summarize(results: dict, floor_s: dict[str, float | None], plan: Plan) -> dict:
    table = {}
    for name, metrics in results.items():
        row = {m: {"median": statistics.median(v), "min": min(v), "max": max(v)} for m, v in metrics.items()}
        c0 = plan.contexts[0]
        if floor_s.get(name) and f"tok_s@{c0}" in row:
            row["step_over_floor"] = {"median": (1 / row[f"tok_s@{c0}"]["median"]) / floor_s[name]}
        table[name] = row
    return table


def ratios(table: dict, plan: Plan, ours: str, others: dict[str, str]) -> dict[str, float]:
    med = lambda name, m: table.get(name, {}).get(m, {}).get("median")  # noqa: E731
    c0, cN, b = plan.contexts[0], plan.contexts[-1], plan.batch
    out = {}
    for label, other in others.items():
        if med(other, f"tok_s@{c0}"):
            out[f"decode {ours}/{label}"] = med(ours, f"tok_s@{c0}") / med(other, f"tok_s@{c0}")
        if med(other, "ttft_s"):
            out[f"ttft {ours}/{label}"] = med(ours, "ttft_s") / med(other, "ttft_s")
    out[f"tok/s@{cN} / tok/s@{c0} ({ours})"] = med(ours, f"tok_s@{cN}") / med(ours, f"tok_s@{c0}")
    out[f"batch {b} aggregate / batch 1 ({ours})"] = med(ours, f"b{b}_tok_s@{c0}") / med(ours, f"tok_s@{c0}")
    return out


def format_table(table: dict, plan: Plan) -> str:
    c0 = plan.contexts[0]
    cols = ["load_s", "ttft_s", *(f"tok_s@{c}" for c in plan.contexts), f"b{plan.batch}_tok_s@{c0}", "peak_rss_gb", "step_over_floor"]
    head = f"{'runner':<28}" + "".join(f"{c:>16}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, row in table.items():
        cells = []
        for c in cols:
            v = row.get(c)
            if v is None:
                cells.append(f"{'-':>16}")
            elif "min" in v and v["max"] != v["min"]:
                cells.append(f"{v['median']:>9.3g} ±{(v['max'] - v['min']) / 2:<5.2g}")
            else:
                cells.append(f"{v['median']:>16.3g}")
        lines.append(f"{name:<28}" + "".join(cells))
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The report as the markdown tables docs/PERFORMANCE.md carries."""
    plan = Plan(**{**report["plan"], "contexts": tuple(report["plan"]["contexts"])})
    c0 = plan.contexts[0]
    cols = ["load_s", "ttft_s", *(f"tok_s@{c}" for c in plan.contexts), f"b{plan.batch}_tok_s@{c0}", "peak_rss_gb", "step_over_floor"]
    lines = ["| runner | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in report["table"].items():
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("-" if v is None else f"{v['median']:.3g}" + (f" ({v['min']:.3g}–{v['max']:.3g})" if v.get("max", 0) != v.get("min", 0) else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in {**report["ratios"], **report["greedy_agreement"]}.items()]
    m = report["machine"]
    lines += ["", f"Read bandwidth {m['read_bandwidth_gbs']:.1f} GB/s ({m['cpus']} threads); floor per decode step (ms): "
              + ", ".join(f"{k} {v:.1f}" for k, v in report["floor_ms"].items()) + "."]
    return "\n".join(lines)


def agreement(ours: Runner, other: Runner, vocab: int, plan: Plan, prompts: int = 4) -> float:
    """Share of greedy tokens equal between two runners of ours (e.g. int8 vs fp32)."""
    same = total = 0
    for seed in range(prompts):
        ids = token_ids(vocab, plan.contexts[0], 1, 100 + seed)[0]
        a, b = ours.call("greedy", ids, plan.new_tokens)["value"], other.call("greedy", ids, plan.new_tokens)["value"]
        same += sum(x == y for x, y in zip(a, b))
        total += len(a)
    return same / total


def run_bench(args, log) -> dict:
    root = Path(args.dir or f"artifacts/bench-{args.model}")
    paths = prepare(args.model, root, args.quantize, log)
    plan = Plan(args.runs, tuple(args.contexts), args.new_tokens, args.batch)
    vocab = json.loads((paths["fp32"] / "manifest.json").read_text())["model"]["dims"]["vocab"]
    bandwidth = read_bandwidth(args.bandwidth_gib)
    log(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    gqa, portable = json.dumps({"decoder": "decoder_gqa"}), json.dumps({"decoder": "decoder"})
    specs = [("vlmdeploy fp32", "ours", str(paths["fp32"]), gqa, weight_bytes(paths["fp32"], "decoder_gqa"))]
    specs += [(f"vlmdeploy {q}", "ours", str(paths[q]), gqa, weight_bytes(paths[q], "decoder_gqa")) for q in args.quantize]
    specs += [("vlmdeploy fp32 portable", "ours", str(paths["fp32"]), portable, weight_bytes(paths["fp32"], "decoder"))]
    specs += [("hf eager fp32", "hf", str(paths["checkpoint"]), None, None)]
    if "genai" in paths:
        specs += [("onnxruntime-genai fp32", "genai", str(paths["genai"]), None, weight_bytes(paths["genai"], "model"))]
    compressed = compression_specs(paths, args)
    specs += [(name, kind, arg, extra, None) for name, kind, arg, extra, _ in compressed]
    ttft_only = {name for name, *_ in compressed}
    runners = []
    try:
        for name, kind, arg, extra, wbytes in specs:
            log(f"starting {name}")
            runners.append(start(name, kind, arg, extra, wbytes, ttft_only=name in ttft_only))
        results = measure(runners, plan, vocab, log)
        agree = {f"{r.name} vs fp32": agreement(r, runners[0], vocab, plan) for r in runners[1:1 + len(args.quantize)]}
    finally:
        for r in runners:
            r.close()
    floor = {r.name: r.weight_bytes / bandwidth if r.weight_bytes else None for r in runners}
    table = summarize(results, floor, plan)
    others = {"hf": "hf eager fp32", "genai": "onnxruntime-genai fp32"}
    report = {
        "machine": {"cpus": _threads(), "read_bandwidth_gbs": bandwidth / 1e9},
        "plan": plan.__dict__,
        "table": table,
        "ratios": {**ratios(table, plan, "vlmdeploy fp32", others),
                   **{f"decode {q}/fp32": table[f"vlmdeploy {q}"][f"tok_s@{plan.contexts[0]}"]["median"]
                      / table["vlmdeploy fp32"][f"tok_s@{plan.contexts[0]}"]["median"] for q in args.quantize},
                   **{f"ttft {q}/hf": table[f"vlmdeploy {q}"]["ttft_s"]["median"] / table["hf eager fp32"]["ttft_s"]["median"]
                      for q in args.quantize},
                   **{f"ttft {name.removeprefix('vlmdeploy ')}/{base}": table[name]["ttft_s"]["median"]
                      / table[f"vlmdeploy {base}"]["ttft_s"]["median"] for name, *_, base in compressed},
                   **{f"ttft {name.removeprefix('vlmdeploy ')}/hf": table[name]["ttft_s"]["median"]
                      / table["hf eager fp32"]["ttft_s"]["median"] for name, *_ in compressed}},
        "greedy_agreement": agree,
        "floor_ms": {k: v * 1e3 for k, v in floor.items() if v},
    }
    return report


def compression_specs(paths: dict, args) -> list[tuple[str, str, str, str, str]]:
    """Time-to-first-token runners for `--visual-tokens` settings, on the fp32 export and on the
    int8-compute one when measured: (name, kind, artifact, VLM.load options, the variant it compresses)."""
    from vlmdeploy.runtime.compress import parse_visual_tokens

    bases = ["fp32", *(["int8-compute"] if "int8-compute" in args.quantize else [])]
    specs = []
    for setting in map(parse_visual_tokens, args.visual_tokens):  # ValueError: what is allowed
        label = f"{args.compression} {setting}" if isinstance(setting, int) else f"{args.compression} {setting:.4g}"
        options = {"decoder": "decoder_gqa", "visual_tokens": setting, "compression": args.compression}
        specs += [(f"vlmdeploy {base} {label}", "ours", str(paths[base]), json.dumps(options), base) for base in bases]
    return specs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bench", help="a random-init recipe (bench, tiny)")
    p.add_argument("--dir", help="where checkpoint and artifacts are kept (default artifacts/bench-MODEL)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="+", default=[64, 512, 2048])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--quantize", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variants of the fp32 export to measure beside it: int8/int4 decoder weights; int8-compute: "
                        "the image graphs and the prompt pass in int8 (vlmdeploy quantize --vision --prefill)")
    p.add_argument("--visual-tokens", nargs="*", default=["0.25"], metavar="K",
                   help="visual-token compression settings to time (time to first token) on fp32 and int8-compute: "
                        "tokens per image or a fraction (default: 0.25; none: --visual-tokens with no value)")
    p.add_argument("--compression", choices=["pool", "topk", "merge"], default="pool",
                   help="method for --visual-tokens (runtime/compress.py)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the bandwidth probe")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--threads", type=int, help="threads for every side (ONNX Runtime, torch, onnxruntime-genai); "
                                                "default: all cores")


def main(args) -> int:
    log = lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True)  # noqa: E731
    if args.threads is not None:
        if args.threads < 1 or args.threads > len(os.sched_getaffinity(0)):
            raise ValueError(f"--threads {args.threads}: allowed 1..{len(os.sched_getaffinity(0))} (the cores here)")
        os.environ["VLMDEPLOY_BENCH_THREADS"] = str(args.threads)
    report = run_bench(args, log)
    print(format_table(report["table"], Plan(**report["plan"])))
    print()
    for k, v in {**report["ratios"], **report["greedy_agreement"]}.items():
        print(f"  {k:<48} {v:.3f}")
    print(f"  read bandwidth {report['machine']['read_bandwidth_gbs']:.1f} GB/s; floor per decode step (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in report["floor_ms"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        Path(args.json).with_suffix(".md").write_text(format_markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    else:
        parser = argparse.ArgumentParser(prog="vlmdeploy bench")
        add_arguments(parser)
        sys.exit(main(parser.parse_args()))
