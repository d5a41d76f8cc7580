"""A seeded random-weight checkpoint with a real model's shapes, written shard by shard (`make bigckpt`).

    recipe architecture (configs/llava.yaml: LLaVA-1.5-7B; llava-13b) -> LlavaConfig
      -> the model built on the meta device: every tensor's name, shape and dtype, no memory
      -> one tensor at a time: N(0, 0.02) from a generator seeded by (seed, name), cast to fp16
      -> safetensors shards of at most `shard_bytes`, `model.safetensors.index.json`, config,
         tokenizer and processor files: a directory `vlmdeploy export` and transformers read as a checkpoint

Peak memory is one shard plus one tensor, whatever the model's size (the exporter's memory is what
issue 14 measures, not this generator's). The tokenizer is the tiny test tokenizer (its ids are a
subset of the model's vocabulary); weights are noise, so answers are too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .recipes import RecipeError, TinyConfig, load_recipe

DTYPES = {"fp16": np.float16, "fp32": np.float32}
INIT_STD = 0.02


def tiny_config_for(recipe: str) -> TinyConfig:
    """The recipe's architecture (its sizes) as the tiny builder's config."""
    r = load_recipe(recipe)
    if r.architecture is None:
        raise RecipeError(f"recipe {recipe!r} has no architecture sizes; bigckpt needs one (e.g. llava, llava-13b)")
    a = r.architecture
    names = {f.name for f in dataclasses.fields(TinyConfig)}
    return TinyConfig(**{k: v for k, v in dataclasses.asdict(a).items() if k in names and v is not None})


def tensor_specs(cfg: TinyConfig) -> tuple[object, list[tuple[str, tuple[int, ...]]]]:
    """(HF config, [(state-dict name, shape)]) from a model built on the meta device (no memory)."""
    import torch
    import transformers

    from .tiny import build_tiny_tokenizer, vlm_config

    tokenizer = build_tiny_tokenizer(256)
    config = vlm_config(cfg, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id)
    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(config)
    return config, [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype) -> np.ndarray:
    """N(0, INIT_STD) for weights, ones for norm weights, zeros for biases; seeded by (seed, name) so a
    tensor does not depend on which others were written before it."""
    if name.endswith(".bias"):
        return np.zeros(shape, dtype)
    if "norm" in name and len(shape) == 1:
        return np.ones(shape, dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    return (rng.standard_normal(shape, dtype=np.float32) * INIT_STD).astype(dtype)


def shards(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> Iterator[list]:
    """Groups of (name, shape), each at most shard_bytes (a bigger tensor is a shard of its own)."""
    group, size = [], 0
    for name, shape in specs:
        nbytes = int(np.prod(shape)) * itemsize
        if group and size + nbytes > shard_bytes:
            yield group
            group, size = [], 0
        group.append((name, shape))
        size += nbytes
    if group:
        yield group


def write_checkpoint(recipe: str, out: Path, seed: int = 0, dtype: str = "fp16", shard_bytes: int = 1 << 30,
                     log: Callable[[str], None] = print, cfg: TinyConfig | None = None) -> dict:
    """Write the checkpoint into `out` (created; must not exist). Returns the index's metadata."""
    from safetensors.numpy import save_file

    from .tiny import tiny_processor, build_tiny_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} not one of {sorted(DTYPES)}")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; bigckpt writes a new directory")
    cfg = cfg or tiny_config_for(recipe)
    config, specs = tensor_specs(cfg)
    np_dtype = DTYPES[dtype]
    groups = list(shards(specs, np.dtype(np_dtype).itemsize, shard_bytes))
    tmp = out.with_name(f".{out.name}.partial")
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, seed, np_dtype) for name, shape in group}  # one shard at a time
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        log(f"[bigckpt] {file}: {len(tensors)} tensors, {sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB")
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.torch_dtype = "float16" if dtype == "fp16" else "float32"
    config.architectures = ["LlavaForConditionalGeneration"]
    config.save_pretrained(tmp)
    tokenizer = build_tiny_tokenizer(256)
    tiny_processor(cfg, tokenizer).save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": tokenizer.pad_token_id}))
    tmp.rename(out)
    log(f"[bigckpt] {out}: {len(specs)} tensors, {total / 1e9:.2f} GB {dtype} in {len(groups)} shards")
    return index["metadata"]


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vlmdeploy.export.bigckpt", description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="llava", help="a recipe with architecture sizes: llava (7B), llava-13b")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--shard-gb", type=float, default=1.0)
    a = p.parse_args(argv)
    write_checkpoint(a.recipe, Path(a.out), a.seed, a.dtype, int(a.shard_gb * 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
