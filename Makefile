# vlmdeploy: export vision-language models to ONNX and run them without PyTorch.
# `make demo` sets up and runs the main job on the shipped default; `make test` runs the tests.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?= shapes
OUT    ?= artifacts/$(MODEL)
DTYPE  ?=
IMAGE  ?=
PROMPT ?= What is in this picture?
MODEL_PATH ?=

EXPORT_MODEL := $(if $(MODEL_PATH),$(MODEL_PATH),$(MODEL))

.PHONY: setup setup-runtime export run check demo test test-large export-memory fuzz bench clean train-shapes train-shapes-hd eval-shapes plan bigckpt serve bench-serve compression-curve

$(PY):
	$(PYTHON) -m venv $(VENV)

# Runtime + exporter + test tools + video decoding (PyAV), at the versions in constraints.txt (CPU torch).
setup: $(PY)
	$(PIP) install -q -c constraints.txt -e '.[export,test,video,serve,ray]'
	# Triton's model-config schema for the triton-repo test: tritonclient's generated protobuf module loads
	# under our protobuf 7; its own pins (protobuf<7) would clash, and nothing else of it is used.
	$(PIP) install -q -c constraints.txt --no-deps tritonclient

# The torch-free runtime only.
setup-runtime: $(PY)
	$(PIP) install -q -c constraints.txt -e .

export: setup
	$(VENV)/bin/vlmdeploy export --model $(EXPORT_MODEL) --out $(OUT) $(if $(DTYPE),--dtype $(DTYPE))

run:
	$(VENV)/bin/vlmdeploy run $(OUT) $(if $(IMAGE),--image $(IMAGE)) --prompt "$(PROMPT)"

check:
	$(VENV)/bin/vlmdeploy check $(OUT)

# OpenAI-compatible server on $(OUT) (docs/SERVING.md): make serve OUT=artifacts/shapes [PORT=8000] [SERVE_FLAGS=...]
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_FLAGS ?=
serve: $(OUT)/manifest.json
	$(VENV)/bin/vlmdeploy serve $(OUT) --host $(HOST) --port $(PORT) $(SERVE_FLAGS)

# Load test of the server on $(OUT): 1/4/8/16 clients + a disconnect storm (docs/SERVING.md "Measured")
bench-serve: $(OUT)/manifest.json
	$(PY) scripts/bench_serve.py $(OUT) $(BENCH_SERVE_FLAGS)

# Set up, export the default model, check it, and ask it about a picture. The shapes model gets a
# fresh picture drawn now (question, answer and truth printed); other models a photo.
demo: export
	$(VENV)/bin/vlmdeploy check $(OUT)
ifneq ($(filter shapes shapes-hd,$(EXPORT_MODEL)),)
	$(VENV)/bin/vlmdeploy demo $(OUT) --save $(OUT)-demo.png
else
	$(PY) -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.chelsea()).save('$(OUT)-demo.png')"
	$(VENV)/bin/vlmdeploy run $(OUT) --image $(OUT)-demo.png --prompt "$(PROMPT)" --max-new-tokens 24
endif

# Re-train the shipped shapes model (models/shapes, ~15 min on 2 cores) and print its held-out accuracy.
train-shapes: setup
	nice -n 5 $(PY) -m vlmdeploy.demo.train --out models/shapes

# Train shapes-hd (models/shapes-hd: the same pictures at 168 px, 144 visual tokens; four stages, ~60 CPU
# minutes on one thread), the model the visual-token compression curve is measured on (docs/PERFORMANCE.md).
train-shapes-hd: setup
	nice -n 5 $(PY) -m vlmdeploy.demo.train --preset shapes-hd --out models/shapes-hd
	for stage in 2 3 4; do nice -n 5 $(PY) -m vlmdeploy.demo.train --preset shapes-hd-stage$$stage --out models/shapes-hd || exit 1; done

# The visual-token compression curve on shapes-hd: exact match and TTFT per method at 100/50/25/12.5%.
compression-curve: setup
	$(VENV)/bin/vlmdeploy export --model shapes-hd --out artifacts/shapes-hd
	$(PY) scripts/compression_curve.py artifacts/shapes-hd --n $(N) --threads 2

# Accuracy table of the shapes model: PyTorch and the fp32, fp16, int8-decoder and int8 vision/prefill exports (N held-out questions).
N ?= 500
eval-shapes: setup
	$(VENV)/bin/vlmdeploy export --model shapes --out artifacts/shapes --dtype fp32
	$(VENV)/bin/vlmdeploy export --model shapes --out artifacts/shapes-fp16 --dtype fp16
	$(VENV)/bin/vlmdeploy export --model shapes --out artifacts/shapes-int8 --dtype fp32 --quantize int8
	$(VENV)/bin/vlmdeploy quantize artifacts/shapes --out artifacts/shapes-int8c --vision --prefill
	$(VENV)/bin/vlmdeploy eval artifacts/shapes artifacts/shapes-fp16 artifacts/shapes-int8 artifacts/shapes-int8c --torch models/shapes --n $(N)

# A seeded random fp16 checkpoint with a recipe's real shapes (RECIPE=llava: LLaVA-1.5-7B, 14 GB;
# llava-13b: 27 GB), written one shard at a time: `make bigckpt OUT=/data/llava-7b-random`.
RECIPE ?= llava
bigckpt: setup
	$(PY) -m vlmdeploy.export.bigckpt --recipe $(RECIPE) --out $(OUT)

# Memory table for MODEL (a recipe or checkpoint dir; no weights needed for llava / llava-13b).
plan:
	$(VENV)/bin/vlmdeploy plan --model $(EXPORT_MODEL) $(if $(DTYPE),--dtype $(DTYPE))

test: setup
	$(VENV)/bin/pytest -q

# The 7B-shaped export (issue 14): peak RSS <= 0.3x the weights, check, tokens; a truncated copy vs HF. ~37 GB disk under
# LARGE_DIR (a ckpt-7b there from `make export-memory SIZE=7b` is reused), ~16 GB free memory (mostly the check's mapped pages), ~27 min. Not part of `make test`.
LARGE_DIR ?= /tmp
test-large: setup
	VLMDEPLOY_LARGE_DIR=$(LARGE_DIR) nice -n 5 $(VENV)/bin/pytest -q -m slow -s tests/test_export_large.py

# Export memory curve point: make export-memory SIZE=0.5b|2b|7b [LARGE_DIR=/work/big]
SIZE ?= 0.5b
export-memory: setup
	nice -n 5 $(PY) scripts/export_memory.py --size $(SIZE) --dir $(LARGE_DIR)

# The fuzzing suite with many more examples per property than `make test` runs (random seed each run).
fuzz: setup
	VLMDEPLOY_FUZZ=long $(VENV)/bin/pytest -q tests/test_fuzz.py --hypothesis-show-statistics

# Speed side by side (HF eager, onnxruntime-genai, this runtime fp32/int8/int4) on the bench recipe;
# method and latest table in docs/PERFORMANCE.md. First run builds and exports (~10 min).
bench: setup
	$(PIP) install -q -c constraints.txt -e '.[bench]'
	$(VENV)/bin/vlmdeploy bench --model bench --dir artifacts/bench --json artifacts/bench/report.json

clean:
	rm -rf artifacts .pytest_cache

# ---- TensorRT (runtime/tensorrt; README "Deploying with TensorRT") ---------------------------------
# On a machine with an NVIDIA GPU. Engines are built for that GPU model and TensorRT version only.
PRECISION    ?= fp16
CI_PRECISION ?= fp32
ENGINE_FLAGS ?=
# ENGINE_FLAGS e.g. --max-batch 4 --max-context 2048 --timing-cache $$HOME/.cache/vlmdeploy-timing.cache

.PHONY: setup-tensorrt setup-gpu engines ci-engines test-gpu

# The runtime + TensorRT + Polygraphy (+ test tools), no torch.
setup-tensorrt: $(PY)
	$(PIP) install -q -c constraints.txt -e '.[tensorrt,test]'

# Also ONNX Runtime's CUDA/TensorRT providers: onnxruntime-gpu must replace onnxruntime (same module).
setup-gpu: setup-tensorrt
	$(PIP) install -q -c constraints.txt -e '.[gpu]'
	$(PIP) uninstall -q -y onnxruntime
	$(PIP) install -q --force-reinstall --no-deps onnxruntime-gpu

$(OUT)/manifest.json:
	$(MAKE) export MODEL=$(MODEL) OUT=$(OUT)

# Engines for artifacts/$(MODEL) on this GPU: make engines MODEL=llava [PRECISION=fp16] [ENGINE_FLAGS=...]
engines: $(OUT)/manifest.json
	$(VENV)/bin/vlmdeploy build $(OUT) --precision $(PRECISION) $(ENGINE_FLAGS)

# What a CI job on a GPU runner calls: static check, build, TensorRT vs ONNX Runtime (Polygraphy
# comparator), token check. Where TensorRT is not installed it runs the static check only, and says so.
ci-engines: $(OUT)/manifest.json
	@if $(PY) -c "import tensorrt" 2>/dev/null; then \
		$(VENV)/bin/vlmdeploy check $(OUT) --tensorrt && \
		$(VENV)/bin/vlmdeploy build $(OUT) --precision $(CI_PRECISION) $(ENGINE_FLAGS) && \
		$(PY) -m vlmdeploy.runtime.tensorrt.compare $(OUT); \
	else \
		echo "ci-engines: TensorRT is not installed here, so no engines are built or compared;" \
			"running the static check only (vlmdeploy check $(OUT) --tensorrt)"; \
		$(VENV)/bin/vlmdeploy check $(OUT) --tensorrt; \
	fi

# The GPU tests (TensorRT engines, ort-cuda, ort-trt); each skips with its reason where they cannot run.
test-gpu:
	$(VENV)/bin/pytest -q -m gpu -rs
