"""BLIP-2 (`Blip2ForConditionalGeneration`): one image per prompt, a fixed number of query tokens.

    image -> BLIP resize + normalize (images.ImagePreprocessor) -> [1, 3, H, W] -> vision -> Q-Former -> [Q, C]
    prompt -> ids (with BOS) -> Q image tokens + ids: the queries go before BOS, as Blip2Processor puts them

The prompt text holds no placeholder: an image is given or not.
"""

from __future__ import annotations

import numpy as np

from .base import MediaItem
from .llava import Llava


class Blip2(Llava):
    name = "blip2"
    compression_methods = ()
    compression_refusal = "its Q-Former gives a fixed number of learned query tokens, not a grid of image patches"

    def configure(self, preprocess: dict) -> None:
        super().configure(preprocess)
        self.compression_methods = ()  # Llava.configure allows it for a square count

    def check_placeholders(self, prompt: str, counts: dict[str, int]) -> None:
        if counts.get("image", 0) > 1:
            raise ValueError(f"BLIP-2 takes one image per prompt, got {counts['image']}")
        if self.facts.image_token in prompt:
            raise ValueError(f"BLIP-2 prompts hold no {self.facts.image_token!r} placeholder: the image's query "
                             "tokens go before the text; pass the image and plain text")

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        return prompt

    def prompt_ids(self, ids: np.ndarray, items: list[MediaItem]) -> np.ndarray:
        queries = np.full(sum(i.num_tokens for i in items), self.facts.image_token_id, dtype=np.int64)
        return np.concatenate([queries, ids])

    @classmethod
    def visual_tokens(cls, preprocess, image_sizes, tile_tokens, tile_size, facts=None):
        rows, _ = super().visual_tokens(preprocess, image_sizes, tile_tokens, tile_size, facts)
        return rows, "BLIP-2: every image becomes the Q-Former's fixed number of query tokens, placed before BOS"


FAMILY = Blip2
