"""Which ONNX Runtime CPU kernels make int8 compute fast here, and where a graph's time goes.

    python scripts/int8_kernels.py                       # kernel table: one MatMul chain, each quantization
    python scripts/int8_kernels.py --profile DIR GRAPH   # op-type profile of GRAPH in artifact DIR (prefill shapes)

The kernel table runs a chain of four [M, 1024] x [1024, 2816]-shaped MatMuls (the bench decoder's MLP
widths) at M = 1 (a decode step) and M = 600 (an image prompt's prefill), as:
  fp32                   MatMul (MLAS SGEMM, AVX-512)
  int8 dynamic u8s8      DynamicQuantizeLinear + MatMulInteger, int8 weights per channel (what
                         `--quantize vision|prefill` writes): MLAS's u8 x s8 GEMM, the VNNI (vpdpbusd) path
  int8 dynamic u8u8      the same with uint8 weights: no VNNI instruction takes u8 x u8
  MatMulNBits int8/int4  weight-only blocks of 32, accuracy_level 4 (what `--quantize int8|int4` writes)
The CPU flags line says which of AVX-512 VNNI / AMX the kernel sees (AMX needs the OS to enable it).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K, N, LAYERS = 1024, 2816, 4


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split())
    wanted = ["avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"]
    return ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)


def matmul_chain(path: Path, rng) -> None:
    """x [M, K] -> four MatMuls (K->N, N->K, ...) -> [M, K], fp32 weights."""
    nodes, inits, prev = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((K, N) if i % 2 == 0 else (N, K)) * 0.02).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", K])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["m", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def variants(d: Path) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger().setLevel(logging.ERROR)
    out = {"fp32": d / "fp32.onnx"}
    for name, weight_type in (("int8 dynamic u8s8", QuantType.QInt8), ("int8 dynamic u8u8", QuantType.QUInt8)):
        out[name] = d / f"{weight_type.name}.onnx"
        quantize_dynamic(out["fp32"], out[name], op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=weight_type, extra_options={"MatMulConstBOnly": True})
    for bits in (8, 4):
        q = MatMulNBitsQuantizer(onnx.load(str(out["fp32"])), bits=bits, block_size=32, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        out[f"MatMulNBits int{bits}"] = d / f"nbits{bits}.onnx"
        onnx.save(q.model.model, str(out[f"MatMulNBits int{bits}"]))
    return out


def kernel_table(threads: int, repeats: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        matmul_chain(Path(tmp) / "fp32.onnx", rng)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        sessions = {n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                    for n, p in variants(Path(tmp)).items()}
    print(f"onnxruntime {ort.__version__}, {threads} threads; CPU: {cpu_flags()}")
    print(f"| kernel | M=1 ms | M=1 vs fp32 | M=600 ms | M=600 GFLOP/s | M=600 vs fp32 | output cosine vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for m in (1, 600):
        x = rng.standard_normal((m, K)).astype(np.float32)
        times = defaultdict(list)
        for _ in range(repeats):  # interleaved, so drift hits every kernel alike
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times[name].append(time.perf_counter() - t0)
        ref = sessions["fp32"].run(None, {"x": x})[0].ravel()
        for name, s in sessions.items():
            y = s.run(None, {"x": x})[0].ravel()
            rows.setdefault(name, {})[m] = (float(np.median(times[name])), float(y @ ref / np.linalg.norm(y) / np.linalg.norm(ref)))
    flops = 2 * 600 * K * N * LAYERS
    for name, r in rows.items():
        (t1, _), (t600, cos) = r[1], r[600]
        print(f"| {name} | {t1 * 1e3:.2f} | {rows['fp32'][1][0] / t1:.2f}x | {t600 * 1e3:.1f} | {flops / t600 / 1e9:.0f} | "
              f"{rows['fp32'][600][0] / t600:.2f}x | {cos:.5f} |")


def profile_graph(directory: Path, graph: str, threads: int, seq: int) -> None:
    """Op-type shares of one prompt pass (or image batch) of `graph`, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    from vlmdeploy.runtime.dummy import bound_outputs, sample_feeds
    from vlmdeploy.runtime.manifest import load_manifest

    manifest = load_manifest(directory, checksums=False)
    spec = manifest.graphs[graph]
    dims = {"batch": 1, "seq": seq, "past": 0, "total": seq, "capacity": seq, "num_images": 1}
    feeds = sample_feeds(spec, {**{d: 1 for d in spec.dim_names()}, **dims}, manifest.model, np.random.default_rng(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.enable_profiling = threads, True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "p")
        session = ort.InferenceSession(str(directory / manifest.graph_files[graph]), options,
                                       providers=["CPUExecutionProvider"])
        binding = session.io_binding()
        outputs = bound_outputs(spec, feeds)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in spec.output_names:
            if name in outputs:
                binding.bind_output(name, "cpu", 0, outputs[name].dtype, list(outputs[name].shape), outputs[name].ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        for _ in range(3):
            session.run_with_iobinding(binding)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / 3
    total = sum(by_op.values())
    print(f"{graph} ({directory}), {threads} threads, one pass at {dims if 'seq' in spec.dim_names() else 'one image'}: "
          f"{total / 1e3:.0f} ms of kernels")
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1]):
        if us / total >= 0.005:
            print(f"  {op:<36} {us / 1e3:8.1f} ms  {100 * us / total:5.1f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", nargs=2, metavar=("DIR", "GRAPH"), help="profile GRAPH of the artifact in DIR")
    p.add_argument("--seq", type=int, default=600, help="prompt length for a decoder graph's profile")
    args = p.parse_args()
    if args.profile:
        profile_graph(Path(args.profile[0]), args.profile[1], args.threads, args.seq)
    else:
        kernel_table(args.threads, args.repeats)


if __name__ == "__main__":
    main()
