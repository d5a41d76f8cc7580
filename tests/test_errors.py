"""Every bad input fails early with the right error type and a message that names what was wrong
and what is allowed: images, prompts, artifact directories, graph feeds, sampling, export."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.export.recipes import RecipeError, find_hf_weights, recipe_names
from vlmdeploy.runtime.dummy import sample_feeds
from vlmdeploy.runtime.images import ImageError
from vlmdeploy.runtime.manifest import MANIFEST_NAME, MANIFEST_VERSION, ArtifactError, load_manifest
from vlmdeploy.runtime.runners import OrtRunner
from vlmdeploy.runtime.sampling import SamplingParams
from vlmdeploy.runtime.spec import SpecError
from vlmdeploy.runtime.vlm import VLM, PromptError

CONTEXT = 512  # the tiny model's context_length
TOKENS_PER_IMAGE = 16
LLAVA_HF_ID = "llava-hf/llava-1.5-7b-hf"


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures


@pytest.fixture(scope="module")
def vlm(tiny) -> VLM:
    """The portable decoder: the feed-check tests below build its feeds (past [B, H, P, D])."""
    return VLM.load(tiny.artifact, decoder="decoder")


@pytest.fixture
def artifact(tiny, tmp_path) -> Path:
    """A private copy of the tiny artifact, safe to corrupt."""
    return Path(shutil.copytree(tiny.artifact, tmp_path / "artifact"))


def _image(seed: int = 0, size=(40, 30)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    _image().save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def good_png(tmp_path) -> Path:
    path = tmp_path / "good.png"
    _image().save(path)
    return path


def _prompt_with_tokens(vlm: VLM, n: int, prefix: str = "") -> str:
    """`prefix` + 'x'*k with exactly `n` tokens once <image> placeholders are expanded (BOS included)."""
    extra = prefix.count(vlm.facts.image_token) * (vlm.facts.tokens_per_image - 1)

    def count(k):
        return len(vlm.text.encode(prefix + "x" * k)) + extra

    k = max(0, n - count(0))
    while count(k) < n:
        k += 1
    while k > 0 and count(k) > n:
        k -= 1
    prompt = prefix + "x" * k
    assert count(k) == n, f"cannot build a prompt of exactly {n} tokens"
    return prompt


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / MANIFEST_NAME
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# 1. Images


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_file(vlm, tmp_path, fmt):
    data = _encoded(fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as e:
        vlm.generate("<image>\nWhat is this?", images=[path], max_new_tokens=2)
    assert str(path) in str(e.value)
    assert "truncated" in str(e.value)


def test_text_file_as_image(vlm, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="not a readable image") as e:
        vlm.generate("<image>\nWhat is this?", images=[path], max_new_tokens=2)
    assert str(path) in str(e.value)


def test_missing_image_path(vlm, tmp_path):
    path = tmp_path / "nope" / "missing.png"
    with pytest.raises(ImageError, match="does not exist") as e:
        vlm.generate("<image>\nWhat is this?", images=[str(path)], max_new_tokens=2)
    assert str(path) in str(e.value)


def test_directory_as_image(vlm, tmp_path):
    with pytest.raises(ImageError, match="is a directory") as e:
        vlm.generate("<image>\nhi", images=[tmp_path], max_new_tokens=2)
    assert str(tmp_path) in str(e.value)


def test_unsupported_image_object(vlm):
    with pytest.raises(ImageError, match=r"cannot load an image from a int.*allowed: a path.*bytes.*PIL"):
        vlm.generate("<image>\nhi", images=[42], max_new_tokens=2)


def test_bad_image_in_chat_and_stream(vlm, tmp_path):
    path = tmp_path / "missing.png"
    messages = [{"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(ImageError, match=re.escape(str(path))):
        vlm.chat(messages, max_new_tokens=2)
    with pytest.raises(ImageError, match=re.escape(str(path))):
        list(vlm.stream("<image>\nhi", images=[path], max_new_tokens=2))


def test_bad_image_bytes_named_by_size(vlm):
    data = _encoded("PNG")[:50]
    with pytest.raises(ImageError, match=r"<50 bytes> is not a readable image"):
        vlm.generate("<image>\nhi", images=[data], max_new_tokens=2)


def test_bare_path_string_as_images(vlm, good_png):
    try:
        result = vlm.generate("<image>\nhi", images=str(good_png), max_new_tokens=2)
    except (PromptError, TypeError) as e:
        assert "list" in str(e), str(e)  # an error must say that images is a list
    else:
        assert result.prompt_tokens > TOKENS_PER_IMAGE  # or it is taken as one image


# ---------------------------------------------------------------------------------------------
# 2. Placeholders vs images


@pytest.mark.parametrize(
    "prompt, n_images, found, given",
    [
        ("<image><image>\nCompare.", 1, "2 <image> placeholders", "1 image was given"),
        ("<image>\nDescribe.", 2, "1 <image> placeholder ", "2 images were given"),
        ("Describe.", 1, "0 <image> placeholders", "1 image was given"),
        ("<image>\nDescribe.", 0, "1 <image> placeholder ", "0 images were given"),
    ],
)
def test_placeholder_count_mismatch(vlm, good_png, prompt, n_images, found, given):
    with pytest.raises(PromptError) as e:
        vlm.generate(prompt, images=[good_png] * n_images, max_new_tokens=2)
    msg = str(e.value)
    assert found in msg and given in msg, msg
    assert "one image per placeholder" in msg


def test_placeholder_mismatch_is_checked_before_images_are_read(vlm, tmp_path):
    # cheap checks first: the missing file is never opened
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 image"):
        vlm.generate("<image><image>", images=[tmp_path / "missing.png"], max_new_tokens=2)


def test_chat_with_hand_typed_image_token(vlm, good_png):
    # the chat template already puts one <image> per image item; a typed one is an extra placeholder
    messages = [{"role": "user", "content": [{"type": "image", "image": good_png},
                                             {"type": "text", "text": "<image> what is it?"}]}]
    with pytest.raises(PromptError, match="2 <image> placeholders but 1 image was given"):
        vlm.chat(messages, max_new_tokens=2)


def test_generate_batch_mismatched_list_lengths(vlm, good_png):
    with pytest.raises(PromptError, match=r"3 prompts but 2 image lists; give one list per prompt"):
        vlm.generate_batch(["<image> a", "<image> b", "c"], images=[[good_png], [good_png]], max_new_tokens=2)
    with pytest.raises(PromptError, match=r"1 prompts but 2 image lists"):
        vlm.generate_batch(["<image> a"], images=[[good_png], [good_png]], max_new_tokens=2)


def test_generate_batch_row_mismatch(vlm, good_png):
    with pytest.raises(PromptError, match="prompt has 1 <image> placeholder but 0 images were given"):
        vlm.generate_batch(["<image> a", "<image> b"], images=[[good_png], []], max_new_tokens=2)


def test_prompt_not_a_string(vlm):
    with pytest.raises(PromptError, match="prompt must be a str, got list"):
        vlm.generate(["hi"], max_new_tokens=2)


def test_generate_batch_empty(vlm):
    try:
        assert vlm.generate_batch([], max_new_tokens=2) == []
    except PromptError:
        pass  # or a PromptError that says no prompts were given


def test_chat_message_without_role(vlm):
    with pytest.raises(PromptError, match="each message must be a dict with 'role' and 'content'"):
        vlm.chat([{"content": "hi"}], max_new_tokens=2)


# ---------------------------------------------------------------------------------------------
# 3. Context length


def test_prompt_longer_than_context(vlm):
    prompt = "hello world " * 60
    n = len(vlm.text.encode(prompt))
    assert n > CONTEXT
    with pytest.raises(PromptError) as e:
        vlm.generate(prompt, max_new_tokens=2)
    msg = str(e.value)
    assert f"prompt is {n} tokens" in msg
    assert f"the context is {CONTEXT}" in msg
    assert f"at most {CONTEXT - 1} prompt tokens" in msg


def test_visual_tokens_count_towards_context(vlm, good_png):
    prompt = _prompt_with_tokens(vlm, CONTEXT + 3, prefix="<image>\n")
    assert len(vlm.text.encode(prompt)) < CONTEXT  # too long only with the 16 visual tokens
    with pytest.raises(PromptError) as e:
        vlm.generate(prompt, images=[good_png], max_new_tokens=2)
    msg = str(e.value)
    assert f"prompt is {CONTEXT + 3} tokens" in msg
    assert f"1 image(s), {TOKENS_PER_IMAGE} visual tokens included" in msg
    assert f"the context is {CONTEXT}" in msg


def test_context_boundary(vlm):
    with pytest.raises(PromptError, match=f"prompt is {CONTEXT} tokens"):
        vlm.generate(_prompt_with_tokens(vlm, CONTEXT), max_new_tokens=2)
    result = vlm.generate(_prompt_with_tokens(vlm, CONTEXT - 1), max_new_tokens=50, ignore_eos=True)
    assert result.prompt_tokens == CONTEXT - 1
    assert len(result.token_ids) == 1 and result.finish_reason == "length"


def test_max_new_tokens_capped_by_context(vlm, good_png):
    prompt = _prompt_with_tokens(vlm, CONTEXT - 7, prefix="<image>\n")
    result = vlm.generate(prompt, images=[good_png], max_new_tokens=100, ignore_eos=True)
    assert result.prompt_tokens == CONTEXT - 7
    assert len(result.token_ids) == 7
    assert result.finish_reason == "length"
    assert result.prompt_tokens + len(result.token_ids) <= CONTEXT
    streamed = "".join(vlm.stream(prompt, images=[good_png], max_new_tokens=100, ignore_eos=True))
    assert streamed == result.text


def test_no_decoder_pass_after_the_last_token(vlm, monkeypatch):
    runner, real, passes = vlm.runners["decoder"], vlm.runners["decoder"].run, []

    def counting(feeds, out=None):
        passes.append(feeds["inputs_embeds"].shape[1])
        return real(feeds, out)

    monkeypatch.setattr(runner, "run", counting)
    result = vlm.generate("hi", max_new_tokens=4, ignore_eos=True)
    assert len(result.token_ids) == 4
    assert passes == [3, 1, 1, 1]  # prefill (BOS + 'hi' = 3 tokens) gives token 1; 3 steps give 2..4


def test_max_new_tokens_capped_in_batch(vlm):
    long, short = _prompt_with_tokens(vlm, CONTEXT - 5), _prompt_with_tokens(vlm, 20)
    results = vlm.generate_batch([short, long], max_new_tokens=100, ignore_eos=True)
    for r in results:
        assert r.finish_reason == "length"
        assert r.prompt_tokens + len(r.token_ids) <= CONTEXT
    assert len(results[1].token_ids) == 5


# ---------------------------------------------------------------------------------------------
# 4. Artifact directories


def test_missing_directory(tmp_path):
    missing = tmp_path / "no" / "such"
    with pytest.raises(ArtifactError, match="no such artifact directory") as e:
        VLM.load(missing)
    assert str(missing) in str(e.value) and "vlmdeploy export" in str(e.value)


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ArtifactError, match=re.escape(str(path))):
        VLM.load(path)


def test_missing_manifest(artifact):
    (artifact / MANIFEST_NAME).unlink()
    with pytest.raises(ArtifactError) as e:
        VLM.load(artifact)
    msg = str(e.value)
    assert str(artifact) in msg and f"no {MANIFEST_NAME}" in msg and "Re-run `vlmdeploy export`" in msg


@pytest.mark.parametrize("name", ["decoder.onnx", "decoder.onnx.data", "tokenizer.json"])
def test_missing_listed_file(artifact, name):
    (artifact / name).unlink()
    with pytest.raises(ArtifactError) as e:
        VLM.load(artifact)
    msg = str(e.value)
    assert f"file {name} listed in the manifest is missing" in msg
    assert str(artifact) in msg and "vlmdeploy export" in msg


def test_truncated_file(artifact):
    path = artifact / "decoder.onnx.data"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError) as e:
        VLM.load(artifact)
    msg = str(e.value)
    assert str(path) in msg
    assert f"size {size - 10} bytes, manifest says {size}" in msg and "truncated" in msg


def test_same_size_corruption_fails_checksum(artifact):
    path = artifact / "decoder.onnx.data"
    _flip_byte(path)
    with pytest.raises(ArtifactError) as e:
        VLM.load(artifact)
    msg = str(e.value)
    assert str(path) in msg and "sha256 mismatch" in msg and "corrupt" in msg


def test_verify_false_skips_sha256_but_not_size(artifact):
    path = artifact / "decoder.onnx.data"
    _flip_byte(path)  # weights bytes: ONNX Runtime still loads it
    vlm = VLM.load(artifact, verify=False, decoder="decoder")
    assert vlm.runners["decoder"] is not None
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        VLM.load(artifact)  # the default verifies
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: size ")):
        VLM.load(artifact, verify=False)


def test_future_manifest_version(artifact):
    _edit_manifest(artifact, lambda d: d.update(manifest_version=999))
    with pytest.raises(ArtifactError) as e:
        VLM.load(artifact)
    msg = str(e.value)
    assert str(artifact / MANIFEST_NAME) in msg
    assert "manifest_version 999" in msg and f"reads versions [1, {MANIFEST_VERSION}]" in msg and "re-export" in msg


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b""])
def test_manifest_not_json(artifact, content):
    (artifact / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ArtifactError) as e:
        VLM.load(artifact)
    msg = str(e.value)
    assert str(artifact / MANIFEST_NAME) in msg and "not valid JSON" in msg and "vlmdeploy export" in msg


@pytest.mark.parametrize("content", ["[1, 2]", '{"format": "something-else", "manifest_version": 1}'])
def test_manifest_of_another_format(artifact, content):
    (artifact / MANIFEST_NAME).write_text(content)
    with pytest.raises(ArtifactError, match="not a vlmdeploy manifest"):
        VLM.load(artifact)


def test_manifest_missing_section(artifact):
    _edit_manifest(artifact, lambda d: d.pop("model"))
    with pytest.raises(ArtifactError, match=r"malformed manifest \(KeyError\('model'\)\)"):
        VLM.load(artifact)


def _drop_size(d):
    del d["files"]["decoder.onnx"]["size"]


def _bad_dtype(d):
    d["graphs"]["decoder"]["spec"]["inputs"][0]["dtype"] = "float99"


def _files_not_a_dict(d):
    d["files"] = "decoder.onnx"


@pytest.mark.parametrize("edit", [_drop_size, _bad_dtype, _files_not_a_dict])
def test_malformed_manifest_entries(artifact, edit):
    _edit_manifest(artifact, edit)
    with pytest.raises(ArtifactError, match="malformed manifest"):
        VLM.load(artifact)


def test_load_manifest_is_cheap_to_call_directly(artifact):
    m = load_manifest(artifact)
    assert set(m.graph_files) == {"vision", "projector", "embed", "decoder", "decoder_gqa"}
    assert all(name in m.files for name in m.graph_files.values())


# ---------------------------------------------------------------------------------------------
# 5. Runner feed checks


@pytest.fixture
def decoder_feeds(vlm):
    dims = {"batch": 2, "seq": 3, "past": 4, "total": 7}
    return sample_feeds(vlm.manifest.graphs["decoder"], dims, vlm.facts, np.random.default_rng(0))


def _run_bad(vlm, graph, feeds):
    with pytest.raises(SpecError) as e:
        vlm.runners[graph].run(feeds)
    return str(e.value)


def test_good_feeds_run(vlm, decoder_feeds):
    out = vlm.runners["decoder"].run(decoder_feeds)
    assert out["logits"].shape == (2, 3, vlm.facts.dims.vocab)


def test_feed_wrong_dtype(vlm, decoder_feeds):
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, inputs_embeds=decoder_feeds["inputs_embeds"].astype(np.float64)))
    assert "'inputs_embeds'" in msg and "dtype float64" in msg and "allowed [batch, seq, 64] of float32" in msg
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, attention_mask=decoder_feeds["attention_mask"].astype(np.int32)))
    assert "'attention_mask'" in msg and "dtype int32" in msg and "allowed [batch, total] of int64" in msg


def test_feed_wrong_rank(vlm, decoder_feeds):
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, inputs_embeds=decoder_feeds["inputs_embeds"][0]))
    assert "'inputs_embeds'" in msg and "shape [3, 64] has rank 2" in msg and "allowed [batch, seq, 64]" in msg


def test_feed_wrong_fixed_dim(vlm, decoder_feeds):
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, inputs_embeds=np.zeros((2, 3, 65), np.float32)))
    assert "'inputs_embeds'" in msg and "shape [2, 3, 65], axis 2 must be 64" in msg
    assert "allowed [batch, seq, 64] of float32" in msg
    msg = _run_bad(vlm, "vision", {"pixel_values": np.zeros((1, 3, 57, 56), np.float32)})
    assert "'pixel_values'" in msg and "axis 2 must be 56" in msg and "allowed [num_images, 3, 56, 56]" in msg


def test_feed_inconsistent_named_dim(vlm, decoder_feeds):
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, position_ids=np.zeros((3, 3), np.int64)))
    assert "'position_ids'" in msg and "shape [3, 3]" in msg
    assert "(batch) is 3 but 'inputs_embeds' set batch=2" in msg and "allowed [batch, seq] of int64" in msg
    kv = "past_key_values.1.value"
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, **{kv: np.zeros((2, 4, 5, 16), np.float32)}))
    assert f"'{kv}'" in msg and "(past) is 5 but 'past_key_values.0.key' set past=4" in msg


def test_feed_attention_mask_length(vlm, decoder_feeds):
    msg = _run_bad(vlm, "decoder", dict(decoder_feeds, attention_mask=np.ones((2, 8), np.int64)))
    assert "total=8" in msg and "past + seq = 4 + 3" in msg and "attention_mask length" in msg


def test_feed_missing_and_unexpected(vlm, decoder_feeds):
    feeds = dict(decoder_feeds)
    del feeds["position_ids"]
    msg = _run_bad(vlm, "decoder", feeds)
    assert "missing inputs ['position_ids']" in msg and "expected exactly ['inputs_embeds', 'attention_mask'" in msg
    msg = _run_bad(vlm, "embed", {"input_ids": np.zeros((1, 2), np.int64), "ids": np.zeros(1)})
    assert "unexpected inputs ['ids']" in msg and "expected exactly ['input_ids']" in msg


def test_output_buffer_checks(vlm, decoder_feeds):
    with pytest.raises(SpecError, match=r"output buffer 'logits': shape \[2, 3, 255\].*needs contiguous \[2, 3, 256\]"):
        vlm.runners["decoder"].run(decoder_feeds, out={"logits": np.zeros((2, 3, 255), np.float32)})
    with pytest.raises(SpecError, match=r"no output named 'nope'; outputs are \['logits'"):
        vlm.runners["decoder"].run(decoder_feeds, out={"nope": np.zeros(1, np.float32)})


def test_ort_runner_direct_and_spec_mismatch(tiny, vlm):
    spec = vlm.manifest.graphs["embed"]
    runner = OrtRunner(tiny.artifact / "embed.onnx", spec, threads=1)
    with pytest.raises(SpecError, match=r"'input_ids': dtype int32, allowed \[batch, seq\] of int64"):
        runner.run({"input_ids": np.zeros((1, 2), np.int32)})
    path = tiny.artifact / "embed.onnx"
    with pytest.raises(SpecError, match="differ from the manifest's spec") as e:
        OrtRunner(path, vlm.manifest.graphs["decoder"], threads=1)
    assert str(path) in str(e.value)


def test_feed_not_an_array(vlm):
    with pytest.raises(SpecError, match="'input_ids'"):
        vlm.runners["embed"].run({"input_ids": [[1, 2, 3]]})


# ---------------------------------------------------------------------------------------------
# 6. Sampling parameters


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 1, got 2.5"),
        (dict(temperature=-1), r"temperature must be >= 0 \(0 = greedy\), got -1"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(top_k=-1), r"top_k must be an int >= 0 \(0 = off\), got -1"),
        (dict(stop=[""]), "stop must be a list of non-empty strings"),
        (dict(stop=["ok", 3]), "stop must be a list of non-empty strings"),
    ],
)
def test_bad_sampling_params(vlm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vlm.generate("hi", **kwargs)
    with pytest.raises(ValueError, match=message):  # streaming checks the same, on first next()
        next(vlm.stream("hi", **kwargs))


def test_unknown_sampling_param(vlm):
    with pytest.raises(PromptError, match=r"unknown sampling argument\(s\) \['bogus'\]; allowed: \['max_new_tokens'"):
        vlm.generate("hi", bogus=1)


def test_stop_bare_string_is_one_stop_string(vlm):
    """`_normalize` turns a bare str into a 1-tuple (SamplingParams itself wants a sequence)."""
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        SamplingParams(stop="abc")
    base = vlm.generate("hi", max_new_tokens=30, ignore_eos=True)
    assert vlm.generate("hi", max_new_tokens=30, ignore_eos=True, stop=None).text == base.text
    # a 2-character stop string that occurs in the text: the output ends right before it
    stop = next(base.text[i:i + 2] for i in range(len(base.text) - 2, 0, -1) if "\ufffd" not in base.text[i:i + 2])
    cut = base.text.index(stop)
    as_str = vlm.generate("hi", max_new_tokens=30, ignore_eos=True, stop=stop)
    as_list = vlm.generate("hi", max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert as_str.text == as_list.text == base.text[:cut]
    assert as_str.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# 7. Export inputs


def test_unknown_recipe(tmp_path):
    from vlmdeploy.export.exporter import export_model

    out = tmp_path / "out"
    with pytest.raises(RecipeError) as e:
        export_model("nope", out, log=lambda m: None)
    msg = str(e.value)
    assert "unknown model 'nope'" in msg
    for name in recipe_names():
        assert name in msg
    assert {"llava", "tiny"} <= set(recipe_names())
    assert not out.exists()


def test_bad_dtype(tiny, tmp_path):
    from vlmdeploy.export.exporter import export_model

    with pytest.raises(RecipeError, match=r"--dtype 'int8' not one of \['fp16', 'fp32'\]"):
        export_model(str(tiny.checkpoint), tmp_path / "out", dtype="int8", log=lambda m: None)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch) -> Path:
    """The HF cache pointed at an empty dir. huggingface_hub reads its env once at import into
    `constants`; `snapshot_download` reads `constants.HF_HUB_CACHE` at call time, so patch both."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(cache.parent))
    return cache


def test_find_hf_weights_uses_the_patched_cache(empty_hf_cache):
    # positive control: a snapshot in the patched cache is found, so the patch is effective
    repo = empty_hf_cache / ("models--" + LLAVA_HF_ID.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert find_hf_weights(LLAVA_HF_ID) == repo / "snapshots" / commit


def test_recipe_weights_absent(empty_hf_cache, tmp_path):
    from vlmdeploy.export.exporter import export_model

    out = tmp_path / "out"
    with pytest.raises(RecipeError) as e:
        export_model("llava", out, log=lambda m: None)
    msg = str(e.value)
    assert f"weights for {LLAVA_HF_ID} are not on this machine" in msg
    assert f"hf download {LLAVA_HF_ID}" in msg  # how to download
    assert "--model /path/to/checkpoint" in msg  # or pass a directory
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("model", ["./missing/dir", "missing/dir", "../missing"])
def test_model_directory_missing(tmp_path, model):
    from vlmdeploy.export.exporter import export_model

    with pytest.raises(RecipeError, match=f"--model {re.escape(model)}: no such directory"):
        export_model(model, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_out_dir_not_an_artifact(tiny, tmp_path):
    from vlmdeploy.export.exporter import export_model

    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    with pytest.raises(FileExistsError) as e:
        export_model(str(tiny.checkpoint), out, log=lambda m: None)
    msg = str(e.value)
    assert str(out.resolve()) in msg and "not a vlmdeploy artifact" in msg and "choose another --out" in msg
    after = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else None) for p in out.rglob("*"))
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_out_is_an_existing_file(tiny, tmp_path):
    from vlmdeploy.export.exporter import export_model

    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep")
    try:
        with pytest.raises(FileExistsError, match="not a directory|not a vlmdeploy artifact"):
            export_model(str(tiny.checkpoint), out, log=lambda m: None)
    finally:
        assert out.read_bytes() == b"keep"


# ---------------------------------------------------------------------------------------------
# 8. Atomic export


class _Boom(RuntimeError):
    pass


def _fail_on_call(monkeypatch, n: int, exc: BaseException) -> list[Path]:
    """Make `validate_graph` raise `exc` on its n-th call; record the graph paths it saw."""
    from vlmdeploy.export import onnx_export

    real, seen = onnx_export.validate_graph, []

    def validate(path, *args, **kwargs):
        seen.append(Path(path))
        assert Path(path).is_file()  # the graph was written into the staging dir
        if len(seen) == n:
            raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "validate_graph", validate)
    return seen


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    from vlmdeploy.export.exporter import export_model

    out = tmp_path / "fresh"
    seen = _fail_on_call(monkeypatch, 1, _Boom("validation exploded"))
    with pytest.raises(_Boom, match="validation exploded"):
        export_model(str(tiny.checkpoint), out, log=lambda m: None)
    assert len(seen) == 1 and seen[0].name == "vision.onnx"
    staging = seen[0].parent
    assert staging.parent == tmp_path and staging.name.startswith(".fresh.partial-")
    assert not staging.exists()
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_reexport_keeps_previous_artifact(tiny, artifact, monkeypatch):
    from vlmdeploy.export.exporter import export_model

    before = _snapshot(artifact)
    # the first graph exports and validates; Ctrl-C arrives while the second one validates
    seen = _fail_on_call(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        export_model(str(tiny.checkpoint), artifact, log=lambda m: None)
    assert [p.name for p in seen] == ["vision.onnx", "projector.onnx"]
    assert not seen[0].parent.exists()
    assert _snapshot(artifact) == before
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["artifact"]  # no .partial-* / .old-*
    result = VLM.load(artifact).generate("hi", max_new_tokens=3)
    assert len(result.token_ids) >= 1
