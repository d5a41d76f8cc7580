"""Property-based fuzzing of everything a user or an artifact hands the runtime (Hypothesis).

Each property asserts: a result, or an error of the project's own types (ArtifactError, PromptError,
ImageError, SpecError) with a one-line message; never a traceback from a dependency, a hang (each
example has a deadline) or memory beyond a budget. CI runs a fixed seed and a fixed example count
(`derandomize`); `make fuzz` runs the same properties with many more examples (VLMDEPLOY_FUZZ=long).
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlmdeploy.runtime.images import ImageError, load_image
from vlmdeploy.runtime.manifest import ArtifactError
from vlmdeploy.runtime.spec import SpecError
from vlmdeploy.runtime.vlm import VLM, PromptError

OURS = (ArtifactError, PromptError, ImageError, SpecError)
settings.register_profile("ci", max_examples=40, derandomize=True, deadline=10_000, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=1500, deadline=10_000, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("long" if os.environ.get("VLMDEPLOY_FUZZ") == "long" else "ci")
RSS_BUDGET = 3 << 30  # bytes of resident memory the test process may reach


@pytest.fixture(scope="module")
def vlm(tiny):
    return VLM.load(tiny.artifact)


def _ours_or_result(call):
    """Run `call`; an exception must be ours with a one-line message. Returns the result or None."""
    try:
        result = call()
    except OURS as e:
        assert str(e) and "\n" not in str(e).strip(), f"multi-line error: {e!r}"
        result = None
    assert psutil.Process().memory_info().rss < RSS_BUDGET
    return result


# ---- images ------------------------------------------------------------------------------------

MODES = ["RGB", "RGBA", "L", "LA", "P", "PA", "1", "I", "I;16", "F", "CMYK"]
FORMATS = {"PNG": ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16"), "JPEG": ("RGB", "L", "CMYK"),
           "GIF": ("P", "L"), "BMP": ("RGB", "L", "P", "1"), "TIFF": tuple(MODES), "WEBP": ("RGB", "RGBA")}


@st.composite
def image_bytes(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w, h = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    if draw(st.booleans()):  # extreme aspect ratios
        w, h = (draw(st.integers(200, 3000)), 1) if draw(st.booleans()) else (1, draw(st.integers(200, 3000)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if draw(st.booleans()) and fmt in ("JPEG", "PNG", "TIFF", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))  # orientation, incl. invalid values
        kwargs["exif"] = exif
    try:
        img.save(buf, fmt, **kwargs)
    except (OSError, ValueError, KeyError):  # a mode this Pillow cannot write in that format
        assume(False)
    data = buf.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, max(0, len(data) - 1))))
    return data if cut is None else data[:cut]


@given(data=st.one_of(image_bytes(), st.binary(max_size=256)))
def test_images_load_and_preprocess_or_say_why(vlm, data):
    def run():
        item = vlm.family.prepare(load_image(data))
        assert item.pixels.dtype == np.float32 and item.pixels.shape[1:] == (3, *vlm.facts.dims.image_size)
        assert np.isfinite(item.pixels).all()
        return item

    _ours_or_result(run)


@given(data=image_bytes())
def test_images_through_generate(vlm, data):
    _ours_or_result(lambda: vlm.generate("<image>\nwhat?", [data], max_new_tokens=1))


# ---- prompts -----------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)  # any code point, surrogates too


@given(parts=st.lists(st.one_of(TEXT, st.just("<image>"), st.just("</s>"), st.just("<s>")), max_size=6),
       n_images=st.integers(0, 3))
def test_prompts_with_any_text_and_placeholders(vlm, parts, n_images):
    prompt = "".join(parts)
    images = [Image.new("RGB", (30, 20), "red")] * n_images
    result = _ours_or_result(lambda: vlm.generate(prompt, images, max_new_tokens=2))
    if result is not None:
        assert prompt.count("<image>") == n_images and len(result.token_ids) <= 2


@given(messages=st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]),
                           "content": st.one_of(TEXT, st.lists(st.one_of(
                               st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
                               st.fixed_dictionaries({"type": st.just("image"), "image": st.just(b"\x89PNG")}),
                               TEXT, st.none(), st.integers()), max_size=3))}),
    st.none(), TEXT, st.integers()), max_size=3))
def test_chat_messages_of_any_shape(vlm, messages):
    _ours_or_result(lambda: vlm.chat(messages, max_new_tokens=1))


# ---- sampling parameters ----------------------------------------------------------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True, allow_infinity=True),
                   TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(), max_size=2))
KEYS = st.sampled_from(["max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos",
                        "do_sample", "num_beams", "max_tokens"])


@given(kwargs=st.dictionaries(KEYS, VALUES, max_size=4))
def test_sampling_arguments_of_any_type(vlm, kwargs):
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("max_new_tokens"), int) and not isinstance(kwargs["max_new_tokens"], bool):
        kwargs["max_new_tokens"] = min(kwargs["max_new_tokens"], 4)  # keep examples fast
    result = _ours_or_result(lambda: vlm.generate("hello", **kwargs))
    if result is not None:
        assert len(result.token_ids) <= kwargs.get("max_new_tokens", 128)


# ---- manifest mutations ------------------------------------------------------------------------

JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False),
                              st.text(max_size=12), st.sampled_from(["../x", "/etc/passwd", "", "float32", "decoder"])),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                    max_leaves=6)


def _paths(d, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, d
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


@pytest.fixture(scope="module")
def linked_artifact(tiny, tmp_path_factory):
    """A copy of the tiny artifact whose manifest each example rewrites (a copy, not hard links: onnx's
    checker refuses multiply-linked weights files, in this artifact and the original)."""
    root = tmp_path_factory.mktemp("fuzz-art")
    shutil.copytree(tiny.artifact, root / "art")
    (root / "art" / "manifest.json").unlink()
    return root / "art", json.loads((tiny.artifact / "manifest.json").read_text())


@given(data=st.data())
def test_manifest_mutations_load_or_say_why(linked_artifact, data):
    art, original = linked_artifact
    manifest = json.loads(json.dumps(original))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(manifest) if p]
        path = data.draw(st.sampled_from(paths))
        parent = manifest
        for k in path[:-1]:
            parent = parent[k]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
    (art / "manifest.json").write_text(json.dumps(manifest))

    def run():
        vlm = VLM.load(art, verify=False)
        return vlm.generate("<image> hi", [Image.new("RGB", (30, 20))], max_new_tokens=2)

    _ours_or_result(run)
