"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size image, a fixed token count.

    pixel_values [N,3,H,W] -> vision -> [N,T,Cv] -> projector -> [N,T,C] --+
    input_ids [B,S] -> embed -> [B,S,C] ---- scatter at <image> tokens ----+-> decoder -> logits, present

Any vision tower of export/components.py (CLIP, SigLIP, DINOv2) and any HF text model.
"""

from __future__ import annotations

from vlmdeploy.runtime.images import ImagePreprocessor

from .components import ExportError
from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


def tokens_per_image(files: ProcessorFiles, image_size: tuple[int, int]) -> int:
    """The number of placeholders LlavaProcessor expands each <image> into."""
    proc = files.processor
    patch = proc.get("patch_size")
    if not patch:
        raise ExportError("processor config has no patch_size; LlavaProcessor cannot expand <image> without it")
    n = (image_size[0] // patch) * (image_size[1] // patch) + proc.get("num_additional_image_tokens", 0)
    return n - 1 if proc.get("vision_feature_select_strategy") == "default" else n


class LlavaExport(LlavaStyleExport):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def scored(self, model) -> bool:
        return c.has_attention_scores(model.model.vision_tower)

    def model_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return ImagePreprocessor.from_hf_config(files.image_processor).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        return tuple(ImagePreprocessor.from_hf_config(files.image_processor).output_size)

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        per_image = tokens_per_image(files, self.vision_input_size(files, model))
        if per_image != vision_tokens:
            raise ExportError(
                f"the processor expands <image> into {per_image} tokens but the vision tower yields "
                f"{vision_tokens} features per image (check patch_size, num_additional_image_tokens and "
                "vision_feature_select_strategy in the processor config); HF would fail on this checkpoint too"
            )
        return {"typical": per_image, "tokens_per_image": per_image}


FAMILY = LlavaExport()
