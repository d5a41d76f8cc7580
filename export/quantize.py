"""Weight-only quantization of the ONNX Runtime decoder (`decoder_gqa`): MatMul -> MatMulNBits.

int8 and int4 weights, symmetric, one scale per block of `block_size` input channels;
`accuracy_level=4` lets ONNX Runtime compute with int8 activations (its fastest CPU kernels).
The portable decoder stays fp32 (TensorRT quantizes on its own terms). A quantized graph is not
claimed equal to PyTorch: its logits difference is recorded and greedy-token agreement is
measured by `vlmdeploy bench` / `eval`.
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


def quantize_vision_graph(path: Path) -> dict:
    """The image chain's graph at `path` with int8 compute: ONNX Runtime's dynamic quantization of its
    MatMuls (int8 weights per output channel, activations quantized per call: the MatMulInteger
    kernels that use VNNI / AMX). Norms, softmax and the rest stay fp32."""
    from vlmdeploy.runtime.offline import import_onnxruntime

    import_onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = path.with_name(path.stem + ".int8.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" advice on root
    quantize_dynamic(path, tmp, op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    model = onnx.load(str(tmp))
    for leftover in (tmp, tmp.with_name(tmp.name + ".data"), path.with_name(path.name + ".data")):
        leftover.unlink(missing_ok=True)
    for f in path.parent.glob(f"{tmp.name}*"):
        f.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return {"scheme": "int8-dynamic", "op_types": ["MatMul"], "per_channel": True}


def quantize_artifact(src: Path, out: Path, scheme: str | None, log=print, vision: bool = False) -> dict:
    """`vlmdeploy quantize DIR --out OUT`: a copy of an exported artifact with decoder_gqa's weights
    quantized (`scheme`) and/or the image chain's graphs computing in int8 (`vision`), without
    re-exporting (no PyTorch, no checkpoint). The copy is written beside `out` and swapped in when
    complete; `src` is not touched. How far the outputs moved from the fp32 graphs is measured on
    the export's validation shapes and recorded (not enforced)."""
    import shutil

    from vlmdeploy.runtime.manifest import (ArtifactError, check_export_target, describe_files, load_manifest,
                                            staging_dir)

    src, out = Path(src), Path(out)
    manifest = load_manifest(src, checksums=True)
    if scheme is None and not vision:
        raise ValueError("nothing to quantize: give --scheme int8|int4 (decoder_gqa's weights) and/or --vision")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"--scheme {scheme!r} not one of {sorted(SCHEMES)}")
    if vision and (manifest.source or {}).get("vision_quantization"):
        raise ArtifactError(f"{src}: the image graphs are already int8; start from the fp32 artifact")
    if scheme is None:
        pass
    elif "decoder_gqa" not in manifest.graphs:
        raise ArtifactError(f"{src} has no decoder_gqa graph (the one weight-only quantization applies to); its "
                            f"graphs are {sorted(manifest.graphs)}")
    done = (manifest.source or {}).get("quantization") if scheme else None
    if done:
        raise ArtifactError(f"{src}: decoder_gqa is already quantized ({done.get('scheme')}); quantize the fp32 artifact")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source artifact; write the quantized copy elsewhere")
    with staging_dir(out, check_export_target) as tmp:
        for name in manifest.files:
            shutil.copy2(src / name, tmp / name)
        validation, source, record = dict(manifest.validation), {**(manifest.source or {}), "quantized_from": str(src)}, {}
        if scheme is not None:
            log(f"quantizing decoder_gqa weights to {scheme}")
            record = source["quantization"] = quantize_graph(tmp / "decoder_gqa.onnx", scheme)
            diff = _logits_moved(src, tmp, manifest)
            log(f"decoder_gqa {scheme}: max abs logit diff vs fp32 {diff:.3g} (recorded, not enforced)")
            validation["decoder_gqa"] = {"quantized": scheme, "max_abs_diff_vs_fp32": diff,
                                         "fp32": manifest.validation.get("decoder_gqa")}
        if vision:
            graphs = _image_graphs(manifest)
            for graph in graphs:
                log(f"{graph}: int8 compute (dynamic quantization of its MatMuls)")
                record = quantize_vision_graph(tmp / manifest.graph_files[graph])
            moved = _image_outputs_moved(src, tmp, manifest, graphs)
            log(f"image graphs int8: output cosine vs fp32 {moved['cosine']:.5f}, max abs diff "
                f"{moved['max_abs_diff']:.3g} (recorded, not enforced)")
            source["vision_quantization"] = {**record, "graphs": graphs}
            validation["vision_int8"] = moved
        files = describe_files(tmp, sorted(p.name for p in tmp.iterdir() if p.is_file() and p.name != "manifest.json"))
        import dataclasses

        dataclasses.replace(manifest, files=files, validation=validation, source=source).write(tmp)
    log(f"done: {out}")
    return record


def _image_graphs(manifest) -> list[str]:
    """The graphs of every media chain (image and video share them), in order."""
    chains = [manifest.model.pipeline[k] for k in manifest.model.media if k in manifest.model.pipeline]
    return list(dict.fromkeys(g for chain in chains for g in chain))


def _image_outputs_moved(fp32_dir: Path, int8_dir: Path, manifest, graphs: list[str]) -> dict:
    """Each image graph on its validation inputs, fp32 vs int8: the worst cosine and max abs diff."""
    import numpy as np

    from vlmdeploy.runtime.dummy import sample_feeds, validation_dims
    from vlmdeploy.runtime.runners import OrtRunner

    cosine, diff = 1.0, 0.0
    for graph in graphs:
        spec = manifest.graphs[graph]
        runners = [OrtRunner(d / manifest.graph_files[graph], spec) for d in (fp32_dir, int8_dir)]
        for i, dims in enumerate(validation_dims(spec)):
            feeds = sample_feeds(spec, dims, manifest.model, np.random.default_rng(i))
            a, b = (r.run(feeds)[spec.output_names[0]].astype(np.float64).ravel() for r in runners)
            cosine = min(cosine, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
            diff = max(diff, float(np.max(np.abs(a - b))))
    return {"graphs": graphs, "cosine": cosine, "max_abs_diff": diff}


def _logits_moved(fp32_dir: Path, quantized_dir: Path, manifest) -> float:
    """Max abs difference of decoder_gqa's logits, fp32 vs quantized, on the validation shapes."""
    import numpy as np

    from vlmdeploy.runtime.dummy import bound_outputs, sample_feeds, validation_dims
    from vlmdeploy.runtime.runners import OrtRunner

    spec, worst = manifest.graphs["decoder_gqa"], 0.0
    runners = [OrtRunner(d / manifest.graph_files["decoder_gqa"], spec) for d in (fp32_dir, quantized_dir)]
    for i, dims in enumerate(validation_dims(spec)):
        feeds = sample_feeds(spec, dims, manifest.model, np.random.default_rng(i))
        logits = []
        for runner in runners:
            mine = {k: v.copy() for k, v in feeds.items()}  # the KV buffers are written in place
            logits.append(runner.run(mine, out=bound_outputs(spec, mine))["logits"])
        worst = max(worst, float(np.max(np.abs(logits[0] - logits[1]))))
    return worst
