"""`vlmdeploy check DIR`: is this artifact directory sound? Returns a report; never raises on a bad graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dummy import bound_outputs, sample_feeds, validation_dims, with_sums
from .manifest import ArtifactError, Manifest, check_external_data, load_manifest
from .backends import make_runner


@dataclass
class CheckReport:
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # "warn: ..." / "info: ..." lines that do not fail the check

    def add(self, passed: bool, what: str) -> None:
        (self.ok if passed else self.failed).append(what)

    @property
    def passed(self) -> bool:
        return not self.failed


def check_artifact(directory: str | Path, backend: str = "ort-cpu", tensorrt: tuple | None = None) -> CheckReport:
    """`tensorrt`: (trt_version, BuildOptions) adds the static TensorRT check (runtime/tensorrt/build.py)."""
    report = CheckReport()
    directory = Path(directory)
    try:
        manifest = load_manifest(directory, checksums=True)
    except ArtifactError as e:
        report.add(False, f"manifest and checksums: {e}")
        return report
    report.add(True, f"manifest v{manifest.to_dict()['manifest_version']}, {len(manifest.files)} files, sha256 match")
    _check_part(report, "external data: every weights file a graph reads is listed", check_external_data, directory, manifest)
    _check_part(report, "model family: preprocessing parameters and tensors load", _family, directory, manifest)
    _check_part(report, "tokenizer: loads; media and EOS token ids match it", _tokenizer, directory, manifest)
    _check_part(report, "chat template: compiles", _template, directory, manifest)
    _check_part(report, "media: an image through the family and the image graphs gives its prompt tokens", _media,
                directory, manifest)
    for name in manifest.graphs:
        _check_onnx(directory, manifest, name, report)
        _check_run(directory, manifest, name, backend, report)
    if tensorrt is not None:
        _check_tensorrt(directory, manifest, tensorrt, report)
    return report


def _check_part(report: CheckReport, what: str, fn, directory: Path, manifest: Manifest) -> None:
    """What `VLM.load` and a first request would do, one line each: a manifest that would fail at
    run time fails here."""
    try:
        fn(directory, manifest)
        report.add(True, what)
    except Exception as e:  # noqa: BLE001 — every failure is a finding, reported on its line
        report.add(False, f"{what.split(':')[0]}: {type(e).__name__}: {str(e)[:300]}")


def _family(directory: Path, m: Manifest) -> None:
    from .families import family_class

    tensors = {n: np.load(directory / f, allow_pickle=False) for n, f in m.model.tensors.items()}
    family_class(m.model.family)(m.model, m.preprocess, tensors)


def _media(directory: Path, m: Manifest) -> None:
    """One synthetic image, prepared by the family and run through the pipeline's image graphs (ONNX
    Runtime, CPU): the embeddings it yields must fill exactly the tokens its placeholder becomes."""
    from PIL import Image

    from .families import family_class
    from .runners import OrtRunner

    tensors = {n: np.load(directory / f, allow_pickle=False) for n, f in m.model.tensors.items()}
    family = family_class(m.model.family)(m.model, m.preprocess, tensors)
    runners = {g: OrtRunner(directory / m.graph_files[g], m.graphs[g], threads=1) for g in m.model.pipeline["image"]}

    def run(graph, x):  # as VLM._run_graph: one input or a feed dict -> the first output
        spec = m.graphs[graph]
        return runners[graph].run(x if isinstance(x, dict) else {spec.input_names[0]: x})[spec.output_names[0]]

    item = family.prepare(Image.new("RGB", (64, 48), (120, 80, 40)))
    (embeds,) = family.embed_media([item], run)
    if embeds.shape[-1] != m.model.dims.hidden:
        raise ValueError(f"image embeddings have width {embeds.shape[-1]}, the decoder's hidden size is {m.model.dims.hidden}")
    ids = np.array([m.model.media["image"].token_id, 0], np.int64)  # an image token, then text
    context = family.decoder_context([ids], [[item]], lambda graph, feeds: runners[graph].run(feeds))
    if context is not None:  # what the decoders read besides embeddings and their KV (mllama's cross K/V)
        for decoder in m.model.pipeline["decoders"]:
            _check_context(m.graphs[decoder], context.prefill(), len(ids))


def _check_context(spec, feeds: dict, seq: int) -> None:
    """The family's decoder context for one row of `seq` tokens: inputs of the decoder spec, of its dtype
    and rank, batch 1, seq rows where the spec has a seq axis, and its fixed sizes."""
    inputs = {t.name: t for t in spec.inputs}
    for name, x in feeds.items():
        t = inputs.get(name)
        if t is None:
            raise ValueError(f"the family's decoder input {name!r} is not an input of graph {spec.name!r}")
        want = [d if isinstance(d, int) else {"batch": 1, "seq": seq}.get(d) for d in t.shape]  # None: any size
        if x.dtype != t.np_dtype or x.ndim != len(want) or any(w not in (None, n) for w, n in zip(want, x.shape)):
            raise ValueError(f"the family's decoder input {name!r} is {x.dtype} {list(x.shape)}; graph {spec.name!r} "
                             f"wants {t.dtype} {list(t.shape)} (batch 1, seq {seq})")


def _tokenizer(directory: Path, m: Manifest) -> None:
    from .text import TextProcessor

    text = TextProcessor.from_files(directory / m.tokenizer_file, directory / m.tokenizer_config_file)
    for kind, media in m.model.media.items():
        got = text.token_to_id(media.placeholder)
        if got != media.token_id:
            raise ValueError(f"media {kind!r}: the tokenizer gives {media.placeholder!r} id {got}, the manifest {media.token_id}")
    if text.vocab_size > m.model.input_vocab:
        raise ValueError(f"the tokenizer has {text.vocab_size} tokens but the embedding takes {m.model.input_vocab}")


def _template(directory: Path, m: Manifest) -> None:
    from .text import compile_chat_template

    if m.chat_template_file is not None:
        compile_chat_template((directory / m.chat_template_file).read_text())


def _check_tensorrt(directory: Path, manifest: Manifest, request: tuple, report: CheckReport) -> None:
    from .tensorrt.build import tensorrt_check

    for severity, line in tensorrt_check(directory, manifest, *request):
        if severity in ("ok", "error"):
            report.add(severity == "ok", line)
        else:
            report.notes.append(f"{severity}: {line}")


def _check_onnx(directory: Path, manifest: Manifest, name: str, report: CheckReport) -> None:
    import onnx

    path = directory / manifest.graph_files[name]
    try:
        onnx.checker.check_model(str(path), full_check=True)  # path form: handles external data and >2 GB
        report.add(True, f"{name}: onnx checker and shape inference")
    except Exception as e:  # noqa: BLE001 — any checker failure is a finding, reported per graph
        report.add(False, f"{name}: onnx checker: {type(e).__name__}: {str(e)[:300]}")


def _check_run(directory: Path, manifest: Manifest, name: str, backend: str, report: CheckReport) -> None:
    spec = manifest.graphs[name]
    rng = np.random.default_rng(0)
    try:
        runner = make_runner(backend, directory / manifest.graph_files[name], spec)
        shapes = validation_dims(spec)
        for dims in shapes:
            dims = with_sums(spec, dims)
            feeds = sample_feeds(spec, dims, manifest.model, rng)
            out = runner.run(feeds, out=bound_outputs(spec, feeds))
            _check_outputs(spec, dims, out)
        report.add(True, f"{name}: ran on {backend} at {len(shapes)} shapes, outputs finite and as specified")
    except Exception as e:  # noqa: BLE001
        report.add(False, f"{name}: run on {backend}: {type(e).__name__}: {str(e)[:300]}")


def _check_outputs(spec, dims: dict, out: dict) -> None:
    for name, shape in spec.output_shapes(dims).items():
        if out[name].shape != shape:
            raise ValueError(f"output {name} has shape {list(out[name].shape)}, spec says {list(shape)} at {dims}")
        if not np.all(np.isfinite(out[name])):
            raise ValueError(f"output {name} has non-finite values at {dims}")
