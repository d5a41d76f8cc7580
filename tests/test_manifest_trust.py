"""An artifact opens only files inside it that its manifest lists (so checksums), and `vlmdeploy
check` fails a manifest that would fail at run time (issue: reliability, items 7 and 8)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from vlmdeploy.runtime.check import check_artifact
from vlmdeploy.runtime.manifest import ArtifactError, describe_files
from vlmdeploy.runtime.vlm import VLM


@pytest.fixture
def art(tiny, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(tiny.artifact, out)
    return out


def _edit(art, fn):
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _point_graph_at(art, path: str):
    def fn(m):
        m["graphs"]["projector"]["file"] = path
        m["files"][path] = m["files"]["projector.onnx"]
    _edit(art, fn)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_paths_leading_outside_the_artifact_are_refused(art, tmp_path, where):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(art / "projector.onnx", outside / "projector.onnx")
    if where == "absolute":
        path = str(outside / "projector.onnx")
    elif where == "dotdot":
        path = "../elsewhere/projector.onnx"
    else:
        (art / "link.onnx").symlink_to(outside / "projector.onnx")
        path = "link.onnx"
    _point_graph_at(art, path)
    with pytest.raises(ArtifactError, match="leads outside the artifact"):
        VLM.load(art)
    report = check_artifact(art)
    assert not report.passed and "leads outside the artifact" in report.failed[0]


def test_tokenizer_and_template_must_be_listed(art):
    _edit(art, lambda m: m["files"].pop("chat_template.jinja"))
    with pytest.raises(ArtifactError, match="chat_template_file 'chat_template.jinja' is not listed in 'files'"):
        VLM.load(art)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["model"]["media"]["image"].update(token_id=10**6), "token_id 1000000 is outside the vocabulary"),
    (lambda m: m["model"].update(context_length=-5), "context_length must be >= 2"),
    (lambda m: m["model"]["media"]["image"].update(typical_tokens=0), "typical_tokens must be an int >= 1"),
    (lambda m: m["model"]["dims"].update(dtype="garbage"), "dtype 'garbage'"),
    (lambda m: m.update(files={}), "which 'files' does not list"),
    (lambda m: m["model"]["pipeline"].update(image=["vision_missing", "projector"]), "pipeline names graph 'vision_missing'"),
    (lambda m: m["model"].update(eos_token_ids=[10**6]), r"eos_token_ids \[1000000\] are outside the vocabulary"),
])
def test_meaningless_manifests_fail_load_and_check(art, edit, message):
    _edit(art, edit)
    with pytest.raises(ArtifactError, match=message):
        VLM.load(art)
    report = check_artifact(art)
    assert not report.passed and any(message.split(" ")[0].strip("r\\") in line for line in report.failed)


@pytest.mark.parametrize("what, edit, message", [
    ("family", lambda art, m: m["preprocess"].update(image_std=[0.0, 0.5, 0.5]), "model family: ValueError"),
    ("template", lambda art, m: (art / "chat_template.jinja").write_text("{% for %}"), "chat template: TemplateSyntaxError"),
    ("tokenizer", lambda art, m: m["model"]["media"]["image"].update(token_id=3), "media 'image': the tokenizer gives"),
])
def test_check_fails_what_run_would_fail(art, what, edit, message):
    def fn(m):
        edit(art, m)
        m["files"].update(describe_files(art, ["chat_template.jinja"]))
    _edit(art, fn)
    report = check_artifact(art)
    assert not report.passed and any(message in line for line in report.failed), report.failed


def test_unlisted_external_data_fails_check(art):
    """A graph whose weights file is not in 'files' (ONNX Runtime would read it without a checksum)."""
    import onnx

    model = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    (art / "decoder.onnx.data").rename(art / "other.data")
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "other.data"
    onnx.save(model, str(art / "decoder.onnx"))

    def fn(m):
        m["files"].pop("decoder.onnx.data")
        m["files"].update(describe_files(art, ["decoder.onnx"]))
    _edit(art, fn)
    report = check_artifact(art)
    assert any("external data" in line and "'other.data'" in line for line in report.failed), report.failed


def test_run_time_errors_are_one_line_artifact_errors(art):
    (art / "chat_template.jinja").write_text("{% for %}")
    _edit(art, lambda m: m["files"].update(describe_files(art, ["chat_template.jinja"])))
    vlm = VLM.load(art)
    with pytest.raises(ArtifactError, match="the chat template does not compile"):
        vlm.chat([{"role": "user", "content": "hi"}])
    _edit(art, lambda m: m["preprocess"].update(image_std=[0.0, 0.5, 0.5]))
    with pytest.raises(ArtifactError, match="the llava family cannot use this manifest's preprocess"):
        VLM.load(art)


def test_wrong_tokens_per_image_fails_check_and_run(art):
    _edit(art, lambda m: m["model"]["family_params"].update(tokens_per_image=17))  # the vision graph gives 16
    report = check_artifact(art)
    assert any(line.startswith("media:") and "gave 16 embeddings but its prompt holds 17 tokens" in line
               for line in report.failed), report.failed
    with pytest.raises(ArtifactError, match="gave 16 embeddings but its prompt holds 17 tokens"):
        VLM.load(art).generate("<image>", [Image.new("RGB", (20, 20))], max_new_tokens=1)


def test_asking_for_a_graph_that_is_not_a_decoder(tiny):
    with pytest.raises(ArtifactError, match=r"has no decoder graph 'vision'; its decoders are \['decoder_gqa', 'decoder'\]"):
        VLM.load(tiny.artifact, decoder="vision")
