"""The OpenAI API's request bodies (pydantic), its response and chunk objects, and its error shape.

Fields the server does not implement are refused when set to anything but their default (so a
client never silently gets something other than what it asked for); fields with no effect on the
answer (`user`, `metadata`, ...) are ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from vlmdeploy.runtime.sampling import SamplingParams


class APIError(Exception):
    """An error the client caused (or 429/503): rendered as OpenAI's {"error": {...}} with `status`."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
             415: "invalid_request_error", 429: "rate_limit_exceeded", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(_Body):
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: ImageURL | None = None  # vLLM's part for video: {"url": "data:video/mp4;base64,..."}


# per-request preprocessing (vLLM's `mm_processor_kwargs`, extra body): image sizes and frame sampling
MEDIA_OPTIONS = {"min_pixels": int, "max_pixels": int, "fps": (int, float), "num_frames": int}


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What chat and completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, description="OpenAI's default is 1.0 (sampling); 0 is greedy")
    top_p: float | None = None
    top_k: int | None = None  # extra body (vLLM's name)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extra body (vLLM's name): benchmarks
    # implemented only at their defaults
    logprobs: bool | int | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict | None = None
    tools: list | None = None
    response_format: dict | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not implement, as an error message."""
        if self.n != 1:
            return f"n must be 1 (one choice per request), got {self.n}"
        for name in ("logprobs", "logit_bias", "tools"):
            if getattr(self, name):
                return f"{name} is not supported by this server; leave it unset"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return f"{name} is not supported by this server; leave it unset or 0"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return f"response_format {self.response_format.get('type')!r} is not supported; only 'text'"
        if self.stream_options is not None and not self.stream:
            return "stream_options is only allowed with stream: true"
        return None

    def sampling(self, max_tokens: int | None, default_max: int) -> SamplingParams:
        """SamplingParams; ValueError (named field, allowed values) when one is out of range."""
        if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
            raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens}")
        given = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop)
        kwargs = {k: v for k, v in given.items() if v is not None}
        kwargs.setdefault("temperature", 1.0)  # OpenAI's default
        max_new = default_max if max_tokens is None else max_tokens
        return SamplingParams.from_kwargs(dict(kwargs, max_new_tokens=max_new, ignore_eos=self.ignore_eos))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    mm_processor_kwargs: dict | None = None

    def media_options(self) -> dict:
        """mm_processor_kwargs checked: {min_pixels, max_pixels} for images and frames, {fps | num_frames}
        for how video frames are sampled."""
        given = self.mm_processor_kwargs or {}
        unknown = sorted(set(given) - set(MEDIA_OPTIONS))
        if unknown:
            raise ValueError(f"mm_processor_kwargs {unknown} are not supported; allowed: {sorted(MEDIA_OPTIONS)}")
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, MEDIA_OPTIONS[key]) or value <= 0:
                raise ValueError(f"mm_processor_kwargs.{key} must be a positive number, got {value!r}")
        return dict(given)

    def requested_max(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError(f"prompt must be one string (or a list of exactly one), got a list of {len(self.prompt)}")
            return self.prompt[0]
        return self.prompt

    def unsupported(self) -> str | None:
        if self.echo or self.suffix:
            return "echo and suffix are not supported by this server; leave them unset"
        return super().unsupported()


# ---- images in messages ---------------------------------------------------------------------------


def runtime_messages(messages: list[Message], fetch: Callable[[str], bytes], frames: dict | None = None) -> list[dict]:
    """OpenAI messages -> the runtime's (text parts as they are, images as {"type": "image", "image": bytes},
    videos as {"type": "video", "video": bytes, **frames}); `fetch`: a media URL -> its bytes
    (serve/media.py); `frames`: how video frames are sampled (fps or num_frames)."""
    out = []
    for m in messages:
        parts = [] if m.content is None else [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        out.append({"role": m.role, "content": [_runtime_part(p, fetch, frames or {}) for p in parts]})
    return out


def image_urls(messages: list[Message]) -> list[str]:
    """The image and video URLs of a request (both count against --max-images)."""
    return [u.url for m in messages if isinstance(m.content, list) for p in m.content
            if (u := p.image_url if p.type == "image_url" else p.video_url if p.type == "video_url" else None) is not None]


def _runtime_part(part: ContentPart, fetch: Callable[[str], bytes], frames: dict) -> dict:
    if part.type == "text":
        if part.text is None:
            raise APIError(400, "a text content part needs 'text'", "messages")
        return {"type": "text", "text": part.text}
    if part.type == "video_url":
        if part.video_url is None:
            raise APIError(400, "a video_url content part needs 'video_url': {'url': 'data:video/...;base64,...'}",
                           "messages")
        return {"type": "video", "video": fetch(part.video_url.url, "video"), **frames}
    if part.image_url is None:
        raise APIError(400, "an image_url content part needs 'image_url': {'url': 'data:image/...;base64,...'}", "messages")
    return {"type": "image", "image": fetch(part.image_url.url)}


# ---- responses ------------------------------------------------------------------------------------


class Reply:
    """One request's response objects: the full completion, or its stream chunks."""

    def __init__(self, kind: Literal["chat", "text"], model: str):
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, chunk: bool) -> dict:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj + (".chunk" if chunk and self.kind == "chat" else ""),
                "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish_reason: str | None, chunk: bool, role: bool = False) -> dict:
        if self.kind == "text":
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if chunk:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}

    def full(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._envelope(False) | {"choices": [self._choice(text, finish_reason, False)],
                                         "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              with_usage_field: bool = False) -> dict:
        body = self._envelope(True) | {"choices": [self._choice(text, finish_reason, True, role)]}
        return body | ({"usage": None} if with_usage_field else {})

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._envelope(True) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
