"""Bad requests, images and settings get one clear error of the project's own types (issue:
reliability, items 5, 6, 9, 10 and the "ugly errors"); each case failed differently before."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import photo
from vlmdeploy.runtime.images import ImageError, load_image
from vlmdeploy.runtime.manifest import ArtifactError
from vlmdeploy.runtime.vlm import VLM, PromptError


@pytest.fixture(scope="module")
def vlm(tiny):
    return VLM.load(tiny.artifact)


@pytest.mark.parametrize("call, message", [
    (lambda v: v.generate_batch("hello world", None), "prompts must be a list of strings"),
    (lambda v: v.generate("hi", ignore_eos="no"), "ignore_eos must be True or False, got 'no'"),
    (lambda v: v.generate("hi", temperature="0.5"), "temperature must be a number >= 0"),
    (lambda v: v.generate("hi", do_sample=True), r"unknown sampling argument\(s\) \['do_sample'\] \(sampling is on when temperature > 0\)"),
    (lambda v: v.generate("hi", seed=-1), "seed must be an int >= 0 or None, got -1"),
    (lambda v: v.generate("hi", stop=5), "stop must be a string or a list"),
    (lambda v: v.generate("caf\udce9"), "prompt is not valid text: surrogates not allowed"),
    (lambda v: v.chat([{"role": "user", "content": ["hello"]}]), "each content item must be a dict with a 'type'"),
    (lambda v: v.generate("<image>", images=photo()), "images must be a list"),
])
def test_bad_requests_are_one_line_prompt_errors(vlm, call, message):
    with pytest.raises(PromptError, match=message) as e:
        call(vlm)
    assert "\n" not in str(e.value)


def test_images_none_is_no_images(vlm):
    assert vlm.generate("hi", images=None, max_new_tokens=2, ignore_eos=True).token_ids


@pytest.mark.parametrize("threads", [1000, -3, 0, 2.5, True])
def test_threads_out_of_range_are_refused_before_loading(tiny, threads):
    with pytest.raises(ValueError, match="threads must be an int from 1 to"):
        VLM.load(tiny.artifact, threads=threads)


def test_cli_threads_exit_code(tiny, capsys):
    from vlmdeploy.runtime.cli import main

    assert main(["run", str(tiny.artifact), "--prompt", "hi", "--threads", "100000"]) != 0
    assert "threads must be an int from 1 to" in capsys.readouterr().err


def test_eos_token_ids_must_be_ints(tiny, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny.artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["model"]["eos_token_ids"] = "2"
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="eos_token_ids must be a list of token ids"):
        VLM.load(art)


def test_fifo_and_devices_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(fifo)  # would block forever on open() for reading
    with pytest.raises(ImageError, match="not a regular file"):
        load_image("/dev/zero")  # would be read until memory runs out


def test_extreme_aspect_ratio_is_refused_by_the_resize_budget(vlm, tmp_path):
    """1 x 300000 pixels is a 1.2 KB PNG; HF's shortest-edge rule would resize it to 56 x 16.8M."""
    path = tmp_path / "line.png"
    Image.new("RGB", (300_000, 1), "white").save(path)
    assert path.stat().st_size < 5_000
    with pytest.raises(ImageError, match="would be resized to 16800000x56 .* over the budget"):
        vlm.generate("<image>", images=[path], max_new_tokens=1)


def test_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (9_000, 9_000)).save(path)  # 81M pixels in a small file; Pillow itself stops at 179M
    with pytest.raises(ImageError, match=f"{path} is 9000x9000 pixels, over the budget"):
        load_image(path)


def _rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(np.asarray(photo("chelsea"))).save(path, "JPEG", exif=exif)


def test_exif_orientation_as_transformers(tiny, vlm, tmp_path):
    """A PIL image is taken as given, as HF's processor takes it (so a phone photo opened with PIL
    gives HF's pixels, and one the user already turned upright is not turned twice); a path is
    turned upright, as transformers' load_image does."""
    path = tmp_path / "phone.jpg"
    _rotated_jpeg(path)
    opened = Image.open(path)
    assert load_image(opened).size == (451, 300) and load_image(path).size == (300, 451)
    hf = tiny.processor.image_processor(opened, return_tensors="np")["pixel_values"][0]
    assert np.array_equal(vlm.family.prepare(load_image(opened)).pixels[0], hf)


# ---- export and CLI errors --------------------------------------------------------------------

def test_image_urls_are_not_fetched():
    with pytest.raises(ImageError, match="is a URL; vlmdeploy does not fetch images"):
        load_image("https://example.com/cat.jpg")


@pytest.mark.parametrize("opset", [-1, 0, 17, 99, "18"])
def test_opset_outside_the_supported_range(opset, tmp_path):
    from vlmdeploy.export.exporter import export_model
    from vlmdeploy.export.recipes import RecipeError

    with pytest.raises(RecipeError, match=r"--opset .* not supported; allowed: 18\.\.23"):
        export_model("tiny", tmp_path / "out", opset=opset)
    assert not (tmp_path / "out").exists()


def test_a_folder_named_like_a_recipe_does_not_shadow_it(tmp_path, monkeypatch):
    from vlmdeploy.export.exporter import resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    with resolve_source("shapes", None) as src:
        assert src.recipe == "shapes" and src.checkpoint.name == "shapes" and src.checkpoint != tmp_path / "shapes"
    with pytest.raises(Exception, match="config.json"):  # ./shapes means the folder
        with resolve_source("./shapes", None) as src:
            from transformers import AutoConfig

            AutoConfig.from_pretrained(src.checkpoint)


def _checkpoint_copy(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.checkpoint, ckpt)
    return ckpt


def test_pickle_weights_are_refused(tiny, tmp_path):
    from vlmdeploy.export.components import ExportError
    from vlmdeploy.export.exporter import export_model

    ckpt = _checkpoint_copy(tiny, tmp_path)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ExportError, match=r"weights only as pickles \(pytorch_model.bin\)"):
        export_model(str(ckpt), tmp_path / "out", log=lambda m: None)


def test_truncated_safetensors_is_one_line(tiny, tmp_path):
    from vlmdeploy.export.components import ExportError
    from vlmdeploy.export.exporter import export_model

    ckpt = _checkpoint_copy(tiny, tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="cannot read the weights") as e:
        export_model(str(ckpt), tmp_path / "out", log=lambda m: None)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_export_to_a_full_disk_is_one_line(tiny, tmp_path, monkeypatch, capsys):
    import errno

    from vlmdeploy.export import exporter
    from vlmdeploy.runtime.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "export_model", full)
    assert main(["export", "--model", "tiny", "--out", str(tmp_path / "out")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_output_to_a_closed_pipe_is_quiet(tiny):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vlmdeploy.runtime.cli", "run", str(tiny.artifact), "--prompt", "hi",
           "--max-new-tokens", "300", "--ignore-eos"]
    p = subprocess.run(["bash", "-c", " ".join(f"'{c}'" for c in cmd) + " | head -c 1"], capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
