"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's graphs, OneVision's data.

    image / video frames -> [rows, 3, S, S] -> vision -> projector -> [rows, T, C]
          -> runtime packs (runtime/onevision.py): anyres_max images, 2x2-pooled video frames,
             `image_newline` (an artifact tensor)

What differs from LLaVA-NeXT is the processor (tiles without a crop, one tile per image when a
prompt holds several), the packing rule and a `video` media kind.
"""

from __future__ import annotations

import dataclasses

from vlmdeploy.runtime import onevision as ov
from vlmdeploy.runtime.manifest import MediaKind, ModelFacts
from vlmdeploy.runtime.video import FrameSampling

from .hf_files import ProcessorFiles
from .llava_next import LlavaNextExport


class LlavaOnevisionExport(LlavaNextExport):
    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)

    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def _image_params(self, files: ProcessorFiles, model) -> ov.OnevisionImageParams:
        return ov.OnevisionImageParams.from_hf(files.image_processor, files.processor, model.config.to_dict())

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        """{"image", "video", "video_sampling"}: the video processor is its own config when the checkpoint
        has one, else built from the image processor's (as transformers does); frames sampled uniformly."""
        video = files.processor.get("video_processor") or {  # as transformers falls back to the image config
            k: v for k, v in files.image_processor.items() if k != "do_convert_rgb"}
        return {"image": self._image_params(files, model).to_dict(),
                "video": ov.OnevisionVideoParams.from_hf(video).to_dict(),
                "video_sampling": dataclasses.asdict(FrameSampling(rule="uniform"))}

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        tile = self._image_params(files, model).tile
        return tile, tile

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        p = ov.OnevisionImageParams.from_dict(preprocess["image"])
        return {"typical": p.image_tokens((p.tile, p.tile)), "tokens_per_tile": vision_tokens}

    def rows_per_image(self, preprocess: dict) -> int:
        p = ov.OnevisionImageParams.from_dict(preprocess["image"])
        return 1 + max(h // p.tile * (w // p.tile) for h, w in p.grid_pinpoints)

    def model_facts(self, model, files: ProcessorFiles, tokenizer, dtype: str) -> ModelFacts:
        facts = super().model_facts(model, files, tokenizer, dtype)
        p = ov.OnevisionImageParams.from_dict(self.preprocess(files, model)["image"])
        video = MediaKind(files.processor.get("video_token", "<video>"), int(model.config.video_token_id),
                          ov.video_tokens(8, p.tokens_side))  # typical: 8 frames
        return dataclasses.replace(facts, media={**facts.media, "video": video},
                                   pipeline={**facts.pipeline, "video": list(facts.pipeline["image"])})


FAMILY = LlavaOnevisionExport()
