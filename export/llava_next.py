"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles and a token count per image.

    image -> [1 + tiles, 3, t, t] (runtime/anyres.py) -> vision -> projector -> [1 + tiles, T, C]
          -> runtime packs: base tokens, unpadded tile grid + `image_newline` per row

The graphs are LLaVA's (a tile is a LLaVA image); what differs is data: the anyres parameters
(grid pinpoints, tile size) and the `image_newline` vector, an artifact tensor.
"""

from __future__ import annotations

import numpy as np

from vlmdeploy.runtime import anyres

from . import components as c
from .family import LlavaStyleExport
from .hf_files import ProcessorFiles


class LlavaNextExport(LlavaStyleExport):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)

    def scored(self, model) -> bool:
        return c.has_attention_scores(model.model.vision_tower)

    def model_class(self):
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def _params(self, files: ProcessorFiles, model) -> anyres.AnyresParams:
        return anyres.AnyresParams.from_hf(files.image_processor, files.processor, model.config.to_dict())

    def preprocess(self, files: ProcessorFiles, model) -> dict:
        return self._params(files, model).to_dict()

    def vision_input_size(self, files: ProcessorFiles, model) -> tuple[int, int]:
        return self._params(files, model).tile_hw

    def image_tokens(self, files: ProcessorFiles, model, preprocess: dict, vision_tokens: int) -> dict:
        p = anyres.AnyresParams.from_dict(preprocess)
        side = p.tile_side
        return {"typical": anyres.num_image_tokens((side, side), p), "tokens_per_tile": vision_tokens}

    def rows_per_image(self, preprocess: dict) -> int:
        p = anyres.AnyresParams.from_dict(preprocess)
        return 1 + max(h // p.tile_side * (w // p.tile_side) for h, w in p.grid_pinpoints)

    def tensors(self, model, dtype: str) -> dict[str, np.ndarray]:
        return {"image_newline": model.model.image_newline.detach().float().numpy().astype(dtype)}  # [C]


FAMILY = LlavaNextExport()
