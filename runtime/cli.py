"""`vlmdeploy` command line: a thin layer over the Python API. Errors print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .compress import add_arguments as compression_arguments
from .images import ImageError
from .manifest import ArtifactError
from .spec import SpecError
from .tensorrt.cli import add_build_parser, add_check_arguments, tensorrt_check_request
from .tensorrt.deps import BackendUnavailable
from .vlm import VLM, PromptError, compression_plan

USER_ERRORS = (ArtifactError, ImageError, PromptError, SpecError, ValueError, FileNotFoundError, FileExistsError,
               BackendUnavailable)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"vlmdeploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `vlmdeploy run ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as e:  # e.g. stdout on a full disk
        print(f"vlmdeploy {args.command}: error: {e.strerror or e} ({type(e).__name__})", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmdeploy", description="Export and run vision-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="export a checkpoint to ONNX graphs + manifest")
    e.add_argument("--model", required=True, help="a recipe name in configs/ (llava, llava-13b, llava-next, shapes, shapes-hd, tiny, tiny-next) or an HF checkpoint dir")
    e.add_argument("--out", required=True, help="artifact directory to write (replaced atomically)")
    e.add_argument("--dtype", choices=["fp32", "fp16"], help="default: the recipe's; fp32 for a directory")
    e.add_argument("--opset", type=int, default=18)
    e.add_argument("--quantize", nargs="+", choices=["int8", "int4", "vision", "prefill"], metavar="KIND",
                   help="int8|int4: decoder_gqa's weights (decode speed); vision: the image graphs compute in int8; "
                        "prefill: an int8-compute decoder for the prompt pass (time to first token); e.g. "
                        "--quantize int4 vision prefill")
    e.add_argument("--skip-resource-check", action="store_true",
                   help="export even when free memory or disk is below what `vlmdeploy plan --export` estimates")
    e.set_defaults(func=_export)

    t = sub.add_parser("triton-repo", help="a Triton Inference Server model repository (Python backend, streaming)")
    t.add_argument("dir", help="artifact directory")
    t.add_argument("out", help="the model repository to write (Triton's --model-repository)")
    t.add_argument("--name", help="model name (default: the artifact folder's name)")
    t.add_argument("--instances", type=int, default=1, help="model instances (instance_group count)")
    t.add_argument("--threads", type=int, help="ONNX Runtime threads per instance (default: all cores)")
    compression_arguments(t)  # what every instance passes to VLM.load
    t.set_defaults(func=_triton_repo)

    q = sub.add_parser("quantize", help="a copy of an artifact with int8/int4 weights and/or int8-compute graphs (no re-export)")
    q.add_argument("dir", help="an exported fp32 artifact directory (left as it is)")
    q.add_argument("--out", required=True, help="where the quantized artifact is written")
    q.add_argument("--scheme", choices=["int8", "int4"], help="decoder_gqa's weights (int8 / int4 blocks)")
    q.add_argument("--vision", action="store_true",
                   help="the image graphs (vision tower, projector) compute in int8: dynamic quantization of their "
                        "MatMuls (VNNI / AMX kernels); norms and softmax stay fp32")
    q.add_argument("--prefill", action="store_true",
                   help="add an int8-compute copy of decoder_gqa that runs the prompt pass (decode keeps decoder_gqa)")
    q.set_defaults(func=_quantize)

    r = sub.add_parser("run", help="generate an answer with an exported model")
    r.add_argument("dir", help="artifact directory")
    r.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    r.add_argument("--video", action="append", default=[], help="video file (repeatable; families with video: qwen2_vl)")
    r.add_argument("--video-fps", type=float, help="sample the videos at this many frames per second")
    r.add_argument("--video-frames", type=int, help="sample this many frames from each video (default: all)")
    r.add_argument("--min-pixels", type=int, help="per-image/frame pixel floor (qwen2_vl; default: the processor's)")
    r.add_argument("--max-pixels", type=int, help="per-image/frame pixel ceiling (qwen2_vl; at most the artifact's)")
    r.add_argument("--prompt", required=True, help="user message (rendered with the chat template)")
    r.add_argument("--raw", action="store_true", help="pass --prompt as is, with <image> placeholders, no chat template")
    r.add_argument("--max-new-tokens", type=int, default=128)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    r.add_argument("--ignore-eos", action="store_true", help="generate exactly --max-new-tokens (benchmarks, parity checks)")
    r.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    compression_arguments(r)
    r.add_argument("--json", action="store_true", help="print one JSON object: token_ids, text, timings")
    r.set_defaults(func=_run)

    c = sub.add_parser("check", help="validate an artifact directory: checker, checksums, a run of every graph")
    c.add_argument("dir")
    c.add_argument("--backend", default="ort-cpu", choices=["ort-cpu", "ort-cpu-mapped", "ort-cuda", "ort-trt"],
                   help="what runs every graph; ort-cpu-mapped keeps fp16 weights memory-mapped instead of float32 "
                        "copies (a 7B fp16 artifact on a 24 GB machine)")
    add_check_arguments(c)  # --tensorrt [--trt-version 10] and the build limits
    c.set_defaults(func=_check)
    add_build_parser(sub)  # vlmdeploy build DIR (runtime/tensorrt/cli.py)

    b = sub.add_parser("bench", help="speed side by side with HF eager (and onnxruntime-genai) on the same weights")
    from vlmdeploy.export.bench import add_arguments as bench_arguments  # numpy-only module; torch loads in workers

    bench_arguments(b)
    b.set_defaults(func=_bench)

    from vlmdeploy.serve.cli import add_arguments as serve_arguments  # argparse only; fastapi loads when run

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (needs vlmdeploy[serve])")
    serve_arguments(sv)
    sv.set_defaults(func=_serve)
    _add_model_tools(sub)
    return p


def _export(args) -> int:
    try:
        from vlmdeploy.export.exporter import export_model
        from vlmdeploy.export.components import ExportError
        from vlmdeploy.export.export_plan import Machine, ResourceError
        from vlmdeploy.export.recipes import RecipeError
    except ImportError as e:
        print(f"vlmdeploy export: error: the exporter needs torch and transformers ({e.name} is missing); "
              "install them with: pip install 'vlmdeploy[export]'", file=sys.stderr)
        return 2
    try:
        export_model(args.model, args.out, dtype=args.dtype, opset=args.opset, quantize=args.quantize,
                     machine=None if args.skip_resource_check else Machine())
    except (RecipeError, ExportError, ResourceError) as e:
        print(f"vlmdeploy export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk: the previous artifact, if any, is untouched
        print(f"vlmdeploy export: error: cannot write {args.out}: {e.strerror or e} ({type(e).__name__}); "
              "nothing was replaced", file=sys.stderr)
        return 2
    return 0


def _triton_repo(args) -> int:
    from vlmdeploy.serve.triton import write_repository

    model = write_repository(Path(args.dir), Path(args.out), args.name, args.instances, args.threads,
                             args.visual_tokens, args.compression)
    print(f"wrote {model} (config.pbtxt, 1/model.py, 1/artifact); serve it with "
          f"tritonserver --model-repository {Path(args.out)}")
    return 0


def _quantize(args) -> int:
    try:
        from vlmdeploy.export.quantize import quantize_artifact
    except ImportError as e:
        print(f"vlmdeploy quantize: error: it needs onnx ({e.name} is missing); install: pip install 'vlmdeploy[export]'",
              file=sys.stderr)
        return 2
    bare = args.scheme is None and not (args.vision or args.prefill)
    scheme = "int8" if bare else args.scheme  # bare `quantize`: int8 weights
    quantize_artifact(Path(args.dir), Path(args.out), scheme, vision=args.vision, prefill=args.prefill,
                      log=lambda m: print(f"[quantize] {m}", file=sys.stderr, flush=True))
    return 0


def _run(args) -> int:
    vlm = VLM.load(args.dir, threads=args.threads, visual_tokens=args.visual_tokens, compression=args.compression)
    sampling = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    sampling.update({k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None})
    frames = {k: v for k, v in (("fps", args.video_fps), ("num_frames", args.video_frames)) if v is not None}
    videos = [{"video": p, **frames} if frames else p for p in args.video]
    if args.raw:
        result, stream = vlm.generate, vlm.stream
        inputs = (args.prompt, list(args.image), videos)
    else:
        result, stream = vlm.chat, vlm.chat_stream
        content = ([{"type": "image", "image": p} for p in args.image] + [{"type": "video", "video": p, **frames} for p in args.video]
                   + [{"type": "text", "text": args.prompt}])
        inputs = ([{"role": "user", "content": content}],)
    if args.json:
        print(json.dumps(result(*inputs, **sampling).to_dict()))
        return 0
    for text in stream(*inputs, **sampling):
        print(text, end="", flush=True)
    print()
    return 0


def _bench(args) -> int:
    from vlmdeploy.export.bench import main as bench_main

    return bench_main(args)


def _serve(args) -> int:
    from vlmdeploy.serve.cli import serve_command

    return serve_command(args)


def _check(args) -> int:
    from .check import check_artifact

    report = check_artifact(args.dir, backend=args.backend, tensorrt=tensorrt_check_request(args))
    for line in report.ok:
        print(f"  ok    {line}")
    for line in report.notes:
        print(f"  {line.replace(': ', '  ', 1)}")
    for line in report.failed:
        print(f"  FAIL  {line}")
    print("PASS" if report.passed else f"FAIL: {len(report.failed)} problem(s)")
    return 0 if report.passed else 1



def _add_model_tools(sub) -> None:
    """`eval`, `plan` and `demo` (the shapes demo model and the memory planner)."""
    v = sub.add_parser("eval", help="exact-match accuracy on the held-out shapes questions (the shapes demo model)")
    v.add_argument("dirs", nargs="*", metavar="DIR", help="exported artifact directories, one table row each")
    v.add_argument("--torch", metavar="CHECKPOINT", help="also evaluate an HF checkpoint dir or recipe with PyTorch "
                   "(needs vlmdeploy[export]); other rows then say how many answers equal its tokens")
    v.add_argument("--n", type=int, default=500, help="questions (the first N of the held-out split)")
    v.add_argument("--threads", type=int, help="ONNX Runtime / torch threads")
    v.add_argument("--json", action="store_true", help="one JSON list of {name, n, accuracy, by_kind}")
    compression_arguments(v)
    v.set_defaults(func=_eval)

    pl = sub.add_parser("plan", help="memory table: weights, vision encoder, projector, KV cache, activations")
    pl.add_argument("dir", nargs="?", metavar="DIR", help="an exported artifact directory (exact weight and KV sizes)")
    pl.add_argument("--model", help="instead of DIR: a recipe name in configs/ or an HF checkpoint dir (no weights needed)")
    pl.add_argument("--dtype", choices=["fp32", "fp16", "int8"], help="default: the recipe's; fp32 for a directory")
    pl.add_argument("--context", type=int, help="tokens per sequence (visual tokens included); default min(2048, model's)")
    pl.add_argument("--images", type=int, default=1, help="images per sequence")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--image-size", action="append", default=[], metavar="HxW",
                    help="an image's height x width in pixels (repeatable, or a comma-separated list): the table "
                         "shows its visual tokens (LLaVA-NeXT: tiles and tokens before/after unpadding); the "
                         "largest sizes the context")
    pl.add_argument("--video-frames", type=int, default=0, help="frames of one video per sequence (qwen2_vl)")
    pl.add_argument("--video-size", metavar="HxW", help="the video's frame size (default: the largest --image-size)")
    pl.add_argument("--json", action="store_true")
    compression_arguments(pl)
    pl.add_argument("--export", action="store_true",
                    help="with --model: also the peak memory and disk `vlmdeploy export` needs (measured curve)")
    pl.set_defaults(func=_plan)

    d = sub.add_parser("demo", help="draw a fresh shapes picture, ask the model about it, print answers and truth")
    d.add_argument("dir", help="artifact directory of the shapes model (make demo exports it)")
    d.add_argument("--seed", type=int, help="picture seed (default: a fresh random one)")
    d.add_argument("--questions", type=int, default=3, help="questions about the picture, of different kinds")
    d.add_argument("--question", help="ask this instead (answer only; the truth line shows the picture)")
    d.add_argument("--save", help="write the picture here (PNG)")
    d.add_argument("--threads", type=int)
    compression_arguments(d)
    d.set_defaults(func=_demo)


def _eval(args) -> int:
    from vlmdeploy.demo.evaluate import eval_command

    return eval_command(args.dirs, args.torch, args.n, args.threads, args.json,
                        {"visual_tokens": args.visual_tokens, "compression": args.compression})


def _plan(args) -> int:
    from vlmdeploy.export.plan import Workload, parse_image_sizes, plan_artifact, plan_model

    if (args.dir is None) == (args.model is None):
        raise ValueError("give an exported DIR or --model NAME_OR_DIR (exactly one)")
    video_size = parse_image_sizes([args.video_size])[0] if args.video_size else None
    workload = Workload(args.context, args.batch, args.images, parse_image_sizes(args.image_size), args.video_frames,
                        video_size, compression_plan(args.visual_tokens, args.compression))
    plan = plan_model(args.model, args.dtype, workload) if args.model else plan_artifact(args.dir, workload, args.dtype)
    if not args.export:
        print(json.dumps(plan.to_dict()) if args.json else plan.table())
        return 0
    if args.model is None:
        raise ValueError("--export needs --model NAME_OR_DIR (the checkpoint to export), not an artifact DIR")
    from vlmdeploy.export.export_plan import export_needs

    needs = export_needs(args.model, plan.dtype)
    if args.json:
        print(json.dumps({**plan.to_dict(), "export": {"ram_bytes": needs.ram_bytes, "disk_bytes": needs.disk_bytes,
                                                       "anon_bytes": needs.anon_bytes, "file_bytes": needs.file_bytes,
                                                       "weights_bytes": needs.weights_bytes,
                                                       "largest_graph_bytes": needs.largest_graph_bytes}}))
    else:
        print("\n".join([plan.table(), "", *needs.lines()]))
    return 0


def _demo(args) -> int:
    from vlmdeploy.demo.ask import demo_command

    return demo_command(args.dir, args.seed, args.questions, args.save, args.question, args.threads,
                        {"visual_tokens": args.visual_tokens, "compression": args.compression})


if __name__ == "__main__":
    sys.exit(main())
