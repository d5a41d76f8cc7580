"""`make ci-engines`: built engines against ONNX Runtime with Polygraphy's comparator, then the token check.

    python -m vlmdeploy.runtime.tensorrt.compare DIR [--tokens 16]

1. Per engine and per optimization profile, random feeds at the profile's min, opt and max dims run
   through Polygraphy's OnnxrtRunner (CPU, the ONNX the engine came from) and TrtRunner (that profile
   active); `Comparator.compare_accuracy` checks every output within TOLERANCES[precision].
2. Greedy tokens of VLM with backend "trt" (the decode loop with its tensors on the GPU, then with host memory) against
   backend "ort-cpu" on a fixed prompt and image: equal for fp32 engines; for fp16/bf16 the first token
   must match and the common prefix is reported (random-weight models have near-tied logits).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ..dummy import sample_feeds
from ..manifest import load_manifest
from .engines import GREEDY, load_engines
from .greedy import greedy_spec

# (atol, rtol) per engine precision; fp32 engines are built with TF32 off (Polygraphy's default)
TOLERANCES = {"fp32": (1e-3, 1e-3), "fp16": (3e-2, 3e-2), "bf16": (1e-1, 5e-2)}
POINTS = ("min", "opt", "max")


def profile_feeds(spec, profile, facts, seed: int = 0) -> list[dict]:
    """Random feeds at the profile's min, opt and max dims (deduplicated), as the spec describes them."""
    rng = np.random.default_rng(seed)
    points = list(dict.fromkeys(tuple((d, getattr(r, k)) for d, r in profile.dims.items()) for k in POINTS))
    return [sample_feeds(spec, dict(point), facts, rng) for point in points]


def compare_runners(reference, candidate, feeds: list[dict], atol: float, rtol: float) -> bool:
    """Polygraphy's comparator: every output of `candidate` within atol/rtol of `reference` on every feed."""
    from polygraphy import comparator

    simple = getattr(comparator, "SimpleCompareFunc", None) or comparator.CompareFunc.simple  # the latter before 0.50
    results = comparator.Comparator.run([reference, candidate], data_loader=feeds)
    return bool(comparator.Comparator.compare_accuracy(results, compare_func=simple(atol=atol, rtol=rtol)))


def compare_engines(directory: Path) -> list[str]:
    """One line per engine and profile; a line starting with FAIL is a failure."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    manifest, section = load_manifest(directory), load_engines(directory)
    atol, rtol = TOLERANCES[section.precision]
    lines = []
    for name, entry in section.graphs.items():
        engine = EngineFromBytes(BytesFromPath(str(directory / entry.file)))()
        reference = OnnxrtRunner(SessionFromOnnx(str(directory / entry.onnx), providers=["CPUExecutionProvider"]))
        for index, profile in enumerate(entry.profiles):
            spec = greedy_spec(manifest.model.dims) if name == GREEDY else manifest.graphs[name]
            feeds = profile_feeds(spec, profile, manifest.model)
            ok = compare_runners(reference, TrtRunner(engine, optimization_profile=index), feeds, atol, rtol)
            lines.append(f"{'ok  ' if ok else 'FAIL'} {name} profile {profile.describe()}: TensorRT vs ONNX Runtime "
                         f"at {len(feeds)} shapes, atol {atol} rtol {rtol}")
    return lines


def token_check(directory: Path, new_tokens: int = 16) -> list[str]:
    """Greedy tokens of the TensorRT paths vs ONNX Runtime on the CPU, on one prompt with one image."""
    from PIL import Image

    from ..generate import DecodeLoop
    from ..vlm import VLM

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    reference = VLM.load(directory, backend="ort-cpu", decoder="decoder")
    prompt = f"{reference.facts.image_token}\nWhat is in the picture?"
    ask = dict(max_new_tokens=new_tokens, ignore_eos=True)
    want = reference.generate(prompt, [image], **ask).token_ids
    vlm = VLM.load(directory, backend="trt", verify=False)  # the decode loop with its tensors on the GPU
    got = {"trt (device memory)": vlm.generate(prompt, [image], **ask).token_ids}
    vlm.decoder = DecodeLoop(vlm.runners["embed"], vlm.runners["decoder"], vlm.facts)  # the same loop, host memory
    got["trt (host memory)"] = vlm.generate(prompt, [image], **ask).token_ids
    exact = load_engines(directory).precision == "fp32"
    return [_token_line(path, want, tokens, exact) for path, tokens in got.items()]


def _token_line(path: str, want: list[int], got: list[int], exact: bool) -> str:
    prefix = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    ok = got == want if exact else prefix >= 1
    rule = "must equal" if exact else "first token must match"
    return f"{'ok  ' if ok else 'FAIL'} tokens {path}: {prefix}/{len(want)} equal to ort-cpu ({rule})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmdeploy.runtime.tensorrt.compare", description=__doc__.split("\n")[0])
    p.add_argument("dir")
    p.add_argument("--tokens", type=int, default=16, help="new tokens in the token check")
    args = p.parse_args(argv)
    lines = compare_engines(Path(args.dir)) + token_check(Path(args.dir), args.tokens)
    print("\n".join(lines))
    failed = [line for line in lines if line.startswith("FAIL")]
    print("PASS" if not failed else f"FAIL: {len(failed)} check(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
