"""Answers and scorecards of the shapes demo: what PyTorch (demo/train.py) and the runtime
(demo/evaluate.py) both fill, so their rows compare. No torch, no runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

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
