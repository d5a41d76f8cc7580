"""Exact-match accuracy on the held-out shapes questions, through the torch-free runtime.

    card = evaluate_artifact("artifacts/shapes", n=500)   # VLM.generate_batch, greedy
    print(card.table())                                    # overall and per question kind

The PyTorch side (`demo.train.evaluate_torch`) fills the same `Scorecard`, so rows compare.
"""

from __future__ import annotations

from pathlib import Path

from . import shapes

from .scorecard import MAX_NEW_TOKENS, PROMPT, Answer, Scorecard, table  # noqa: F401 (re-exported)


def variant_name(manifest) -> str:
    """`fp32` / `fp16`, plus the quantization the manifest records (e.g. `fp32 + int8 decoder`,
    `fp32 + int8 vision/prefill`)."""
    source = manifest.source or {}
    dtype = str(source.get("dtype") or {"float32": "fp32", "float16": "fp16"}[manifest.model.dims.dtype])
    quant = source.get("quantization")
    if isinstance(quant, dict):
        quant = quant.get("scheme") or quant.get("bits")
    parts = [dtype, *([f"{quant} decoder"] if quant else [])]
    computed = source.get("int8_compute")
    if isinstance(computed, dict) and computed:
        parts.append("int8 " + "/".join(sorted(computed, reverse=True)))  # vision/prefill
    return " + ".join(parts)


def evaluate_artifact(directory: str | Path, n: int, batch: int = 32, threads: int | None = None, vlm=None,
                      compression: dict | None = None) -> Scorecard:
    """Greedy answers of the exported model in `directory` to the first `n` held-out questions, the
    pictures drawn at the model's input size (shapes: 84 px, shapes-hd: 168). `compression`:
    VLM.load's visual_tokens / compression."""
    from vlmdeploy.runtime.vlm import VLM

    vlm = vlm or VLM.load(directory, threads=threads, **(compression or {}))
    variant = variant_name(vlm.manifest)
    if vlm.family.compression is not None:
        variant += f", {vlm.family.compression.label()}"
    card = Scorecard(Path(directory).name, variant)
    examples = list(shapes.examples("heldout", n, size=picture_size(vlm)))
    for i in range(0, n, batch):
        chunk = examples[i : i + batch]
        results = vlm.generate_batch(
            [PROMPT.format(question=ex.question) for ex in chunk], [[ex.image] for ex in chunk],
            max_new_tokens=MAX_NEW_TOKENS,
        )
        card.extend([Answer(ex, r.text, tuple(r.token_ids)) for ex, r in zip(chunk, results)])
    return card


def picture_size(vlm) -> int:
    """The side of the pictures the model takes (its vision input), at least the generator's 84 px."""
    return max(shapes.IMAGE_SIZE, min(vlm.facts.dims.image_size))


def eval_command(dirs: list[str], torch_checkpoint: str | None, n: int, threads: int | None, as_json: bool,
                 compression: dict | None = None) -> int:
    """`vlmdeploy eval`: one row per exported directory (and the PyTorch checkpoint, if given)."""
    if not dirs and not torch_checkpoint:
        raise ValueError("give at least one artifact directory, or --torch CHECKPOINT")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    cards = [evaluate_torch_checkpoint(torch_checkpoint, n, threads)] if torch_checkpoint else []
    cards += [evaluate_artifact(d, n, threads=threads, compression=compression) for d in dirs]
    for card in cards[1:]:
        card.reference = cards[0]  # PyTorch when given, else the first directory
    if as_json:
        import json

        print(json.dumps([c.summary() for c in cards]))
    else:
        print(table(cards))
    return 0


def evaluate_torch_checkpoint(checkpoint: str, n: int, threads: int | None) -> Scorecard:
    try:
        from .train import evaluate_torch
    except ImportError as e:
        raise ValueError(
            f"--torch needs torch and transformers ({e.name} is missing); install them with: pip install 'vlmdeploy[export]'"
        ) from None
    from vlmdeploy.export.recipes import find_weights, load_recipe

    path = Path(checkpoint)
    if not path.is_dir():
        path = find_weights(load_recipe(checkpoint))
    card = evaluate_torch(path, n, threads=threads)
    card.name = checkpoint
    return card
