"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): anyres tiles, a different token count per image.

    image -> best grid resolution -> [base + tiles, 3, crop, crop] -> vision -> projector -> [n, T, C]
          -> unpad the tile grid to the image's aspect, `image_newline` after each row -> [num_tokens, C]

Preprocessing, the token count and the packing are runtime/anyres.py (bit-exact vs HF); the
`image_newline` vector is an artifact tensor.
"""

from __future__ import annotations

import numpy as np

from .. import anyres
from .base import Family, MediaItem


class LlavaNext(Family):
    name = "llava_next"

    def configure(self, preprocess: dict) -> None:
        self.params = anyres.AnyresParams.from_dict(preprocess)
        self.newline = self.tensors["image_newline"]  # [C]

    def prepare(self, image) -> MediaItem:
        pixels, size = anyres.preprocess(image, self.params)  # [1 + tiles, 3, crop, crop], (h, w)
        return MediaItem(pixels, anyres.num_image_tokens(size, self.params), {"image_size": size})

    def pack(self, item: MediaItem, features: np.ndarray) -> np.ndarray:
        return anyres.pack_features(features, item.meta["image_size"], self.params, self.newline)


FAMILY = LlavaNext
