"""`vlmdeploy serve DIR`: flags -> ServeConfig -> uvicorn. Imports fastapi/uvicorn only when run, so
`vlmdeploy --help` works on a runtime-only install."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="artifact directory (vlmdeploy export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="ort-cpu", help="ort-cpu, ort-cuda or ort-trt (the decode loop runs on the host)")
    p.add_argument("--decoder", choices=["decoder_gqa", "decoder"], help="default: decoder_gqa where the artifact has it")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--served-model-name", help="the `model` clients send (default: the directory's name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="rows in the running batch = KV slots")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get 429")
    p.add_argument("--max-model-len", type=int, help="prompt + generated tokens per row (default: the model's context)")
    p.add_argument("--max-images", type=int, default=8, help="images per request")
    p.add_argument("--max-image-mb", type=float, default=16.0, help="bytes per image (decoded from its data: URL)")
    p.add_argument("--max-image-pixels", type=int, default=16_000_000, help="width x height per image")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="request body size")
    p.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: refused)")
    p.add_argument("--image-fetch-timeout", type=float, default=10.0, help="seconds per remote image")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="read image paths / file:// URLs inside DIR (default: refused)")
    p.add_argument("--vision-cache-mb", type=float, default=256.0, help="encoder outputs kept by image hash (0: off)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per prefill call (chunked prefill)")
    p.add_argument("--prefill-tokens-per-step", type=int, default=256,
                   help="prompt tokens prefilled between two decode steps (at least one chunk)")
    from vlmdeploy.runtime.compress import add_arguments as compression_arguments

    compression_arguments(p)  # --visual-tokens K --compression pool|topk|merge
    p.add_argument("--ray", action="store_true", help="serve with Ray Serve on a local Ray instance (vlmdeploy[ray])")
    p.add_argument("--replicas", type=int, default=1, help="with --ray: copies of the server, each with its own model")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def config_from_args(args):
    from .app import ServeConfig

    return ServeConfig(
        args.dir, backend=args.backend, threads=args.threads, decoder=args.decoder,
        model_name=args.served_model_name, max_num_seqs=args.max_num_seqs, max_queue=args.max_queue,
        max_model_len=args.max_model_len, max_images=args.max_images, max_image_mb=args.max_image_mb,
        max_image_pixels=args.max_image_pixels, max_request_mb=args.max_request_mb,
        allow_remote_images=args.allow_remote_images, image_fetch_timeout=args.image_fetch_timeout,
        allowed_local_media_path=args.allowed_local_media_path,
        vision_cache_mb=args.vision_cache_mb, prefill_chunk=args.prefill_chunk,
        prefill_tokens_per_step=args.prefill_tokens_per_step, visual_tokens=args.visual_tokens,
        compression=args.compression,
    )


def serve_command(args) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        print(f"vlmdeploy serve: error: the server needs the serve extra ({e.name} is missing); "
              "install it with: pip install 'vlmdeploy[serve]'", file=sys.stderr)
        return 2
    if args.ray:
        return _serve_on_ray(args)
    failed: list[str] = []
    servers: list = []

    def on_load_error(message: str) -> None:  # loading runs in a thread; stop serving and exit 2
        failed.append(message)
        servers[0].should_exit = True

    app = create_app(config_from_args(args), on_load_error)
    servers.append(uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)))
    servers[0].run()
    if failed:
        print(f"vlmdeploy serve: error: cannot serve {args.dir}: {failed[0]}", file=sys.stderr)
        return 2
    return 0


def _serve_on_ray(args) -> int:
    try:
        from .ray import run_on_ray
    except ImportError as e:
        print(f"vlmdeploy serve --ray: error: Ray Serve is not installed ({e.name} is missing); "
              "install it with: pip install 'vlmdeploy[ray]'", file=sys.stderr)
        return 2
    run_on_ray(config_from_args(args), args.replicas, args.host, args.port)
    return 0
