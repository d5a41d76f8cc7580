"""`vlmdeploy` command line: a thin layer over the Python API. Errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from .images import ImageError
from .manifest import ArtifactError
from .spec import SpecError
from .vlm import VLM, PromptError

USER_ERRORS = (ArtifactError, ImageError, PromptError, SpecError, ValueError, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"vlmdeploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmdeploy", description="Export and run vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a checkpoint to ONNX graphs + manifest")
    e.add_argument("--model", required=True, help="a recipe name in configs/ (llava, llava-13b, tiny) or an HF checkpoint dir")
    e.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], help="default: the recipe's; fp32 for a directory")
    e.add_argument("--opset", type=int, default=18)
    e.set_defaults(func=_export)

    r = sub.add_parser("run", help="generate an answer with an exported model")
    r.add_argument("dir", help="artifact directory")
    r.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    r.add_argument("--prompt", required=True, help="user message (rendered with the chat template)")
    r.add_argument("--raw", action="store_true", help="pass --prompt as is, with <image> placeholders, no chat template")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    r.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, timings")
    r.set_defaults(func=_run)

    c = sub.add_parser("check", help="validate an artifact directory: checker, checksums, a run of every graph")
    c.add_argument("dir")
    c.set_defaults(func=_check)
    return p


def _export(args) -> int:
    try:
        from vlmdeploy.export.exporter import export_model
        from vlmdeploy.export.llava import ExportError
        from vlmdeploy.export.recipes import RecipeError
    except ImportError as e:
        print(f"vlmdeploy export: error: the exporter needs torch and transformers ({e.name} is missing); "
              "install them with: pip install 'vlmdeploy[export]'", file=sys.stderr)
        return 2
    try:
        export_model(args.model, args.out, dtype=args.dtype, opset=args.opset)
    except (RecipeError, ExportError) as e:
        print(f"vlmdeploy export: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(args) -> int:
    vlm = VLM.load(args.dir, threads=args.threads)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop,
    )
    if args.raw:
        result, stream = vlm.generate, vlm.stream
        inputs = (args.prompt, list(args.image))
    else:
        result, stream = vlm.chat, vlm.chat_stream
        content = [{"type": "image", "image": p} for p in args.image] + [{"type": "text", "text": args.prompt}]
        inputs = ([{"role": "user", "content": content}],)
    if args.json:
        print(json.dumps(result(*inputs, **sampling).to_dict()))
        return 0
    for text in stream(*inputs, **sampling):
        print(text, end="", flush=True)
    print()
    return 0


def _check(args) -> int:
    from .check import check_artifact

    report = check_artifact(args.dir)
    for line in report.ok:
        print(f"  ok    {line}")
    for line in report.failed:
        print(f"  FAIL  {line}")
    print("PASS" if report.passed else f"FAIL: {len(report.failed)} problem(s)")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
