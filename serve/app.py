"""The FastAPI app: OpenAI-compatible routes over one `Engine`.

    POST /v1/chat/completions   messages (text + data: image_url parts) -> chat template -> engine
    POST /v1/completions        a raw prompt -> engine
    GET  /v1/models, /health (503 while the model loads), /metrics (Prometheus)

Request flow: read and check the JSON body (415/413/400) -> OpenAI fields -> SamplingParams (400)
-> images decoded from data: URLs, counted and sized (400/413) -> prompt embeds built in a worker
thread (`PromptBuilder`, vision cache) -> `Engine.submit` (429 when the queue is full) -> the
scheduler thread's events, as one JSON response or as SSE chunks. A client that disconnects
cancels its sequence; its KV slot is free at the next decode step.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, PreparedPrompt, QueueFull
from .metrics import ServerMetrics
from .prepare import PromptBuilder
from .media import ImageFetcher
from .protocol import APIError, ChatRequest, CompletionRequest, Reply, image_urls, runtime_messages

log = logging.getLogger("vlmdeploy.serve")
MB = 1 << 20


@dataclass(frozen=True)
class ServeConfig:
    """One field per `vlmdeploy serve` flag."""

    directory: str
    backend: str = "ort-cpu"
    threads: int | None = None
    decoder: str | None = None  # decoder_gqa (default where the artifact has it) or decoder
    model_name: str | None = None  # default: the directory's name
    max_num_seqs: int = 8
    max_queue: int = 64
    max_model_len: int | None = None  # default: the model's context length
    max_images: int = 8  # per request
    max_image_mb: float = 16.0  # per image, decoded bytes
    max_image_pixels: int = 16_000_000  # per image, width x height
    max_request_mb: float = 64.0  # request body
    vision_cache_mb: float = 256.0
    allow_remote_images: bool = False  # fetch http(s) image URLs
    allowed_local_media_path: str | None = None  # read image paths under this directory
    image_fetch_timeout: float = 10.0  # seconds per remote image
    prefill_chunk: int = 256  # prompt tokens per prefill call
    prefill_tokens_per_step: int = 256  # prompt tokens prefilled between two decode steps
    visual_tokens: int | float | None = None  # visual-token compression (runtime/compress.py): per image
    compression: str = "pool"

    def __post_init__(self):
        for name in ("max_num_seqs", "max_queue", "max_images", "max_image_pixels", "prefill_chunk",
                     "prefill_tokens_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {value!r}")
        for name in ("max_image_mb", "max_request_mb", "image_fetch_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)!r}")

    def image_fetcher(self) -> ImageFetcher:
        root = Path(self.allowed_local_media_path) if self.allowed_local_media_path else None
        if root is not None and not root.is_dir():
            raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path!r} is not a directory")
        return ImageFetcher(int(self.max_image_mb * MB), self.allow_remote_images, root, self.image_fetch_timeout)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.directory).resolve().name


class Server:
    """The app's state: loads the model in the background (503 until then), then owns the engine."""

    def __init__(self, config: ServeConfig, on_load_error: Callable[[str], None] | None = None):
        self.config, self.on_load_error = config, on_load_error
        self.metrics = ServerMetrics()
        self.engine: Engine | None = None
        self.builder: PromptBuilder | None = None
        self.load_error: str | None = None
        self.fetcher = config.image_fetcher()

    def load(self) -> None:
        from vlmdeploy.runtime.vlm import VLM

        c = self.config
        try:
            vlm = VLM.load(c.directory, backend=c.backend, threads=c.threads, decoder=c.decoder,
                           visual_tokens=c.visual_tokens, compression=c.compression)
            builder = PromptBuilder(vlm, int(c.vision_cache_mb * MB))
            engine = Engine(vlm, c.max_num_seqs, c.max_queue, c.max_model_len, c.prefill_chunk,
                            c.prefill_tokens_per_step, self.metrics)
        except Exception as e:  # reported by /health and the CLI
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("loading %s failed: %s", c.directory, self.load_error)
            if self.on_load_error:
                self.on_load_error(self.load_error)
            return
        self.metrics.watch(engine, builder.cache)
        self.builder, self.engine = builder, engine
        log.info("serving %s as %r (%s, %s)", c.directory, c.served_name, vlm.backend, vlm.decoder_graph)

    def chat_prompt(self, messages, options: dict) -> PreparedPrompt:
        """OpenAI messages -> prompt embeds (in a worker thread: media fetches, decoding, vision graphs);
        `options`: the request's mm_processor_kwargs (image sizes, video frame sampling)."""
        frames = {k: options[k] for k in ("fps", "num_frames") if k in options}
        runtime = runtime_messages(messages, self.fetcher.fetch, frames)
        _check_pixels(runtime, self.config.max_image_pixels)
        sizes = {k: options[k] for k in ("min_pixels", "max_pixels") if k in options}
        return self.builder.chat(runtime, **sizes)

    def ready(self) -> Engine:
        if self.engine is None:
            state = f"failed to load ({self.load_error})" if self.load_error else "is loading"
            raise APIError(503, f"the model {state}; retry when GET /health answers 200", code="model_not_ready")
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def create_app(config: ServeConfig, on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    server = Server(config, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=server.load, name="vlmdeploy-load", daemon=True).start()
        yield
        server.close()

    app = FastAPI(title="vlmdeploy", lifespan=lifespan)
    app.state.server = server
    _add_error_handlers(app)
    _add_request_counter(app, server.metrics)
    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: Server) -> None:
    config = server.config

    @app.get("/health")
    async def health():
        server.ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        engine = server.ready()
        card = {"id": config.served_name, "object": "model", "created": 0, "owned_by": "vlmdeploy",
                "max_model_len": engine.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrived = time.perf_counter()
        req = _checked(server, await _json_body(request, config), ChatRequest)
        engine = server.ready()
        params = _sampling(req, req.requested_max(), engine)
        _check_image_count(req, config.max_images)
        try:
            options = req.media_options()
        except ValueError as e:
            raise APIError(400, str(e), "mm_processor_kwargs") from None
        prompt = await _prepare(server.chat_prompt, req.messages, options)
        return await _respond(request, engine, Reply("chat", config.served_name), prompt, params, req, arrived)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrived = time.perf_counter()
        req = _checked(server, await _json_body(request, config), CompletionRequest)
        engine = server.ready()
        params = _sampling(req, 16 if req.max_tokens is None else req.max_tokens, engine)  # OpenAI's default: 16
        try:
            text = req.text()
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        prompt = await _prepare(server.builder.raw, text)
        return await _respond(request, engine, Reply("text", config.served_name), prompt, params, req, arrived)


# ---- request checks --------------------------------------------------------------------------------


async def _json_body(request: Request, config: ServeConfig) -> dict:
    """The body as a JSON object: 415 for another content type, 413 over --max-request-mb, 400 when malformed."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    limit = int(config.max_request_mb * MB)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is over this server's limit of {limit:,} bytes (--max-request-mb)")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _checked(server: Server, body: dict, model_cls):
    """Validated request fields; the model name; fields this server does not implement."""
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more problem(s))" if e.error_count() > 1 else ""
        raise APIError(400, f"{where}: {first['msg']}{more}", where) from None
    name = server.config.served_name
    if req.model != name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {name!r} (GET /v1/models)",
                       "model", "model_not_found")
    problem = req.unsupported()
    if problem:
        raise APIError(400, problem)
    return req


def _sampling(req, max_tokens: int | None, engine: Engine):
    try:
        return req.sampling(max_tokens, engine.max_model_len)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _check_image_count(req: ChatRequest, max_images: int) -> None:
    count = len(image_urls(req.messages))
    if count > max_images:
        raise APIError(400, f"the request has {count} images; this server allows at most {max_images} per request "
                            "(--max-images)", "messages", "too_many_images")


def _check_pixels(messages: list[dict], max_pixels: int) -> None:
    for data in (p["image"] for m in messages for p in m["content"] if p["type"] == "image"):
        try:
            w, h = Image.open(io.BytesIO(data)).size  # reads the header only
        except Exception:
            continue  # not an image: the runtime's loader names the problem
        if w * h > max_pixels:
            raise APIError(413, f"an image is {w}x{h} = {w * h:,} pixels, over this server's limit of "
                                f"{max_pixels:,} (--max-image-pixels)", "messages", "image_too_large")


async def _prepare(build, *args) -> PreparedPrompt:
    """Prompt embeds in a worker thread; the runtime's ValueErrors (PromptError, ImageError) become 400
    (APIErrors raised there pass through)."""
    try:
        return await run_in_threadpool(build, *args)
    except ValueError as e:
        raise APIError(400, str(e)) from None


# ---- responses -------------------------------------------------------------------------------------


async def _respond(request: Request, engine: Engine, reply: Reply, prompt: PreparedPrompt, params, req,
                   arrived: float):
    events: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:  # scheduler thread -> this request's event loop
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    try:
        seq = engine.submit(prompt, params, emit, arrived)
    except QueueFull as e:
        raise APIError(429, str(e), code="queue_full") from None
    except ValueError as e:
        raise APIError(400, str(e)) from None
    if req.stream:
        chunks = _sse(engine, seq, events, reply, req.include_usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(request, engine, seq, events, reply)


async def _collect(request: Request, engine: Engine, seq, events: asyncio.Queue, reply: Reply):
    """The whole answer; a client that hangs up while waiting cancels the sequence."""
    text = []
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                engine.cancel(seq)
                return Response(status_code=499)
            continue
        if event.error:
            raise APIError(500, event.error)
        text.append(event.text)
        if event.finish_reason:
            return reply.full("".join(text), event.finish_reason, event.prompt_tokens, event.completion_tokens)


async def _sse(engine: Engine, seq, events: asyncio.Queue, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
    """SSE: a role chunk (chat), text chunks, a finish_reason chunk, a usage chunk when asked, [DONE]."""
    finished = False
    try:
        if reply.kind == "chat":
            yield _data(reply.chunk("", role=True, with_usage_field=include_usage))
        while not finished:
            event = await events.get()
            if event.error:
                yield _data(APIError(500, event.error).body())
                return
            finished = event.finish_reason is not None
            if event.text or finished:
                yield _data(reply.chunk(event.text, event.finish_reason, with_usage_field=include_usage))
        if include_usage:
            yield _data(reply.usage_chunk(event.prompt_tokens, event.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client disconnected (the generator was cancelled or closed)
            engine.cancel(seq)


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---- errors and accounting -------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            message += "; routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, /health, /metrics"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s", request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)


def _add_request_counter(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.url.path if request.url.path in _ROUTES else "other"
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response


_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
