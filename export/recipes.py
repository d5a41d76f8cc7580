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
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None  # llava_next; default: 1x2, 2x1, 2x2 tiles

    def __post_init__(self):
        allowed = {"family": ("llava", "llava_next"), "text_model": ("llama", "mistral", "qwen2", "gemma", "phi3"),
                   "vision_model": ("clip", "siglip", "dinov2")}
        for name, options in allowed.items():
            if getattr(self, name) not in options:
                raise RecipeError(f"random_init.{name}: {getattr(self, name)!r} not one of {list(options)}")


@dataclass(frozen=True)
class Architecture:
    """The sizes of a LLaVA-1.5-style model (Llama + CLIP ViT + 2-layer MLP projector): what
    `vlmdeploy plan` needs for a recipe whose weights are not on this machine. Same names as
    TinyConfig; values as in the checkpoint's config.json."""

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

    @classmethod
    def from_tiny(cls, t: TinyConfig) -> "Architecture":
        names = {f.name for f in dataclasses.fields(cls)} - {"vision_intermediate", "tie_word_embeddings"}
        return cls(vision_intermediate=t.vision_intermediate or 2 * t.vision_hidden, **{n: getattr(t, n) for n in names})

    @classmethod
    def from_hf_config(cls, c: dict) -> "Architecture":
        """From a LlavaForConditionalGeneration config.json (text_config + vision_config)."""
        t, v = c.get("text_config", {}), c.get("vision_config", {})
        return cls(
            text_hidden=t["hidden_size"], text_layers=t["num_hidden_layers"], text_heads=t["num_attention_heads"],
            text_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            text_intermediate=t["intermediate_size"], vocab_size=t["vocab_size"],
            context_length=t.get("max_position_embeddings", 4096), image_size=v["image_size"],
            patch_size=v["patch_size"], vision_hidden=v["hidden_size"], vision_layers=v["num_hidden_layers"],
            vision_heads=v["num_attention_heads"], vision_intermediate=v["intermediate_size"],
            vision_feature_layer=c.get("vision_feature_layer", -2),
            vision_feature_select_strategy=c.get("vision_feature_select_strategy", "default"),
            tie_word_embeddings=bool(t.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
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
            "`make train-shapes`)"
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
