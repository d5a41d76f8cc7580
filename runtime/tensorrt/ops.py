"""Which ONNX operators and types a TensorRT release's ONNX parser accepts, read from onnx_tensorrt_ops.json.

The JSON is data transcribed from onnx/onnx-tensorrt `docs/operators.md` (its `source` fields say
which revision). `--trt-version 10` means "any TensorRT 10.x": ops added after 10.0 and opsets
above 10.0's range are refused; `--trt-version 10.15` allows what 10.15 added.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Mapping

DATA_FILE = "onnx_tensorrt_ops.json"


@lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads((resources.files(__package__) / DATA_FILE).read_text())


def known_versions() -> list[str]:
    return sorted(_data()["releases"])


@dataclass(frozen=True)
class TrtTarget:
    """A TensorRT release to check graphs against."""

    version: tuple[int, int]  # (major, minor) asked for; minor 0 when only the major was given
    table_release: str  # the operators.md revision the op table comes from
    opset_min: int
    opset_max: int
    int64_native: bool  # TensorRT >= 9 imports INT64; 8.x narrows it to INT32
    ops: Mapping[str, dict | None]
    source: str

    @property
    def name(self) -> str:
        return f"TensorRT {self.version[0]}.{self.version[1]}"

    @classmethod
    def parse(cls, version: str | int) -> "TrtTarget":
        major, minor = _split_version(str(version))
        release = _data()["releases"].get(str(major))
        if release is None:
            raise ValueError(f"--trt-version {version}: no operator table for TensorRT {major}; "
                             f"known majors: {', '.join(known_versions())}")
        if "." not in str(version):  # "10" = any 10.x: the oldest documented 10.x release
            major, minor = min(_split_version(k) for k in release["opset_max"])
        return cls(
            version=(major, minor),
            table_release=release["table_release"],
            opset_min=release["opset_min"],
            opset_max=_opset_max(release["opset_max"], (major, minor)),
            int64_native=release["int64"] == "native",
            ops=release["ops"],
            source=release["source"],
        )

    def support(self, op_type: str) -> dict | None:
        """The table entry for an op, or None when this release's parser does not import it."""
        entry = self.ops.get(op_type)
        if entry is None or _split_version(entry.get("since", "0.0")) > self.version:
            return None
        return entry

    def missing_reason(self, op_type: str) -> str:
        entry = self.ops.get(op_type, "absent")
        if entry == "absent":
            return f"not in the ONNX-TensorRT parser's operator list (TensorRT {self.table_release})"
        if entry is None:
            return f"listed as unsupported by the ONNX-TensorRT parser (TensorRT {self.table_release})"
        return f"needs TensorRT >= {entry['since']} (checking for {self.name}; pass --trt-version {entry['since']})"


def _split_version(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split(".")[:2]]
    except ValueError:
        raise ValueError(f"TensorRT version {text!r} is not MAJOR or MAJOR.MINOR (e.g. 10 or 10.15)") from None
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def _opset_max(by_release: Mapping[str, int], version: tuple[int, int]) -> int:
    """The highest opset of the newest documented release not newer than `version`."""
    known = sorted((_split_version(k), v) for k, v in by_release.items())
    eligible = [v for k, v in known if k <= version]
    return eligible[-1] if eligible else known[0][1]
