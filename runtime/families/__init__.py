"""Runtime model families: `manifest.model.family` -> the module that turns media into embeddings.

A family is one module here plus one line in FAMILIES (and one module in vlmdeploy.export).
Modules are imported on first use.
"""

from __future__ import annotations

import importlib

from ..manifest import ArtifactError

# family name (manifest.model.family) -> module in vlmdeploy.runtime.families
FAMILIES = {
    "blip2": "blip2",
    "idefics2": "idefics2",
    "idefics3": "idefics3",
    "internvl": "internvl",
    "llava": "llava",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "mllama": "mllama",
    "qwen2_vl": "qwen2_vl",
}


def family_class(name: str):
    if name not in FAMILIES:
        raise ArtifactError(f"model family {name!r} is not known to this runtime; known: {sorted(FAMILIES)}. "
                            "Upgrade vlmdeploy or re-export the model.")
    return importlib.import_module(f"{__name__}.{FAMILIES[name]}").FAMILY
