"""Recipes: named models in configs/*.yaml, validated on load, and how to find their weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

DTYPES = ("fp32", "fp16")


class RecipeError(ValueError):
    """Unknown recipe, malformed recipe file, or weights that are not on this machine."""


@dataclass(frozen=True)
class TinyConfig:
    """A random-weight LLaVA built from sizes (tests, demo, benchmarks)."""

    seed: int = 0
    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int | None = None
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vocab_size: int = 256
    context_length: int = 512
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    do_pad: bool = False
    family: str = "llava"  # llava | llava_next
    text_model: str = "llama"  # llama | mistral | qwen2 | gemma | phi3
    vision_model: str = "clip"  # clip | siglip | dinov2
    sliding_window: int | None = None  # mistral
    longrope_original: int | None = None  # phi3: LongRoPE with this original_max_position_embeddings
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # llava_next; default: 1x2, 2x1, 2x2 tiles
    min_pixels: int = 56 * 56  # qwen2_vl / qwen2_5_vl: the image processor's pixel bounds
    max_pixels: int = 28 * 28 * 64
    window_size: int = 56  # qwen2_5_vl: the vision window side in pixels
    onevision_max_tiles: int = 9  # llava_onevision: vision_aspect_ratio anyres_max_N
    num_query_tokens: int = 8  # blip2: the Q-Former's learned queries
    internvl_max_tiles: int = 6  # internvl: GotOcr2's max_patches
    do_image_splitting: bool = True  # idefics2: 4 crops + the whole image

    def __post_init__(self):
        allowed = {"family": ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip2", "internvl", "idefics3", "smolvlm", "idefics2", "mllama"), "text_model": ("llama", "mistral", "qwen2", "gemma", "phi3", "opt"),
                   "vision_model": ("clip", "siglip", "dinov2")}
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise RecipeError(f"random_init.{name}: {getattr(self, name)!r} not one of {list(options)}")


# transformers' config-class defaults (5.x) for the keys a checkpoint's config.json may leave out
# (llava-hf configs store only what differs: llava-v1.6-mistral's text_config has no hidden_size).
_TEXT_DEFAULTS = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048, vocab_size=32000),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=131072, vocab_size=32000, sliding_window=4096),
    "qwen2": dict(hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=32768, vocab_size=151936, use_sliding_window=False, max_window_layers=28),
    "gemma": dict(hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
                  head_dim=256, max_position_embeddings=8192, vocab_size=256000, tie_word_embeddings=True),
    "phi3": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 max_position_embeddings=4096, vocab_size=32064),
}
# vision_config.model_type -> (Architecture.vision_model, defaults)
_VISION_DEFAULTS = {
    "clip_vision_model": ("clip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, image_size=224, patch_size=32)),
    "siglip_vision_model": ("siglip", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=16)),
    "dinov2": ("dinov2", dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=14, num_register_tokens=0)),
    "dinov2_with_registers": ("dinov2", dict(hidden_size=768, mlp_ratio=4, num_hidden_layers=12, num_attention_heads=12,
                                             image_size=224, patch_size=16, num_register_tokens=4)),
}
# LlavaConfig / LlavaNextConfig without a vision_config: CLIP ViT-L/14-336
_LLAVA_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, image_size=336, patch_size=14)
ARCH_FAMILIES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}


@dataclass(frozen=True)
class Architecture:
    """The sizes of a LLaVA-style model (text backbone + ViT + 2-layer MLP projector): what
    `vlmdeploy plan` needs for a recipe whose weights are not on this machine. Same names as
    TinyConfig; values as in the checkpoint's config.json.

    The optional fields default to LLaVA-1.5 (Llama + CLIP): `family` llava | llava_next;
    `text_model` llama | mistral | qwen2 | gemma | phi3; `vision_model` clip | siglip | dinov2;
    `head_dim` None: text_hidden // text_heads; `sliding_window` (+ how many layers use it, None:
    all); `vision_registers`: DINOv2 register tokens; `grid_pinpoints` (h, w): LLaVA-NeXT's, None:
    llava-v1.6's."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    context_length: int
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    tie_word_embeddings: bool = False
    family: str = "llava"
    text_model: str = "llama"
    vision_model: str = "clip"
    head_dim: int | None = None
    sliding_window: int | None = None
    sliding_window_layers: int | None = None
    vision_registers: int = 0
    projector_bias: bool = True
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        allowed = {"family": ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip2", "internvl", "idefics3", "smolvlm", "idefics2", "mllama"), "text_model": tuple(_TEXT_DEFAULTS),
                   "vision_model": ("clip", "siglip", "dinov2")}
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise RecipeError(f"architecture.{name}: {getattr(self, name)!r} not one of {list(options)}")
        if self.grid_pinpoints is not None:
            object.__setattr__(self, "grid_pinpoints", tuple((int(h), int(w)) for h, w in self.grid_pinpoints))

    @property
    def text_head_dim(self) -> int:
        return self.head_dim or self.text_hidden // self.text_heads

    @classmethod
    def from_tiny(cls, t: TinyConfig) -> "Architecture":
        own = {"vision_intermediate", "tie_word_embeddings", "head_dim", "sliding_window_layers", "vision_registers",
               "projector_bias", "grid_pinpoints"}
        names = {f.name for f in dataclasses.fields(cls)} - own
        s = t.image_size
        pinpoints = (t.grid_pinpoints or ((s, 2 * s), (2 * s, s), (2 * s, 2 * s))) if t.family == "llava_next" else None
        # LlavaConfig ties lm_head to the embeddings when the text config does (Gemma's default);
        # LlavaNextConfig reads only its own tie_word_embeddings (False)
        tie = t.text_model == "gemma" and t.family == "llava"
        return cls(vision_intermediate=t.vision_intermediate or 2 * t.vision_hidden, tie_word_embeddings=tie,
                   grid_pinpoints=pinpoints, **{n: getattr(t, n) for n in names})

    @classmethod
    def from_hf_config(cls, c: dict) -> "Architecture":
        """From a LlavaForConditionalGeneration / LlavaNextForConditionalGeneration config.json
        (text_config + vision_config), with transformers' defaults for the keys it leaves out."""
        archs = c.get("architectures") or []
        family = next((ARCH_FAMILIES[a] for a in archs if a in ARCH_FAMILIES),
                      "llava_next" if c.get("model_type") == "llava_next" else "llava")
        t = c.get("text_config") or {}
        text_model = t.get("model_type", "llama")
        if text_model not in _TEXT_DEFAULTS:
            raise RecipeError(f"text_config.model_type {text_model!r} is not supported; supported: {sorted(_TEXT_DEFAULTS)}")
        t = {**_TEXT_DEFAULTS[text_model], **t}
        v = c.get("vision_config") or _LLAVA_VISION
        vision_type = v.get("model_type", "clip_vision_model")
        if vision_type not in _VISION_DEFAULTS:
            raise RecipeError(f"vision_config.model_type {vision_type!r} is not supported; supported: {sorted(_VISION_DEFAULTS)}")
        vision_model, defaults = _VISION_DEFAULTS[vision_type]
        v = {**defaults, **v}
        if v.get("use_swiglu_ffn"):
            raise RecipeError("vision_config.use_swiglu_ffn: DINOv2 with a SwiGLU MLP is not supported")
        window = t.get("sliding_window") if t.get("use_sliding_window", True) else None
        types = t.get("layer_types")
        if window is None:
            window_layers = None
        elif types:
            window_layers = sum(x == "sliding_attention" for x in types)
        elif text_model == "qwen2":  # layers from max_window_layers on
            window_layers = max(0, t["num_hidden_layers"] - t.get("max_window_layers", 28))
        else:
            window_layers = None
        if family == "llava":
            tie = bool(c.get("tie_word_embeddings") or t.get("tie_word_embeddings", False))
        else:
            tie = bool(c.get("tie_word_embeddings", False))
        pinpoints = c.get("image_grid_pinpoints") if family == "llava_next" else None
        return cls(
            text_hidden=t["hidden_size"], text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
            text_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            text_intermediate=t["intermediate_size"], vocab_size=t["vocab_size"],
            context_length=t["max_position_embeddings"], image_size=v["image_size"],
            patch_size=v["patch_size"], vision_hidden=v["hidden_size"], vision_layers=v["num_hidden_layers"],
            vision_heads=v["num_attention_heads"],
            vision_intermediate=v["intermediate_size"] if "intermediate_size" in v else int(v["hidden_size"] * v["mlp_ratio"]),
            vision_feature_layer=c.get("vision_feature_layer", -2),
            vision_feature_select_strategy=c.get("vision_feature_select_strategy", "default"),
            tie_word_embeddings=tie, family=family, text_model=text_model, vision_model=vision_model,
            head_dim=t.get("head_dim"), sliding_window=window if window_layers != 0 else None,
            sliding_window_layers=window_layers if window_layers != 0 else None,
            vision_registers=v.get("num_register_tokens", 0) if vision_model == "dinov2" else 0,
            projector_bias=bool(c.get("multimodal_projector_bias", True)),
            grid_pinpoints=tuple(tuple(p) for p in pinpoints) if pinpoints else None,
        )


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    dtype: str = "fp16"
    hf_id: str | None = None
    random_init: TinyConfig | None = None
    checkpoint: str | None = None  # an HF directory shipped with vlmdeploy, relative to the repository root
    architecture: Architecture | None = None  # sizes, for `vlmdeploy plan` without the weights

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise RecipeError(f"recipe {self.name}: dtype {self.dtype!r} not one of {DTYPES}")
        sources = [s for s in (self.hf_id, self.random_init, self.checkpoint) if s is not None]
        if len(sources) != 1:
            raise RecipeError(f"recipe {self.name}: give exactly one of hf_id, random_init or checkpoint")


def _from_mapping(cls, d: dict, where: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise RecipeError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    return cls(**d)


def recipe_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("vlmdeploy.configs").iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> Recipe:
    path = resources.files("vlmdeploy.configs") / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(
            f"unknown model {name!r}: not a recipe ({', '.join(recipe_names())}) and not a directory"
        )
    d = yaml.safe_load(path.read_text()) or {}
    if "random_init" in d:
        d["random_init"] = _from_mapping(TinyConfig, d["random_init"] or {}, f"configs/{name}.yaml random_init")
    if "architecture" in d:
        d["architecture"] = _architecture(d["architecture"] or {}, f"configs/{name}.yaml architecture")
    return _from_mapping(Recipe, d, f"configs/{name}.yaml")


def _architecture(d: dict, where: str) -> Architecture:
    required = [f.name for f in dataclasses.fields(Architecture) if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise RecipeError(f"{where}: missing keys {missing}")
    return _from_mapping(Architecture, d, where)


def repository_root() -> Path:
    """Where `checkpoint:` paths are resolved: the directory that holds configs/ (the repository
    root in a clone or an editable install)."""
    return Path(str(resources.files("vlmdeploy.configs"))).parent


def find_weights(recipe: Recipe) -> Path:
    """The checkpoint directory of a recipe with weights (checkpoint or hf_id); never downloads."""
    if recipe.checkpoint is None:
        return find_hf_weights(recipe.hf_id)
    path = repository_root() / recipe.checkpoint
    if not (path / "config.json").is_file():
        raise RecipeError(
            f"recipe {recipe.name}: checkpoint {path} is missing (it ships in the vlmdeploy repository under "
            f"{recipe.checkpoint}; use a git clone with an editable install, or re-create it with "
            f"`make train-{recipe.name}`)"
        )
    return path


def find_hf_weights(hf_id: str) -> Path:
    """A checkpoint from the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(hf_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        raise RecipeError(
            f"weights for {hf_id} are not on this machine (looked in the Hugging Face cache; vlmdeploy "
            f"never downloads). Either download them first, e.g. `hf download {hf_id}`, or pass a local "
            f"checkpoint directory: `vlmdeploy export --model /path/to/checkpoint ...` "
            f"(make export MODEL_PATH=/path/to/checkpoint)."
        ) from e
