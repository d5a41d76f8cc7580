"""`vlmdeploy demo DIR`: draw a fresh shapes picture, ask the exported model about it through the
torch-free runtime, and print each question, the model's answer and the picture's truth.

    picture   artifacts/shapes-demo.png  (84x84, seed 4711; never a training picture)
    truth     a red circle at the top left and a blue star at the center
    model     a red circle at the top left and a blue star at the center  ok   ('Describe the picture.')

    question                 model  truth
    What color is the star?  blue   blue   ok
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import shapes
from .scorecard import MAX_NEW_TOKENS, PROMPT


def pick_questions(ex: shapes.Example, count: int, seed: int) -> list[shapes.QA]:
    """Up to `count` questions of different kinds other than the caption (the example's pick first)."""
    rng = np.random.default_rng(seed)
    chosen, kinds = [], {"caption"}
    for i in [ex.pick, *rng.permutation(len(ex.qa))]:
        qa = ex.qa[int(i)]
        if len(chosen) < count and qa.kind not in kinds:
            chosen.append(qa)
            kinds.add(qa.kind)
    return chosen


def demo_command(directory: str, seed: int | None, count: int, save: str | None, question: str | None,
                 threads: int | None = None, compression: dict | None = None) -> int:
    from vlmdeploy.runtime.vlm import VLM

    from .evaluate import picture_size

    if count < 1:
        raise ValueError(f"--questions must be >= 1, got {count}")
    vlm = VLM.load(directory, threads=threads, **(compression or {}))
    size = picture_size(vlm)
    ex = shapes.random_example(seed, size)
    describe = next(q for q in ex.qa if q.kind == "caption")
    asked = [describe] + ([shapes.QA("yours", question, "")] if question else pick_questions(ex, count, ex.index))
    results = vlm.generate_batch(
        [PROMPT.format(question=q.question) for q in asked], [[ex.image]] * len(asked), max_new_tokens=MAX_NEW_TOKENS
    )
    answers = [r.text.strip() for r in results]
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        ex.image.save(save)
    print(f"picture   {save or '(not saved; --save PATH)'}  ({size}x{size}, seed {ex.index}; "
          "never a training picture)")
    print(f"truth     {ex.caption}")
    print(f"model     {answers[0]}  {_verdict(answers[0], describe.answer)}   ({describe.question!r})")
    _print_questions(asked[1:], answers[1:])
    return 0


def _verdict(answer: str, truth: str) -> str:
    return "ok" if shapes.normalize_answer(answer) == shapes.normalize_answer(truth) else "WRONG"


def _print_questions(asked: list[shapes.QA], answers: list[str]) -> None:
    qw = max(len("question"), *(len(q.question) for q in asked))
    aw = max(len("model"), *(len(a) for a in answers))
    tw = max(len("truth"), *(len(q.answer) for q in asked))
    print(f"\n{'question':<{qw}}  {'model':<{aw}}  truth")
    for q, a in zip(asked, answers):
        truth = "(see the truth line)" if q.kind == "yours" else f"{q.answer:<{tw}}  {_verdict(a, q.answer)}"
        print(f"{q.question:<{qw}}  {a:<{aw}}  {truth}")
