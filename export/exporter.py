"""`vlmdeploy export`: checkpoint -> validated ONNX graphs + tokenizer + manifest, written atomically."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmdeploy.runtime.dummy import export_dims, sample_feeds, validation_dims
from vlmdeploy.runtime.manifest import Manifest, check_export_target, describe_files, staging_dir
from vlmdeploy.runtime.spec import GraphSpec

from . import decoder_gqa, onnx_export, page_trimmer, registry
from .components import ExportError
from .export_plan import Machine, check_machine, export_needs
from .hf_files import read_processor_files, save_runtime_tokenizer_json
from .page_trimmer import PageTrimmer, file_mappings
from .quantize import INT8_COMPUTE, SCHEMES, add_int8_compute, quantize_graph
from .recipes import RecipeError, find_weights, load_recipe, recipe_names

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}
# Graphs an artifact can do without (the runtime falls back to the portable decoder): a failure to
# build or validate one is logged in one line and the export goes on.
OPTIONAL_GRAPHS = ("decoder_gqa",)
DEFAULT_OPSET = 18
TRIM_INTERVAL_S = 0.05  # how often the weights' file pages are dropped (export/page_trimmer.py)
MIN_OPSET, MAX_OPSET = 18, 23


class Progress:
    """Stage lines with elapsed time on stderr: a 7B export takes minutes."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.start = stream, time.perf_counter()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f}s] {msg}", file=self.stream, flush=True)


@dataclass(frozen=True)
class Source:
    checkpoint: Path
    recipe: str | None
    dtype: str


@contextlib.contextmanager
def resolve_source(model: str, dtype: str | None):
    """A checkpoint directory for `--model NAME_OR_DIR`; random-init recipes are built in a temp dir.
    A bare recipe name means the recipe even when the working directory has a folder of that name
    (write `./shapes` for the folder)."""
    path = Path(model).expanduser()
    bare_recipe = os.sep not in model and not model.startswith(".") and model in recipe_names()
    if path.is_dir() and not bare_recipe:
        yield Source(path, None, dtype or "fp32")
        return
    if os.sep in model or model.startswith("."):
        raise RecipeError(f"--model {model}: no such directory")
    recipe = load_recipe(model)
    if recipe.random_init is None:
        yield Source(find_weights(recipe), recipe.name, dtype or recipe.dtype)
        return
    from .tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix=f"vlmdeploy-{recipe.name}-") as tmp:
        build_tiny_checkpoint(recipe.random_init, Path(tmp))
        yield Source(Path(tmp), recipe.name, dtype or recipe.dtype)


def export_model(model: str, out: str | Path, dtype: str | None = None, opset: int = DEFAULT_OPSET, log=None,
                 quantize: str | Sequence[str] | None = None, machine: Machine | None = Machine()) -> Manifest:
    """`quantize`: any of "int8" | "int4" (weight-only quantization of decoder_gqa; the portable decoder
    stays float), "vision" (the image graphs compute in int8) and "prefill" (an int8-compute copy of
    decoder_gqa for the prompt pass); export/quantize.py. `machine`: where free memory and disk are read
    before loading (None: not checked)."""
    log = log or Progress()
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise RecipeError(f"--dtype {dtype!r} not one of {sorted(TORCH_DTYPES)}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise RecipeError(f"--opset {opset!r} not supported; allowed: {MIN_OPSET}..{MAX_OPSET} (torch.onnx's dynamo "
                          "exporter and the decoder_gqa builder need at least 18)")
    scheme, int8_compute = _quantize_choices(quantize)
    check_export_target(Path(out))  # before minutes of work
    with resolve_source(model, dtype) as src, staging_dir(Path(out), check_export_target) as tmp:
        log(f"checkpoint {src.checkpoint} ({src.dtype}, opset {opset})")
        _check_resources(src, Path(out), machine, log)
        manifest = _export_into(src, tmp, opset, log, scheme, int8_compute)
        manifest.write(tmp)
    log(f"done: {Path(out)}")
    return manifest


def _quantize_choices(quantize: str | Sequence[str] | None) -> tuple[str | None, tuple[str, ...]]:
    """--quantize's values -> (decoder_gqa's weight scheme or None, the int8-compute kinds)."""
    given = [quantize] if isinstance(quantize, str) else list(quantize or [])
    allowed = [*SCHEMES, *INT8_COMPUTE]
    bad = [q for q in given if q not in allowed]
    if bad:
        raise RecipeError(f"--quantize {' '.join(map(str, bad))}: not one of {allowed}")
    schemes = [q for q in given if q in SCHEMES]
    if len(schemes) > 1:
        raise RecipeError(f"--quantize takes one weight scheme, got {schemes}; choose int8 or int4")
    return (schemes[0] if schemes else None), tuple(q for q in INT8_COMPUTE if q in given)


def _check_resources(src: Source, out: Path, machine: Machine | None, log) -> None:
    """Refuse before loading when the machine has less memory or disk than the measured curve says."""
    if machine is None:
        return
    try:
        needs = export_needs(str(src.checkpoint), src.dtype)
    except (RecipeError, ValueError, KeyError, OSError) as e:  # the planner does not know every architecture
        log(f"no export memory estimate for this checkpoint ({e}); not checked")
        return
    log(needs.lines()[0])
    check_machine(needs, out, machine)


def _export_into(src: Source, tmp: Path, opset: int, log, quantize: str | None, int8_compute=()) -> Manifest:
    """Memory plan: never two copies of the weights alive, and never a whole graph's weights resident.

        torch phase: the checkpoint loaded once (transformers memory-maps safetensors); per graph:
                     trace + write it with external data, then record PyTorch's outputs on the
                     validation inputs (onnx_export.Recorded); small arrays and facts read out
        free torch:  the model and every graph module dropped
        ORT phase:   one graph at a time: load, compare with the recorded outputs, release
        both phases: the weights' file pages dropped every TRIM_INTERVAL_S (export/page_trimmer.py)
    """
    family, model, files, tokenizer, mapped = _load(src, log)  # mapped: the weights' file mappings
    dtype = TORCH_DTYPES[src.dtype]
    with PageTrimmer(ranges=mapped, interval_s=TRIM_INTERVAL_S) as trimmer:  # the model keeps them mapped
        facts = family.model_facts(model, files, tokenizer, dtype)
        specs = family.graph_specs(facts, model, log)
        recorded = _torch_phase(family, model, facts, specs, tmp, opset, log)
    log(f"page trimmer: {len(trimmer.targets)} of {len(mapped)} checkpoint mappings trimmed {trimmer.ticks} times")
    if "decoder_gqa" not in specs:
        facts = dataclasses.replace(facts, pipeline={**facts.pipeline, "decoders": ["decoder"]})
    for name, array in family.tensors(model, dtype).items():
        np.save(tmp / facts.tensors[name], array, allow_pickle=False)
    preprocess = family.preprocess(files, model)
    del model
    release_torch(log, mapped)
    validation = _ort_phase(family, facts, specs, recorded, tmp, log)
    try:  # before the weights: the int8 prefill graph derives from fp32 decoder_gqa
        facts, computed = add_int8_compute(tmp, facts, specs, int8_compute, validation, log) if int8_compute else (facts, {})
    except ValueError as e:
        raise RecipeError(f"--quantize {' '.join(int8_compute)}: {e}") from None
    quantization = _quantize(facts, specs, recorded, tmp, quantize, validation, log) if quantize else None
    text_files = _write_text_files(files, tokenizer, tmp)
    all_files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    log(f"checksumming {len(all_files)} files")
    return Manifest(
        model=facts,
        graphs=specs,
        graph_files={n: f"{n}.onnx" for n in specs},
        preprocess=preprocess,
        tokenizer_file=text_files["tokenizer"],
        tokenizer_config_file=text_files["tokenizer_config"],
        chat_template_file=text_files.get("chat_template"),
        files=describe_files(tmp, all_files),
        validation=validation,
        versions=_versions(),
        source={"checkpoint": str(src.checkpoint), "recipe": src.recipe, "dtype": src.dtype, "opset": opset,
                "quantization": quantization, **({"int8_compute": computed} if computed else {})},
    )


def _torch_phase(family, model, facts, specs: dict, tmp: Path, opset: int, log) -> dict:
    """Write every graph and record PyTorch's validation outputs; the graph modules die with this frame."""
    modules = family.graph_modules(model)  # traced graphs; decoder_gqa is built directly as ONNX
    recorded = {}
    for i, (name, spec) in enumerate(list(specs.items()), 1):
        log(f"[{i}/{len(specs)}] {name}: exporting")
        try:
            recorded[name] = _export_one(family, model, facts, name, spec, modules, tmp / f"{name}.onnx", opset)
        except Exception as e:  # noqa: BLE001 — an optional graph never fails the export
            _skip_optional(tmp, name, specs, e, log)
            continue
        log(f"[{i}/{len(specs)}] {name}: written, PyTorch reference recorded")
    return recorded


def _ort_phase(family, facts, specs: dict, recorded: dict, tmp: Path, log) -> dict:
    """Each graph in ONNX Runtime against the recorded PyTorch outputs, one session at a time."""
    validation = {}
    for i, name in enumerate(list(specs), 1):
        try:
            validation[name] = _validate_one(family, facts, name, specs[name], recorded[name], tmp / f"{name}.onnx")
        except Exception as e:  # noqa: BLE001 — an optional graph never fails the export
            _skip_optional(tmp, name, specs, e, log)
            continue
        log(f"[{i}/{len(specs)}] {name}: ONNX Runtime vs {recorded[name].reference_kind}: max abs diff "
            f"{validation[name]['max_abs_diff']:.2e}")
    return validation


def _skip_optional(tmp: Path, name: str, specs: dict, error: Exception, log) -> None:
    if name not in OPTIONAL_GRAPHS:
        raise error
    _drop_graph(tmp, name, specs)
    log(f"{name}: skipped, the export ships without it ({type(error).__name__}: {str(error)[:200]})")


def release_torch(log, mapped: list) -> None:
    """Collect the torch model's last references (cycles) and drop the checkpoint's pages (torch.export
    keeps the traced parameters in a module global, so the mapping outlives the model) before ONNX
    Runtime loads a graph; logs the resident memory left."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps freed heap pages; hand them back
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    page_trimmer.drop_pages(ranges=mapped)
    mem = memory_status()
    log(f"torch model released (resident {mem.get('VmRSS', 0) / 1e9:.2f} GB, of it anonymous "
        f"{mem.get('RssAnon', 0) / 1e9:.2f} GB; peak so far {mem.get('VmHWM', 0) / 1e9:.2f} GB)")


def memory_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes ({} where /proc is not there)."""
    status = Path("/proc/self/status")
    fields = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    lines = status.read_text().splitlines() if status.exists() else []
    return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in lines) if k in fields}


def _load(src: Source, log):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(src.checkpoint)
    family = registry.family_for(config)
    log(f"loading {config.architectures[0]} weights")
    model_cls = family.model_class()  # family: an export/family.py LlavaStyleExport
    _check_weight_files(src.checkpoint)
    before = {m.key for m in file_mappings([src.checkpoint])}
    try:
        model = model_cls.from_pretrained(src.checkpoint, dtype=getattr(torch, TORCH_DTYPES[src.dtype]),
                                          attn_implementation="sdpa")
    except Exception as e:  # noqa: BLE001 — safetensors, torch and transformers each raise their own types
        raise ExportError(f"{src.checkpoint}: cannot read the weights ({type(e).__name__}: {str(e)[:300]}); "
                          "the files are truncated, corrupt or do not match config.json") from e
    model.eval()
    files = read_processor_files(src.checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(src.checkpoint)
    return family, model, files, tokenizer, [m for m in file_mappings([src.checkpoint]) if m.key not in before]


def _check_weight_files(checkpoint: Path) -> None:
    """Safetensors only: a pickle (`*.bin`, `*.pt`) can run code when it is loaded."""
    if any(checkpoint.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ExportError(f"{checkpoint} has weights only as pickles ({', '.join(pickles[:3])}), which can run code when "
                          "loaded; vlmdeploy reads safetensors. Convert them first (e.g. load with transformers and "
                          "`save_pretrained(..., safe_serialization=True)` in a sandbox you trust)")
    raise ExportError(f"{checkpoint} has no *.safetensors weights")


def _export_one(family, model, facts, name, spec, modules, path: Path, opset: int) -> onnx_export.Recorded:
    """Write graph `name`; return PyTorch's outputs on its validation inputs."""
    if name == "decoder_gqa":
        return _build_decoder_gqa(family, model, facts, spec, modules, path)
    rng = np.random.default_rng(0)

    def feeds_at(dims):
        return family.sample_feeds(name, spec, dims, facts, rng)

    module = modules[name]
    with family.export_context(module, name):
        onnx_export.export_graph(module, spec, feeds_at(export_dims(spec)), path, opset)
    reference = family.reference(model, name, module, spec)
    return onnx_export.Recorded.record(reference, feeds_at, family.validation_dims(name, spec), dtype=facts.dims.dtype)


def _validate_one(family, facts, name: str, spec, recorded: onnx_export.Recorded, path: Path) -> dict:
    replay = recorded.replay()
    if name == "decoder_gqa":
        return _validate_decoder_gqa(facts, spec, replay, path)
    valid = functools.partial(family.valid_positions, name)
    record = onnx_export.validate_graph(path, spec, replay.reference, replay.feeds_at,
                                        [r[0] for r in recorded.runs], facts.dims.dtype, valid,
                                        while_loaded=lambda: PageTrimmer(roots=external_data(path), interval_s=TRIM_INTERVAL_S))
    return {**record, **_compared(recorded, onnx_export.ATOL[facts.dims.dtype])}


def external_data(graph: Path) -> list[Path]:
    """The external-data file(s) of a graph written here (`NAME.onnx.data`), which ONNX Runtime maps."""
    return sorted(graph.parent.glob(f"{graph.name}.*"))


def _compared(recorded: onnx_export.Recorded, atol: float) -> dict:
    """What the manifest says was compared (issue 14: fp16 graphs against a float32 reference)."""
    return {"reference": recorded.reference_kind, "tolerance_rule": f"{atol:g} * max(1, max |reference|)"}


def _drop_graph(tmp: Path, name: str, specs: dict) -> None:
    specs.pop(name)
    for path in tmp.glob(f"{name}.onnx*"):
        path.unlink()


def _build_decoder_gqa(family, model, facts, spec, modules, path: Path) -> onnx_export.Recorded:
    """decoder_gqa is written directly as ONNX from the HF weights; its reference is the portable
    decoder's PyTorch module driven with the same feeds (past cut to the portable layout)."""
    decoder_gqa.save(decoder_gqa.build(*family.text_parts(model), spec), path)
    portable = GraphSpec("decoder", spec.inputs, spec.outputs)  # same input names and order
    rng = np.random.default_rng(0)
    return onnx_export.Recorded.record(
        onnx_export.torch_reference(modules["decoder"], portable),
        lambda dims: sample_feeds(spec, dims, facts, np.random.default_rng(rng.integers(1 << 31))),
        validation_dims(spec), reference_inputs=functools.partial(decoder_gqa.portable_feeds, facts.dims.num_layers),
        dtype=facts.dims.dtype,
    )


def _validate_decoder_gqa(facts, spec, replay: onnx_export.Recorded, path: Path, tolerance: float | None = None) -> dict:
    record = decoder_gqa.validate(
        path, spec, replay.reference, replay.feeds_at, [r[0] for r in replay.runs], facts.dims.num_layers,
        onnx_export.ATOL[facts.dims.dtype] if tolerance is None else tolerance,
    )
    return {**record, **_compared(replay, onnx_export.ATOL[facts.dims.dtype])}


def _quantize(facts, specs, recorded: dict, tmp: Path, scheme: str, validation: dict, log) -> dict:
    """Quantize decoder_gqa's weights; record (not enforce) how far its outputs moved from PyTorch."""
    if "decoder_gqa" not in specs:
        raise RecipeError("--quantize applies to decoder_gqa, which this model/dtype does not get "
                          "(fp32 and a text model its builder supports)")
    log(f"quantizing decoder_gqa weights to {scheme}")
    record = quantize_graph(tmp / "decoder_gqa.onnx", scheme)
    fp32 = validation["decoder_gqa"]["max_abs_diff"]
    validation["decoder_gqa"] = {**_validate_decoder_gqa(facts, specs["decoder_gqa"], recorded["decoder_gqa"].replay(),
                                                         tmp / "decoder_gqa.onnx", tolerance=float("inf")),
                                 "quantized": scheme, "fp32_max_abs_diff": fp32}
    log(f"decoder_gqa {scheme}: max abs diff vs PyTorch {validation['decoder_gqa']['max_abs_diff']:.3g} (reported, not enforced)")
    return record


def _write_text_files(files, tokenizer, tmp: Path) -> dict[str, str]:
    """tokenizer.json from the LOADED tokenizer (transformers rebuilds parts of it on load), its
    config, and the chat template."""
    save_runtime_tokenizer_json(tokenizer, tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps(files.tokenizer_config, indent=2) + "\n")
    out = {"tokenizer": "tokenizer.json", "tokenizer_config": "tokenizer_config.json"}
    if files.chat_template:
        (tmp / "chat_template.jinja").write_text(files.chat_template)
        out["chat_template"] = "chat_template.jinja"
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vlmdeploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
