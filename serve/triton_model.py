"""Triton Inference Server Python backend for a vlmdeploy artifact (copied into the model repository
as `<name>/1/model.py` by `vlmdeploy triton-repo`; Triton imports it, never vlmdeploy's tests).

Decoupled (streaming): each request sends one response per generated piece of text, then an empty
final one flagged TRITONSERVER_RESPONSE_COMPLETE_FINAL.

    inputs   messages  TYPE_STRING [1]  JSON: OpenAI-style chat messages; images as
                                        {"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}
             sampling  TYPE_STRING [1]  JSON, optional: max_tokens, temperature, top_p, top_k, seed, stop, ignore_eos
    outputs  text           TYPE_STRING [1]  the new text of this response
             finish_reason  TYPE_STRING [1]  "" while streaming; "stop" or "length" on the last piece
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend

SAMPLING_KEYS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                 "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos"}


class TritonPythonModel:
    def initialize(self, args):
        from vlmdeploy.runtime.compress import parse_visual_tokens
        from vlmdeploy.runtime.vlm import VLM

        config = json.loads(args["model_config"])
        artifact = config["parameters"]["artifact"]["string_value"]
        threads, visual_tokens, compression = (config["parameters"].get(key, {}).get("string_value")
                                               for key in ("threads", "visual_tokens", "compression"))
        directory = Path(args["model_repository"]) / args["model_version"] / artifact
        self.vlm = VLM.load(directory, threads=int(threads) if threads else None,
                            visual_tokens=parse_visual_tokens(visual_tokens) if visual_tokens else None,
                            compression=compression or "pool")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._stream(request, sender)
            except ValueError as e:  # a bad request: one error response, final
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None  # decoupled: responses went through the senders

    def _stream(self, request, sender) -> None:
        from vlmdeploy.runtime.sampling import SamplingParams
        from vlmdeploy.runtime.session import Generation

        messages = _runtime_messages(json.loads(_string(request, "messages")))
        params = SamplingParams.from_kwargs(_sampling(_string(request, "sampling", optional=True)))
        gen = Generation(self.vlm, [self.vlm._chat_request(messages)], params)  # the runtime's one-row generation
        for pieces in gen:
            if pieces[0]:
                sender.send(_response(pieces[0], ""))
        sender.send(_response("", gen.results()[0].finish_reason), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.vlm = None


def _string(request, name: str, optional: bool = False) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if optional:
            return None
        raise ValueError(f"input {name!r} is missing")
    value = tensor.as_numpy().reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _sampling(text: str | None) -> dict:
    given = json.loads(text) if text else {}
    unknown = sorted(set(given) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"sampling keys {unknown} are not supported; allowed: {sorted(SAMPLING_KEYS)}")
    return {SAMPLING_KEYS[k]: v for k, v in given.items()}


def _runtime_messages(messages: list) -> list:
    """OpenAI-style messages -> the runtime's: data: URL images decoded to bytes."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [_part(p) for p in content]
        out.append({**m, "content": content})
    return out


def _part(part: dict) -> dict:
    if part.get("type") != "image_url":
        return part
    url = (part.get("image_url") or {}).get("url", "")
    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError("image_url must be a base64 data URL of an image (data:image/...;base64,...)")
    return {"type": "image", "image": base64.b64decode(payload, validate=True)}


def _response(text: str, finish: str):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text", np.array([text.encode("utf-8")], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([finish.encode("utf-8")], dtype=np.object_)),
    ])
