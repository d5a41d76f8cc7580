"""`vlmdeploy serve`: the official `openai` client against a server on 127.0.0.1 (the shipped shapes
model, so answers are checkable), continuous batching (greedy answers identical alone and in a busy
batch, slots freed on disconnect), the vision cache, and every bad input answered with a 4xx."""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from vlmdeploy.demo import shapes  # noqa: E402
from vlmdeploy.demo.scorecard import PROMPT  # noqa: E402
from vlmdeploy.runtime.cli import main  # noqa: E402
from vlmdeploy.runtime.sampling import SamplingParams  # noqa: E402
from vlmdeploy.runtime.vlm import VLM  # noqa: E402
from vlmdeploy.serve.app import ServeConfig, Server, create_app  # noqa: E402
from vlmdeploy.serve.engine import Engine, QueueFull  # noqa: E402
from vlmdeploy.serve.prepare import PromptBuilder  # noqa: E402
from vlmdeploy.serve.protocol import APIError  # noqa: E402
from vlmdeploy.serve.vision_cache import VisionCache  # noqa: E402

MODEL = "shapes"
LIMITS = dict(max_images=2, max_image_pixels=200_000, max_image_mb=0.25, max_model_len=96, max_num_seqs=4)


# ---------------------------------------------------------------------------------------------
# Fixtures: a server in a thread on a free loopback port (the shapes artifact: conftest.py)


@pytest.fixture(scope="session")
def vlm(shapes_dir):
    return VLM.load(shapes_dir)


class RunningServer:
    def __init__(self, config: ServeConfig):
        self.app = create_app(config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)
        wait_until(lambda: self.get("/health")[0] == 200, "the server to load")

    @property
    def engine(self) -> Engine:
        return self.app.state.server.engine

    def request(self, method: str, path: str, body: bytes | None = None, content_type="application/json"):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": content_type} if body is not None else {})
            r = conn.getresponse()
            return r.status, r.read()
        except ConnectionRefusedError:
            return 0, b""
        finally:
            conn.close()

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, path: str, obj) -> tuple[int, dict]:
        status, data = self.request("POST", path, json.dumps(obj).encode())
        return status, json.loads(data)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)


def wait_until(ready, what: str, seconds: float = 60.0) -> None:
    """Poll (a liveness deadline, not a speed assertion)."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(shapes_dir):
    s = RunningServer(ServeConfig(str(shapes_dir), model_name=MODEL, **LIMITS))
    yield s
    s.stop()


def png_url(image: Image.Image, fmt="PNG") -> str:
    f = io.BytesIO()
    image.save(f, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(f.getvalue()).decode()


def question_messages(image: Image.Image, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": png_url(image)}}]}]


def ask(client, image, question, **kw):
    return client.chat.completions.create(model=MODEL, messages=question_messages(image, question),
                                          temperature=0, max_tokens=32, **kw)


QUESTIONS = [(ex.image, qa.question, qa.answer) for ex in (shapes.example("heldout", i) for i in range(6))
             for qa in ex.qa[:2]]


# ---------------------------------------------------------------------------------------------
# Answers


def test_chat_answers_as_the_runtime_does(server, vlm):
    got = [ask(server.client, im, q) for im, q, _ in QUESTIONS]
    expected = [vlm.generate(PROMPT.format(question=q), [im], max_new_tokens=32) for im, q, _ in QUESTIONS]
    assert [r.choices[0].message.content for r in got] == [e.text for e in expected]
    assert all(r.choices[0].finish_reason == "stop" and r.model == MODEL for r in got)
    assert [r.usage.prompt_tokens for r in got] == [e.prompt_tokens for e in expected]
    correct = sum(shapes.normalize_answer(r.choices[0].message.content) == shapes.normalize_answer(a)
                  for r, (_, _, a) in zip(got, QUESTIONS))
    assert correct >= len(QUESTIONS) - 2  # the shipped model: >= 90% on held-out questions


def test_greedy_answers_are_identical_alone_and_in_a_busy_batch(server):
    alone = [ask(server.client, im, q).choices[0].message.content for im, q, _ in QUESTIONS]
    # busy: the questions interleaved with long captions, all at once (max_num_seqs 4, the rest queue)
    captions = [(ex.image, "Describe the picture.") for ex in (shapes.example("heldout", 50 + i) for i in range(len(QUESTIONS)))]
    jobs = [job for pair in zip(QUESTIONS, captions) for job in pair]
    server.engine.peak_running = 0
    with ThreadPoolExecutor(8) as pool:
        busy = list(pool.map(lambda j: ask(server.client, j[0], j[1]).choices[0].message.content, jobs))
    assert busy[0::2] == alone
    assert server.engine.peak_running > 1  # the batch really was shared
    assert server.engine.slots_in_use == 0


def test_streaming_chunks_add_up_to_the_answer_and_end_with_usage(server):
    im, q, _ = QUESTIONS[0]
    full = ask(server.client, shapes.example("heldout", 3).image, "Describe the picture.")
    chunks = list(server.client.chat.completions.create(
        model=MODEL, messages=question_messages(shapes.example("heldout", 3).image, "Describe the picture."),
        temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_take_a_raw_prompt(server, vlm):
    prompt = PROMPT.format(question="How many shapes are there?").replace("<image>", "")
    r = server.client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    assert r.choices[0].text == vlm.generate(prompt, max_new_tokens=8).text
    streamed = server.client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_max_tokens_stop_and_seeded_sampling(server):
    image = shapes.example("heldout", 3).image
    short = ask(server.client, image, "Describe the picture.", max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = ask(server.client, image, "Describe the picture.").choices[0].message.content
    word = full.split()[2]
    cut = ask(server.client, image, "Describe the picture.", stop=[word]).choices[0].message.content
    assert cut == full[: full.index(word)] and word not in cut
    sampled = [server.client.chat.completions.create(
        model=MODEL, messages=question_messages(image, "Describe the picture."), temperature=1.5, seed=7,
        max_tokens=16, extra_body={"top_k": 5}).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_models_health_and_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    image = shapes.example("heldout", 7).image
    before = _metric(server, "vlmdeploy_vision_cache_hits")
    a, b = (ask(server.client, image, "How many shapes are there?") for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert _metric(server, "vlmdeploy_vision_cache_hits") >= before + 1
    assert _metric(server, "vlmdeploy_vision_cache_bytes") > 0
    assert _metric(server, "vlmdeploy_kv_slots_total") == LIMITS["max_num_seqs"]
    assert _metric(server, "vlmdeploy_generated_tokens_total") > 0
    assert _metric(server, "vlmdeploy_time_to_first_token_seconds_count") > 0
    assert _metric(server, 'vlmdeploy_requests_total{route="/v1/chat/completions",status="200"}') >= 2


def _metric(server, name: str) -> float:
    status, text = server.get("/metrics")
    assert status == 200
    (line,) = [x for x in text.decode().splitlines() if x.split(" ")[0] == name]
    return float(line.split(" ")[1])


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, monkeypatch):
    engine = server.engine
    gate, step = threading.Event(), engine._step
    monkeypatch.setattr(engine, "_step", lambda: (gate.wait(30), step()))  # no decode step until the clients left
    body = {"model": MODEL, "messages": question_messages(shapes.example("heldout", 1).image, "Describe the picture."),
            "temperature": 0, "max_tokens": 70, "ignore_eos": True, "stream": True}
    cancelled, conns = engine.cancelled, []
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")  # streaming has begun
        conns.append((conn, r))
    for conn, r in conns:
        r.close()
        conn.close()
    def cancelled_in_server() -> int:
        try:
            return sum(s.cancelled for s in [*engine.waiting, *engine.prefilling, *engine.running.values()])
        except RuntimeError:  # changed (by the scheduler thread) while read
            return -1

    wait_until(lambda: cancelled_in_server() == 3, "the server to notice the hang-ups")
    gate.set()
    wait_until(lambda: engine.slots_in_use == 0 and engine.queue_length == 0, "the slots to be freed")
    assert engine.cancelled == cancelled + 3  # dropped at a step boundary, not run to their 70 tokens
    assert ask(server.client, *QUESTIONS[0][:2]).choices[0].finish_reason == "stop"  # still serving


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx with a clear message, and the server keeps serving


def _chat(messages=None, **fields) -> dict:
    return {"model": MODEL, "messages": messages or [{"role": "user", "content": "How many shapes are there?"}],
            "max_tokens": 4, "temperature": 0, **fields}


def _image_message(url: str, count: int = 1) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}] * count
    return [{"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}, *parts]}]


def _noise_png(size) -> str:
    rng = np.random.default_rng(0)
    return png_url(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


BAD_REQUESTS = {
    "unknown model": (_chat(model="gpt-4o"), 404, "does not exist; this server serves 'shapes'"),
    "negative max_tokens": (_chat(max_tokens=-5), 400, "max_tokens must be an int >= 1, got -5"),
    "zero max_completion_tokens": (_chat(max_completion_tokens=0), 400, "max_tokens must be an int >= 1, got 0"),
    "temperature below 0": (_chat(temperature=-1), 400, "temperature must be >= 0"),
    "top_p over 1": (_chat(top_p=2), 400, "top_p must be in (0, 1]"),
    "n > 1": (_chat(n=2), 400, "n must be 1"),
    "no messages": (_chat(messages=[]) | {"messages": []}, 400, "messages: List should have at least 1 item"),
    "a message without a role": (_chat([{"content": "hi"}]), 400, "messages.0.role: Field required"),
    "a string as max_tokens": (_chat(max_tokens="many"), 400, "max_tokens: Input should be a valid integer"),
    "a remote image URL": (_chat(_image_message("https://example.com/cat.png")), 400,
                           "http(s) URLs are refused unless the server runs with --allow-remote-images"),
    "a local path": (_chat(_image_message("/etc/passwd")), 400,
                     "local paths are refused unless the server runs with --allowed-local-media-path DIR"),
    "a file: URL": (_chat(_image_message("file:///etc/passwd")), 400, "local paths are refused"),
    "an ftp URL": (_chat(_image_message("ftp://example.com/cat.png")), 400, "scheme 'ftp' is not supported"),
    "a data: URL that is not an image": (_chat(_image_message("data:text/plain;base64,aGVsbG8=")), 400,
                                         "must be a base64 data URL of an image"),
    "an image/png that is not one": (_chat(_image_message("data:image/png;base64,aGVsbG8=")), 400, "is not a readable image"),
    "bad base64": (_chat(_image_message("data:image/png;base64,@@@")), 400, "base64 payload does not decode"),
    "too many images": (_chat(_image_message(png_url(shapes.example("heldout", 0).image), 3)), 400,
                        "3 images; this server allows at most 2"),
    "an image over the pixel limit": (_chat(_image_message(png_url(Image.new("RGB", (600, 600))))), 413,
                                      "600x600 = 360,000 pixels, over this server's limit of 200,000"),
    "an image over the byte limit": (_chat(_image_message(_noise_png((300, 300)))), 413,
                                     "over this server's limit of 262,144 bytes per image"),
    "a prompt over the context": (_chat([{"role": "user", "content": "one two " * 80}]), 400,
                                  "--max-model-len is 96"),
    "image placeholders typed by hand": (_chat([{"role": "user", "content": "<image> <image>"}]), 400, "image"),
    "a completion with two prompts": ({"model": MODEL, "prompt": ["a", "b"]}, 400, "a list of 2"),
    "a completion with max_tokens 0": ({"model": MODEL, "prompt": "a", "max_tokens": 0}, 400, "max_tokens must be an int >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_with_a_clear_message(server, case):
    body, status, message = BAD_REQUESTS[case]
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    got_status, got = server.post(path, body)
    assert got_status == status, got
    assert message in got["error"]["message"], got
    assert got["error"]["type"] == "invalid_request_error"


def test_malformed_bodies_and_routes(server):
    assert server.request("POST", "/v1/chat/completions", b'{"model": "shapes", "messages": [') [0] == 400
    status, body = server.request("POST", "/v1/chat/completions", b'{"model": ')
    assert status == 400 and "request body is not valid JSON" in json.loads(body)["error"]["message"]
    status, body = server.request("POST", "/v1/chat/completions", b"[1, 2]")
    assert status == 400 and "must be a JSON object, got list" in json.loads(body)["error"]["message"]
    status, body = server.request("POST", "/v1/chat/completions", b"model=shapes", content_type="text/plain")
    assert status == 415 and "Content-Type must be application/json, got 'text/plain'" in json.loads(body)["error"]["message"]
    status, body = server.request("GET", "/v1/nothing")
    assert status == 404 and "routes: POST /v1/chat/completions" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an int >= 1"):
        server.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1)
    assert ask(server.client, *QUESTIONS[1][:2]).choices[0].finish_reason == "stop"  # still serving


def test_a_full_queue_is_429(server, monkeypatch):
    def full(*args, **kwargs):
        raise QueueFull("64 requests are waiting, the most this server queues (--max-queue 64); retry later")

    monkeypatch.setattr(server.engine, "submit", full)
    with pytest.raises(openai.RateLimitError, match="--max-queue"):
        ask(server.client, *QUESTIONS[0][:2])


def test_503_until_loaded_and_when_loading_failed(tmp_path):
    server = Server(ServeConfig(str(tmp_path / "missing")))
    with pytest.raises(APIError, match="is loading") as e:
        server.ready()
    assert e.value.status == 503
    server.load()
    with pytest.raises(APIError, match=r"failed to load \(.*missing") as e:
        server.ready()
    assert e.value.status == 503 and e.value.body()["error"]["code"] == "model_not_ready"


# ---------------------------------------------------------------------------------------------
# Image URLs other than data: (off by default; tested above), when the flags allow them


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    images: dict = {}

    def do_GET(self):
        if self.path == "/slow.png":
            time.sleep(1.0)
        data = self.images.get(self.path)
        if self.path == "/elsewhere":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/q.png")
            self.end_headers()
            return
        try:
            self.send_response(200 if data else 404)
            self.end_headers()
            self.wfile.write(data or b"")
        except BrokenPipeError:  # the fetcher gave up (the timeout case)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    _ImageHandler.images = {"/q.png": _png(QUESTIONS[0][0]), "/big.png": b"x" * 300_000, "/slow.png": b""}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_image_urls_fetched_when_the_flags_allow(image_host, tmp_path):
    from vlmdeploy.serve.media import ImageFetcher

    (tmp_path / "q.png").write_bytes(_png(QUESTIONS[0][0]))
    (tmp_path / "sub").mkdir()
    fetch = ImageFetcher(max_bytes=262_144, allow_remote=True, local_root=tmp_path, timeout_s=0.3).fetch
    expected = _png(QUESTIONS[0][0])
    assert fetch(f"{image_host}/q.png") == fetch(str(tmp_path / "q.png")) == fetch(f"file://{tmp_path}/q.png") == expected
    assert fetch("q.png") == fetch("sub/../q.png") == expected  # relative to the allowed directory
    refusals = {
        f"{image_host}/missing.png": (400, "failed: HTTP 404"),
        f"{image_host}/big.png": (413, "over this server's limit of 262,144 bytes"),
        f"{image_host}/slow.png": (400, "timeout 0.3 s, --image-fetch-timeout"),
        f"{image_host}/elsewhere": (400, "redirect to a non-http(s) URL refused"),
        "/etc/passwd": (400, "is outside the allowed directory"),
        "../q.png": (400, "is outside the allowed directory"),
        "sub": (400, "is not a regular file"),
        "nothing.png": (400, "cannot be read"),
    }
    for url, (status, message) in refusals.items():
        with pytest.raises(APIError, match=re.escape(message)) as e:
            fetch(url)
        assert e.value.status == status, url


def test_a_remote_image_answers_as_a_data_url(shapes_dir, image_host, server):
    allowed = RunningServer(ServeConfig(str(shapes_dir), model_name=MODEL, allow_remote_images=True))
    try:
        image, question, _ = QUESTIONS[0]
        messages = [{"role": "user", "content": [{"type": "text", "text": question},
                                                 {"type": "image_url", "image_url": {"url": f"{image_host}/q.png"}}]}]
        remote = allowed.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=32)
        assert remote.choices[0].message.content == ask(server.client, image, question).choices[0].message.content
    finally:
        allowed.stop()


# ---------------------------------------------------------------------------------------------
# The scheduler and its caches, without HTTP


@pytest.mark.parametrize("decoder", ["decoder_gqa", "decoder"])
@pytest.mark.parametrize("chunk,per_step", [(5, 8), (256, 512)])
def test_scheduler_matches_the_runtime_through_shifts_and_compaction(shapes_dir, decoder, chunk, per_step):
    """A small --max-model-len and staggered prompts of different lengths make the slot cache shift
    rows right (a prompt longer than the frontier) and left (the frontier at capacity); rows join
    as others leave, prompts are prefilled whole or in chunks of 5 tokens (at most 8 per step, so
    prefills interleave with decode steps), and every answer equals the runtime's own (ignore_eos:
    5 to 30 tokens each)."""
    vlm = VLM.load(shapes_dir, decoder=decoder)
    engine = Engine(vlm, max_num_seqs=3, max_queue=64, max_model_len=48, prefill_chunk=chunk,
                    prefill_tokens_per_step=per_step)
    builder = PromptBuilder(vlm, 1 << 20)
    jobs = [(ex.image, q, n) for i, ex in enumerate(shapes.example("heldout", 20 + i) for i in range(8))
            for q, n in [("Describe the picture.", 30), ("What color is the " + ex.shapes[0].kind + "?", 5 + i)]]
    prompts = [builder.chat([{"role": "user", "content": [{"type": "text", "text": q}, {"type": "image", "image": _png(im)}]}])
               for im, q, _ in jobs]
    shifts = _count_shifts(engine)
    outs = [queue.Queue() for _ in jobs]
    with engine._wake:  # all queued before the scheduler looks: the run does not depend on timing
        for prompt, (_, _, n), events in zip(prompts, jobs, outs):
            engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), events.put)
    texts = [_drain(q) for q in outs]
    engine.stop()
    expected = [vlm.generate(PROMPT.format(question=q), [im], max_new_tokens=n, ignore_eos=True).text
                for im, q, n in jobs]
    assert texts == expected
    assert shifts["left"] > 0  # compaction at capacity happened
    assert shifts["right"] > 0 or chunk < 18  # whole prefills: the 2nd prompt is longer than the 1st


def test_slot_cache_shifts_keep_each_rows_span(vlm):
    from vlmdeploy.serve.slots import SlotKVCache

    cache = SlotKVCache(vlm.facts, slots=3, capacity=10)
    d = vlm.facts.dims
    kv = lambda s, v: [np.full((1, d.kv_heads, s, d.head_dim), v, np.float32)] * (2 * d.num_layers)  # noqa: E731
    cache.place(0, kv(3, 1.0), active=[])  # frontier 0 -> 3
    cache.place(2, kv(5, 2.0), active=[0])  # longer than the frontier: row 0 shifts right by 2
    assert cache.frontier == 5
    assert cache.mask[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0] and cache.mask[2, :5].tolist() == [1] * 5
    assert (cache.buffers[:, 0, :, 2:5] == 1).all() and (cache.buffers[:, 2, :, :5] == 2).all()
    cache.frontier = 10  # as after 5 decode steps
    cache.mask[[0, 2], 5:] = 1
    cache.make_room([0, 2])  # row 2 starts at column 0: nothing to free
    assert cache.frontier == 10  # row 2 spans all 10 columns: no room (the engine ends such a row first)
    cache.make_room([0])
    assert cache.frontier == 8 and cache.mask[0, :8].tolist() == [1] * 8 and (cache.buffers[:, 0, :, :3] == 1).all()


def _count_shifts(engine) -> dict:
    counts = {"left": 0, "right": 0}
    shift = engine.cache._shift

    def counted(by, active):
        counts["left" if by < 0 else "right"] += bool(active)
        shift(by, active)

    engine.cache._shift = counted
    return counts


def _png(image, fmt="PNG") -> bytes:
    f = io.BytesIO()
    image.save(f, fmt)
    return f.getvalue()


def _drain(events: queue.Queue) -> str:
    text = ""
    while True:
        e = events.get(timeout=60)
        assert e.error is None, e.error
        text += e.text
        if e.finish_reason:
            return text


def test_a_cancelled_sequence_leaves_at_the_next_step(vlm):
    engine = Engine(vlm, max_num_seqs=2)
    prompt = PromptBuilder(vlm, 0).raw("USER: hi ASSISTANT:")
    events = []

    def emit(event):  # runs in the scheduler thread: cancel right after the first token
        events.append(event)
        engine.cancel(seq)

    with engine._wake:  # `seq` is bound before the scheduler can call emit
        seq = engine.submit(prompt, SamplingParams(max_new_tokens=50, ignore_eos=True), emit)
    wait_until(lambda: engine.cancelled == 1, "the cancelled sequence to be dropped")
    assert len(events) == 1 and events[0].finish_reason is None and engine.slots_in_use == 0
    engine.stop()


def test_queue_limit(shapes_dir, vlm):
    engine = Engine(vlm, max_num_seqs=1, max_queue=2)
    prompt = PromptBuilder(vlm, 0).raw("USER: hi ASSISTANT:")
    params = SamplingParams(max_new_tokens=2)
    with engine._wake:  # the scheduler cannot take from the queue meanwhile
        engine.submit(prompt, params, lambda e: None)
        engine.submit(prompt, params, lambda e: None)
        with pytest.raises(QueueFull, match="--max-queue 2"):
            engine.submit(prompt, params, lambda e: None)
    engine.stop()


def test_vision_cache_is_lru_within_its_byte_budget():
    cache = VisionCache(budget_bytes=3 * 400, fingerprint="f")
    entry = lambda: np.zeros((10, 10), np.float32)  # noqa: E731  400 bytes
    for name in "abc":
        cache.put(name, entry())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry())  # evicts b, the least recent
    assert cache.get("b") is None and cache.get("c") is not None
    assert len(cache) == 3 and cache.bytes == 1200 and (cache.hits, cache.misses) == (2, 1)
    cache.put("huge", np.zeros((40, 40), np.float32))  # over the budget: not kept
    assert cache.get("huge") is None and len(cache) == 3
    with pytest.raises(ValueError, match="--vision-cache-mb must be >= 0"):
        VisionCache(-1, "f")


def test_vision_cache_keys_follow_the_preprocessed_content(vlm):
    from vlmdeploy.runtime.images import load_image

    cache = VisionCache(1 << 20, "f")
    image = QUESTIONS[0][0]
    as_png, as_bmp = (vlm.family.prepare(load_image(_png(image, fmt))) for fmt in ("PNG", "BMP"))
    other = vlm.family.prepare(load_image(_png(QUESTIONS[2][0])))
    assert cache.key(as_png) == cache.key(as_bmp) != cache.key(other)
    assert VisionCache(1, "g").key(as_png) != cache.key(as_png)  # another preprocessing fingerprint


# ---------------------------------------------------------------------------------------------
# The command


def test_vlmdeploy_serve_command(shapes_dir, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "vlmdeploy.runtime.cli", "serve", str(shapes_dir), "--port", str(port),
                             "--served-model-name", MODEL, "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def healthy():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return client.with_options(timeout=2).models.list().data[0].id == MODEL
            except (openai.APIConnectionError, openai.InternalServerError):
                return False

        wait_until(healthy, "vlmdeploy serve to answer")
        image, question, answer = QUESTIONS[0]
        got = ask(client, image, question).choices[0].message.content
        assert shapes.normalize_answer(got) == shapes.normalize_answer(answer)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    missing = subprocess.run([sys.executable, "-m", "vlmdeploy.runtime.cli", "serve", str(tmp_path / "none"),
                              "--port", str(port)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "vlmdeploy serve: error: cannot serve" in missing.stderr


def test_the_runtime_cli_does_not_import_the_server_stack():
    code = ("import sys; from vlmdeploy.runtime.cli import _parser; _parser().parse_args(['serve', 'x']); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
