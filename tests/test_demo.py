"""The shapes demo: the dataset (deterministic, disjoint splits, well-posed questions), the shipped
model (a real HF checkpoint, exported through `vlmdeploy export --model shapes`, >= 90% exact match
on held-out questions through the torch-free runtime, fp32 export == PyTorch token for token), and
the `eval` / `demo` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from vlmdeploy.demo import shapes
from vlmdeploy.demo.evaluate import evaluate_artifact
from vlmdeploy.export import recipes
from vlmdeploy.export.recipes import RecipeError, find_weights, load_recipe
from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.text import TextProcessor

SHIPPED = recipes.repository_root() / "models" / "shapes"
SAMPLE = 50  # held-out questions checked through the runtime (about 2 s)


# ---------------------------------------------------------------------------------------------
# Dataset


def test_examples_are_deterministic():
    a = [shapes.example(split, i) for split in ("train", "heldout") for i in range(20)]
    b = [shapes.example(split, i) for split in ("train", "heldout") for i in range(20)]
    assert [(x.digest, x.qa, x.pick) for x in a] == [(x.digest, x.qa, x.pick) for x in b]
    code = "from vlmdeploy.demo import shapes; print([shapes.example('heldout', i).digest for i in range(5)])"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other_process.strip() == str([x.digest for x in a[20:25]])


def test_splits_never_share_an_image():
    train = {shapes.example("train", i).digest for i in range(1500)}
    heldout = [shapes.example("heldout", i) for i in range(300)]
    assert len(train) > 1490 and len({x.digest for x in heldout}) == 300
    assert not train & {x.digest for x in heldout}
    # by construction: the pixel hash decides the split, and the seed streams differ
    assert all(shapes.is_heldout_image(x.image) for x in heldout)
    assert not any(shapes.is_heldout_image(shapes.example("train", i).image) for i in range(200))
    assert all(x.seed[0] == shapes.SPLITS["heldout"] for x in heldout)
    demo = shapes.random_example(12345)
    assert shapes.is_heldout_image(demo.image) and demo.digest not in train


def test_questions_have_exactly_one_right_answer():
    kinds = Counter()
    for i in range(300):
        ex = shapes.example("train", i)
        kinds[ex.kind] += 1
        assert 1 <= len(ex.shapes) <= 3 and ex.image.size == (shapes.IMAGE_SIZE,) * 2
        assert len({(s.row, s.col) for s in ex.shapes}) == len(ex.shapes)  # one shape per cell
        assert len({(s.kind, s.color) for s in ex.shapes}) == len(ex.shapes)
        for qa in ex.qa:
            words = qa.question.rstrip("?.").split()
            if qa.kind == "count":
                assert qa.answer == shapes.NUMBERS[len(ex.shapes)]
            elif qa.kind == "color":
                (s,) = [s for s in ex.shapes if s.kind == words[-1]]
                assert qa.answer == s.color
            elif qa.kind == "shape":
                (s,) = [s for s in ex.shapes if s.color == words[-2]]
                assert qa.answer == s.kind
            elif qa.kind == "where":
                (s,) = [s for s in ex.shapes if (s.color, s.kind) == (words[-2], words[-1])]
                assert qa.answer == s.position
        assert ex.qa[ex.pick].kind == ex.kind
    assert set(kinds) == set(shapes.QUESTION_KINDS)  # every kind gets asked


# ---------------------------------------------------------------------------------------------
# The shipped checkpoint


def test_shipped_checkpoint_is_a_standard_hf_directory():
    names = {p.name for p in SHIPPED.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja"} <= names
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) <= 25 * 2**20
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert json.loads((SHIPPED / "generation_config.json").read_text())["eos_token_id"] == 2
    assert find_weights(load_recipe("shapes")) == SHIPPED


def test_tokenizer_knows_every_word_of_the_dataset():
    text = TextProcessor.from_files(SHIPPED / "tokenizer.json", SHIPPED / "tokenizer_config.json")
    unk = text.token_to_id("<unk>")
    for i in range(200):
        ex = shapes.example("heldout", i)
        for qa in ex.qa:
            ids = text.encode(f"USER: <image>\n{qa.question} ASSISTANT: {qa.answer}")
            assert unk not in ids, qa
            assert ids[0] == text.token_to_id("<s>")  # BOS from the post-processor


def test_missing_checkpoint_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(recipes, "repository_root", lambda: tmp_path)
    with pytest.raises(RecipeError, match=r"checkpoint .*models/shapes is missing.*make train-shapes"):
        find_weights(load_recipe("shapes"))


# ---------------------------------------------------------------------------------------------
# Exported and run through the runtime


@pytest.fixture(scope="session")
def shapes_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "artifact"
    assert main(["export", "--model", "shapes", "--out", str(out)]) == 0  # what `make demo` runs
    return out


@pytest.fixture(scope="session")
def runtime_card(shapes_artifact):
    return evaluate_artifact(shapes_artifact, SAMPLE)


def test_exported_model_answers_held_out_questions(runtime_card):
    wrong = [(a.example.question, a.text, a.example.answer) for a in runtime_card.answers if not a.correct]
    assert runtime_card.accuracy >= 0.9, wrong


def test_chat_template_renders_the_evaluated_prompt(shapes_artifact):
    from vlmdeploy.demo.evaluate import PROMPT
    from vlmdeploy.runtime.vlm import VLM

    vlm = VLM.load(shapes_artifact)
    messages = [{"role": "user", "content": [{"type": "image", "image": shapes.example("heldout", 0).image},
                                             {"type": "text", "text": "What color is the star?"}]}]
    prompt, images = vlm.render_chat(messages)
    assert prompt == PROMPT.format(question="What color is the star?") and len(images) == 1


def test_fp32_export_answers_equal_pytorch(runtime_card):
    from vlmdeploy.demo.train import evaluate_torch

    torch_card = evaluate_torch(SHIPPED, SAMPLE)
    assert [a.token_ids for a in runtime_card.answers] == [a.token_ids for a in torch_card.answers]
    assert [a.text for a in runtime_card.answers] == [a.text for a in torch_card.answers]


def test_plan_of_the_export_matches_its_files(shapes_artifact):
    from vlmdeploy.export.plan import plan_artifact, plan_model

    exported, from_config = plan_artifact(shapes_artifact), plan_model("shapes")
    files = {p.name: p.stat().st_size for p in shapes_artifact.iterdir()}
    assert exported.get("vision encoder").nbytes == sum(n for f, n in files.items() if f.startswith("vision.onnx"))
    for row in ("LLM weights", "vision encoder", "projector"):  # parameters x 4 bytes, plus graph structure
        assert from_config.get(row).nbytes <= exported.get(row).nbytes < 1.1 * from_config.get(row).nbytes + 100_000


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_eval(shapes_artifact, capsys):
    assert main(["eval", str(shapes_artifact), "--n", "6", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["n"] == 6 and 0 <= row["accuracy"] <= 1 and row["variant"] == "fp32"
    assert main(["eval", str(shapes_artifact), "--torch", "shapes", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "shapes (pytorch fp32)" in out and "(fp32) [4/4 = pytorch fp32]" in out


def test_cli_demo_prints_question_answer_and_truth(shapes_artifact, capsys, tmp_path):
    assert main(["demo", str(shapes_artifact), "--seed", "7", "--save", str(tmp_path / "pic.png")]) == 0
    out = capsys.readouterr().out
    ex = shapes.random_example(7)
    assert f"truth     {ex.caption}" in out
    assert ex.question in out and "model" in out
    assert (tmp_path / "pic.png").is_file()
    assert main(["demo", str(shapes_artifact), "--question", "How many shapes are there?"]) == 0
    assert "How many shapes are there?" in capsys.readouterr().out


def test_eval_plan_and_demo_never_import_torch(shapes_artifact):
    code = (
        "import sys, json; from vlmdeploy.runtime.cli import main\n"
        f"d = {str(shapes_artifact)!r}\n"
        "rc = [main(['eval', d, '--n', '3']), main(['plan', d]), main(['plan', '--model', 'llava']),"
        " main(['demo', d, '--seed', '1'])]\n"
        "print(json.dumps({'rc': rc, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1]) == {"rc": [0, 0, 0, 0], "heavy": []}


def test_cli_eval_errors(capsys, tmp_path):
    assert main(["eval"]) == 2
    assert "give at least one artifact directory" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "no such artifact directory" in capsys.readouterr().err


def test_shapes_hd_is_shipped_with_144_visual_tokens():
    """models/shapes-hd: the same scenes at 168 px, 14 px patches (12x12 tokens), <= 25 MB, found by its recipe."""
    path = find_weights(load_recipe("shapes-hd"))
    config = json.loads((path / "config.json").read_text())["vision_config"]
    assert (config["image_size"] // config["patch_size"]) ** 2 == 144
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20
    small, large = shapes.example("heldout", 3), shapes.example("heldout", 3, size=168)
    assert large.image.size == (168, 168) and (large.shapes, large.question) == (small.shapes, small.question)
    with pytest.raises(ValueError, match=r"allowed sizes are >= 84 px"):
        shapes.example("train", 0, size=42)
