"""`vlmdeploy plan`: the memory a LLaVA-style model needs for a given context, batch and image count,
and the visual tokens each image becomes.

    plan_model("llava", "fp16", Workload(context=2048))   # a recipe (sizes from configs/*.yaml) or HF dir
    plan_model("llava-next", workload=Workload(image_sizes=((1344, 1344),)))
    plan_artifact("artifacts/shapes", Workload(256, 4))  # an exported directory: file sizes + manifest

Rows: LLM weights, vision encoder, projector, KV cache, activations (estimate), total; then the
visual tokens per image size.

- Families: what differs between model families (the visual tokens an image of a given size
  becomes, what the family keeps beside the projector, how its image parameters are read from the
  sizes or a checkpoint's processor files) is asked of the runtime family class
  (runtime/families/base.py `Family`: `visual_tokens`, `preprocess_from_sizes`,
  `preprocess_from_checkpoint`, `plan_notes`, `projector_extras`), looked up by the family name of
  the architecture or manifest; nothing here names a family. Text backbones Llama, Mistral, Qwen2,
  Gemma, Phi-3; towers CLIP, SigLIP, DINOv2.
- Weights: for a recipe or checkpoint, parameter counts from the architecture (the text model; the
  vision tower up to the vision feature layer, which is all the export keeps; the 2-layer MLP
  projector + the family's extras) times the dtype's bytes; for an exported artifact, the sizes of
  the graph files the runtime loads (exact).
- KV cache: K and V of every layer for context x batch tokens (sum over layers of 2 x kv_heads x
  head_dim x dtype bytes per token), exact. The runtime's portable `decoder` keeps TWO such buffers
  (ping-pong, runtime/kv_cache.py), `decoder_gqa` one; the second buffer is its own row. A
  sliding-window layer still keeps the whole context in this runtime's cache.
- Cross-attention K/V (mllama): each cross-attention layer's K and V of the vision states, held once
  per request whatever the context (`Family.request_kv`), a row apart from the context's KV cache,
  which then counts the self-attention layers only.
- Activations: an estimate of the prefill peak over the whole context: one decoder layer's
  intermediates (attention scores B x heads x S x S included) plus the logits [B, S, V]; or the
  vision tower over every tile of every image, whichever is larger.

Never imports torch: it runs in a runtime-only install.
"""

from __future__ import annotations

import dataclasses

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmdeploy.runtime.families import family_class
from vlmdeploy.runtime.compress import Compression
from vlmdeploy.runtime.families.base import ImageTokens, Size  # a row of the plan's visual tokens
from vlmdeploy.runtime.manifest import KVLayer, load_manifest

from .recipes import Architecture, RecipeError, find_weights, load_recipe

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float16"}  # KV / activations
PORTABLE, SHARED = "decoder", "decoder_gqa"
GB = 1e9
DEFAULT_CONTEXT = 2048
TEXT_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "gemma": "Gemma", "phi3": "Phi-3"}
VISION_NAMES = {"clip": "CLIP ViT", "siglip": "SigLIP ViT", "dinov2": "DINOv2 ViT"}


@dataclass(frozen=True)
class Workload:
    context: int | None = None  # tokens per sequence in the KV cache (prompt + images + generated); None: see _fill_context
    batch: int = 1
    images: int = 1  # per sequence
    image_sizes: tuple[Size, ...] = ()  # (h, w) of the images to count visual tokens for; (): a typical image
    video_frames: int = 0  # frames of one video per sequence (families with video); 0: no video
    video_size: Size | None = None  # (h, w) of its frames; None: the largest image size, else 448x448
    compression: Compression | None = None  # visual-token compression (--visual-tokens): fewer tokens per image

    def __post_init__(self):
        if self.video_frames < 0:
            raise ValueError(f"--video-frames must be >= 0, got {self.video_frames}")
        for name in ("batch", "images"):
            if getattr(self, name) < (1 if name == "batch" else 0):
                raise ValueError(f"--{name} must be >= {1 if name == 'batch' else 0}, got {getattr(self, name)}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"--context must be >= 1, got {self.context}")
        sizes = tuple(tuple(s) for s in self.image_sizes)
        for s in sizes:
            if len(s) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in s):
                raise ValueError(f"--image-size must be HEIGHTxWIDTH in pixels (positive integers), got {s!r}")
        object.__setattr__(self, "image_sizes", sizes)


def parse_image_sizes(values) -> tuple[Size, ...]:
    """`--image-size` values -> ((h, w), ...): each value "HxW" (or "N" for NxN), several separated
    by commas or spaces."""
    sizes = []
    for value in values or ():
        for item in re.split(r"[,\s]+", str(value).strip()):
            if not item:
                continue
            m = re.fullmatch(r"(\d+)(?:[xX](\d+))?", item)
            if not m or int(m[1]) < 1 or int(m[2] or m[1]) < 1:
                raise ValueError(f"--image-size {item!r}: expected HEIGHTxWIDTH in pixels, e.g. 1344x1344 or 672x336")
            sizes.append((int(m[1]), int(m[2] or m[1])))
    return tuple(sizes)


@dataclass(frozen=True)
class Line:
    component: str
    nbytes: int
    params: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class Plan:
    source: str
    dtype: str
    context: int
    batch: int
    images: int
    lines: tuple[Line, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)
    family: str = "llava"
    visual: tuple[ImageTokens, ...] = field(default_factory=tuple)
    visual_rule: str = ""

    @property
    def total(self) -> int:
        return sum(line.nbytes for line in self.lines)

    def get(self, component: str) -> Line:
        return next(line for line in self.lines if line.component == component)

    def tokens(self, size: Size | None = None) -> ImageTokens:
        """The visual-token row of an image size (None: the first row)."""
        return next(v for v in self.visual if size is None or v.size == tuple(size))

    def to_dict(self) -> dict:
        return {
            "source": self.source, "family": self.family, "dtype": self.dtype, "context": self.context,
            "batch": self.batch, "images": self.images, "total_bytes": self.total, "notes": list(self.notes),
            "lines": [{"component": x.component, "bytes": x.nbytes, "params": x.params, "detail": x.detail} for x in self.lines],
            "visual_tokens": [v.to_dict() for v in self.visual],
        }

    def table(self) -> str:
        w = max(len(x.component) for x in self.lines)
        head = f"{'component':<{w}}  {'params':>9}  {'memory':>10}"
        rows = [
            f"{x.component:<{w}}  {_params(x.params):>9}  {_size(x.nbytes):>10}  {x.detail}".rstrip()
            for x in self.lines
        ]
        title = (f"{self.source}: {self.dtype}, context {self.context} tokens x batch {self.batch}, "
                 f"{self.images} image(s) per sequence")
        rule = "-" * len(head)
        return "\n".join([title, "", head, rule, *rows, rule, f"{'total':<{w}}  {'':>9}  {_size(self.total):>10}",
                          *self._visual_table(),
                          *([""] + [f"note: {n}" for n in self.notes] if self.notes else [])])

    def _visual_table(self) -> list[str]:
        if not self.visual:
            return []
        cells = [("image (HxW)", "tiles", "before unpadding", "<image> tokens")]
        for v in self.visual:
            tiles = f"1+{v.grid[0]}x{v.grid[1]} ({v.resolution[0]}x{v.resolution[1]})" if v.grid else "1"
            before = f"{v.tiles} x {v.tokens_per_tile:,} = {v.before_unpadding:,}"
            after = f"{v.tokens:,}"
            if v.grid:
                grid = v.tokens - v.tokens_per_tile - v.newlines
                after += f" = {v.tokens_per_tile:,} base + {grid:,} grid + {v.newlines} newlines"
            cells.append((v.label(), tiles, before, after))
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        body = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}".rstrip() for a, b, c, d in cells]
        return ["", f"visual tokens per image ({self.visual_rule}):", body[0], "-" * len(body[0]), *body[1:]]


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


# ---------------------------------------------------------------------------------------------
# Parameter counts (Hugging Face layouts: Llama/Mistral/Qwen2/Gemma/Phi-3 text models,
# CLIPVisionModel/SiglipVisionModel/Dinov2Model towers, LlavaMultiModalProjector)


def text_params(a: Architecture) -> int:
    """Embeddings, decoder layers, final norm and lm_head (unless tied to the embeddings).

    Per layer: q, k, v, o projections (head_dim from the config; Qwen2 adds q/k/v biases; Phi-3
    fuses qkv and gate/up, same counts), gate/up/down MLP, two RMSNorms."""
    h, hd = a.text_hidden, a.text_head_dim
    q, kv = a.text_heads * hd, a.text_kv_heads * hd
    attn = 2 * h * q + 2 * h * kv  # q, o + k, v
    if a.text_model == "qwen2":
        attn += q + 2 * kv
    layer = attn + 3 * h * a.text_intermediate + 2 * h
    head = 0 if a.tie_word_embeddings else a.vocab_size * h
    return a.vocab_size * h + a.text_layers * layer + h + head


llama_params = text_params  # the LLaVA-1.5 name


def vision_layers_kept(a: Architecture) -> int:
    """Encoder layers up to the deepest feature layer (hidden_states[i] follows layer i)."""
    layers = a.vision_feature_layer if isinstance(a.vision_feature_layer, list) else [a.vision_feature_layer]
    return max(i if i >= 0 else a.vision_layers + 1 + i for i in layers)


def vision_params(a: Architecture) -> int:
    """The tower up to the deepest feature layer, which is what the export keeps: embeddings
    (CLIP: CLS, bias-free patch conv, positions incl. CLS, pre-layernorm; SigLIP: patch conv with
    bias, positions, no CLS; DINOv2: CLS (+ registers), patch conv with bias, positions incl. CLS)
    and the kept layers (q, k, v, o and the MLP with biases, two LayerNorms; DINOv2 adds two layer
    scales). Not counted, as the export drops them: post-layernorm / DINOv2's final layernorm,
    SigLIP's pooling head, DINOv2's mask token (pre-training only), layers past the feature layer."""
    c, i, p = a.vision_hidden, a.vision_intermediate, a.patch_size
    patches = (a.image_size // p) ** 2
    conv = 3 * p * p * c
    layer = 4 * (c * c + c) + 2 * (c * i) + i + c + 4 * c
    if a.vision_model == "clip":
        embeddings = c + conv + (patches + 1) * c + 2 * c  # + pre_layrnorm
    elif a.vision_model == "siglip":
        embeddings = conv + c + patches * c
    else:  # dinov2
        embeddings = c + a.vision_registers * c + conv + c + (patches + 1) * c
        layer += 2 * c
    return embeddings + vision_layers_kept(a) * layer


clip_vision_params = vision_params  # the LLaVA-1.5 name


def projector_params(a: Architecture) -> int:
    """linear_1 (features of every feature layer -> text hidden), linear_2, and what the family
    keeps beside them (`Family.projector_extras`, e.g. a newline vector [text hidden])."""
    n_features = len(a.vision_feature_layer) if isinstance(a.vision_feature_layer, list) else 1
    c_in, h = a.vision_hidden * n_features, a.text_hidden
    bias = 2 * h if a.projector_bias else 0
    return c_in * h + h * h + bias + sum(family_class(a.family).projector_extras(h).values())


def tower_tokens(a: Architecture) -> int:
    """Sequence length through the vision tower per tile: patches + CLS (CLIP, DINOv2) + registers."""
    patches = (a.image_size // a.patch_size) ** 2
    return patches + {"clip": 1, "siglip": 0, "dinov2": 1 + a.vision_registers}[a.vision_model]


def vision_tokens(a: Architecture) -> int:
    """Feature tokens per tile: HF's "default" strategy drops the tower's first token (CLS)."""
    return tower_tokens(a) - (1 if a.vision_feature_select_strategy == "default" else 0)


# ---------------------------------------------------------------------------------------------
# Visual tokens per image


def _budget(visual: tuple[ImageTokens, ...], sizes: tuple[Size, ...]) -> ImageTokens:
    """The image the context and activations are sized for: the largest requested, else the typical."""
    return max(visual, key=lambda v: v.tokens) if sizes else visual[0]


def _visual_notes(family, visual: tuple[ImageTokens, ...], budget: ImageTokens, w: Workload,
                  video: ImageTokens | None = None) -> list[str]:
    """The context the images (and the video) take, then the family's own notes on its rows."""
    notes = [f"{w.images} image(s) x {budget.tokens:,} visual tokens per sequence are part of the context"
             + (f" (the largest given size, {budget.label()})" if len(w.image_sizes) > 1
                else f" (a {budget.size[0]}x{budget.size[1]} image)" if budget.grid else "")]
    if video is not None:
        notes.append(f"a video of {w.video_frames} frames at {video.size[0]}x{video.size[1]}: {video.tokens:,} visual tokens "
                     f"({video.tiles} temporal steps x {video.tokens_per_tile:,}; frames resized to "
                     f"{video.resolution[0]}x{video.resolution[1]}), part of the context too")
    return [*notes, *family.plan_notes(visual, bool(w.image_sizes))]


def _video_row(family, preprocess, w: Workload) -> ImageTokens | None:
    """The video's token row (None: no video asked); a family without video refuses --video-frames."""
    if not w.video_frames:
        return None
    size = w.video_size or (max(w.image_sizes, key=lambda s: s[0] * s[1]) if w.image_sizes else (448, 448))
    row = family.video_tokens(preprocess, w.video_frames, size)
    if row is None:
        raise ValueError(f"--video-frames: the {family.name} family takes no video")
    return row if w.compression is None else family.compressed_tokens(preprocess, row, w.compression)


# ---------------------------------------------------------------------------------------------
# KV cache and activations


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V of every layer for one token of one sequence."""
    return 2 * num_layers * kv_heads * head_dim * np.dtype(dtype).itemsize


def kv_layers_bytes_per_token(layers, dtype: str) -> int:
    """K and V for one token of one sequence, summed over per-layer layouts (manifest kv_layers)."""
    return sum(2 * x.kv_heads * x.head_dim for x in layers) * np.dtype(dtype).itemsize


def runtime_kv_bytes(decoder: str, num_layers: int, kv_heads: int, head_dim: int, tokens: int, batch: int, dtype: str) -> int:
    """What the runtime's cache for `decoder` allocates: its own class, sized at one token and one
    sequence (a few bytes), scaled; every layout is proportional to batch x capacity."""
    from vlmdeploy.runtime.generate import CACHE_LAYOUTS

    one = CACHE_LAYOUTS[decoder](num_layers, 1, kv_heads, head_dim, 1, np.dtype(dtype)).nbytes
    return one * tokens * batch


def arch_kv_layers(a: Architecture) -> tuple[KVLayer, ...]:
    """Per-layer cache layout, as the export writes it (export/components.kv_layers); the sliding
    layers are the last `sliding_window_layers` (Qwen2's max_window_layers)."""
    n, window = a.text_layers, a.sliding_window
    first = n - (a.sliding_window_layers if a.sliding_window_layers is not None else n)
    return tuple(KVLayer(a.text_kv_heads, a.text_head_dim, window if window and i >= first else None) for i in range(n))


def _kv_lines(decoder: str, layers: tuple[KVLayer, ...], w: Workload, dtype: str) -> list[Line]:
    per_token = kv_layers_bytes_per_token(layers, dtype)
    kv = per_token * w.context * w.batch
    first = layers[0]  # the runtime's caches are uniform: ModelDims' kv_heads x head_dim for every layer
    allocated = runtime_kv_bytes(decoder, len(layers), first.kv_heads, first.head_dim, w.context, w.batch, dtype)
    shapes = sorted({(x.kv_heads, x.head_dim) for x in layers})
    if len(shapes) == 1:
        what = f"{len(layers)} layers x {shapes[0][0]} heads x {shapes[0][1]}"
    else:
        what = f"{len(layers)} layers ({', '.join(f'{h}x{d}' for h, d in shapes)} heads x dim)"
    detail = f"{per_token:,} B/token = K+V x {what} x {np.dtype(dtype).itemsize} B; {w.context} tokens x batch {w.batch}"
    lines = [Line("KV cache", kv, None, detail)]
    if allocated > kv:
        lines.append(Line("KV cache, runtime's 2nd buffer", allocated - kv, None,
                          f"the `{decoder}` graph runs with {allocated / kv:.0f} ping-pong buffers (runtime/kv_cache.py)"))
    return lines


def _window_note(layers: tuple[KVLayer, ...], w: Workload, dtype: str) -> list[str]:
    windowed = [x for x in layers if x.window]
    if not windowed:
        return []
    windows = sorted({x.window for x in windowed})
    saved = sum(2 * x.kv_heads * x.head_dim * max(0, w.context - x.window) for x in windowed)
    saved *= np.dtype(dtype).itemsize * w.batch
    return [f"sliding-window attention (window {', '.join(map(str, windows))}) on {len(windowed)} of {len(layers)} "
            f"layers: this runtime's KV cache still stores the whole context for them (counted above); keeping "
            f"only the window would save {_size(saved)} per KV buffer"]


def _decoder_activations(batch: int, seq: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                         intermediate: int, vocab: int, logits_rows: int) -> int:
    """Elements alive at the prefill peak: residual stream, one layer's attention (scores included)
    or MLP intermediates, and the logits."""
    stream = 4 * batch * seq * hidden
    attention = batch * heads * seq * seq + batch * seq * (heads + 2 * kv_heads) * head_dim
    mlp = 3 * batch * seq * intermediate
    return stream + max(attention, mlp) + batch * logits_rows * vocab


def _vision_activations(num_rows: int, tokens: int, hidden: int, heads: int, intermediate: int) -> int:
    """The tower over `num_rows` tiles of `tokens` each: one layer's attention scores + MLP."""
    return num_rows * (heads * tokens * tokens + tokens * (4 * hidden + intermediate))


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class _Model:
    arch: Architecture
    source: str
    dtype: str
    preprocess: dict | None = None  # the family's image parameters (Family.preprocess_from_*)


def resolve_architecture(model: str) -> tuple[Architecture, str, str]:
    """(architecture, description, default dtype) for `--model NAME_OR_DIR` without loading weights."""
    m = _resolve(model)
    return m.arch, m.source, m.dtype


def _resolve(model: str) -> _Model:
    path = Path(model).expanduser()
    if path.is_dir():
        return _from_checkpoint(path, f"{path} (checkpoint config.json)", "fp32")
    if "/" in model or model.startswith("."):
        raise RecipeError(f"--model {model}: no such directory")
    recipe = load_recipe(model)
    if recipe.architecture is not None:
        arch = recipe.architecture
        if recipe.family != arch.family:
            raise RecipeError(f"configs/{model}.yaml: family {recipe.family!r} but architecture.family {arch.family!r}")
        return _Model(arch, f"{model} (recipe; sizes from configs/{model}.yaml)", recipe.dtype, _from_sizes(arch))
    if recipe.random_init is not None:
        arch = Architecture.from_tiny(recipe.random_init)
        return _Model(arch, f"{model} (recipe; random_init sizes)", recipe.dtype, _from_sizes(arch))
    ckpt = find_weights(recipe)
    return _from_checkpoint(ckpt, f"{model} (recipe; {ckpt}/config.json)", recipe.dtype)


def _from_sizes(a: Architecture) -> dict | None:
    return family_class(a.family).preprocess_from_sizes(a)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid JSON ({e})") from None


def _from_checkpoint(checkpoint: Path, source: str, dtype: str) -> _Model:
    config = _read_json(checkpoint / "config.json")
    if config is None:
        raise RecipeError(f"{checkpoint}: no config.json; not a Hugging Face checkpoint directory")
    try:
        arch = Architecture.from_hf_config(config)
    except KeyError as e:
        raise RecipeError(f"{checkpoint}/config.json: not a LLaVA config (no {e.args[0]!r} in text_config/vision_config)") from None
    try:  # the family reads what it needs (processor files) as the export does
        preprocess = family_class(arch.family).preprocess_from_checkpoint(
            arch, config, lambda name: _read_json(checkpoint / name))
    except RecipeError:
        raise
    except ValueError as e:
        raise RecipeError(f"{checkpoint}: {e}") from None
    return _Model(arch, source, dtype, preprocess)


def plan_model(model: str, dtype: str | None = None, workload: Workload = Workload(), decoder: str = PORTABLE) -> Plan:
    """From a recipe or checkpoint directory. `decoder`: the graph whose KV layout to count
    (`decoder`, exported for every dtype, or `decoder_gqa`)."""
    m = _resolve(model)
    arch = m.arch
    dtype = dtype or m.dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}")
    family = family_class(arch.family)
    visual, rule = family.visual_tokens(m.preprocess, workload.image_sizes, vision_tokens(arch), (arch.image_size,) * 2)
    visual, rule = _compressed(family, m.preprocess, visual, rule, workload.compression)
    budget = _budget(visual, workload.image_sizes)
    w = _fill_context(workload, arch.context_length, budget.tokens)
    nbytes, act = DTYPE_BYTES[dtype], NUMPY_DTYPES[dtype]
    head_dim = arch.text_head_dim
    llm, vis, proj = text_params(arch), vision_params(arch), projector_params(arch)
    kept = vision_layers_kept(arch)
    kv_layers = arch_kv_layers(arch)
    act_elems = max(
        _decoder_activations(w.batch, w.context, arch.text_hidden, arch.text_heads, arch.text_kv_heads, head_dim,
                             arch.text_intermediate, arch.vocab_size, w.context if decoder == PORTABLE else 1),
        _vision_activations(w.batch * w.images * budget.tiles, tower_tokens(arch), arch.vision_hidden,
                            arch.vision_heads, arch.vision_intermediate),
    )
    text = TEXT_NAMES[arch.text_model]
    tied = ", lm_head tied to the embeddings" if arch.tie_word_embeddings else ""
    fused = " (fused qkv, gate_up)" if arch.text_model == "phi3" else ""
    extras = {"clip": "CLS", "siglip": "no CLS", "dinov2": "CLS" + (f" + {arch.vision_registers} registers"
                                                                     if arch.vision_registers else "")}[arch.vision_model]
    lines = [
        Line("LLM weights", llm * nbytes, llm,
             f"{text}{fused}: {arch.text_layers} layers x {arch.text_hidden}, vocab {arch.vocab_size}{tied}"),
        Line("vision encoder", vis * nbytes, vis,
             f"{VISION_NAMES[arch.vision_model]} ({extras}): {kept} of {arch.vision_layers} layers x {arch.vision_hidden}"),
        Line("projector", proj * nbytes, proj, " + ".join(["2-layer MLP", *family.projector_extras(arch.text_hidden)])),
        *_kv_lines(decoder, kv_layers, w, act),
        Line("activations (estimate)", act_elems * np.dtype(act).itemsize, None, "prefill peak over the whole context"),
    ]
    notes = _visual_notes(family, visual, budget, w)
    notes += _window_note(kv_layers, w, act)
    if dtype == "int8":
        notes.append("int8: 1 byte per weight (weight-only; scales and norms not counted), fp16 KV cache and activations")
    if decoder == PORTABLE:
        notes.append("with `decoder_gqa` (ONNX Runtime; exported where it reproduces the text model) the runtime "
                     "keeps one KV buffer instead of two")
    return Plan(m.source, dtype, w.context, w.batch, w.images, tuple(lines), tuple(notes), arch.family, visual, rule)


def plan_artifact(directory: str | Path, workload: Workload = Workload(), dtype: str | None = None) -> Plan:
    """From an exported directory: the graph files the runtime loads, the manifest's dims,
    per-layer KV layouts and the family's token rule."""
    directory = Path(directory)
    m = load_manifest(directory, checksums=False)  # sizes are still checked
    facts = m.model
    d, act = facts.dims, facts.dims.dtype
    have = {"float32": "fp32", "float16": "fp16"}[act]
    if dtype is not None and dtype != have:
        raise ValueError(f"{directory} holds {have} graphs; --dtype {dtype} does not apply to an exported directory")
    pipeline = facts.pipeline
    decoder = pipeline["decoders"][0]  # what VLM.load picks on ONNX Runtime (the first the pipeline lists)
    chain, embed = list(pipeline["image"]), pipeline["embed"]
    prefill = [g for g in [pipeline.get("prefill", {}).get(decoder)] if g]  # the int8 prompt-pass graph, also loaded
    family = family_class(facts.family)
    visual, rule = family.visual_tokens(m.preprocess, workload.image_sizes, d.vision_tokens, tuple(d.image_size), facts)
    visual, rule = _compressed(family, m.preprocess, visual, rule, workload.compression)
    budget = _budget(visual, workload.image_sizes)
    video = _video_row(family, m.preprocess, workload)
    w = _fill_context(workload, facts.context_length, budget.tokens, video.tokens if video else 0)
    size = {g: _graph_bytes(m, g) for g in m.graphs}
    tensors = {name: m.files[f]["size"] for name, f in facts.tensors.items() if f in m.files}
    heads = d.hidden // d.head_dim
    intermediate = _llama_intermediate(size[PORTABLE] if PORTABLE in size else size[decoder], d, act)
    act_elems = max(
        _decoder_activations(w.batch, w.context, d.hidden, heads, d.kv_heads, d.head_dim, intermediate, d.vocab,
                             w.context if decoder == PORTABLE else 1),
        _vision_activations(w.batch * w.images * budget.tiles, d.vision_tokens + 1, d.vision_hidden,
                            max(1, d.vision_hidden // 64), 4 * d.vision_hidden),
    )
    kv_layers = tuple(facts.kv_layers)
    vision_graphs, projector = chain[:-1] or chain, chain[-1:] if len(chain) > 1 else []
    lines = [
        Line("LLM weights", size[embed] + size[decoder] + sum(size[g] for g in prefill), None,
             " + ".join(f"{g}.onnx" for g in [embed, decoder, *prefill]) + " (files)"),
        Line("vision encoder", sum(size[g] for g in vision_graphs), None,
             " + ".join(f"{g}.onnx" for g in vision_graphs) + " (files)"),
        Line("projector", sum(size[g] for g in projector) + sum(tensors.values()), None,
             " + ".join([f"{g}.onnx" for g in projector] + [facts.tensors[t] for t in tensors]) + " (files)"),
        *_kv_lines(decoder, kv_layers, w, act),
        *_request_kv_lines(family, facts, w),
        Line("activations (estimate)", act_elems * np.dtype(act).itemsize, None, "prefill peak over the whole context"),
    ]
    loaded = set(chain) | {embed, decoder, *prefill}
    unused = sorted(g for g in m.graphs if g not in loaded)
    notes = _visual_notes(family, visual, budget, w, video)
    notes += _window_note(kv_layers, w, act)
    if unused:
        notes.append(f"also on disk, not loaded for generation: {', '.join(unused)} ({_size(sum(size[g] for g in unused))})")
    quantization = (m.source or {}).get("quantization")
    if isinstance(quantization, dict):
        notes.append(f"decoder_gqa weights quantized to {quantization.get('scheme')} at export (the file sizes above)")
    computed = (m.source or {}).get("int8_compute") or {}
    if computed:
        notes.append(f"int8 compute for {' and '.join(sorted(computed, reverse=True))} (`--quantize vision prefill`)"
                     + (f": {prefill[0]} runs the prompt pass, {decoder} the decode steps" if prefill else ""))
    return Plan(f"{directory} (exported {facts.family}, runtime uses `{decoder}`)", have, w.context, w.batch, w.images,
                tuple(lines), tuple(notes), facts.family, visual, rule)


def _request_kv_lines(family, facts, w: Workload) -> list[Line]:
    """K/V the decoder reads besides the context cache (mllama's cross-attention K/V), counted apart from it."""
    extra = family.request_kv(facts, w.images, w.batch, w.compression)
    return [] if extra is None else [Line("cross-attention K/V", extra[0], None, extra[1])]


def _graph_bytes(manifest, graph: str) -> int:
    """Bytes of a graph's .onnx file and its external data (`NAME.onnx.data`)."""
    f = manifest.graph_files[graph]
    return sum(meta["size"] for name, meta in manifest.files.items() if name == f or name.startswith(f + "."))


def _llama_intermediate(decoder_bytes: int, d, dtype: str) -> int:
    """The MLP width, solved from the decoder's weight bytes (per layer: 2*H*H + 2*H*kv*hd + 3*H*I)."""
    params = decoder_bytes / np.dtype(dtype).itemsize - d.vocab * d.hidden  # minus lm_head
    per_layer = params / d.num_layers - 2 * d.hidden * d.hidden - 2 * d.hidden * d.kv_heads * d.head_dim
    return max(d.hidden, int(per_layer / (3 * d.hidden)))


def _compressed(family, preprocess, rows: tuple[ImageTokens, ...], rule: str, compression: Compression | None):
    """The rows after visual-token compression (the family's count: what the runtime puts in the prompt)."""
    if compression is None:
        return rows, rule
    if compression.method not in family.compression_methods:
        family.refuse(compression, family.compression_methods)
    rows = tuple(family.compressed_tokens(preprocess, row, compression) for row in rows)
    return rows, f"{rule}; then {compression.label()} per image (--visual-tokens)"


def default_context(context_length: int, visual_tokens: int) -> int:
    """2048, or the visual tokens + 1024 for text rounded up to a multiple of 1024 when that is
    more (a tiled image: up to ~2,900 tokens); never more than the model's."""
    wanted = max(DEFAULT_CONTEXT, math.ceil((visual_tokens + 1024) / 1024) * 1024)
    return min(wanted, context_length)


def _fill_context(w: Workload, context_length: int, tokens_per_image: int, video_tokens: int = 0) -> Workload:
    visual = w.images * tokens_per_image + video_tokens
    context = w.context if w.context is not None else default_context(context_length, visual)
    if context > context_length:
        raise ValueError(f"--context {context} exceeds the model's context length {context_length}")
    if visual >= context:
        video = f" + a video of {video_tokens}" if video_tokens else ""
        raise ValueError(
            f"{w.images} image(s) x {tokens_per_image} visual tokens{video} = {visual} tokens do not "
            f"fit in a context of {context} with room for text; raise --context or lower --images"
            + (" / --video-frames / the frame size" if video_tokens else "")
        )
    return dataclasses.replace(w, context=context)
