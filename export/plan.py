"""`vlmdeploy plan`: the memory a LLaVA-style model needs for a given context, batch and image count.

    plan_model("llava", "fp16", Workload(context=2048))   # a recipe (sizes from configs/*.yaml) or HF dir
    plan_artifact("artifacts/shapes", Workload(256, 4))  # an exported directory: file sizes + manifest

Rows: LLM weights, vision encoder, projector, KV cache, activations (estimate), total.

- Weights: for a recipe or checkpoint, parameter counts from the architecture (Llama + CLIP up to
  the vision feature layer, which is all the export keeps + 2-layer MLP projector) times the dtype's
  bytes; for an exported artifact, the sizes of the graph files the runtime loads (exact).
- KV cache: K and V of every layer for context x batch tokens (2 x layers x kv_heads x head_dim x
  dtype bytes per token), exact. The runtime's portable `decoder` keeps TWO such buffers (ping-pong,
  runtime/kv_cache.py), `decoder_gqa` one; the second buffer is its own row.
- Activations: an estimate of the prefill peak over the whole context: one decoder layer's
  intermediates (attention scores B x heads x S x S included) plus the logits [B, S, V]; or the
  vision tower over every image, whichever is larger.

Never imports torch: it runs in a runtime-only install.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmdeploy.runtime.manifest import load_manifest

from .recipes import Architecture, RecipeError, find_weights, load_recipe

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16", "int8": "float16"}  # KV / activations
PORTABLE, SHARED = "decoder", "decoder_gqa"
GB = 1e9


@dataclass(frozen=True)
class Workload:
    context: int | None = None  # tokens per sequence in the KV cache (prompt + images + generated); None: min(2048, model's)
    batch: int = 1
    images: int = 1  # per sequence

    def __post_init__(self):
        for name in ("batch", "images"):
            if getattr(self, name) < (1 if name == "batch" else 0):
                raise ValueError(f"--{name} must be >= {1 if name == 'batch' else 0}, got {getattr(self, name)}")
        if self.context is not None and self.context < 1:
            raise ValueError(f"--context must be >= 1, got {self.context}")


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

    @property
    def total(self) -> int:
        return sum(line.nbytes for line in self.lines)

    def get(self, component: str) -> Line:
        return next(line for line in self.lines if line.component == component)

    def to_dict(self) -> dict:
        return {
            "source": self.source, "dtype": self.dtype, "context": self.context, "batch": self.batch,
            "images": self.images, "total_bytes": self.total, "notes": list(self.notes),
            "lines": [{"component": x.component, "bytes": x.nbytes, "params": x.params, "detail": x.detail} for x in self.lines],
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
                          *([""] + [f"note: {n}" for n in self.notes] if self.notes else [])])


def _size(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.2f} MB"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


# ---------------------------------------------------------------------------------------------
# Parameter counts (Hugging Face Llama / CLIPVisionModel / LlavaMultiModalProjector layouts)


def llama_params(a: Architecture) -> int:
    h, hd = a.text_hidden, a.text_hidden // a.text_heads
    attn = h * a.text_heads * hd * 2 + h * a.text_kv_heads * hd * 2  # q, o + k, v (no biases)
    layer = attn + 3 * h * a.text_intermediate + 2 * h  # gate, up, down + 2 RMSNorms
    head = 0 if a.tie_word_embeddings else a.vocab_size * h
    return a.vocab_size * h + a.text_layers * layer + h + head


def vision_layers_kept(a: Architecture) -> int:
    """Encoder layers up to the deepest feature layer (hidden_states[i] follows layer i)."""
    layers = a.vision_feature_layer if isinstance(a.vision_feature_layer, list) else [a.vision_feature_layer]
    return max(i if i >= 0 else a.vision_layers + 1 + i for i in layers)


def clip_vision_params(a: Architecture) -> int:
    c, patches = a.vision_hidden, (a.image_size // a.patch_size) ** 2
    embeddings = c + 3 * a.patch_size**2 * c + (patches + 1) * c  # CLS, patch conv, positions
    layer = 4 * (c * c + c) + 2 * (c * a.vision_intermediate) + a.vision_intermediate + c + 4 * c
    return embeddings + 2 * c + vision_layers_kept(a) * layer  # + pre_layrnorm; post_layernorm unused


def projector_params(a: Architecture) -> int:
    n_features = len(a.vision_feature_layer) if isinstance(a.vision_feature_layer, list) else 1
    c_in = a.vision_hidden * n_features
    return c_in * a.text_hidden + a.text_hidden + a.text_hidden * a.text_hidden + a.text_hidden


def vision_tokens(a: Architecture) -> int:
    patches = (a.image_size // a.patch_size) ** 2
    return patches if a.vision_feature_select_strategy == "default" else patches + 1


# ---------------------------------------------------------------------------------------------
# KV cache and activations


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """K and V of every layer for one token of one sequence."""
    return 2 * num_layers * kv_heads * head_dim * np.dtype(dtype).itemsize


def runtime_kv_bytes(decoder: str, num_layers: int, kv_heads: int, head_dim: int, tokens: int, batch: int, dtype: str) -> int:
    """What the runtime's cache for `decoder` allocates: its own class, sized at one token and one
    sequence (a few bytes), scaled; every layout is proportional to batch x capacity."""
    from vlmdeploy.runtime.generate import CACHE_LAYOUTS

    one = CACHE_LAYOUTS[decoder](num_layers, 1, kv_heads, head_dim, 1, np.dtype(dtype)).nbytes
    return one * tokens * batch


def _kv_lines(decoder: str, layers: int, kv_heads: int, head_dim: int, w: Workload, dtype: str) -> list[Line]:
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, dtype)
    kv = per_token * w.context * w.batch
    allocated = runtime_kv_bytes(decoder, layers, kv_heads, head_dim, w.context, w.batch, dtype)
    detail = (f"{per_token:,} B/token = K+V x {layers} layers x {kv_heads} heads x {head_dim} x "
              f"{np.dtype(dtype).itemsize} B; {w.context} tokens x batch {w.batch}")
    lines = [Line("KV cache", kv, None, detail)]
    if allocated > kv:
        lines.append(Line("KV cache, runtime's 2nd buffer", allocated - kv, None,
                          f"the `{decoder}` graph runs with {allocated / kv:.0f} ping-pong buffers (runtime/kv_cache.py)"))
    return lines


def _decoder_activations(batch: int, seq: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                         intermediate: int, vocab: int, logits_rows: int) -> int:
    """Elements alive at the prefill peak: residual stream, one layer's attention (scores included)
    or MLP intermediates, and the logits."""
    stream = 4 * batch * seq * hidden
    attention = batch * heads * seq * seq + batch * seq * (heads + 2 * kv_heads) * head_dim
    mlp = 3 * batch * seq * intermediate
    return stream + max(attention, mlp) + batch * logits_rows * vocab


def _vision_activations(num_images: int, tokens: int, hidden: int, heads: int, intermediate: int) -> int:
    return num_images * (heads * tokens * tokens + tokens * (4 * hidden + intermediate))


# ---------------------------------------------------------------------------------------------
# Plans


def resolve_architecture(model: str) -> tuple[Architecture, str, str]:
    """(architecture, description, default dtype) for `--model NAME_OR_DIR` without loading weights."""
    path = Path(model).expanduser()
    if path.is_dir():
        return _read_config(path), f"{path} (checkpoint config.json)", "fp32"
    if "/" in model or model.startswith("."):
        raise RecipeError(f"--model {model}: no such directory")
    recipe = load_recipe(model)
    if recipe.architecture is not None:
        return recipe.architecture, f"{model} (recipe; sizes from configs/{model}.yaml)", recipe.dtype
    if recipe.random_init is not None:
        return Architecture.from_tiny(recipe.random_init), f"{model} (recipe; random_init sizes)", recipe.dtype
    ckpt = find_weights(recipe)
    return _read_config(ckpt), f"{model} (recipe; {ckpt}/config.json)", recipe.dtype


def _read_config(checkpoint: Path) -> Architecture:
    path = checkpoint / "config.json"
    if not path.is_file():
        raise RecipeError(f"{checkpoint}: no config.json; not a Hugging Face checkpoint directory")
    try:
        return Architecture.from_hf_config(json.loads(path.read_text()))
    except KeyError as e:
        raise RecipeError(f"{path}: not a LLaVA config (no {e.args[0]!r} in text_config/vision_config)") from None


def plan_model(model: str, dtype: str | None = None, workload: Workload = Workload(), decoder: str = PORTABLE) -> Plan:
    """From a recipe or checkpoint directory. `decoder`: the graph whose KV layout to count
    (`decoder`, exported for every dtype, or `decoder_gqa`)."""
    arch, source, default_dtype = resolve_architecture(model)
    dtype = dtype or default_dtype
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype!r} not one of {sorted(DTYPE_BYTES)}")
    w = _fill_context(workload, arch.context_length, vision_tokens(arch))
    nbytes, act = DTYPE_BYTES[dtype], NUMPY_DTYPES[dtype]
    head_dim = arch.text_hidden // arch.text_heads
    llm, vis, proj = llama_params(arch), clip_vision_params(arch), projector_params(arch)
    kept = vision_layers_kept(arch)
    act_elems = max(
        _decoder_activations(w.batch, w.context, arch.text_hidden, arch.text_heads, arch.text_kv_heads, head_dim,
                             arch.text_intermediate, arch.vocab_size, w.context if decoder == PORTABLE else 1),
        _vision_activations(w.batch * w.images, vision_tokens(arch) + 1, arch.vision_hidden, arch.vision_heads,
                            arch.vision_intermediate),
    )
    lines = [
        Line("LLM weights", llm * nbytes, llm, f"Llama: {arch.text_layers} layers x {arch.text_hidden}, vocab {arch.vocab_size}"),
        Line("vision encoder", vis * nbytes, vis, f"CLIP ViT: {kept} of {arch.vision_layers} layers x {arch.vision_hidden}"),
        Line("projector", proj * nbytes, proj, "2-layer MLP"),
        *_kv_lines(decoder, arch.text_layers, arch.text_kv_heads, head_dim, w, act),
        Line("activations (estimate)", act_elems * np.dtype(act).itemsize, None, "prefill peak over the whole context"),
    ]
    notes = [f"{w.images} image(s) x {vision_tokens(arch)} visual tokens per sequence are part of the context"]
    if dtype == "int8":
        notes.append("int8: 1 byte per weight (weight-only; scales and norms not counted), fp16 KV cache and activations")
    if decoder == PORTABLE:
        notes.append("with `decoder_gqa` (exported for fp32 Llama) the runtime keeps one KV buffer instead of two")
    return Plan(source, dtype, w.context, w.batch, w.images, tuple(lines), tuple(notes))


def plan_artifact(directory: str | Path, workload: Workload = Workload(), dtype: str | None = None) -> Plan:
    """From an exported directory: the graph files the runtime loads, the manifest's dims."""
    from vlmdeploy.runtime.vlm import DECODERS

    directory = Path(directory)
    m = load_manifest(directory, checksums=False)  # sizes are still checked
    d, act = m.model.dims, m.model.dims.dtype
    have = {"float32": "fp32", "float16": "fp16"}[act]
    if dtype is not None and dtype != have:
        raise ValueError(f"{directory} holds {have} graphs; --dtype {dtype} does not apply to an exported directory")
    decoder = next(g for g in DECODERS if g in m.graphs)
    w = _fill_context(workload, m.model.context_length, m.model.tokens_per_image)
    size = {g: _graph_bytes(m, g) for g in m.graphs}
    heads = d.hidden // d.head_dim
    intermediate = _llama_intermediate(size[PORTABLE] if PORTABLE in size else size[decoder], d, act)
    act_elems = max(
        _decoder_activations(w.batch, w.context, d.hidden, heads, d.kv_heads, d.head_dim, intermediate, d.vocab,
                             w.context if decoder == PORTABLE else 1),
        _vision_activations(w.batch * w.images, d.vision_tokens + 1, d.vision_hidden, max(1, d.vision_hidden // 64),
                            4 * d.vision_hidden),
    )
    lines = [
        Line("LLM weights", size["embed"] + size[decoder], None, f"embed.onnx + {decoder}.onnx (files)"),
        Line("vision encoder", size["vision"], None, "vision.onnx (files)"),
        Line("projector", size["projector"], None, "projector.onnx (files)"),
        *_kv_lines(decoder, d.num_layers, d.kv_heads, d.head_dim, w, act),
        Line("activations (estimate)", act_elems * np.dtype(act).itemsize, None, "prefill peak over the whole context"),
    ]
    unused = sorted(g for g in m.graphs if g not in ("vision", "projector", "embed", decoder))
    notes = [f"{w.images} image(s) x {m.model.tokens_per_image} visual tokens per sequence are part of the context"]
    if unused:
        notes.append(f"also on disk, not loaded for generation: {', '.join(unused)} ({_size(sum(size[g] for g in unused))})")
    quantization = (m.source or {}).get("quantization")
    if isinstance(quantization, dict):
        notes.append(f"decoder_gqa weights quantized to {quantization.get('scheme')} at export (the file sizes above)")
    return Plan(f"{directory} (exported, runtime uses `{decoder}`)", have, w.context, w.batch, w.images, tuple(lines), tuple(notes))


def _graph_bytes(manifest, graph: str) -> int:
    """Bytes of a graph's .onnx file and its external data (`NAME.onnx.data`)."""
    f = manifest.graph_files[graph]
    return sum(meta["size"] for name, meta in manifest.files.items() if name == f or name.startswith(f + "."))


def _llama_intermediate(decoder_bytes: int, d, dtype: str) -> int:
    """The MLP width, solved from the decoder's weight bytes (per layer: 2*H*H + 2*H*kv*hd + 3*H*I)."""
    params = decoder_bytes / np.dtype(dtype).itemsize - d.vocab * d.hidden  # minus lm_head
    per_layer = params / d.num_layers - 2 * d.hidden * d.hidden - 2 * d.hidden * d.kv_heads * d.head_dim
    return max(d.hidden, int(per_layer / (3 * d.hidden)))


def _fill_context(w: Workload, context_length: int, tokens_per_image: int) -> Workload:
    context = w.context if w.context is not None else min(2048, context_length)
    if context > context_length:
        raise ValueError(f"--context {context} exceeds the model's context length {context_length}")
    if w.images * tokens_per_image >= context:
        raise ValueError(
            f"{w.images} image(s) x {tokens_per_image} visual tokens = {w.images * tokens_per_image} tokens do not "
            f"fit in a context of {context} with room for text; raise --context or lower --images"
        )
    return Workload(context, w.batch, w.images)
