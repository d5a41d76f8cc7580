# vlmdeploy: export vision-language models to ONNX and run them without PyTorch.
# `make demo` sets up and runs the main job on the shipped default; `make test` runs the tests.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL  ?= tiny
OUT    ?= artifacts/$(MODEL)
DTYPE  ?=
IMAGE  ?=
PROMPT ?= What is in this picture?
MODEL_PATH ?=

EXPORT_MODEL := $(if $(MODEL_PATH),$(MODEL_PATH),$(MODEL))

.PHONY: setup setup-runtime export run check demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Runtime + exporter + test tools, at the versions in constraints.txt (CPU torch).
setup: $(PY)
	$(PIP) install -q -c constraints.txt -e '.[export,test]'

# The torch-free runtime only.
setup-runtime: $(PY)
	$(PIP) install -q -c constraints.txt -e .

export: setup
	$(VENV)/bin/vlmdeploy export --model $(EXPORT_MODEL) --out $(OUT) $(if $(DTYPE),--dtype $(DTYPE))

run:
	$(VENV)/bin/vlmdeploy run $(OUT) $(if $(IMAGE),--image $(IMAGE)) --prompt "$(PROMPT)"

check:
	$(VENV)/bin/vlmdeploy check $(OUT)

# Set up, export the default model, check it, and answer a question about a photo.
demo: export
	$(VENV)/bin/vlmdeploy check $(OUT)
	$(PY) -c "import skimage.data, PIL.Image; PIL.Image.fromarray(skimage.data.chelsea()).save('$(OUT)-demo.png')"
	$(VENV)/bin/vlmdeploy run $(OUT) --image $(OUT)-demo.png --prompt "$(PROMPT)" --max-new-tokens 24

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf artifacts .pytest_cache
