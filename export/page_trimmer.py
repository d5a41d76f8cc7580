"""Page trimmer: the weights' file pages leave this process soon after an export has read them.

An export reads every weight several times, each time through a memory mapping of a file: torch
traces, writes and runs the reference from the checkpoint's safetensors; ONNX Runtime validates from
the graph's external-data file. A page a process has read stays in its RSS until it is unmapped, so
RSS grew by the weights of the whole graph being handled (~1x the model). While a `PageTrimmer` is
open, a background thread calls madvise(MADV_DONTNEED) on those mappings every `interval_s` (ctypes
and ONNX Runtime's run release the GIL): RSS holds what was read since the last tick.

Why a result cannot change: a page of a file mapping that was never written holds the file's bytes;
DONTNEED only removes it from this process's page tables (it stays in the page cache) and the next
read faults the same bytes back in (a minor fault; a read from disk if the kernel evicted it
meanwhile). Only a *written* page of a private mapping (copy-on-write) would be lost, and torch's
safetensors mappings and ONNX Runtime's external-data mappings are both private and writable (rw-p).
So on entry the trimmer *seals* each mapping it is given: mprotect(PROT_READ) first, then
/proc/self/smaps must show no written page (Anonymous: 0). From then on a write would fault (SIGSEGV)
instead of being silently dropped; a mapping with a written page gets its permission back and is
never advised. On exit the trimmer trims once more and gives the write permission back.

    trimmed:  the mappings live at entry that are in `ranges` or map one of the files `roots` (or a
              file under a directory there), once sealed
    never:    anonymous memory, a mapping with a written page, a mapping of any other file, a
              mapping made after entry

Open it only while the owners of those mappings are alive (the torch model; the ONNX Runtime
session): a mapping unmapped while the thread runs could have its addresses reused by other memory.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

MADV_DONTNEED = 4
PROT_READ, PROT_WRITE = 1, 2


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/maps that maps a file."""

    start: int
    end: int
    perms: str  # e.g. "r--p", "rw-p"
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def writable(self) -> bool:
        return "w" in self.perms

    @property
    def key(self) -> tuple[int, int, str]:
        return self.start, self.end, self.path


def _libc():
    return ctypes.CDLL("libc.so.6", use_errno=True)


def file_mappings(of: Iterable[Path] | None = None, maps: Path = Path("/proc/self/maps")) -> list[Mapping]:
    """This process's mappings of files (if `of` is given: of those files, or of files under those
    directories)."""
    paths = None if of is None else [str(Path(p).resolve()) for p in of]
    lines = maps.read_text().splitlines() if maps.exists() else []
    out = []
    for parts in (line.split(maxsplit=5) for line in lines):
        if len(parts) == 6 and parts[5].startswith("/") and (paths is None or _inside(parts[5], paths)):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append(Mapping(start, end, parts[1], parts[5]))
    return out


def _inside(path: str, paths: list[str]) -> bool:
    return any(path == p or path.startswith(p + os.sep) for p in paths)


def written_bytes(mappings: Sequence[Mapping], smaps: Path = Path("/proc/self/smaps")) -> dict[tuple, int]:
    """Written (copy-on-write) bytes of each mapping by `Mapping.key`: smaps' "Anonymous:" line. A
    mapping not found (unmapped, or another file there now) is absent."""
    wanted = {m.key: m for m in mappings}
    out, current = {}, None
    for line in smaps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            current = wanted.get((start, end, parts[5] if len(parts) == 6 else ""))
        elif current is not None and parts and parts[0] == "Anonymous:":
            out[current.key] = int(parts[1]) * 1024
    return out


def _mprotect(m: Mapping, prot: int) -> bool:
    return _libc().mprotect(ctypes.c_void_p(m.start), ctypes.c_size_t(m.size), prot) == 0


def seal(mappings: Sequence[Mapping]) -> tuple[list[Mapping], list[Mapping]]:
    """(read-only mappings that were never written, the ones `seal` made read-only): each writable one
    is made read-only, then kept only if smaps shows no written page (else its permission comes back)."""
    protected = [m for m in mappings if m.writable and _mprotect(m, PROT_READ)]
    written = written_bytes(protected)
    sealed = [m for m in protected if written.get(m.key, 1) == 0]
    for m in protected:
        if m not in sealed:
            _mprotect(m, PROT_READ | PROT_WRITE)
    readonly = [m for m in mappings if not m.writable] + [replace(m, perms=m.perms.replace("w", "-")) for m in sealed]
    return readonly, sealed


def unseal(sealed: Sequence[Mapping]) -> None:
    for m in sealed:
        _mprotect(m, PROT_READ | PROT_WRITE)


def trim(mappings: Sequence[Mapping]) -> int:
    """madvise(MADV_DONTNEED) on each mapping (read-only ones only); returns the bytes advised."""
    libc, done = _libc(), 0
    for m in mappings:
        if m.writable:
            raise ValueError(f"{m.path} {m.start:x}-{m.end:x} is writable ({m.perms}); only read-only mappings are trimmed")
        if libc.madvise(ctypes.c_void_p(m.start), ctypes.c_size_t(m.size), MADV_DONTNEED) == 0:
            done += m.size
    return done


class PageTrimmer:
    """Context manager (see the module's docstring). `interval_s=None`: no thread, one trim on exit.

        with PageTrimmer(ranges=checkpoint_mappings) as trimmer:   # while the model is alive
            ...  # trace, write, run the reference
        trimmer.ticks, trimmer.advised_bytes, trimmer.targets
    """

    def __init__(self, roots: Sequence[Path] = (), ranges: Sequence[Mapping] = (), interval_s: float | None = 0.1):
        self.roots, self.interval_s = tuple(Path(r) for r in roots), interval_s
        self.ranges = {m.key for m in ranges}
        self.ticks = self.advised_bytes = 0
        self.targets: list[Mapping] = []
        self._sealed: list[Mapping] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="page-trimmer", daemon=True)

    def _candidates(self) -> list[Mapping]:
        under = {m.key for m in file_mappings(self.roots)} if self.roots else set()
        return [m for m in file_mappings() if m.key in self.ranges or m.key in under]

    def trim_now(self) -> int:
        advised = trim(self.targets)
        self.ticks += 1
        self.advised_bytes += advised
        return advised

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.trim_now()

    def __enter__(self) -> "PageTrimmer":
        self.targets, self._sealed = seal(self._candidates())
        if self.interval_s is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.trim_now()
        unseal(self._sealed)


def drop_pages(ranges: Sequence[Mapping] = (), roots: Sequence[Path] = ()) -> int:
    """Trim once, now (the same sealing rules); returns the bytes advised."""
    with PageTrimmer(roots, ranges, interval_s=None) as trimmer:
        pass
    return trimmer.advised_bytes
