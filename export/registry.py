"""Model families by HF architecture name. A family is one module in export/ plus one line here."""

from __future__ import annotations

import importlib

from .recipes import RecipeError

# architecture -> module in vlmdeploy.export
FAMILIES = {
    "LlavaForConditionalGeneration": "llava",
}


def family_for(config):
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in FAMILIES:
            return importlib.import_module(f"vlmdeploy.export.{FAMILIES[arch]}")
    raise RecipeError(f"architecture {archs or config.model_type!r} is not supported; supported: {sorted(FAMILIES)}")
