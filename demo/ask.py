"""`vlmdeploy demo DIR`: draw a fresh shapes picture, ask the exported model about it through the
torch-free runtime, and print each question, the model's answer and the picture's truth.

    picture  artifacts/shapes-demo.png  (seed 4711; never a training picture)
    truth    a red circle at the top left and a blue star at the center
    question                         model        truth
    What color is the star?          blue         blue       ok
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import shapes
from .evaluate import MAX_NEW_TOKENS, PROMPT


def pick_questions(ex: shapes.Example, count: int, seed: int) -> list[shapes.QA]:
    """Up to `count` questions of different kinds (the example's own pick first)."""
    rng = np.random.default_rng(seed)
    chosen, kinds = [ex.qa[ex.pick]], {ex.kind}
    for i in rng.permutation(len(ex.qa)):
        qa = ex.qa[int(i)]
        if len(chosen) < count and qa.kind not in kinds:
            chosen.append(qa)
            kinds.add(qa.kind)
    return chosen


def demo_command(directory: str, seed: int | None, count: int, save: str | None, question: str | None,
                 threads: int | None = None) -> int:
    from vlmdeploy.runtime.vlm import VLM

    if count < 1:
        raise ValueError(f"--questions must be >= 1, got {count}")
    vlm = VLM.load(directory, threads=threads)
    ex = shapes.random_example(seed)
    asked = [shapes.QA("yours", question, "")] if question else pick_questions(ex, count, ex.index)
    results = vlm.generate_batch(
        [PROMPT.format(question=q.question) for q in asked], [[ex.image]] * len(asked), max_new_tokens=MAX_NEW_TOKENS
    )
    where = "(not saved)"
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        ex.image.save(save)
        where = save
    print(f"picture   {where}  ({shapes.IMAGE_SIZE}x{shapes.IMAGE_SIZE}, seed {ex.index}; never a training picture)")
    print(f"truth     {ex.caption}")
    width = max(len("question"), *(len(q.question) for q in asked))
    answer_width = max(len("model"), *(len(r.text.strip()) for r in results))
    print(f"\n{'question':<{width}}  {'model':<{answer_width}}  truth")
    for q, r in zip(asked, results):
        if q.kind == "yours":
            print(f"{q.question:<{width}}  {r.text.strip()}")
            continue
        verdict = "ok" if shapes.normalize_answer(r.text) == shapes.normalize_answer(q.answer) else "WRONG"
        print(f"{q.question:<{width}}  {r.text.strip():<{answer_width}}  {q.answer:<{max(5, len(q.answer))}}  {verdict}")
    return 0
