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


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    dtype: str = "fp16"
    hf_id: str | None = None
    random_init: TinyConfig | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise RecipeError(f"recipe {self.name}: dtype {self.dtype!r} not one of {DTYPES}")
        if (self.hf_id is None) == (self.random_init is None):
            raise RecipeError(f"recipe {self.name}: give exactly one of hf_id or random_init")


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
    return _from_mapping(Recipe, d, f"configs/{name}.yaml")


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
