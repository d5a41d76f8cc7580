"""`VLM`: load an artifact directory and generate. No torch, no transformers. The public API.

    images -> family.prepare -> vision chain (manifest pipeline) -> family.pack -> [num_tokens_i, C] per image
    prompt -> family.expand_prompt -> tokenize -> embed -> [1, S, C] -> scatter image embeds -> DecodeLoop

What differs between model families lives in runtime/families/ (chosen by `manifest.model.family`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import jinja2
import numpy as np

from .backends import make_runner
from .compress import Compression
from .families import family_class
from .families.base import SCORES, MediaItem
from .generate import Batch, DecodeLoop
from .images import ImageError, load_image, parallel_map
from .mrope import left_pad_positions
from .video import load_video
from .manifest import ArtifactError, Manifest, load_manifest
from .runners import check_threads
from .sampling import SamplingParams
from .session import Generation, GenerationResult, Timings
from .text import TextProcessor, chat_prompt_adds_special_tokens, render_chat_template

__all__ = ["VLM", "PromptError", "GenerationResult", "Timings"]


class PromptError(ValueError):
    """A prompt that cannot run: placeholders vs images, too long for the context."""


@dataclass(frozen=True)
class _Request:
    prompt: str
    images: list
    add_special_tokens: bool = True  # as HF's processor: yes for a raw prompt; chat: unless it starts with BOS
    videos: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)  # min_pixels / max_pixels for this request's media (Qwen2-VL)


class VLM:
    def __init__(self, directory: Path, manifest: Manifest, backend: str, threads: int | None, decoder: str | None,
                 int8_prefill: bool = True, compression: Compression | None = None):
        self.directory, self.manifest, self.backend, self.threads = directory, manifest, backend, threads
        self.facts = manifest.model
        self.family = load_family(directory, manifest, compression)
        self.text = TextProcessor.from_files(
            directory / manifest.tokenizer_file, directory / manifest.tokenizer_config_file
        )
        self.chat_template = (directory / manifest.chat_template_file).read_text() if manifest.chat_template_file else None
        self.decoder_graph = decoder or _pick_decoder(manifest, backend)
        pipeline = self.facts.pipeline
        # an int8-compute prompt-pass graph (`--quantize prefill`), ONNX Runtime only
        ort = backend.startswith("ort")
        self.prefill_graph = pipeline.get("prefill", {}).get(self.decoder_graph) if ort and int8_prefill else None
        graphs = [*pipeline["image"], pipeline["embed"], self.decoder_graph, *filter(None, [self.prefill_graph])]
        self.runners = {name: self._runner(name) for name in graphs}
        self.decoder = self._decoder()

    def _decoder(self) -> DecodeLoop:
        """The decode loop, with its tensors on the host (ONNX Runtime) or on the GPU (TensorRT)."""
        embed, decoder = self.runners[self.facts.pipeline["embed"]], self.runners[self.decoder_graph]
        if self.backend == "trt":
            from .tensorrt.decode import device_decode_loop

            return device_decode_loop(self.directory, embed, decoder, self.facts)
        prefill = self.runners[self.prefill_graph] if self.prefill_graph else None
        return DecodeLoop(embed, decoder, self.facts, prefill=prefill)

    @classmethod
    def load(cls, directory: str | Path, backend: str = "ort-cpu", threads: int | None = None, verify: bool = True,
             decoder: str | None = None, int8_prefill: bool = True, visual_tokens: int | float | None = None,
             compression: str = "pool") -> "VLM":
        """Open an artifact directory. `verify` checks every file's sha256 against the manifest.
        `decoder`: "decoder_gqa" (in-place KV cache, ONNX Runtime only) or "decoder" (portable);
        default: the fastest one the artifact has for the backend. `int8_prefill`: run the prompt
        pass on the artifact's int8-compute prefill graph where it has one (`--quantize prefill`).
        `visual_tokens`: keep this many visual tokens per image (an int), or this fraction of them (a
        float in (0, 1)), chosen by `compression` ("pool", "topk" or "merge"; runtime/compress.py); None: all."""
        directory = Path(directory)
        check_threads(threads)  # before anything is read
        plan = compression_plan(visual_tokens, compression)
        manifest = load_manifest(directory, checksums=verify)
        if backend == "auto":
            from .tensorrt.backends import resolve_backend

            backend = resolve_backend(directory)
        decoders = manifest.model.pipeline["decoders"]
        if decoder is not None and decoder not in decoders:
            raise ArtifactError(f"{directory} has no decoder graph {decoder!r}; its decoders are {decoders}")
        return cls(directory, manifest, backend, threads, decoder, int8_prefill, plan)

    def _runner(self, name: str):
        m = self.manifest
        return make_runner(self.backend, self.directory / m.graph_files[name], m.graphs[name], self.threads)

    # ---- public API -------------------------------------------------------------------------

    def generate(self, prompt: str, images: Sequence = (), videos: Sequence = (), *, min_pixels: int | None = None,
                 max_pixels: int | None = None, **sampling) -> GenerationResult:
        """`prompt` is raw text with the model's placeholders (<image>; Qwen2-VL: <|image_pad|>,
        <|video_pad|>), as given to HF's processor. `videos`: file paths, bytes or frame lists
        (families with video). `min_pixels`/`max_pixels`: per-request image size bounds (Qwen2-VL)."""
        return self._generate([self._request(prompt, images, videos, min_pixels, max_pixels)], sampling)[0]

    def generate_batch(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None,
                       videos: Sequence[Sequence] | None = None, *, min_pixels: int | None = None,
                       max_pixels: int | None = None, **sampling) -> list[GenerationResult]:
        """Left-padded batch; each row's tokens equal HF batch `generate`."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise PromptError(f"prompts must be a list of strings (one per row), got a bare {type(prompts).__name__}")
        images = [()] * len(prompts) if images is None else images
        videos = [()] * len(prompts) if videos is None else videos
        for what, given in (("image", images), ("video", videos)):
            if len(given) != len(prompts):
                raise PromptError(f"{len(prompts)} prompts but {len(given)} {what} lists; give one list per prompt")
        if not prompts:
            raise PromptError("generate_batch got no prompts; give at least one")
        return self._generate([self._request(p, i, v, min_pixels, max_pixels) for p, i, v in zip(prompts, images, videos)],
                              sampling)

    def stream(self, prompt: str, images: Sequence = (), videos: Sequence = (), *, min_pixels: int | None = None,
               max_pixels: int | None = None, **sampling) -> Iterator[str]:
        """Yields text as it is generated."""
        return self._stream(self._request(prompt, images, videos, min_pixels, max_pixels), sampling)

    def chat(self, messages: list[dict], *, min_pixels: int | None = None, max_pixels: int | None = None,
             **sampling) -> GenerationResult:
        """vLLM-style messages; images given as {"type": "image", "image": PIL image | path | bytes},
        videos as {"type": "video", "video": path | bytes | frames}."""
        return self._generate([self._chat_request(messages, min_pixels, max_pixels)], sampling)[0]

    def chat_stream(self, messages: list[dict], *, min_pixels: int | None = None, max_pixels: int | None = None,
                    **sampling) -> Iterator[str]:
        return self._stream(self._chat_request(messages, min_pixels, max_pixels), sampling)

    def prefill_logits(self, prompt: str, images: Sequence = (), videos: Sequence = ()) -> np.ndarray:
        """Logits [1, S, V] over the prompt (as HF's forward on the processor's inputs); runs the
        portable decoder, the one that returns every position's logits."""
        batch, _, _ = self._prepare([self._request(prompt, images, videos, None, None)])
        if "decoder" not in self.runners:
            self.runners["decoder"] = self._runner("decoder")
        return DecodeLoop(self.runners[self.facts.pipeline["embed"]], self.runners["decoder"], self.facts).prefill_logits(batch)

    def render_chat(self, messages: list[dict]) -> tuple[str, list]:
        """The prompt text the chat template renders, and the images in order of appearance."""
        prompt, media = self._render_chat(messages)
        return prompt, media["image"]

    def _render_chat(self, messages: list[dict]) -> tuple[str, dict[str, list]]:
        if self.chat_template is None:
            raise PromptError(f"{self.directory} has no chat template; use generate() with a raw prompt")
        media, plain = _split_media(messages)
        try:
            prompt = render_chat_template(self.chat_template, plain, add_generation_prompt=True, **self.text.special_tokens)
        except jinja2.TemplateSyntaxError as e:
            raise ArtifactError(f"{self.directory}: the chat template does not compile (line {e.lineno}: {e.message}); "
                                "fix chat_template.jinja or re-export") from None
        return prompt, media

    # ---- internals --------------------------------------------------------------------------

    def _request(self, prompt, images, videos, min_pixels, max_pixels, add_special_tokens: bool = True) -> _Request:
        videos = _media_list(videos, "videos")
        if videos and "video" not in self.family.media_kinds:
            raise PromptError(f"the {self.facts.family} family takes no video (media it takes: "
                              f"{', '.join(self.family.media_kinds)})")
        sizes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        if sizes and not self.family.size_options:
            raise PromptError(f"min_pixels/max_pixels apply to families that keep each image's resolution (qwen2_vl); "
                              f"the {self.facts.family} family resizes every image to a fixed size")
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PromptError(f"{name} must be an int >= 1 (pixels), got {value!r}")
        return _Request(prompt, _media_list(images, "images"), add_special_tokens, videos, sizes)

    def _chat_request(self, messages: list[dict], min_pixels=None, max_pixels=None) -> _Request:
        prompt, media = self._render_chat(messages)
        return self._request(prompt, media["image"], media["video"], min_pixels, max_pixels,
                             chat_prompt_adds_special_tokens(prompt, self.text.bos_token))

    def _generate(self, requests: list[_Request], sampling: dict) -> list[GenerationResult]:
        gen = Generation(self, requests, _sampling(sampling))
        for _ in gen:
            pass
        return gen.results()

    def _stream(self, request: _Request, sampling: dict) -> Iterator[str]:
        gen = Generation(self, [request], _sampling(sampling))
        for deltas in gen:
            if deltas[0]:
                yield deltas[0]

    def _prepare(self, requests: list[_Request]) -> tuple[Batch, list[int], float]:
        for r in requests:  # cheap checks before any image is read
            self._check_placeholders(r)
        items = [self._media_items(r) for r in requests]  # [row][item]
        ids = [self._tokenize(r, row) for r, row in zip(requests, items)]  # cheap checks before the vision graphs
        t0 = time.perf_counter()
        media = self.family.embed_media([i for row in items for i in row], self._run_graph)  # [num_tokens_i, C]
        vision_s = time.perf_counter() - t0
        splits = np.cumsum([len(row) for row in items])[:-1]
        embeds = [self._embed_row(row, its, feats) for row, its, feats in zip(ids, items, _split(media, splits))]
        batch = _left_pad(embeds)
        t0 = time.perf_counter()
        batch.context = self.family.decoder_context(ids, items, self._run_graph_outputs)  # mllama: cross K/V + mask
        vision_s += time.perf_counter() - t0
        positions = [self.family.prompt_positions(row, its) for row, its in zip(ids, items)]
        if any(p is not None for p in positions):
            batch.positions = left_pad_positions(positions, batch.mask.shape[1])  # [3, B, S] (M-RoPE) or [B, S]
        return batch, [len(r) for r in ids], vision_s

    def _media_items(self, request: _Request) -> list[MediaItem]:
        """The request's images, then its videos, preprocessed (each kind keeps its own order)."""
        try:
            items = self.family.prepare_images(parallel_map(load_image, request.images), **request.sizes)
            for video in request.videos:
                frames, meta = load_video(*_video_source(video), sampling=self.family.frame_sampling)  # [F, H, W, 3]
                items.append(self.family.prepare_video(frames, meta.sampled_fps, **request.sizes))
            if self.family.compression is not None:  # the prompt expands to the kept count
                items = [self.family.compressed(i) for i in items]
        except ImageError:
            raise
        except ValueError as e:  # the request's sizes (min/max_pixels) against the model's limits
            raise PromptError(str(e)) from None
        return items

    def _run_graph(self, name: str, x: np.ndarray | dict, all_outputs: bool = False) -> np.ndarray | dict:
        """A graph of the media chain: its one input (or a feed dict) -> its first output (or all, by name)."""
        spec = self.manifest.graphs[name]
        feeds = x if isinstance(x, dict) else {spec.input_names[0]: x}
        outputs = self.runners[name].run(feeds)
        return {n: outputs[n] for n in spec.output_names} if all_outputs else outputs[spec.output_names[0]]

    def _run_graph_outputs(self, name: str, feeds: dict) -> dict[str, np.ndarray]:
        """A graph of the media chain run on a feed dict -> all its outputs by name."""
        return self.runners[name].run(feeds)

    def _check_placeholders(self, request: _Request) -> None:
        if not isinstance(request.prompt, str):
            raise PromptError(f"prompt must be a str, got {type(request.prompt).__name__}")
        try:
            request.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"prompt is not valid text: {e.reason} at position {e.start} "
                              "(a lone surrogate, e.g. from bytes decoded with errors='surrogateescape')") from None
        try:
            self.family.check_placeholders(request.prompt, {"image": len(request.images), "video": len(request.videos)})
        except ValueError as e:
            raise PromptError(str(e)) from None

    def _tokenize(self, request: _Request, items: list[MediaItem]) -> np.ndarray:
        f = self.facts
        try:
            text = self.family.expand_prompt(request.prompt, items)
        except ValueError as e:
            raise PromptError(str(e)) from None
        ids = np.asarray(self.text.encode(text, add_special_tokens=request.add_special_tokens), dtype=np.int64)
        ids = self.family.prompt_ids(ids, items)  # BLIP-2: query tokens before BOS
        if len(ids) >= f.context_length:
            visual = sum(i.num_tokens for i in items)
            raise PromptError(
                f"prompt is {len(ids)} tokens ({len(items)} image(s), {visual} visual tokens included) but the "
                f"context is {f.context_length}; at most {f.context_length - 1} prompt tokens leave room for one "
                "new token. Shorten the prompt or use fewer or smaller images."
            )
        return ids

    def _embed_row(self, ids: np.ndarray, items: list[MediaItem], item_embeds: list[np.ndarray]) -> np.ndarray:
        """[S] ids + each item's [n_i, C] embeds -> [S, C] with each kind's at its token's positions, in order."""
        embeds = self.runners[self.facts.pipeline["embed"]].run({"input_ids": ids[None]})["inputs_embeds"][0]  # [S, C]
        if not self.family.media_in_prompt:  # mllama: the decoder reads the media through Batch.context
            return embeds
        for kind, media in self.facts.media.items():
            slots = ids == media.token_id
            mine = [e for item, e in zip(items, item_embeds) if item.kind == kind]
            given = sum(e.shape[0] for e in mine)
            if slots.sum() != given:
                raise PromptError(
                    f"the prompt holds {int(slots.sum())} {kind} tokens but the {kind}s give {given} features; "
                    f"do not type the {kind} token {media.placeholder!r} expanded by hand"
                )
            if given:
                embeds[slots] = np.concatenate(mine)
        return embeds


def load_family(directory: Path, manifest: Manifest, compression: Compression | None = None):
    """The artifact's family (its preprocessing and prompt rules), set up for `compression`; no graph is
    loaded. ArtifactError if the manifest does not fit the family, ValueError (what it allows) if the
    family cannot apply `compression`."""
    facts = manifest.model
    tensors = {n: np.load(directory / f, allow_pickle=False) for n, f in facts.tensors.items()}
    try:
        family = family_class(facts.family)(facts, manifest.preprocess, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{directory}: the {facts.family} family cannot use this manifest's "
                            f"preprocess/tensors ({e}); re-run `vlmdeploy export`") from None
    scored = SCORES in manifest.graphs[facts.pipeline["image"][0]].output_names
    family.compression = family.check_compression(compression, scored)
    return family


def compression_plan(visual_tokens: int | float | None, method: str = "pool") -> Compression | None:
    """`visual_tokens` (an int: tokens per image; a float in (0, 1]: a fraction) -> a Compression."""
    if visual_tokens is None:
        return None
    if isinstance(visual_tokens, float):
        return Compression(method, ratio=visual_tokens)
    return Compression(method, keep=visual_tokens)  # Compression checks it is an int >= 1


def _split(media: list[np.ndarray], splits: np.ndarray) -> list[list[np.ndarray]]:
    bounds = [0, *splits.tolist(), len(media)]
    return [media[a:b] for a, b in zip(bounds, bounds[1:])]


def _pick_decoder(manifest: Manifest, backend: str) -> str:
    """The first decoder of the pipeline this backend runs (decoder_gqa needs ONNX Runtime's contrib ops)."""
    decoders = manifest.model.pipeline["decoders"]
    usable = [d for d in decoders if d == "decoder" or backend.startswith("ort")]
    if not usable:
        raise ArtifactError(f"backend {backend!r} cannot run any of this artifact's decoders {decoders}")
    return usable[0]


VIDEO_SAMPLING = ("fps", "num_frames")  # per-video frame sampling (as qwen-vl-utils' message items)


def _video_source(video) -> tuple:
    """A video item -> load_video's (source, num_frames, fps): a path, bytes or frames, or a dict
    {"video": ..., "fps": f} / {"video": ..., "num_frames": n} choosing how frames are sampled."""
    if not isinstance(video, dict):
        return video, None, None
    unknown = sorted(set(video) - {"video", *VIDEO_SAMPLING})
    if "video" not in video or unknown:
        raise PromptError(f"a video given as a dict needs 'video' (path, bytes or frames) and may have "
                          f"{' / '.join(VIDEO_SAMPLING)}; got keys {sorted(video)}")
    return video["video"], video.get("num_frames"), video.get("fps")


def _media_list(items, what: str = "images") -> list:
    """A list of media (None: none); a lone path/bytes/PIL image is a mistake worth naming, not 70 'images'."""
    if items is None:
        return []
    if isinstance(items, (str, bytes, os.PathLike)) or hasattr(items, "getpixel"):
        raise PromptError(f"{what} must be a list (e.g. {what}=[{type(items).__name__}]), got a bare {type(items).__name__}")
    if not isinstance(items, (list, tuple)):
        raise PromptError(f"{what} must be a list ({'paths, bytes or PIL images' if what == 'images' else 'paths, bytes or frame lists'}), "
                          f"got {type(items).__name__}")
    return list(items)


def _sampling(kwargs: dict) -> SamplingParams:
    try:
        return SamplingParams.from_kwargs(kwargs)
    except ValueError as e:
        raise PromptError(str(e)) from None


def _left_pad(rows: list[np.ndarray]) -> Batch:
    """[S_i, C] rows -> Batch with embeds [B, S, C] (zeros at pads) and mask [B, S]."""
    s = max(r.shape[0] for r in rows)
    embeds = np.zeros((len(rows), s, rows[0].shape[1]), dtype=rows[0].dtype)
    mask = np.zeros((len(rows), s), dtype=np.int64)
    for i, r in enumerate(rows):
        embeds[i, s - r.shape[0]:] = r
        mask[i, s - r.shape[0]:] = 1
    return Batch(embeds, mask)


def _split_media(messages: list[dict]) -> tuple[dict[str, list], list[dict]]:
    """Pull image and video objects out of message content (in order); the template only needs their type."""
    media, plain = {"image": [], "video": []}, []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise PromptError(f"each message must be a dict with 'role' and 'content', got {m!r:.80}")
        content = m.get("content")
        if isinstance(content, list):
            new = []
            for item in content:
                if not isinstance(item, dict) or "type" not in item:
                    raise PromptError(f"each content item must be a dict with a 'type' ('text', 'image' or 'video'), "
                                      f'got {item!r:.80}; a plain string goes as {{"type": "text", "text": ...}}')
                kind = item.get("type")
                if kind in media:
                    if kind not in item:
                        raise PromptError(f"an {kind} content item needs the {kind} under {kind!r} "
                                          f"({'PIL image, path or bytes' if kind == 'image' else 'path, bytes or frames'})")
                    sampling = {k: item[k] for k in VIDEO_SAMPLING if k in item and kind == "video"}
                    media[kind].append({"video": item[kind], **sampling} if sampling else item[kind])
                    item = {"type": kind}
                new.append(item)
            m = dict(m, content=new)
        plain.append(m)
    return media, plain
