"""Load test of `vlmdeploy serve` on loopback (the numbers in docs/SERVING.md).

    python scripts/bench_serve.py ARTIFACT_DIR [--concurrency 1 4 8 16] [--requests-per-client 2]
        [--max-tokens 32] [--no-image] [--storm 16] [--json report.json] [-- extra serve flags]

Starts `vlmdeploy serve` in its own process, then for each concurrency level runs that many
clients, each sending `--requests-per-client` streaming chat requests one after the other (one
image as a data: URL + a question, `ignore_eos` so every answer is exactly `--max-tokens` tokens).
Per level: aggregate generated tokens/s (all tokens / wall time of the level), p50/p99 time to
first token (request arrival to first token: images, queue, prefill) and p50/p99 per-token
latency (time between two tokens of a row: its p99 shows how long running rows stall while others
prefill), both from the server's /metrics histograms, and the server's peak RSS. Then a disconnect storm: `--storm` clients start long streams and hang
up after the first chunk; reported: whether the server's KV slots and queue drain to zero, its
RSS against idle, and that it still answers.
"""

from __future__ import annotations

import argparse
import os
import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
from openai import OpenAI
from PIL import Image

MODEL = "bench"


def main() -> int:
    args = _parse()
    port = _free_port()
    cmd = [sys.executable, "-m", "vlmdeploy.runtime.cli", "serve", args.dir, "--port", str(port),
           "--served-model-name", MODEL, "--max-num-seqs", str(max(args.concurrency + [args.storm])),
           "--log-level", "warning", *args.serve_flags]
    server = subprocess.Popen(cmd)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        _wait_ready(client, server)
        rss = RssSampler(server.pid)
        messages = _messages(not args.no_image, not args.same_image)
        _request(client, messages(10**6), args.max_tokens)  # warm-up
        idle_rss = rss.now()
        levels = [_level(client, messages, c, args, rss, port) for c in args.concurrency]
        loaded_rss = rss.now()
        storms = [_storm(client, messages(10**6 + 1), args.storm, port, rss) for _ in range(2)]
        report = {"levels": levels, "storms": storms, "idle_rss_mb": idle_rss, "loaded_rss_mb": loaded_rss, "max_tokens": args.max_tokens,
                  "image": not args.no_image, "same_image": args.same_image, "serve_flags": args.serve_flags,
                  "load_average_before": list(os.getloadavg())}
        _print(report)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-image", action="store_true", help="text-only prompts")
    p.add_argument("--same-image", action="store_true", help="one photo for all requests (vision cache hits)")
    p.add_argument("--storm", type=int, default=16, help="clients in the disconnect storm")
    p.add_argument("--json")
    argv = sys.argv[1:]
    ours, serve_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = p.parse_args(ours)
    args.serve_flags = serve_flags  # after --: passed to vlmdeploy serve
    return args


class RssSampler:
    """Peak resident memory of the server process, sampled every 20 ms while a phase runs."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)

    def now(self) -> float:
        return self.proc.memory_info().rss / 2**20

    def peak_during(self, work):
        peak, done = [self.now()], threading.Event()

        def sample():
            while not done.wait(0.02):
                peak.append(self.now())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            result = work()
        finally:
            done.set()
            t.join()
        return result, max(peak)


def _level(client, messages, concurrency: int, args, rss: RssSampler, port: int) -> dict:
    def one_client(k):
        return [_request(client, messages(k * args.requests_per_client + i), args.max_tokens)
                for i in range(args.requests_per_client)]

    before = _histograms(port)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results, peak = rss.peak_during(lambda: [r for rs in pool.map(one_client, range(concurrency)) for r in rs])
    wall = time.perf_counter() - t0
    after = _histograms(port)
    ttft, per_token = (_delta(after[n], before[n]) for n in (TTFT, PER_TOKEN))
    tokens = sum(results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": _quantile(ttft, 0.5), "ttft_p99": _quantile(ttft, 0.99),
            "per_token_p50": _quantile(per_token, 0.5), "per_token_p99": _quantile(per_token, 0.99),
            "peak_rss_mb": peak}


def _request(client, messages, max_tokens: int) -> int:
    """One streaming request, read to the end; its generated tokens (from the usage chunk)."""
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    return [chunk.usage for chunk in stream if chunk.usage][0].completion_tokens


# Latencies come from the server's own histograms (the bench model's random weights decode to no
# text, so a client cannot time its tokens): the difference of two /metrics scrapes, and quantiles
# interpolated inside the buckets as Prometheus' histogram_quantile does (buckets 25% apart).
TTFT, PER_TOKEN = "vlmdeploy_time_to_first_token_seconds", "vlmdeploy_time_per_output_token_seconds"


def _histograms(port: int) -> dict[str, list[tuple[float, float]]]:
    """Histogram name -> [(upper bound, cumulative count)]."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(_scrape(port)):
        if family.name in (TTFT, PER_TOKEN):
            out[family.name] = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    return out


def _delta(after, before):
    return [(le, a - b) for (le, a), (_, b) in zip(after, before)]


def _quantile(buckets, q: float) -> float:
    total = buckets[-1][1]
    if not total:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


def _storm(client, messages, clients: int, port: int, rss: RssSampler) -> dict:
    """Clients that hang up after the first chunk; then the server must drain and still answer."""
    import http.client

    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": 10_000, "temperature": 0,
                       "stream": True, "ignore_eos": True})

    def hang_up(_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.readline()  # the first chunk has arrived: the request is in the server
        conn.close()

    def storm():
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(hang_up, range(clients)))
        t0 = time.perf_counter()
        while _gauge(port, "vlmdeploy_running_rows") or _gauge(port, "vlmdeploy_queue_length"):
            time.sleep(0.05)
        return time.perf_counter() - t0

    drain_s, peak = rss.peak_during(storm)
    after = _request(client, messages, 8)
    return {"clients": clients, "drained_s": drain_s, "running_rows_after": _gauge(port, "vlmdeploy_running_rows"),
            "queue_after": _gauge(port, "vlmdeploy_queue_length"), "peak_rss_mb": peak,
            "rss_after_mb": rss.now(), "answers_after": after == 8}


def _gauge(port: int, name: str) -> float:
    return float(next(line.split()[1] for line in _scrape(port).splitlines() if line.startswith(name + " ")))


def _scrape(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()


def _messages(with_image: bool, distinct: bool):
    """Request index -> messages: a question, and a photo (a different one per request unless
    `distinct` is off: then every request after the first hits the vision cache)."""
    photo = None
    if with_image:
        import skimage.data

        photo = skimage.data.chelsea()  # [300, 451, 3]

    def messages(i: int) -> list[dict]:
        content = [{"type": "text", "text": "What is in this picture? Describe it in detail."}]
        if photo is not None:
            pixels = photo.copy()
            pixels[0, 0] = (i % 256, i // 256 % 256, 7) if distinct else (0, 0, 0)
            f = io.BytesIO()
            Image.fromarray(pixels).save(f, "PNG")
            url = "data:image/png;base64," + base64.b64encode(f.getvalue()).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        return [{"role": "user", "content": content}]

    return messages


def _wait_ready(client, server) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"vlmdeploy serve exited with {server.returncode}")
        try:
            client.with_options(timeout=2).models.list()
            return
        except Exception:
            time.sleep(0.2)
    raise SystemExit("vlmdeploy serve did not become ready in 300 s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _print(report: dict) -> None:
    base = report["levels"][0]["tokens_per_s"]
    print("| clients | requests | tokens/s | vs 1st row | TTFT p50 (s) | TTFT p99 (s) | per-token p50 (ms) "
          "| per-token p99 (ms) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for lv in report["levels"]:
        print(f"| {lv['concurrency']} | {lv['requests']} | {lv['tokens_per_s']:.1f} | {lv['tokens_per_s'] / base:.2f}x "
              f"| {lv['ttft_p50']:.2f} | {lv['ttft_p99']:.2f} | {lv['per_token_p50'] * 1e3:.1f} "
              f"| {lv['per_token_p99'] * 1e3:.1f} | {lv['peak_rss_mb']:.0f} |")
    for i, s in enumerate(report["storms"], 1):
        print(f"\ndisconnect storm {i}: {s['clients']} clients hung up after their first chunk; slots and queue empty "
              f"{s['drained_s']:.2f} s later (running rows {s['running_rows_after']:.0f}, queue {s['queue_after']:.0f}); "
              f"server RSS peak {s['peak_rss_mb']:.0f} MB, after {s['rss_after_mb']:.0f} MB; answers afterwards: "
              f"{s['answers_after']}")
    print(f"RSS: idle (after one request) {report['idle_rss_mb']:.0f} MB, after the load levels "
          f"{report['loaded_rss_mb']:.0f} MB (the KV cache's pages touched)")


if __name__ == "__main__":
    sys.exit(main())
