"""Exact-match accuracy on the held-out shapes questions, through the torch-free runtime.

    card = evaluate_artifact("artifacts/shapes", n=500)   # VLM.generate_batch, greedy
    print(card.table())                                    # overall and per question kind

The PyTorch side (`demo.train.evaluate_torch`) fills the same `Scorecard`, so rows compare.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import shapes

# What the shapes model's chat template renders for one question and one picture: the question comes
# BEFORE the picture (LLaVA-1.5's training data has both orders), so every visual token can see
# what is asked; see demo/train.py.
PROMPT = "USER: {question}\n<image> ASSISTANT:"
MAX_NEW_TOKENS = 32  # the longest caption is 23 words + EOS


@dataclass(frozen=True)
class Answer:
    example: shapes.Example
    text: str
    token_ids: tuple[int, ...]

    @property
    def correct(self) -> bool:
        return shapes.normalize_answer(self.text) == shapes.normalize_answer(self.example.answer)


@dataclass
class Scorecard:
    name: str  # the artifact directory or checkpoint
    variant: str  # "pytorch fp32", "fp32", "fp16", "fp32 + int8 decoder"
    answers: list[Answer] = field(default_factory=list)
    reference: "Scorecard | None" = None  # the row whose tokens this one is compared with

    @property
    def label(self) -> str:
        label = f"{self.name} ({self.variant})"
        if self.reference is not None:
            label += f" [{self.same_tokens}/{len(self.answers)} = {self.reference.variant}]"
        return label

    @property
    def same_tokens(self) -> int:
        """Answers whose tokens equal the reference row's."""
        return sum(a.token_ids == b.token_ids for a, b in zip(self.answers, self.reference.answers))

    def extend(self, answers: list[Answer]) -> None:
        self.answers.extend(answers)

    @property
    def accuracy(self) -> float:
        return sum(a.correct for a in self.answers) / max(1, len(self.answers))

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (correct, total), in `shapes.QUESTION_KINDS` order."""
        out = {}
        for kind in shapes.QUESTION_KINDS:
            rows = [a for a in self.answers if a.example.kind == kind]
            if rows:
                out[kind] = (sum(a.correct for a in rows), len(rows))
        return out

    def summary(self) -> dict:
        out = {
            "name": self.name, "variant": self.variant, "n": len(self.answers), "accuracy": round(self.accuracy, 4),
            "by_kind": {k: round(c / t, 4) for k, (c, t) in self.by_kind().items()},
        }
        if self.reference is not None:
            out["same_tokens_as"] = {"variant": self.reference.variant, "answers": self.same_tokens}
        return out

    def table(self) -> str:
        return table([self])


def table(cards: list[Scorecard]) -> str:
    """One row per model: overall exact match and per question kind (percent)."""
    kinds = [k for k in shapes.QUESTION_KINDS if any(k in c.by_kind() for c in cards)]
    width = max([len("model")] + [len(c.label) for c in cards])
    head = f"{'model':<{width}}  {'n':>5}  {'exact':>6}  " + "  ".join(f"{k:>10}" for k in kinds)
    lines = [head, "-" * len(head)]
    for c in cards:
        per = c.by_kind()
        cells = [f"{100 * per[k][0] / per[k][1]:9.1f}%" if k in per else f"{'-':>10}" for k in kinds]
        lines.append(f"{c.label:<{width}}  {len(c.answers):>5}  {100 * c.accuracy:5.1f}%  " + "  ".join(cells))
    return "\n".join(lines)


def variant_name(manifest) -> str:
    """`fp32` / `fp16`, plus the quantization the manifest records (e.g. `fp32 + int8 decoder`)."""
    source = manifest.source or {}
    dtype = str(source.get("dtype") or {"float32": "fp32", "float16": "fp16"}[manifest.model.dims.dtype])
    quant = source.get("quantization")
    if isinstance(quant, dict):
        quant = quant.get("scheme") or quant.get("bits")
    return f"{dtype} + {quant} decoder" if quant else dtype


def evaluate_artifact(directory: str | Path, n: int, batch: int = 32, threads: int | None = None, vlm=None) -> Scorecard:
    """Greedy answers of the exported model in `directory` to the first `n` held-out questions."""
    from vlmdeploy.runtime.vlm import VLM

    vlm = vlm or VLM.load(directory, threads=threads)
    card = Scorecard(Path(directory).name, variant_name(vlm.manifest))
    examples = list(shapes.examples("heldout", n))
    for i in range(0, n, batch):
        chunk = examples[i : i + batch]
        results = vlm.generate_batch(
            [PROMPT.format(question=ex.question) for ex in chunk], [[ex.image] for ex in chunk],
            max_new_tokens=MAX_NEW_TOKENS,
        )
        card.extend([Answer(ex, r.text, tuple(r.token_ids)) for ex, r in zip(chunk, results)])
    return card


def eval_command(dirs: list[str], torch_checkpoint: str | None, n: int, threads: int | None, as_json: bool) -> int:
    """`vlmdeploy eval`: one row per exported directory (and the PyTorch checkpoint, if given)."""
    if not dirs and not torch_checkpoint:
        raise ValueError("give at least one artifact directory, or --torch CHECKPOINT")
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    cards = [evaluate_torch_checkpoint(torch_checkpoint, n, threads)] if torch_checkpoint else []
    cards += [evaluate_artifact(d, n, threads=threads) for d in dirs]
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
