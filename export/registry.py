"""Model families by HF architecture name. A family is one module in export/ plus one line here
(and one module plus one line in runtime/families/)."""

from __future__ import annotations

import importlib

from .recipes import RecipeError

# HF architecture -> module in vlmdeploy.export (its FAMILY object)
FAMILIES = {
    "Blip2ForConditionalGeneration": "blip2",
    "Idefics2ForConditionalGeneration": "idefics2",
    "Idefics3ForConditionalGeneration": "idefics3",
    "InternVLForConditionalGeneration": "internvl",
    "SmolVLMForConditionalGeneration": "idefics3",
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "MllamaForConditionalGeneration": "mllama",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
}


def family_for(config):
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in FAMILIES:
            return importlib.import_module(f"vlmdeploy.export.{FAMILIES[arch]}").FAMILY
    raise RecipeError(f"architecture {archs or config.model_type!r} is not supported; supported: {sorted(FAMILIES)}")
