"""`vlmdeploy build DIR`: TensorRT engines for an artifact directory, written atomically with the manifest.

    check the graphs (static_check) -> hidden sibling copy of DIR (hard links) -> engines/<graph>.plan
    -> manifest.json with an `engines` section -> rename over DIR

A failed or interrupted build leaves DIR as it was. Engines are built for this machine's GPU and
TensorRT version only (engines.py says why).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..manifest import MANIFEST_NAME, ArtifactError, describe_files, load_manifest, sha256_file, staging_dir
from .engines import (engine_graphs, ENGINES_DIR, GREEDY, PRECISIONS, EngineEntry, EnginesSection, Platform,
                      current_platform, verify_engine)
from .greedy import greedy_spec, write_greedy_onnx
from .loader import EngineRecipe, stderr_log
from .ops import TrtTarget
from .profiles import Limits, derive_profiles
from .static_check import GraphReport, check_graph

TIMING_CACHE = "timing.cache"


class BuildError(RuntimeError):
    """The graphs would not build (static check failures) or a build option is invalid."""


@dataclass(frozen=True)
class BuildOptions:
    """One field per `vlmdeploy build` flag."""

    precision: str = "fp16"
    max_batch: int = 1
    max_images: int = 4
    max_context: int | None = None  # default: the model's context length
    max_input: int | None = None  # default: max_context
    timing_cache: Path | None = None  # default: DIR/engines/timing.cache, carried over between builds
    workspace_gb: float | None = None

    def limits(self, facts) -> Limits:
        return Limits.for_model(facts, self.max_batch, self.max_images, self.max_context, self.max_input)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise BuildError(f"--precision {self.precision!r} not one of {', '.join(PRECISIONS)}")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise BuildError(f"--workspace must be > 0 GB, got {self.workspace_gb}")


class Progress:
    """Stage lines with elapsed time on stderr: a 7B decoder engine takes many minutes."""

    def __init__(self, log=stderr_log):
        self.log, self.start = log, time.perf_counter()

    def __call__(self, msg: str) -> None:
        self.log(f"[{time.perf_counter() - self.start:7.1f}s] {msg}")


BuildOne = Callable[..., None]  # (onnx_path, plan_path, spec, profiles, recipe, log) -> None


def build_engines(directory: str | Path, options: BuildOptions = BuildOptions(), log=None,
                  build_one: BuildOne | None = None, platform: Platform | None = None) -> EnginesSection:
    """Build every engine the runtime needs. `build_one`/`platform` default to TensorRT on this GPU."""
    directory, log = Path(directory), log or Progress()
    if build_one is None:
        build_one, platform = _tensorrt_builder()
    manifest = load_manifest(directory, checksums=True)
    limits = options.limits(manifest.model)
    specs = _engine_specs(manifest)
    _refuse_failing_graphs(directory, manifest, limits, platform, log)
    log(f"building {len(specs)} engines ({options.precision}) for {platform.describe()}; limits {limits.to_dict()}")
    with staging_dir(directory) as tmp:
        _link_artifact(directory, tmp, options)
        write_greedy_onnx(tmp / ENGINES_DIR / f"{GREEDY}.onnx", manifest.model.dims)
        entries = {name: _build_graph(tmp, manifest, name, spec, limits, options, build_one, log)
                   for name, spec in specs.items()}
        section = EnginesSection(platform, options.precision, limits, entries, _versions())
        replace(manifest, engines=section.to_dict()).write(tmp)
    log(f"done: {directory}/{ENGINES_DIR}")
    return section


def _tensorrt_builder():
    from .deps import import_polygraphy_trt
    from .loader import PURPOSE, build_engine

    import_polygraphy_trt(PURPOSE)  # fails early, with the install command, where TensorRT is absent
    return build_engine, current_platform()


def _engine_specs(manifest) -> dict:
    wanted = engine_graphs(manifest.model)
    missing = [g for g in wanted if g not in manifest.graphs]
    if missing:
        raise ArtifactError(f"the manifest has no {missing} graph(s); the TensorRT runtime needs {list(wanted)}")
    return {**{g: manifest.graphs[g] for g in wanted}, GREEDY: greedy_spec(manifest.model.dims)}


def static_check_artifact(directory: str | Path, manifest, target: TrtTarget, limits: Limits) -> list[GraphReport]:
    """The static check of every graph the build would make an engine of, with the profiles it would use."""
    directory = Path(directory)
    specs = _engine_specs(manifest)
    with tempfile.TemporaryDirectory(prefix="vlmdeploy-greedy-") as tmp:
        write_greedy_onnx(Path(tmp) / f"{GREEDY}.onnx", manifest.model.dims)
        paths = {**{g: directory / manifest.graph_files[g] for g in engine_graphs(manifest.model)},
                 GREEDY: Path(tmp) / f"{GREEDY}.onnx"}
        return [check_graph(paths[name], spec, target, derive_profiles(spec, limits)) for name, spec in specs.items()]


def _refuse_failing_graphs(directory: Path, manifest, limits: Limits, platform: Platform, log) -> None:
    target = _target_for(platform.tensorrt_version)
    errors = [line for r in static_check_artifact(directory, manifest, target, limits) for line in r.lines()
              if line.startswith("error")]
    if errors:
        raise BuildError(f"{len(errors)} problem(s) TensorRT would reject (vlmdeploy check {directory} --tensorrt):\n  "
                         + "\n  ".join(errors))
    log(f"static check passed for {target.name}")


def _target_for(tensorrt_version: str) -> TrtTarget:
    major_minor = ".".join(tensorrt_version.split(".")[:2])
    try:
        return TrtTarget.parse(major_minor)
    except ValueError:
        return TrtTarget.parse("10")


def _link_artifact(directory: Path, tmp: Path, options: BuildOptions) -> None:
    """The staging copy: every file of DIR hard-linked (no data copied), old engines left out."""
    for src in directory.iterdir():
        if src.is_file() and src.name != MANIFEST_NAME:
            _link_or_copy(src, tmp / src.name)
        elif src.is_dir() and src.name != ENGINES_DIR:
            shutil.copytree(src, tmp / src.name, copy_function=_link_or_copy)
    (tmp / ENGINES_DIR).mkdir()
    old_cache = directory / ENGINES_DIR / TIMING_CACHE
    if options.timing_cache is None and old_cache.is_file():
        shutil.copy2(old_cache, tmp / ENGINES_DIR / TIMING_CACHE)  # a copy: the builder rewrites it in place


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _build_graph(tmp: Path, manifest, name: str, spec, limits: Limits, options: BuildOptions, build_one: BuildOne,
                 log) -> EngineEntry:
    onnx_rel = f"{ENGINES_DIR}/{GREEDY}.onnx" if name == GREEDY else manifest.graph_files[name]
    plan_rel = f"{ENGINES_DIR}/{name}.plan"
    profiles = derive_profiles(spec, limits)
    recipe = EngineRecipe(options.precision, Path(options.timing_cache or tmp / ENGINES_DIR / TIMING_CACHE), options.workspace_gb)
    log(f"{name}: building from {onnx_rel}, profiles " + "; ".join(p.describe() for p in profiles))
    t0 = time.perf_counter()
    build_one(tmp / onnx_rel, tmp / plan_rel, spec, profiles, recipe, log=log)
    meta = describe_files(tmp, [plan_rel])[plan_rel]
    log(f"{name}: {meta['size'] / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f}s")
    onnx_sha = manifest.files[onnx_rel]["sha256"] if onnx_rel in manifest.files else sha256_file(tmp / onnx_rel)
    return EngineEntry(plan_rel, meta["sha256"], meta["size"], onnx_rel, onnx_sha, tuple(profiles))


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("vlmdeploy", "polygraphy", "onnx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def tensorrt_check(directory: str | Path, manifest, trt_version: str = "10",
                   options: BuildOptions = BuildOptions()) -> list[tuple[str, str]]:
    """(severity, line) for `vlmdeploy check --tensorrt`: the static check, and the engines if any were built."""
    target = TrtTarget.parse(trt_version)
    lines = [(f.severity, f"{r.graph}: tensorrt {f.rule}: {f.message}")
             for r in static_check_artifact(directory, manifest, target, options.limits(manifest.model))
             for f in r.findings]
    others = sorted(set(manifest.graphs) - set(engine_graphs(manifest.model)))
    if others:
        lines.append(("info", f"tensorrt: {others} not checked: the TensorRT runtime runs {list(engine_graphs(manifest.model))}"))
    return lines + _engine_lines(Path(directory), manifest)


def _engine_lines(directory: Path, manifest) -> list[tuple[str, str]]:
    if not manifest.engines:
        return [("info", f"engines: none built (vlmdeploy build {directory} on a GPU with TensorRT)")]
    try:
        section = EnginesSection.from_dict(manifest.engines)
        for name, entry in section.graphs.items():
            verify_engine(directory, name, entry, manifest.files)
    except (ArtifactError, KeyError, TypeError, ValueError) as e:
        return [("error", f"engines: {e}")]
    return [("ok", f"engines: {sorted(section.graphs)} intact, built from the current ONNX, "
                   f"{section.precision} for {section.platform.describe()}")]
