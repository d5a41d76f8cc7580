"""`vlmdeploy triton-repo DIR OUT`: a Triton Inference Server model repository for an artifact.

    OUT/NAME/config.pbtxt        backend "python", decoupled (streaming), the inputs and outputs of
                                 serve/triton_model.py, parameters: the artifact's folder, threads,
                                 visual-token compression (`--visual-tokens`, `--compression`)
    OUT/NAME/1/model.py          serve/triton_model.py (Triton's Python backend runs it; it imports vlmdeploy,
                                 so Triton's Python environment needs `pip install vlmdeploy`)
    OUT/NAME/1/artifact/         a copy of the artifact (checksummed files, as exported)

Written into a sibling folder and swapped in when complete, like an export.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vlmdeploy.runtime.manifest import check_export_target, load_manifest, staging_dir

TEMPLATE = Path(__file__).with_name("triton_model.py")

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{
  decoupled: true
}}
input [
  {{
    name: "messages"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }},
  {{
    name: "sampling"
    data_type: TYPE_STRING
    dims: [ 1 ]
    optional: true
  }}
]
output [
  {{
    name: "text"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }},
  {{
    name: "finish_reason"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
instance_group [
  {{
    count: {instances}
    kind: KIND_CPU
  }}
]
parameters {{
  key: "artifact"
  value: {{ string_value: "artifact" }}
}}
parameters {{
  key: "threads"
  value: {{ string_value: "{threads}" }}
}}
parameters {{
  key: "visual_tokens"
  value: {{ string_value: "{visual_tokens}" }}
}}
parameters {{
  key: "compression"
  value: {{ string_value: "{compression}" }}
}}
"""


def write_repository(artifact: Path, out: Path, name: str | None = None, instances: int = 1,
                     threads: int | None = None, visual_tokens: int | float | None = None,
                     compression: str = "pool") -> Path:
    """The model repository for `artifact` at `out` (checked and verified first); returns the model folder.
    `visual_tokens` / `compression`: what every instance passes to `VLM.load` (checked against the
    artifact's family here, so a setting it cannot apply fails now and not when Triton starts)."""
    from vlmdeploy.runtime.vlm import compression_plan, load_family

    artifact, out = Path(artifact), Path(out)
    manifest = load_manifest(artifact, checksums=True)
    load_family(artifact, manifest, compression_plan(visual_tokens, compression))  # ValueError: what it allows
    name = name or artifact.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.' or '-' (it is a folder and a Triton name)")
    if instances < 1:
        raise ValueError(f"instances must be >= 1, got {instances}")
    with staging_dir(out, check_export_target) as tmp:
        version = tmp / name / "1"
        (version / "artifact").mkdir(parents=True)
        for file in [*manifest.files, "manifest.json"]:
            shutil.copy2(artifact / file, version / "artifact" / file)
        shutil.copy2(TEMPLATE, version / "model.py")
        (tmp / name / "config.pbtxt").write_text(CONFIG.format(
            name=name, instances=instances, threads=threads or "",
            visual_tokens="" if visual_tokens is None else visual_tokens, compression=compression))
    return out / name
