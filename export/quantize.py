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
