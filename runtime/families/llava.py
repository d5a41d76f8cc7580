"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one fixed-size image -> a fixed number of tokens.

    image -> CLIP-style resize/crop (images.ImagePreprocessor) -> [1, 3, H, W] -> vision -> projector -> [T, C]
"""

from __future__ import annotations

from ..images import ImagePreprocessor
from .base import Family, MediaItem


class Llava(Family):
    name = "llava"

    def configure(self, preprocess: dict) -> None:
        self.preprocessor = ImagePreprocessor.from_dict(preprocess)
        self.tokens = self.facts.family_params.get("tokens_per_image", self.facts.tokens_per_image)

    def prepare(self, image) -> MediaItem:
        return MediaItem(self.preprocessor([image]), self.tokens)  # [1, 3, H, W]


FAMILY = Llava
