"""What every runtime family shares: media items, placeholder expansion, the vision chain.

    image -> family.prepare(image) -> MediaItem(pixels [n, 3, H, W], num_tokens)
    items -> vision chain (manifest pipeline, e.g. vision -> projector) over all items' rows at once
          -> split per item -> family.pack(item, features [n, T, C]) -> embeds [num_tokens, C]

A family overrides `prepare` (its HF image processor, bit-exact) and `pack` (how an item's feature
rows become its placeholder tokens); the prompt side is the same for every LLaVA-style family:
item i's placeholder becomes `num_tokens` image tokens, the embeddings go to those slots in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from ..manifest import ModelFacts
from ..text import expand_placeholders

RunGraph = Callable[[str, np.ndarray], np.ndarray]  # (graph name, its one input) -> its one output


@dataclass
class MediaItem:
    """One preprocessed image: the vision chain's input rows and the prompt tokens it becomes."""

    pixels: np.ndarray  # [n, 3, H, W]: n = 1 (LLaVA), tiles + base image (LLaVA-NeXT)
    num_tokens: int
    meta: dict = field(default_factory=dict)  # family-specific (e.g. the original image size)


class Family:
    """Base class; subclasses set `name` and implement `prepare` (and `pack` when not a reshape)."""

    name = ""

    def __init__(self, facts: ModelFacts, preprocess: dict, tensors: Mapping[str, np.ndarray]):
        self.facts, self.tensors = facts, tensors
        self.configure(preprocess)

    def configure(self, preprocess: dict) -> None:
        raise NotImplementedError

    def prepare(self, image) -> MediaItem:
        """A decoded PIL image -> its MediaItem."""
        raise NotImplementedError

    def pack(self, item: MediaItem, features: np.ndarray) -> np.ndarray:
        """features [n, T, C] of this item's rows -> embeds [num_tokens, C]."""
        return features.reshape(-1, features.shape[-1])

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        return expand_placeholders(prompt, self.facts.image_token, [i.num_tokens for i in items])

    def embed_media(self, items: list[MediaItem], run: RunGraph) -> list[np.ndarray]:
        """Each item's embeddings [num_tokens, C]; the chain runs once over every item's rows."""
        if not items:
            return []
        x = np.concatenate([i.pixels for i in items]).astype(self.facts.dims.dtype)  # [sum n, 3, H, W]
        for graph in self.facts.pipeline["image"]:
            x = run(graph, x)
        splits = np.cumsum([i.pixels.shape[0] for i in items])[:-1]
        return [self._checked(item, self.pack(item, f)) for item, f in zip(items, np.split(x, splits))]

    def _checked(self, item: MediaItem, embeds: np.ndarray) -> np.ndarray:
        if embeds.shape[0] != item.num_tokens:
            raise RuntimeError(f"{self.name}: an image gave {embeds.shape[0]} embeddings but its prompt holds "
                               f"{item.num_tokens} tokens; the artifact's graphs and family parameters disagree")
        return embeds

