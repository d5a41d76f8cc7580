"""`vlmdeploy triton-repo DIR OUT`: the model repository's config.pbtxt parsed with Triton's own schema
(tritonclient's generated `model_config_pb2`), and its `model.py` (Triton's Python backend API)
driven through `initialize`/`execute` against a stand-in for `triton_python_backend_utils`: the
streamed text equals `VLM.chat`'s. Triton itself is not run here (not installable on these machines)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
import types

import numpy as np
import pytest

from conftest import photo
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.vlm import VLM


def triton_schema():
    """tritonclient's model_config_pb2, loaded by file (its package __init__ wants grpc, unused here)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("tritonclient is not installed (make setup installs it)")
    path = f"{spec.submodule_search_locations[0]}/grpc/model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class StandIn(types.ModuleType):
    """The parts of triton_python_backend_utils model.py uses, recording what it sends."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1

    def __init__(self):
        super().__init__("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, array

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs, self.error = {t.name(): t.as_numpy() for t in output_tensors}, error

    class TritonError:
        def __init__(self, message):
            self.message = message

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.inputs.get(name)


class Request:
    def __init__(self, **inputs):
        self.inputs = {k: StandIn.Tensor(k, np.array([v.encode()], dtype=np.object_)) for k, v in inputs.items()}
        self.sent = []

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response=None, flags=0):
                request.sent.append((response, flags))

        return Sender()


def _png_url(image) -> str:
    f = io.BytesIO()
    image.save(f, "PNG")
    return "data:image/png;base64," + base64.b64encode(f.getvalue()).decode()


def test_repository_config_and_model_py(shapes_dir, tmp_path, monkeypatch, capsys):
    repo = tmp_path / "models"
    assert main(["triton-repo", str(shapes_dir), str(repo), "--name", "shapes", "--threads", "1"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    from google.protobuf import text_format

    schema = triton_schema()
    config = text_format.Parse((repo / "shapes" / "config.pbtxt").read_text(), schema.ModelConfig())
    assert config.name == "shapes" and config.backend == "python" and config.model_transaction_policy.decoupled
    assert [(i.name, i.data_type, i.optional) for i in config.input] == [
        ("messages", schema.TYPE_STRING, False), ("sampling", schema.TYPE_STRING, True)]
    assert [o.name for o in config.output] == ["text", "finish_reason"]
    assert config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_CPU
    assert config.parameters["artifact"].string_value == "artifact"
    assert (repo / "shapes" / "1" / "artifact" / "manifest.json").is_file()

    model = initialized_model(repo / "shapes", config, monkeypatch)
    image = photo("coffee", (84, 84))
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "image_url", "image_url": {"url": _png_url(image)}}]}]
    good = Request(messages=json.dumps(messages), sampling=json.dumps({"max_tokens": 12}))
    bad = Request(messages=json.dumps(messages), sampling=json.dumps({"beams": 3}))
    assert model.execute([good, bad]) is None  # decoupled: responses go through the senders
    text, finish_reason = streamed(good)
    want = VLM.load(shapes_dir).chat(local_messages(image), max_new_tokens=12)
    assert text and text == want.text and finish_reason == want.finish_reason
    (error, flags), = bad.sent
    assert flags == StandIn.TRITONSERVER_RESPONSE_COMPLETE_FINAL and "beams" in error.error.message
    model.finalize()


QUESTION = "What shape is the red one?"


def local_messages(image):
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image", "image": image}]}]


def initialized_model(model_dir, config, monkeypatch):
    """model.py of a written repository, loaded and initialized as Triton's Python backend does."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", StandIn())
    spec = importlib.util.spec_from_file_location("triton_model", model_dir / "1" / "model.py")
    model_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_py)
    model = model_py.TritonPythonModel()
    model_config = {"parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()}}
    model.initialize({"model_config": json.dumps(model_config), "model_repository": str(model_dir),
                      "model_version": "1"})
    return model


def streamed(request) -> tuple[str, str]:
    """The text a request's responses stream, and the finish reason of its last (final) response."""
    *pieces, (last, flags) = request.sent
    assert flags == StandIn.TRITONSERVER_RESPONSE_COMPLETE_FINAL and all(f == 0 for _, f in pieces)
    return "".join(r.outputs["text"][0].decode() for r, _ in pieces), last.outputs["finish_reason"][0].decode()


def test_repository_with_visual_token_compression(shapes_dir, tmp_path, monkeypatch, capsys):
    """`--visual-tokens 4 --compression pool`: every instance loads with it (the 3x3 grid pooled to 2x2),
    and answers as VLM.load with the same setting; a setting the family cannot apply fails at write time."""
    from google.protobuf import text_format

    repo = tmp_path / "models"
    assert main(["triton-repo", str(shapes_dir), str(repo), "--name", "s", "--visual-tokens", "4"]) == 0
    config = text_format.Parse((repo / "s" / "config.pbtxt").read_text(), triton_schema().ModelConfig())
    assert (config.parameters["visual_tokens"].string_value, config.parameters["compression"].string_value) == ("4", "pool")
    model = initialized_model(repo / "s", config, monkeypatch)
    image = photo("chelsea", (84, 84))
    request = Request(messages=json.dumps([{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": _png_url(image)}}]}]),
        sampling=json.dumps({"max_tokens": 12}))
    model.execute([request])
    want = VLM.load(shapes_dir, visual_tokens=4).chat(local_messages(image), max_new_tokens=12)
    assert model.vlm.family.compression.keep == 4 and streamed(request) == (want.text, want.finish_reason)

    capsys.readouterr()
    assert main(["triton-repo", str(shapes_dir), str(tmp_path / "too-many"), "--visual-tokens", "10"]) == 2
    assert "10" in capsys.readouterr().err and not (tmp_path / "too-many").exists()
