"""`vlmdeploy build` and `vlmdeploy check --tensorrt`: flags and commands (imports nothing heavy at load)."""

from __future__ import annotations

import sys


def add_limit_arguments(p) -> None:
    """The limits engines are built for (and `check --tensorrt` derives profiles from); one flag per field."""
    p.add_argument("--max-batch", type=int, default=1, help="sequences per batch (default 1)")
    p.add_argument("--max-images", type=int, default=4, help="images per vision call (default 4)")
    p.add_argument("--max-context", type=int, help="prompt + new tokens (default: the model's context length)")
    p.add_argument("--max-input", type=int, help="prompt tokens in one prefill (default: --max-context)")


def add_check_arguments(p) -> None:
    p.add_argument("--tensorrt", action="store_true", help="also check, without a GPU, that TensorRT will accept the "
                   "graphs: ops, control flow, opset, ranks, named dims, profiles, INT64, weight sizes")
    p.add_argument("--trt-version", default="10", help="TensorRT release to check against: 10 (any 10.x), 10.15, 8")
    add_limit_arguments(p)


def add_build_parser(sub) -> None:
    b = sub.add_parser("build", help="build TensorRT engines for an artifact directory (needs TensorRT and a GPU)")
    b.add_argument("dir", help="artifact directory (from vlmdeploy export); engines go to DIR/engines")
    b.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16",
                   help="fp16 keeps softmax and norms in fp32 (default fp16)")
    add_limit_arguments(b)
    b.add_argument("--timing-cache", help="tactic timing cache to reuse and update (default DIR/engines/timing.cache)")
    b.add_argument("--workspace", type=float, metavar="GB", help="builder workspace limit in GiB (default: TensorRT's)")
    b.set_defaults(func=build_command)


def build_options(args):
    from .build import BuildOptions

    return BuildOptions(
        precision=getattr(args, "precision", "fp16"),
        max_batch=args.max_batch, max_images=args.max_images, max_context=args.max_context, max_input=args.max_input,
        timing_cache=getattr(args, "timing_cache", None), workspace_gb=getattr(args, "workspace", None),
    )


def tensorrt_check_request(args) -> tuple[str, object] | None:
    """(trt_version, BuildOptions) when --tensorrt was given; the version is validated here (exit 2 when unknown)."""
    if not args.tensorrt:
        return None
    from .ops import TrtTarget

    TrtTarget.parse(args.trt_version)
    return args.trt_version, build_options(args)


def build_command(args) -> int:
    from .build import BuildError, build_engines
    from .deps import BackendUnavailable

    try:
        build_engines(args.dir, build_options(args))
    except (BuildError, BackendUnavailable) as e:
        print(f"vlmdeploy build: error: {e}", file=sys.stderr)
        return 2
    return 0
