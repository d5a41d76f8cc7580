"""The artifact manifest: the only contract between `vlmdeploy.export` and `vlmdeploy.runtime`.

An artifact directory is valid only when `manifest.json` exists, has a format version this code
reads, and every file it lists is present with the recorded size (and sha256 when verified).
Export writes the manifest last, inside a temporary directory that is renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from .spec import GraphSpec, ModelDims, is_int, is_name, require

MANIFEST_NAME = "manifest.json"
FORMAT = "vlmdeploy-artifact"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v1 (LLaVA-1.5 only) is upgraded on load: see _upgrade_v1

# The position schemes a decoder can be fed with (runtime/positions.py implements each).
POSITION_SCHEMES = ("cumsum", "mrope")


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, corrupt or from an incompatible version."""


@dataclass(frozen=True)
class KVLayer:
    """One decoder layer's cache: `kv_heads` x `head_dim` per token; `window` keys kept (None: all)."""

    kv_heads: int
    head_dim: int
    window: int | None = None

    def __post_init__(self):
        require(is_int(self.kv_heads, 1) and is_int(self.head_dim, 1) and (self.window is None or is_int(self.window, 1)),
                f"a kv_layers entry needs ints kv_heads, head_dim >= 1 and window None or >= 1, got {self!r}")


@dataclass(frozen=True)
class MediaKind:
    """How one media item (an image) enters the prompt: `placeholder` in the text becomes the family's
    per-item token count of `token_id` (runtime/families/*.py compute the count from the item)."""

    placeholder: str
    token_id: int
    typical_tokens: int  # tokens of a typical item (planner and TensorRT profile `opt`), not a limit

    def __post_init__(self):
        require(is_name(self.placeholder), f"a media placeholder must be a non-empty string, got {self.placeholder!r}")
        require(is_int(self.token_id), f"media token_id must be an int >= 0, got {self.token_id!r}")
        require(is_int(self.typical_tokens, 1), f"media typical_tokens must be an int >= 1, got {self.typical_tokens!r}")


@dataclass(frozen=True)
class ModelFacts:
    """What the runtime needs to know about the model beyond the graphs, as data.

    `family` picks the runtime family module; `family_params` is that module's own configuration
    (e.g. LLaVA-NeXT's grid pinpoints). `pipeline` names the graphs: per media kind the chain that
    turns preprocessed pixels into embeddings, the token embedding, and the decoders by preference.
    `tensors` are extra arrays (.npy files of the artifact, sha-checked like the graphs).
    `limits` bound every named dim of the graphs (the largest value the model accepts; None where the
    model sets none), plus `rows_per_image`: the vision-graph rows one image takes at most."""

    family: str
    dims: ModelDims
    media: Mapping[str, MediaKind]
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token: str | None
    eos_token: str | None
    context_length: int
    kv_layers: tuple[KVLayer, ...]
    family_params: Mapping = field(default_factory=dict)
    positions: str = "cumsum"
    pipeline: Mapping = field(default_factory=lambda: dict(DEFAULT_PIPELINE))
    tensors: Mapping[str, str] = field(default_factory=dict)
    limits: Mapping[str, int | None] = field(default_factory=dict)

    def __post_init__(self):
        self._check_types()
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be a list of token ids (ints >= 0), got {list(self.eos_token_ids)!r}")
        if isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int):
            raise ValueError(f"pad_token_id must be an int, got {self.pad_token_id!r}")
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions {self.positions!r} not one of {POSITION_SCHEMES}")
        if len(self.kv_layers) != self.dims.num_layers:
            raise ValueError(f"kv_layers has {len(self.kv_layers)} entries but the decoder has {self.dims.num_layers} layers")

    def _check_types(self) -> None:
        require(is_name(self.family), f"family must be a non-empty string, got {self.family!r}")
        require(isinstance(self.family_params, Mapping), f"family_params must be an object, got {self.family_params!r}")
        require(isinstance(self.media, Mapping) and "image" in self.media and all(isinstance(m, MediaKind) for m in self.media.values()),
                "media must map kinds (at least 'image') to {placeholder, token_id, typical_tokens}")
        require(is_int(self.context_length, low=-(2**63)), f"context_length must be an int, got {self.context_length!r}")
        require(all(t is None or isinstance(t, str) for t in (self.bos_token, self.eos_token)),
                "bos_token and eos_token must be strings or null")
        p = self.pipeline
        require(isinstance(p, Mapping) and isinstance(p.get("image"), list) and p["image"] and all(map(is_name, p["image"]))
                and is_name(p.get("embed")) and isinstance(p.get("decoders"), list) and all(map(is_name, p["decoders"])),
                f"pipeline must be {{image: [graph names, at least one], embed: graph name, decoders: [graph names]}}, got {p!r}")
        prefill = p.get("prefill", {})
        require(isinstance(prefill, Mapping) and all(d in p["decoders"] and is_name(g) for d, g in prefill.items()),
                f"pipeline.prefill must map a decoder of pipeline.decoders to the graph its prompt pass runs, got {prefill!r}")
        require(isinstance(self.tensors, Mapping) and all(is_name(k) and is_name(v) for k, v in self.tensors.items()),
                f"tensors must map names to .npy files, got {self.tensors!r}")
        require(isinstance(self.limits, Mapping) and all(v is None or is_int(v) for v in self.limits.values()),
                f"limits must map dim names to ints >= 0 or null, got {self.limits!r}")

    # LLaVA-style shorthands (one image kind)
    @property
    def image(self) -> MediaKind:
        return self.media["image"]

    @property
    def image_token(self) -> str:
        return self.image.placeholder

    @property
    def image_token_id(self) -> int:
        return self.image.token_id

    @property
    def input_vocab(self) -> int:
        """Token ids the embed graph takes: dims.vocab (the logits' width), more where the model embeds ids
        it never predicts (mllama: <|image|> is id vocab_size, its embedding has vocab_size + 8 rows)."""
        return int(self.family_params.get("input_vocab", self.dims.vocab))

    @property
    def tokens_per_image(self) -> int:
        return self.image.typical_tokens

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dims"]["image_size"] = list(self.dims.image_size)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["kv_layers"] = [asdict(k) for k in self.kv_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        require(isinstance(d.get("dims"), dict) and isinstance(d["dims"].get("image_size"), list),
                "dims must be an object with image_size [height, width]")
        require(isinstance(d.get("media"), dict) and all(isinstance(v, dict) for v in d["media"].values()),
                "media must map kinds to objects")
        require(isinstance(d.get("kv_layers"), list) and all(isinstance(k, dict) for k in d["kv_layers"]),
                "kv_layers must be a list of {kv_heads, head_dim, window}")
        dims = dict(d["dims"], image_size=tuple(d["dims"]["image_size"]))
        if not isinstance(d["eos_token_ids"], list):
            raise ValueError(f"eos_token_ids must be a list of token ids, got {d['eos_token_ids']!r}")
        return cls(**dict(
            d, dims=ModelDims(**dims), eos_token_ids=tuple(d["eos_token_ids"]),
            media={k: MediaKind(**v) for k, v in d["media"].items()},
            kv_layers=tuple(KVLayer(**k) for k in d["kv_layers"]),
        ))


DEFAULT_PIPELINE = {"image": ["vision", "projector"], "embed": "embed", "decoders": ["decoder_gqa", "decoder"]}


def _upgrade_v1(d: dict) -> dict:
    """A v1 manifest (LLaVA-1.5, one token count per image) as v2."""
    m = dict(d["model"])
    dims = m["dims"]
    m["media"] = {"image": {"placeholder": m.pop("image_token"), "token_id": m.pop("image_token_id"),
                            "typical_tokens": m.pop("tokens_per_image")}}
    m["family_params"] = {"tokens_per_image": m["media"]["image"]["typical_tokens"],
                          "vision_feature_layer": m.pop("vision_feature_layer"),
                          "vision_feature_select_strategy": m.pop("vision_feature_select_strategy")}
    m["kv_layers"] = [{"kv_heads": dims["kv_heads"], "head_dim": dims["head_dim"], "window": None}] * dims["num_layers"]
    m["pipeline"] = {**DEFAULT_PIPELINE, "decoders": [g for g in DEFAULT_PIPELINE["decoders"] if g in d["graphs"]]}
    return {**d, "manifest_version": MANIFEST_VERSION, "model": m}


@dataclass(frozen=True)
class Manifest:
    model: ModelFacts
    graphs: dict[str, GraphSpec]
    graph_files: dict[str, str]  # graph name -> .onnx file
    preprocess: dict  # ImagePreprocessor.to_dict()
    tokenizer_file: str
    tokenizer_config_file: str
    chat_template_file: str | None
    files: dict[str, dict]  # relative path -> {"sha256", "size"}
    validation: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    engines: dict = field(default_factory=dict)  # optional: TensorRT engines (runtime/tensorrt/engines.py)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "manifest_version": MANIFEST_VERSION,
            "model": self.model.to_dict(),
            "graphs": {n: {"file": self.graph_files[n], "spec": g.to_dict()} for n, g in self.graphs.items()},
            "preprocess": self.preprocess,
            "tokenizer_file": self.tokenizer_file,
            "tokenizer_config_file": self.tokenizer_config_file,
            "chat_template_file": self.chat_template_file,
            "files": self.files,
            "validation": self.validation,
            "versions": self.versions,
            "source": self.source,
            **({"engines": self.engines} if self.engines else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        require(isinstance(d.get("graphs"), dict) and all(isinstance(g, dict) and is_name(g.get("file"))
                                                          for g in d["graphs"].values()),
                "graphs must map names to {file, spec}")
        require(isinstance(d.get("preprocess"), dict), f"preprocess must be an object, got {d.get('preprocess')!r}")
        require(is_name(d.get("tokenizer_file")) and is_name(d.get("tokenizer_config_file"))
                and (d.get("chat_template_file") is None or is_name(d["chat_template_file"])),
                "tokenizer_file and tokenizer_config_file must be file names, chat_template_file a file name or null")
        return cls(
            model=ModelFacts.from_dict(d["model"]),
            graphs={n: GraphSpec.from_dict(g["spec"]) for n, g in d["graphs"].items()},
            graph_files={n: g["file"] for n, g in d["graphs"].items()},
            preprocess=d["preprocess"],
            tokenizer_file=d["tokenizer_file"],
            tokenizer_config_file=d["tokenizer_config_file"],
            chat_template_file=d.get("chat_template_file"),
            files=d["files"],
            validation=d.get("validation", {}),
            versions=d.get("versions", {}),
            source=d.get("source", {}),
            engines=d.get("engines", {}),
        )

    def write(self, directory: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        tmp = Path(directory) / (MANIFEST_NAME + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(Path(directory) / MANIFEST_NAME)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    return {n: {"sha256": sha256_file(directory / n), "size": (directory / n).stat().st_size} for n in names}


def read_manifest(directory: str | Path) -> dict:
    """Parse manifest.json and check format and version; raise ArtifactError with what to do."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory (create one with `vlmdeploy export`)")
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: no {MANIFEST_NAME}; this is not a complete vlmdeploy artifact directory "
            "(an export that failed or was interrupted leaves none). Re-run `vlmdeploy export`."
        )
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e}); re-run `vlmdeploy export`") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a vlmdeploy manifest (format {d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("manifest_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"{path}: manifest_version {d.get('manifest_version')!r}, but this vlmdeploy reads versions "
            f"{list(READABLE_VERSIONS)}; re-export the model with this version of vlmdeploy"
        )
    return d


def verify_files(directory: Path, files: dict[str, dict], checksums: bool = True) -> None:
    """Every listed file exists with its recorded size (and sha256 when `checksums`)."""
    for name, meta in files.items():
        path = inside(directory, name, "file")
        if not path.is_file():
            raise ArtifactError(f"{directory}: file {name} listed in the manifest is missing; re-run `vlmdeploy export`")
        size = path.stat().st_size
        if size != meta["size"]:
            raise ArtifactError(
                f"{path}: size {size} bytes, manifest says {meta['size']}; the file is truncated or was "
                "replaced. Re-run `vlmdeploy export`."
            )
        if checksums and sha256_file(path) != meta["sha256"]:
            raise ArtifactError(
                f"{path}: sha256 mismatch (manifest {meta['sha256'][:12]}…); the file is corrupt or was "
                "modified. Re-run `vlmdeploy export`."
            )


def load_manifest(directory: str | Path, checksums: bool = True) -> Manifest:
    d = read_manifest(directory)
    try:
        if d["manifest_version"] == 1:
            d = _upgrade_v1(d)
        manifest = Manifest.from_dict(d)
        _check_file_entries(manifest.files)
        _check_references(manifest)
        _check_meaning(manifest)
    except (LookupError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{directory}/{MANIFEST_NAME}: malformed manifest ({e!r}); re-run `vlmdeploy export`") from e
    _check_paths(Path(directory), manifest)
    verify_files(Path(directory), manifest.files, checksums)
    return manifest


def check_external_data(directory: Path, m: "Manifest") -> None:
    """The weights files each (checksummed) graph points to are listed in 'files' too (`vlmdeploy
    check`; loading does not import onnx, and ONNX Runtime itself refuses data outside the directory)."""
    import onnx

    for graph, file in m.graph_files.items():
        try:
            model = onnx.load_model(str(directory / file), load_external_data=False)
        except Exception:  # noqa: BLE001 — not ONNX: loading the graph reports it, per graph (check) or at once (run)
            continue
        for tensor in model.graph.initializer:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location is not None and location not in m.files:
                raise ArtifactError(f"{directory}: graph {graph!r} reads its weights from {location!r}, which the "
                                    "manifest's 'files' does not list (so no checksum covers it); re-run `vlmdeploy export`")


def _check_paths(directory: Path, m: "Manifest") -> None:
    """Every file the artifact names is a relative path inside it (no absolute path, no '..', no
    symlink leading out), and every file the runtime opens is listed (so checksummed)."""
    for name in m.files:
        inside(directory, name, "file")
    opened = {"tokenizer_file": m.tokenizer_file, "tokenizer_config_file": m.tokenizer_config_file,
              "chat_template_file": m.chat_template_file}
    for what, name in opened.items():
        if name is not None and name not in m.files:
            raise ArtifactError(f"{directory}/{MANIFEST_NAME}: {what} {name!r} is not listed in 'files' (every file "
                                "the runtime opens must be checksummed); re-run `vlmdeploy export`")


def inside(directory: Path, name: str, what: str) -> Path:
    """`directory / name`, refused unless it stays inside `directory` (after resolving symlinks)."""
    bad = not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts or "\\" in name
    path = Path(directory) / str(name)
    root = Path(directory).resolve()
    if bad or not (path.resolve() == root or root in path.resolve().parents):
        raise ArtifactError(f"{directory}/{MANIFEST_NAME}: {what} path {name!r} leads outside the artifact "
                            "(an absolute path, '..' or a symlink); an artifact only opens files inside it")
    return path


def _check_meaning(m: "Manifest") -> None:
    """What the runtime relies on beyond types: token ids in the vocabulary, sizes >= 1, graphs that
    agree with the model facts."""
    f, d = m.model, m.model.dims
    if f.context_length < 2:
        raise ValueError(f"context_length must be >= 2 (a prompt token and a new one), got {f.context_length}")
    for kind, media in f.media.items():
        if not 0 <= media.token_id < f.input_vocab:
            raise ValueError(f"media {kind!r} token_id {media.token_id} is outside the vocabulary 0..{f.input_vocab - 1}")
    bad_eos = [t for t in f.eos_token_ids if t >= d.vocab]
    if bad_eos:
        raise ValueError(f"eos_token_ids {bad_eos} are outside the vocabulary 0..{d.vocab - 1}")
    for name, spec in m.graphs.items():
        if spec.undetermined_output_dims():
            raise ValueError(f"graph {name!r}: output dims {spec.undetermined_output_dims()} are set by no input")
    for name in f.pipeline["decoders"]:
        vocab = m.graphs[name].outputs[0].shape[-1]
        if vocab != d.vocab:
            raise ValueError(f"graph {name!r} gives logits over {vocab} tokens but dims.vocab is {d.vocab}")


def _check_references(m: "Manifest") -> None:
    """Graphs and tensors the model names exist and are files the manifest checksums."""
    p = m.model.pipeline
    for g in [*p.get("image", []), p["embed"], *p["decoders"], *p.get("prefill", {}).values()]:
        if g not in m.graphs:
            raise ValueError(f"pipeline names graph {g!r} but the manifest has only {sorted(m.graphs)}")
    for decoder, graph in p.get("prefill", {}).items():
        if graph in m.graphs and m.graphs[graph].to_dict() | {"name": decoder} != m.graphs[decoder].to_dict():
            raise ValueError(f"prefill graph {graph!r} must have the inputs and outputs of {decoder!r}, which it stands in for")
    if not p["decoders"]:
        raise ValueError("pipeline lists no decoder graph")
    for name, file in {**m.graph_files, **m.model.tensors}.items():
        if file not in m.files:
            raise ValueError(f"{name!r} is stored in {file!r}, which 'files' does not list (every file must be checksummed)")


def _check_file_entries(files) -> None:
    if not isinstance(files, dict):
        raise TypeError(f"'files' must map names to {{size, sha256}}, got {type(files).__name__}")
    for name, meta in files.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int) or not isinstance(meta.get("sha256"), str):
            raise ValueError(f"file entry {name!r} needs an int 'size' and a str 'sha256', got {meta!r}")


def check_out_dir(out: Path) -> Path:
    """An output dir may be absent, empty, or a previous artifact (replaced); nothing else is touched."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{out} exists, is not empty and is not a vlmdeploy artifact; choose another --out")
    return out


def check_export_target(out: Path) -> Path:
    """`check_out_dir`, and: an existing artifact is replaced only when every file in it is one the
    export wrote (listed in its manifest). Anything else (a user's notes, engines from `vlmdeploy
    build`, a manifest.json that is not ours) makes the export refuse, naming it; nothing is deleted."""
    out = check_out_dir(out)
    if not (out / MANIFEST_NAME).is_file():
        return out
    try:
        d = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        d = None
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("files"), dict):
        raise FileExistsError(f"{out} holds a {MANIFEST_NAME} that is not a vlmdeploy manifest; nothing was "
                              "replaced. Choose another --out")
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if not p.is_dir() and p.name != MANIFEST_NAME and str(p.relative_to(out)) not in d["files"])
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{out} holds files the export did not write ({shown}); replacing the artifact would "
                              "delete them, so nothing was replaced. Move them out or choose another --out")
    return out


@contextlib.contextmanager
def staging_dir(out: Path, check=check_out_dir):
    """Write into a hidden sibling directory; swap it with `out` only when complete (export, engine
    builds). `check(out)` runs before the work and again right before the swap."""
    out = check(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        check(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def clean_stale(out: Path) -> None:
    """What killed exports left beside `out`: a previous artifact parked as `.NAME.old-PID` is put back
    when `out` is missing (a kill between two renames on a filesystem without atomic exchange), and
    `.NAME.old-*` / `.NAME.partial-PID-*` of processes no longer running are removed."""
    for parked in sorted(out.parent.glob(f".{out.name}.old-*")):
        if _owner_alive(parked.name.rsplit("-", 1)[-1]):
            continue
        if not out.exists():
            parked.rename(out)
        else:
            shutil.rmtree(parked, ignore_errors=True)
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name[len(f".{out.name}.partial-"):].split("-", 1)[0]
        if not _owner_alive(pid):
            shutil.rmtree(partial, ignore_errors=True)


def _owner_alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_dir(new: Path, out: Path) -> None:
    """Put `new` at `out`. Where the OS can exchange two paths atomically (Linux renameat2), `out` is
    the old or the new artifact at every instant; elsewhere the old one is parked as `.NAME.old-PID`
    for the moment between two renames (and put back by `clean_stale` if the process dies there)."""
    if out.exists() and _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old artifact
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
