"""What every runtime family shares: media items, placeholder expansion, the vision chain.

    image -> family.prepare(image) -> MediaItem(pixels [n, 3, H, W], num_tokens)
    items -> vision chain (manifest pipeline, e.g. vision -> projector) over all items' rows at once
          -> split per item -> family.pack(item, features [n, T, C]) -> embeds [num_tokens, C]

A family overrides `prepare` (its HF image processor, bit-exact) and `pack` (how an item's feature
rows become its placeholder tokens); the prompt side is the same for every LLaVA-style family:
item i's placeholder becomes `num_tokens` image tokens, the embeddings go to those slots in order.

`vlmdeploy plan` (export/plan.py) asks the family class, with no artifact loaded, how many visual
tokens an image of a given size becomes (`visual_tokens`, built on `preprocess_from_sizes` /
`preprocess_from_checkpoint` when there is no manifest) and what it adds beside the projector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..compress import Compression
from ..images import parallel_map
from ..manifest import ArtifactError, ModelFacts
from ..text import expand_placeholders

# (graph name, its one input or a feed dict) -> its first output; with all_outputs=True: {name: output}
RunGraph = Callable[..., "np.ndarray | dict[str, np.ndarray]"]
RunGraphOutputs = Callable[[str, dict], dict]  # (graph name, feeds) -> every output by name
SCORES = "attention_scores"  # the vision graph's optional output [n, T]: what topk/merge rank tokens by
ReadJson = Callable[[str], "dict | None"]  # a checkpoint file's name -> its JSON, None when absent
Size = tuple[int, int]  # (height, width)


@dataclass
class MediaItem:
    """One preprocessed image: the vision chain's input rows and the prompt tokens it becomes."""

    pixels: np.ndarray  # [n, 3, H, W]: n = 1 (LLaVA), tiles + base image (LLaVA-NeXT); Qwen2-VL: [U, M, Dp]
    num_tokens: int
    meta: dict = field(default_factory=dict)  # family-specific (e.g. the original image size)
    kind: str = "image"  # a key of manifest.model.media


@dataclass(frozen=True)
class ImageTokens:
    """The visual tokens of one image (a row of `vlmdeploy plan`): `tiles` vision rows (LLaVA: 1;
    LLaVA-NeXT: the base image + a `grid` of rows x cols tiles) of `tokens_per_tile` features, i.e.
    `before_unpadding` features out of the projector, which become `tokens` <image> tokens in the
    prompt (LLaVA-NeXT: the base tile + the tile grid unpadded to the image's aspect + `newlines`,
    one per feature row)."""

    size: Size | None  # (h, w) of the image; None: a typical image (`typical` says which)
    tiles: int
    tokens_per_tile: int
    tokens: int
    grid: Size | None = None
    resolution: Size | None = None  # the pinpoint (h, w) the image is fitted into
    newlines: int = 0
    typical: str = ""

    @property
    def before_unpadding(self) -> int:
        return self.tiles * self.tokens_per_tile

    def label(self) -> str:
        size = f"{self.size[0]}x{self.size[1]}" if self.size else ""
        return f"{self.typical} ({size})" if self.typical and size else self.typical or size

    def to_dict(self) -> dict:
        return {"image_size": list(self.size) if self.size else None, "typical": self.typical or None,
                "tiles": self.tiles, "grid": list(self.grid) if self.grid else None,
                "resolution": list(self.resolution) if self.resolution else None,
                "tokens_per_tile": self.tokens_per_tile, "before_unpadding": self.before_unpadding,
                "newlines": self.newlines, "tokens": self.tokens}


class Family:
    """Base class; subclasses set `name` and implement `prepare` (and `pack` when not a reshape),
    and `visual_tokens` for the planner (plus the other planning class methods where the defaults
    do not fit)."""

    name = ""
    media_kinds: tuple[str, ...] = ("image",)  # what prepare/prepare_video accept
    size_options = False  # True: prepare takes min_pixels/max_pixels per call
    frame_sampling = None  # video families: runtime/video.py FrameSampling (how load_video picks frames)
    media_in_prompt = True  # False: media embeddings replace no prompt tokens (the decoder reads them, mllama)
    # visual-token compression (runtime/compress.py): the methods this family can apply, and why not the others
    compression_methods: tuple[str, ...] = ()
    compression_refusal = "its visual tokens are not a grid per vision row"

    def __init__(self, facts: ModelFacts, preprocess: dict, tensors: Mapping[str, np.ndarray]):
        self.facts, self.tensors = facts, tensors
        self.compression: Compression | None = None  # set by VLM.load through check_compression
        self.configure(preprocess)

    def check_compression(self, compression: Compression | None, scored: bool) -> Compression | None:
        """`scored`: the artifact's vision graph has the attention_scores output."""
        if compression is None:
            return None
        if compression.method not in self.compression_methods:
            self.refuse(compression, self.compression_methods)
        if compression.needs_scores and not scored:
            raise ValueError(f"{compression.method} ranks visual tokens by the vision tower's attention, and this "
                             f"artifact's vision graph has no {SCORES} output; re-export it with vlmdeploy >= this "
                             "version, or use pool")
        return compression

    def configure(self, preprocess: dict) -> None:
        raise NotImplementedError

    def prepare(self, image) -> MediaItem:
        """A decoded PIL image -> its MediaItem."""
        raise NotImplementedError

    def prepare_images(self, images: list, **options) -> list[MediaItem]:
        """The decoded images of one prompt, in order (a family whose preprocessing depends on how
        many images share the prompt overrides this)."""
        return parallel_map(lambda image: self.prepare(image, **options), images)

    def prepare_video(self, frames, fps: float | None = None, **options) -> MediaItem:
        """frames [F, H, W, 3] uint8 (runtime/video.py) sampled at `fps` -> its MediaItem."""
        raise NotImplementedError(f"the {self.name} family takes no video")

    def prompt_positions(self, ids: np.ndarray, items: list[MediaItem]) -> np.ndarray | None:
        """ids [S] of one row -> its positions, where the family computes them from the media
        (M-RoPE: [3, S]); None: the position scheme's, from the attention mask."""
        return None

    def decoder_context(self, ids: list[np.ndarray], items: list[list[MediaItem]], run: RunGraphOutputs):
        """The decoder inputs the batch needs besides embeddings and the self-attention KV (a
        generate.DecoderContext, left-padded as the batch: each row's ids [S_i] end at the batch's last
        column), or None (every family whose media are prompt tokens). `run(graph, feeds)` -> all outputs."""
        return None

    def pack(self, item: MediaItem, features: np.ndarray) -> np.ndarray:
        """features [n, T, C] of this item's rows -> embeds [num_tokens, C]."""
        return features.reshape(-1, features.shape[-1])

    def check_placeholders(self, prompt: str, counts: dict[str, int]) -> None:
        """Before any media is read: one placeholder per item of each kind (ValueError says what differs)."""
        for kind, media in self.facts.media.items():
            expand_placeholders(prompt, media.placeholder, [1] * counts.get(kind, 0), kind)

    def prompt_ids(self, ids: np.ndarray, items: list[MediaItem]) -> np.ndarray:
        """The encoded prompt [S] -> the ids the decoder sees (a family placing media tokens outside
        the text, BLIP-2, adds them here)."""
        return ids

    def expand_prompt(self, prompt: str, items: list[MediaItem]) -> str:
        """Each kind's placeholders in turn: the i-th becomes the i-th item of that kind's token count."""
        for kind, media in self.facts.media.items():
            counts = [i.num_tokens for i in items if i.kind == kind]
            prompt = expand_placeholders(prompt, media.placeholder, counts, kind)
        return prompt

    def embed_media(self, items: list[MediaItem], run: RunGraph) -> list[np.ndarray]:
        """Each item's embeddings [num_tokens, C]; the chain runs once over every item's rows."""
        if not items:
            return []
        x = np.concatenate([i.pixels for i in items]).astype(self.facts.dims.dtype)  # [sum n, 3, H, W]
        scores = None  # [sum n, T] from the vision graph, when compression ranks tokens
        for graph in self.facts.pipeline["image"]:
            if self.compression is not None and self.compression.needs_scores and scores is None:
                outputs = run(graph, x, all_outputs=True)
                x, scores = next(iter(outputs.values())), outputs[SCORES]
            else:
                x = run(graph, x)
        splits = np.cumsum([i.pixels.shape[0] for i in items])[:-1]
        rows = [None] * len(items) if scores is None else np.split(scores, splits)
        return [self._checked(item, self.pack_item(item, f, s)) for item, f, s in zip(items, np.split(x, splits), rows)]

    def pack_item(self, item: MediaItem, features: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        """features [n, T, C] (scores [n, T]) of this item's rows -> embeds [num_tokens, C], compressed
        when the item was (`compressed`)."""
        if "compressed" not in item.meta:
            return self.pack(item, features)
        return self.pack_compressed(item, features, scores)

    # -- visual-token compression (runtime/compress.py): a family that takes it overrides these --------

    def compressed(self, item: MediaItem) -> MediaItem:
        """The item with its token count after compression (before any graph runs: the prompt is
        expanded to it); the family records in item.meta["compressed"] what pack_compressed needs."""
        raise NotImplementedError

    def pack_compressed(self, item: MediaItem, features: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def _checked(self, item: MediaItem, embeds: np.ndarray) -> np.ndarray:
        if embeds.shape[0] != item.num_tokens:
            raise ArtifactError(f"{self.name}: an image gave {embeds.shape[0]} embeddings but its prompt holds "
                               f"{item.num_tokens} tokens; the artifact's graphs and family parameters disagree")
        return embeds

    # -- planning (`vlmdeploy plan`, export/plan.py): class methods, no artifact loaded, no torch --------
    # `preprocess` below is the dict the manifest stores for this family (`configure`'s argument); for a
    # recipe or a checkpoint directory the family builds it from the sizes or the processor files.

    @classmethod
    def preprocess_from_sizes(cls, arch) -> dict | None:
        """`preprocess` from `arch`, an export/recipes.py `Architecture` (the model's sizes only), as the
        family's usual processor would have it; None where `visual_tokens` needs none."""
        return None

    @classmethod
    def preprocess_from_checkpoint(cls, arch, config: dict, read_json: ReadJson) -> dict | None:
        """`preprocess` from a Hugging Face checkpoint directory: its `config.json` and
        `read_json(file name)` for the processor files, as the export reads them. Raises ValueError
        where they are inconsistent. Default: from the sizes."""
        return cls.preprocess_from_sizes(arch)

    @classmethod
    def visual_tokens(cls, preprocess: dict | None, image_sizes: Sequence[Size], tile_tokens: int,
                      tile_size: Size, facts: ModelFacts | None = None) -> tuple[tuple[ImageTokens, ...], str]:
        """(one row per image size, the rule in one line). With no sizes: the typical image's row
        (+ any other the family finds worth showing). `tile_tokens`/`tile_size`: the feature tokens
        and the input (h, w) of one vision row; `facts`: the artifact's, None when planning from sizes."""
        raise NotImplementedError

    @classmethod
    def compressed_tokens(cls, preprocess: dict | None, row: ImageTokens, compression: Compression) -> ImageTokens:
        """A plan row after visual-token compression (what `compressed` gives an item of that size)."""
        cls.refuse(compression, ())

    @classmethod
    def refuse(cls, compression: Compression, allowed: tuple[str, ...]):
        raise ValueError(f"the {cls.name} family cannot apply visual-token compression {compression.method!r} "
                         f"({cls.compression_refusal}); methods it takes: {', '.join(allowed) or 'none'}")

    @classmethod
    def video_tokens(cls, preprocess: dict | None, frames: int, size: Size) -> ImageTokens | None:
        """The visual tokens of a video of `frames` frames of `size` (h, w); None: no video in this family."""
        return None

    @classmethod
    def plan_notes(cls, rows: Sequence[ImageTokens], sized: bool) -> list[str]:
        """Notes on the visual-token rows (`sized`: the user gave image sizes)."""
        return []

    @classmethod
    def request_kv(cls, facts: ModelFacts, images: int, batch: int,
                   compression: Compression | None = None) -> tuple[int, str] | None:
        """(bytes, how) of K/V the decoder reads besides the context cache, held once per request and
        not growing with the context (mllama: every cross-attention layer's K/V of the vision states,
        `compression`'s kept rows); None: the family has none."""
        return None

    @classmethod
    def projector_extras(cls, text_hidden: int) -> dict[str, int]:
        """Parameters the family keeps beside the 2-layer MLP projector (name -> count)."""
        return {}
