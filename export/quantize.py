"""Quantization of an artifact's ONNX Runtime graphs, two independent kinds:

- weight-only, for decode (`--quantize int8|int4`): decoder_gqa's MatMuls -> MatMulNBits, symmetric,
  one scale per block of `block_size` input channels, `accuracy_level=4`. A decode step reads every
  weight once (bandwidth-bound), so fewer weight bytes is the speed.
- int8 compute, for the compute-bound passes (`--quantize vision` / `prefill`): dynamic quantization
  (int8 x int8 MatMulInteger), for the image graphs and for a prompt-pass copy of decoder_gqa.

The portable decoder stays float (TensorRT quantizes on its own terms). A quantized graph is not
claimed equal to PyTorch: how far its outputs moved from fp32 is recorded; accuracy is measured by
`vlmdeploy eval` and greedy agreement by `vlmdeploy bench`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

SCHEMES = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4


def quantize_graph(path: Path, scheme: str) -> dict:
    """Rewrite the graph at `path` (external data beside it) with quantized MatMul weights."""
    from vlmdeploy.runtime.offline import import_onnxruntime

    import_onnxruntime()  # telemetry off before onnxruntime's first import
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line per node
    if scheme not in SCHEMES:
        raise ValueError(f"--quantize {scheme!r} not one of {sorted(SCHEMES)}")
    model = onnx.load(str(path))
    quantizer = MatMulNBitsQuantizer(
        model, bits=SCHEMES[scheme], block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
    )
    quantizer.process()
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(quantizer.model.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=data.name, size_threshold=1024)
    return {"scheme": scheme, "bits": SCHEMES[scheme], "block_size": BLOCK_SIZE, "accuracy_level": ACCURACY_LEVEL}


# int8 compute (`--quantize vision` / `prefill`): ONNX Runtime's dynamic quantization of the MatMuls
# (int8 weights per output channel, activations quantized per call by DynamicQuantizeLinear, then
# MatMulInteger: MLAS's u8s8 GEMM, on AVX-512 VNNI here (AMX where the OS exposes it)).
INT8_COMPUTE = ("vision", "prefill")
PREFILL_SUFFIX = "_int8"  # decoder_gqa -> decoder_gqa_int8, the graph the prompt pass runs


def dynamic_int8(src: Path, dst: Path) -> dict:
    """`src` (fp32 graph, left as it is) -> `dst` computing its MatMuls in int8; norms, softmax,
    attention and the rest stay fp32. External data beside `dst` as `dst.name + ".data"`."""
    from vlmdeploy.runtime.offline import import_onnxruntime

    import_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    scratch = dst.with_name(dst.stem + ".q.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" advice on root
    quantize_dynamic(src, scratch, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                     use_external_data_format=True,  # contrib ops (decoder_gqa) defeat type inference: all is fp32
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    model = onnx.load(str(scratch))
    for leftover in dst.parent.glob(f"{scratch.name}*"):
        leftover.unlink()
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)
    return {"scheme": "int8-dynamic", "op_types": ["MatMul"], "per_channel": True}


def add_int8_compute(tmp: Path, facts, specs: dict, kinds, validation: dict, log) -> tuple:
    """In the staged artifact `tmp` (fp32 graphs): `vision` rewrites the image chain's graphs to compute
    in int8; `prefill` adds `decoder_gqa_int8`, an int8-compute copy of decoder_gqa that the runtime
    runs for the prompt pass only (decode steps keep decoder_gqa's weights, quantized or not). How far
    the outputs moved from the fp32 graphs is measured on the validation shapes and recorded in
    `validation` (not enforced). Returns (facts with the prefill graph in its pipeline, source record)."""
    import dataclasses

    bad = sorted(set(kinds) - set(INT8_COMPUTE))
    if bad:
        raise ValueError(f"int8 compute for {bad}: allowed {list(INT8_COMPUTE)}")
    if facts.dims.dtype != "float32":
        raise ValueError(f"int8 compute needs an fp32 export (this one is {facts.dims.dtype}): its MatMuls are "
                         "quantized from fp32 weights; export with --dtype fp32")
    record = {}
    if "vision" in kinds:
        graphs = _image_graphs(facts)
        for graph in graphs:
            log(f"{graph}: int8 compute (dynamic quantization of its MatMuls)")
            path = tmp / f"{graph}.onnx"
            quantized = path.with_name(f"{graph}.int8.onnx")
            record["vision"] = {**dynamic_int8(path, quantized), "graphs": graphs}
            validation[f"{graph}_int8"] = _outputs_moved(path, quantized, specs[graph], facts)
            _replace_graph(quantized, path)
        log("image graphs int8: output cosine vs fp32 " + ", ".join(
            f"{g} {validation[f'{g}_int8']['cosine']:.5f}" for g in graphs) + " (recorded, not enforced)")
    if "prefill" in kinds:
        if "decoder_gqa" not in specs:
            raise ValueError(f"int8 prefill derives from decoder_gqa, which this artifact lacks (graphs: {sorted(specs)})")
        name = "decoder_gqa" + PREFILL_SUFFIX
        log(f"{name}: int8-compute copy of decoder_gqa for the prompt pass")
        record["prefill"] = {**dynamic_int8(tmp / "decoder_gqa.onnx", tmp / f"{name}.onnx"), "graph": name}
        specs[name] = dataclasses.replace(specs["decoder_gqa"], name=name)
        validation[name] = _outputs_moved(tmp / "decoder_gqa.onnx", tmp / f"{name}.onnx", specs["decoder_gqa"], facts)
        log(f"{name}: logits cosine vs fp32 {validation[name]['cosine']:.5f} (recorded, not enforced)")
        facts = dataclasses.replace(facts, pipeline={**facts.pipeline, "prefill": {"decoder_gqa": name}})
    return facts, record


def _replace_graph(src: Path, dst: Path) -> None:
    """Move graph `src` (+ its external data) over `dst`, re-pointing the graph at `dst.name + ".data"`."""
    model = onnx.load(str(src))
    for f in (src, src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=dst.name + ".data", size_threshold=1024)


def quantize_artifact(src: Path, out: Path, scheme: str | None, log=print, vision: bool = False,
                      prefill: bool = False) -> dict:
    """`vlmdeploy quantize DIR --out OUT`: a copy of an exported artifact with decoder_gqa's weights
    quantized (`scheme`), the image chain's graphs computing in int8 (`vision`), and/or an int8-compute
    prompt-pass decoder (`prefill`), without re-exporting (no PyTorch, no checkpoint). The copy is
    written beside `out` and swapped in when complete; `src` is not touched."""
    import dataclasses
    import shutil

    from vlmdeploy.runtime.manifest import check_export_target, describe_files, load_manifest, staging_dir

    src, out = Path(src), Path(out)
    manifest = load_manifest(src, checksums=True)
    kinds = [k for k, on in (("vision", vision), ("prefill", prefill)) if on]
    _check_quantizable(src, manifest, scheme, kinds)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source artifact; write the quantized copy elsewhere")
    with staging_dir(out, check_export_target) as tmp:
        for name in manifest.files:
            shutil.copy2(src / name, tmp / name)
        validation, source = dict(manifest.validation), {**(manifest.source or {}), "quantized_from": str(src)}
        facts, specs, record = manifest.model, dict(manifest.graphs), {}
        if kinds:  # before the weights: the prefill graph derives from fp32 decoder_gqa
            facts, done = add_int8_compute(tmp, facts, specs, kinds, validation, log)
            source["int8_compute"] = {**(source.get("int8_compute") or {}), **done}
        if scheme is not None:
            log(f"quantizing decoder_gqa weights to {scheme}")
            record = source["quantization"] = quantize_graph(tmp / "decoder_gqa.onnx", scheme)
            graph = manifest.graph_files["decoder_gqa"]
            diff = _outputs_moved(src / graph, tmp / graph, specs["decoder_gqa"], facts)["max_abs_diff"]
            log(f"decoder_gqa {scheme}: max abs logit diff vs fp32 {diff:.3g} (recorded, not enforced)")
            validation["decoder_gqa"] = {"quantized": scheme, "max_abs_diff_vs_fp32": diff,
                                         "fp32": manifest.validation.get("decoder_gqa")}
        files = describe_files(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != "manifest.json"))
        graph_files = {n: manifest.graph_files.get(n, f"{n}.onnx") for n in specs}
        dataclasses.replace(manifest, model=facts, graphs=specs, graph_files=graph_files, files=files,
                            validation=validation, source=source).write(tmp)
    log(f"done: {out}")
    return record


def _check_quantizable(src: Path, manifest, scheme: str | None, kinds: list[str]) -> None:
    from vlmdeploy.runtime.manifest import ArtifactError

    if scheme is None and not kinds:
        raise ValueError("nothing to quantize: give --scheme int8|int4 (decoder_gqa's weights), --vision and/or --prefill")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"--scheme {scheme!r} not one of {sorted(SCHEMES)}")
    source = manifest.source or {}
    done = dict(source.get("int8_compute") or {})
    for kind in kinds:
        if kind in done:
            raise ArtifactError(f"{src}: {'the image graphs are' if kind == 'vision' else 'the prefill graph is'} "
                                f"already int8; start from the fp32 artifact")
    if (scheme is not None or "prefill" in kinds) and "decoder_gqa" not in manifest.graphs:
        raise ArtifactError(f"{src} has no decoder_gqa graph (the one weight-only quantization and the int8 prefill "
                            f"apply to); its graphs are {sorted(manifest.graphs)}")
    if source.get("quantization") and (scheme is not None or "prefill" in kinds):
        raise ArtifactError(f"{src}: decoder_gqa is already quantized ({source['quantization'].get('scheme')}); "
                            "quantize the fp32 artifact")


def _image_graphs(facts) -> list[str]:
    """The graphs of every media chain (image and video share them), in order."""
    chains = [facts.pipeline[k] for k in facts.media if k in facts.pipeline]
    return list(dict.fromkeys(g for chain in chains for g in chain))


def _outputs_moved(fp32: Path, int8: Path, spec, facts) -> dict:
    """A graph on its validation inputs, fp32 vs int8: the worst cosine and max abs diff of its first
    output (a KV-cache graph: the logits, its caches bound in place as the runtime does)."""
    import numpy as np

    from vlmdeploy.runtime.dummy import bound_outputs, sample_feeds, validation_dims
    from vlmdeploy.runtime.runners import OrtRunner

    cosine, diff = 1.0, 0.0
    runners = [OrtRunner(path, spec) for path in (fp32, int8)]
    for i, dims in enumerate(validation_dims(spec)):
        feeds = sample_feeds(spec, dims, facts, np.random.default_rng(i))
        outs = []
        for runner in runners:
            mine = {k: v.copy() for k, v in feeds.items()}  # KV buffers are written in place
            outs.append(runner.run(mine, out=bound_outputs(spec, mine))[spec.output_names[0]].astype(np.float64).ravel())
        a, b = outs
        cosine = min(cosine, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        diff = max(diff, float(np.max(np.abs(a - b))))
    return {"cosine": cosine, "max_abs_diff": diff}
