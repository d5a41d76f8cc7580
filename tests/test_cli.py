"""`vlmdeploy` command line: `run` / `check` / `export` in-process (capsys) and as real subprocesses.
User errors exit 2 with one `vlmdeploy CMD: error: ...` line and no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmdeploy.runtime.cli import main
from vlmdeploy.runtime.manifest import MANIFEST_NAME, describe_files
from vlmdeploy.runtime.vlm import VLM

CONTEXT = 512
TIMING_KEYS = {"time_to_first_token_s", "prefill_s", "vision_s", "decode_tokens_per_s", "decode_step_overhead_s", "total_s"}


def _cli_command() -> list[str]:
    """The installed console script (next to this interpreter, else on PATH), else `python -m`."""
    script = Path(sys.executable).parent / "vlmdeploy"
    if script.is_file():
        return [str(script)]
    found = shutil.which("vlmdeploy")
    return [found] if found else [sys.executable, "-m", "vlmdeploy.runtime.cli"]


def _cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_user_error(rc: int, err: str, command: str, *fragments: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vlmdeploy {command}: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-images") / "noise.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def artifact_copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny.artifact, tmp_path / "artifact"))


# ---------------------------------------------------------------------------------------------
# run


def test_run_json(tiny, image, capsys):
    rc, out, err = _cli(capsys, "run", tiny.artifact, "--image", image, "--prompt", "What is in the picture?",
                        "--max-new-tokens", 6, "--json")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert set(d) >= {"token_ids", "text", "finish_reason", "prompt_tokens", "timings"}
    assert 1 <= len(d["token_ids"]) <= 6
    assert all(isinstance(t, int) and 0 <= t < 256 for t in d["token_ids"])
    assert isinstance(d["text"], str)
    assert d["finish_reason"] in {"stop", "length"}
    assert d["prompt_tokens"] > 16  # the image's 16 visual tokens + the chat text
    assert set(d["timings"]) >= TIMING_KEYS
    assert d["timings"]["time_to_first_token_s"] > 0
    assert d["timings"]["decode_tokens_per_s"] >= 0
    # the same answer as the Python API (greedy, chat template)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    expected = VLM.load(tiny.artifact).chat(messages, max_new_tokens=6)
    assert d["token_ids"] == expected.token_ids and d["text"] == expected.text


@pytest.mark.parametrize("sampling", [[], ["--temperature", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "7"]])
def test_run_streams_the_same_text(tiny, image, capsys, sampling):
    common = ["run", tiny.artifact, "--image", image, "--prompt", "Describe it.", "--max-new-tokens", 12, *sampling]
    rc, out, err = _cli(capsys, *common, "--json")
    assert rc == 0, err
    text = json.loads(out)["text"]
    rc, out, err = _cli(capsys, *common)
    assert rc == 0, err
    assert out == text + "\n"  # plain text, no JSON
    assert not out.lstrip().startswith("{")


def test_run_raw_prompt_with_placeholder(tiny, image, capsys):
    prompt = "<image>\nUSER: what is this? ASSISTANT:"
    rc, out, err = _cli(capsys, "run", tiny.artifact, "--raw", "--image", image, "--prompt", prompt,
                        "--max-new-tokens", 5, "--json")
    assert rc == 0, err
    d = json.loads(out)
    vlm = VLM.load(tiny.artifact)
    expected = vlm.generate(prompt, images=[image], max_new_tokens=5)
    assert d["token_ids"] == expected.token_ids
    assert d["prompt_tokens"] == len(vlm.text.encode(prompt)) + 15  # <image> -> 16 tokens


def test_run_text_only(tiny, capsys):
    rc, out, err = _cli(capsys, "run", tiny.artifact, "--prompt", "hello", "--max-new-tokens", 3, "--json")
    assert rc == 0, err
    assert len(json.loads(out)["token_ids"]) <= 3


def test_run_stop_strings(tiny, capsys):
    args = ["run", tiny.artifact, "--raw", "--prompt", "hi", "--max-new-tokens", 30, "--json"]
    rc, out, _ = _cli(capsys, *args)
    text = json.loads(out)["text"]
    stop = next(text[i:i + 2] for i in range(len(text) - 2, 0, -1) if "\ufffd" not in text[i:i + 2])
    rc, out, err = _cli(capsys, *args, "--stop", "\u2603never", "--stop", stop)
    assert rc == 0, err
    d = json.loads(out)
    assert d["text"] == text[: text.index(stop)] and d["finish_reason"] == "stop"


def test_run_bad_image(tiny, tmp_path, capsys):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not really a jpeg")
    rc, out, err = _cli(capsys, "run", tiny.artifact, "--image", bad, "--prompt", "hi")
    _assert_user_error(rc, err, "run", str(bad), "not a readable image")
    assert out == ""


def test_run_missing_image(tiny, tmp_path, capsys):
    missing = tmp_path / "missing.png"
    rc, _, err = _cli(capsys, "run", tiny.artifact, "--image", missing, "--prompt", "hi")
    _assert_user_error(rc, err, "run", str(missing), "does not exist")


def test_run_missing_dir(tmp_path, capsys):
    rc, out, err = _cli(capsys, "run", tmp_path / "nope", "--prompt", "hi")
    _assert_user_error(rc, err, "run", str(tmp_path / "nope"), "no such artifact directory", "vlmdeploy export")
    assert out == ""


def test_run_corrupted_artifact(artifact_copy, capsys):
    path = artifact_copy / "vision.onnx.data"
    path.write_bytes(path.read_bytes()[:-4])
    rc, _, err = _cli(capsys, "run", artifact_copy, "--prompt", "hi")
    _assert_user_error(rc, err, "run", str(path), "truncated")


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--raw", "--prompt", "no placeholder"], ["0 <image> placeholders but 1 image was given"]),
        (["--prompt", "<image> typed"], ["2 <image> placeholders but 1 image was given"]),
        (["--prompt", "hi", "--max-new-tokens", "0"], ["max_new_tokens must be an int >= 1, got 0"]),
        (["--prompt", "hi", "--top-p", "1.5"], ["top_p must be in (0, 1], got 1.5"]),
        (["--prompt", "hi", "--temperature", "-0.5"], ["temperature must be >= 0"]),
        (["--prompt", "hi", "--stop", ""], ["stop must be a list of non-empty strings"]),
        (["--prompt", "hello world " * 60], ["tokens", f"the context is {CONTEXT}"]),
    ],
)
def test_run_user_errors(tiny, image, capsys, extra, fragments):
    rc, out, err = _cli(capsys, "run", tiny.artifact, "--image", image, *extra)
    _assert_user_error(rc, err, "run", *fragments)
    assert out == ""


def test_run_usage_error(tiny, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny.artifact)])
    assert e.value.code == 2
    assert "--prompt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# check


def test_check_good_artifact(tiny, capsys):
    rc, out, err = _cli(capsys, "check", tiny.artifact)
    assert rc == 0, out + err
    lines = out.strip().splitlines()
    assert lines[-1] == "PASS"
    assert not any("FAIL" in line for line in lines)
    for graph in ("vision", "projector", "embed", "decoder"):
        assert any(line.strip().startswith(f"ok    {graph}: onnx checker") for line in lines), out
        assert any(line.strip().startswith(f"ok    {graph}: ran on ort-cpu") for line in lines), out


def test_check_corrupted_copy(artifact_copy, capsys):
    path = artifact_copy / "decoder.onnx.data"
    data = bytearray(path.read_bytes())
    data[64] ^= 0x55
    path.write_bytes(bytes(data))
    rc, out, err = _cli(capsys, "check", artifact_copy)
    assert rc == 1
    assert "FAIL" in out and str(path) in out and "sha256 mismatch" in out
    assert out.strip().splitlines()[-1] == "FAIL: 1 problem(s)"
    assert "Traceback" not in out + err


def test_check_broken_graph_with_matching_checksums(artifact_copy, capsys):
    """A graph that is not ONNX but is listed with its real size and sha256: the report names it."""
    (artifact_copy / "embed.onnx").write_bytes(b"this is not an onnx model")
    m = json.loads((artifact_copy / MANIFEST_NAME).read_text())
    m["files"].update(describe_files(artifact_copy, ["embed.onnx"]))
    (artifact_copy / MANIFEST_NAME).write_text(json.dumps(m))
    rc, out, err = _cli(capsys, "check", artifact_copy)
    assert rc == 1, out
    fails = [line for line in out.splitlines() if line.strip().startswith("FAIL ")]
    assert fails and all("embed:" in line for line in fails), out
    assert any(line.strip().startswith("ok    decoder: ran on ort-cpu") for line in out.splitlines())
    assert out.strip().splitlines()[-1] == f"FAIL: {len(fails)} problem(s)"


def test_check_missing_dir(tmp_path, capsys):
    rc, out, _ = _cli(capsys, "check", tmp_path / "nope")
    assert rc == 1
    assert "FAIL" in out and "no such artifact directory" in out


# ---------------------------------------------------------------------------------------------
# export


def test_export_unknown_model(tmp_path, capsys):
    out_dir = tmp_path / "X"
    rc, _, err = _cli(capsys, "export", "--model", "nope", "--out", out_dir)
    _assert_user_error(rc, err, "export", "unknown model 'nope'", "llava", "tiny", "not a directory")
    assert not out_dir.exists()


def test_export_missing_model_dir(tmp_path, capsys):
    rc, _, err = _cli(capsys, "export", "--model", "./missing/dir", "--out", tmp_path / "X")
    _assert_user_error(rc, err, "export", "--model ./missing/dir: no such directory")
    assert list(tmp_path.iterdir()) == []


def test_export_dir_that_is_not_a_checkpoint(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _cli(capsys, "export", "--model", empty, "--out", tmp_path / "X")
    _assert_user_error(rc, err, "export", str(empty))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_export_weights_not_cached(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # read at call time by snapshot_download
    rc, _, err = _cli(capsys, "export", "--model", "llava", "--out", tmp_path / "X")
    _assert_user_error(rc, err, "export", "llava-hf/llava-1.5-7b-hf", "hf download", "--model /path/to/checkpoint")
    assert not (tmp_path / "X").exists()


def test_export_out_not_an_artifact(tiny, tmp_path, capsys):
    out_dir = tmp_path / "docs"
    out_dir.mkdir()
    (out_dir / "README").write_text("keep me")
    rc, _, err = _cli(capsys, "export", "--model", tiny.checkpoint, "--out", out_dir)
    _assert_user_error(rc, err, "export", "is not a vlmdeploy artifact", "choose another --out")
    assert [p.name for p in out_dir.iterdir()] == ["README"] and (out_dir / "README").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs"]


def test_export_out_is_a_file(tiny, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"keep")
    rc, _, err = _cli(capsys, "export", "--model", tiny.checkpoint, "--out", target)
    _assert_user_error(rc, err, "export", str(target))
    assert target.read_bytes() == b"keep"


def test_export_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--model", "tiny", "--out", "x", "--dtype", "int8"])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Real processes


def _subprocess(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)


def test_subprocess_run_json_and_error(tiny, image, tmp_path):
    cmd = _cli_command()
    p = _subprocess([*cmd, "run", tiny.artifact, "--image", image, "--prompt", "What is this?",
                     "--max-new-tokens", 4, "--json"])
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert 1 <= len(d["token_ids"]) <= 4 and set(d["timings"]) >= TIMING_KEYS
    assert "Traceback" not in p.stderr

    missing = tmp_path / "missing.png"
    p = _subprocess([*cmd, "run", tiny.artifact, "--image", missing, "--prompt", "hi"])
    _assert_user_error(p.returncode, p.stderr, "run", str(missing))
    assert p.stdout == ""


TORCH_FREE = r"""
import json, sys
from vlmdeploy.runtime.vlm import VLM
vlm = VLM.load(sys.argv[1])
result = vlm.generate("<image>\nhello", images=[sys.argv[2]], max_new_tokens=5, ignore_eos=True)
heavy = ("torch", "transformers", "onnx", "huggingface_hub")
print(json.dumps({"n": len(result.token_ids), "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_runtime_never_imports_torch(tiny, image):
    import vlmdeploy.runtime  # noqa: F401  (the package imports)

    p = _subprocess([sys.executable, "-c", TORCH_FREE, tiny.artifact, image], cwd=tiny.artifact.parent)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert d["n"] == 5
    assert d["loaded"] == []


def test_check_with_the_mapped_backend(tiny, capsys):
    """`check --backend ort-cpu-mapped`: every graph run by the low-memory session a 7B fp16 artifact needs."""
    rc, out, err = _cli(capsys, "check", tiny.artifact, "--backend", "ort-cpu-mapped")
    assert rc == 0, out + err
    for graph in ("vision", "projector", "embed", "decoder", "decoder_gqa"):
        assert any(line.strip().startswith(f"ok    {graph}: ran on ort-cpu-mapped") for line in out.splitlines()), out
