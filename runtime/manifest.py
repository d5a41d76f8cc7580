"""The artifact manifest: the only contract between `vlmdeploy.export` and `vlmdeploy.runtime`.

An artifact directory is valid only when `manifest.json` exists, has a format version this code
reads, and every file it lists is present with the recorded size (and sha256 when verified).
Export writes the manifest last, inside a temporary directory that is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .spec import GraphSpec, ModelDims

MANIFEST_NAME = "manifest.json"
FORMAT = "vlmdeploy-artifact"
MANIFEST_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact directory is missing, incomplete, corrupt or from an incompatible version."""


@dataclass(frozen=True)
class ModelFacts:
    """What the runtime needs to know about the model beyond the graphs."""

    family: str
    dims: ModelDims
    image_token: str
    image_token_id: int
    tokens_per_image: int  # placeholders each <image> expands to (the processor's rule)
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token: str | None
    eos_token: str | None
    context_length: int
    vision_feature_layer: int | list[int]
    vision_feature_select_strategy: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dims"]["image_size"] = list(self.dims.image_size)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        dims = dict(d["dims"], image_size=tuple(d["dims"]["image_size"]))
        return cls(**dict(d, dims=ModelDims(**dims), eos_token_ids=tuple(d["eos_token_ids"])))


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
    if d.get("manifest_version") != MANIFEST_VERSION:
        raise ArtifactError(
            f"{path}: manifest_version {d.get('manifest_version')!r}, but this vlmdeploy reads version "
            f"{MANIFEST_VERSION}; re-export the model with this version of vlmdeploy"
        )
    return d


def verify_files(directory: Path, files: dict[str, dict], checksums: bool = True) -> None:
    """Every listed file exists with its recorded size (and sha256 when `checksums`)."""
    for name, meta in files.items():
        path = Path(directory) / name
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
        manifest = Manifest.from_dict(d)
        _check_file_entries(manifest.files)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{directory}/{MANIFEST_NAME}: malformed manifest ({e!r}); re-run `vlmdeploy export`") from e
    verify_files(Path(directory), manifest.files, checksums)
    return manifest


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


@contextlib.contextmanager
def staging_dir(out: Path):
    """Write into a hidden sibling directory; rename it over `out` only when complete (export, engine builds)."""
    out = check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(new: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    new.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
