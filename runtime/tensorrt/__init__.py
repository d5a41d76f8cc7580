"""TensorRT for vlmdeploy: a static check that runs anywhere; engine builds and GPU runners where TensorRT exists.

    onnx_tensorrt_ops.json  the ONNX-TensorRT parser's operator table per release (data, source cited inside)
    ops.py                  reads it: which ops, types and opsets a release imports
    static_check.py         `vlmdeploy check --tensorrt`: rules over the ONNX graphs, CPU only
    profiles.py             optimization profiles from the graph spec and the build limits; profile selection
    greedy.py               the argmax graph built beside the others, so greedy decoding stays on the GPU
    engines.py              the manifest's `engines` section; engines run only on the GPU/TensorRT they came from
    loader.py               Polygraphy loaders that build one engine (fp32 norms under fp16, timing cache, progress)
    build.py                `vlmdeploy build`: every engine, written atomically with the manifest
    cuda.py                 device buffers, streams and GPU facts over the CUDA runtime (Polygraphy's wrapper)
    runner.py               TrtRunner: the runner interface over one engine
    decode.py               the decode loop with the KV cache, logits and token ids on the GPU
    backends.py             make_runner's trt / ort-cuda / ort-trt backends and `auto`
    compare.py              `make ci-engines`: Polygraphy comparator TensorRT vs ONNX Runtime, token check
    deps.py, cli.py         optional imports with install hints; the CLI flags

Nothing here imports torch. tensorrt, polygraphy and onnx are imported inside the functions that need
them, and a missing one is an error that says what to install.
"""
