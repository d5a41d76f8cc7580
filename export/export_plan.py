"""What `vlmdeploy export` needs, known before anything is loaded: peak memory and disk, from the
measured curve (docs/PERFORMANCE.md "Export memory"), and the early refusal when the machine has less.

    needs = export_needs("/data/llava-1.5-7b", "fp16")   # sizes from config.json (export/plan.py)
    check_machine(needs, out_dir)                         # ExportError naming what is short, and by how much

The memory model follows the exporter's plan (export/exporter.py `_export_into`): the weights are
memory-mapped, each graph is written and its PyTorch reference recorded, torch is freed, then ONNX
Runtime validates one graph at a time, and a page trimmer drops the mapped weights' pages every 50 ms
in both phases (export/page_trimmer.py). What is resident at the peak is anonymous memory (torch,
transformers, ONNX Runtime, the CLIP-L vision graph's export and validation: the same at every
measured size, plus a small share that grows with the largest graph) and a bounded window of file
pages (what is read between two trims). Torch-free: it runs in `vlmdeploy plan`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

GB = 1e9
# Fitted on the measured curve (scripts/export_memory.py, fp16, validation on; docs/PERFORMANCE.md):
# peak RSS = ANON_FIXED + ANON_PER_GRAPH_BYTE x (weights of the largest graph) + FILE_WINDOW.
# Measured with the page trimmer (weights -> peak, anonymous / file): 1.05 GB -> 2.30 (2.15 / 0.21),
# 3.76 -> 2.31 (2.15 / 0.27), 14.13 (LLaVA-1.5-7B) -> 2.60 (2.42 / 0.40). The anonymous peak is the
# vision graph's export (the same CLIP-L at every size) and creeps up ~0.02x with the decoder; the file
# window is what one trim interval reads, at least the largest single tensor (the 0.26 GB embedding at
# 7B, read whole by one op). Rounded up, so the estimate is an upper bound: 3.1, 3.2, 3.4 GB (13B: 3.6).
ANON_FIXED_BYTES = int(2.5 * GB)
ANON_PER_GRAPH_BYTE = 0.02
FILE_WINDOW_BYTES = int(0.6 * GB)
STORED_NAMES = {"fp16": "float16", "fp32": "float32"}  # config.json's dtype for an export dtype
DISK_MARGIN = 1.02  # graph files hold the weights plus graph protos and padding to 64 KiB per tensor


class ResourceError(RuntimeError):
    """The machine has less free memory or disk than the export needs."""


@dataclass(frozen=True)
class ExportNeeds:
    source: str
    dtype: str
    weights_bytes: int  # every weight the artifact keeps
    largest_graph_bytes: int
    anon_bytes: int  # what cannot be paged out
    file_bytes: int  # the mapped weights' pages resident between two trims
    disk_bytes: int

    @property
    def ram_bytes(self) -> int:
        return self.anon_bytes + self.file_bytes

    def lines(self) -> list[str]:
        return [
            f"export ({self.dtype}): peak memory ~{self.ram_bytes / GB:.1f} GB (anonymous ~{self.anon_bytes / GB:.1f} GB, "
            f"mapped weight pages ~{self.file_bytes / GB:.1f} GB; largest graph {self.largest_graph_bytes / GB:.1f} GB), "
            f"disk {self.disk_bytes / GB:.1f} GB for {self.weights_bytes / GB:.1f} GB of weights",
        ]


def export_needs(model: str, dtype: str) -> ExportNeeds:
    """From a recipe name or checkpoint directory (config.json only; no weights are read)."""
    from .plan import plan_model

    plan = plan_model(model, dtype)
    graphs = [plan.get(c).nbytes for c in ("LLM weights", "vision encoder", "projector")]
    largest = max(graphs)
    converted = sum(graphs) if _converted_at_load(model, dtype) else 0
    return ExportNeeds(plan.source, dtype, sum(graphs), largest,
                       ANON_FIXED_BYTES + int(ANON_PER_GRAPH_BYTE * largest) + converted,
                       FILE_WINDOW_BYTES, int(sum(graphs) * DISK_MARGIN) + 64 * 1024 * 1024)


def _converted_at_load(model: str, dtype: str) -> bool:
    """Weights stored in another dtype than the export's are converted at load into anonymous memory
    (nothing stays mapped for the trimmer to drop). A recipe's checkpoint is taken as stored in its dtype."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return False
    fields = json.loads(config.read_text())
    stored = fields.get("dtype") or fields.get("torch_dtype")
    return stored is not None and stored != STORED_NAMES.get(dtype)


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ResourceError("no MemAvailable in /proc/meminfo")


def free_disk(path: Path) -> int:
    """Free bytes on the file system that will hold `path` (its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class Machine:
    """Where free memory and disk are read from; tests give fixed numbers."""

    ram: Callable[[], int] = field(default=available_ram)
    disk: Callable[[Path], int] = field(default=free_disk)


def check_machine(needs: ExportNeeds, out: Path, machine: Machine = Machine()) -> None:
    """Raise ResourceError naming what is short; the export has loaded nothing yet."""
    ram, disk = machine.ram(), machine.disk(out)
    short = []
    if ram < needs.ram_bytes:
        short.append(f"memory: it needs ~{needs.ram_bytes / GB:.1f} GB at its peak, {ram / GB:.1f} GB is available")
    if disk < needs.disk_bytes:
        short.append(f"disk: the artifact needs ~{needs.disk_bytes / GB:.1f} GB, {disk / GB:.1f} GB is free where "
                     f"{out} goes")
    if short:
        raise ResourceError(f"this machine cannot hold an export of {needs.source} ({needs.dtype}): " + "; ".join(short)
                            + ". Free memory or disk, write --out elsewhere, or pass --skip-resource-check to try anyway "
                            "(`vlmdeploy plan --export --model ...` shows the estimate)")
