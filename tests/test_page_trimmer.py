"""export/page_trimmer.py: the export's weights' file pages are dropped from this process while it
reads them (issue 14: the part of export memory that grows with the model). Checked here: only the
given files' mappings are touched (never another file, anonymous memory, or a mapping with a
written page), their write permission comes back, and outputs computed while the trimmer runs
(ONNX Runtime on mapped fp16 weights; the torch reference on the mapped checkpoint) are bit-identical."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from vlmdeploy.export.llava import FAMILY
from vlmdeploy.export.page_trimmer import PageTrimmer, file_mappings
from vlmdeploy.runtime.runners import OrtRunner
from test_export_memory import _matmul_graph, _resident_in

MB = 1 << 20


def _mapped_file(path: Path, nbytes: int) -> np.memmap:
    """A private (copy-on-write, rw-p) mapping of a new file, every page read once."""
    np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tofile(path)
    view = np.memmap(path, dtype=np.uint8, mode="c")
    assert int(view[::4096].sum()) >= 0  # touch every page
    return view


def _perms(path: Path) -> set[str]:
    return {m.perms for m in file_mappings([path])}


def test_trimmer_drops_only_the_given_files_pages_and_never_a_written_page(tmp_path):
    weights, written, other = (_mapped_file(tmp_path / n, 16 * MB) for n in ("w.bin", "written.bin", "other.bin"))
    written[5] = 7  # one copy-on-write page: DONTNEED would lose it
    anon = np.ones(16 * MB, np.uint8)
    resident = {n: _resident_in(file_mappings([tmp_path / n])) for n in ("w.bin", "written.bin", "other.bin")}
    assert min(resident.values()) >= 8 * MB
    with PageTrimmer(roots=[tmp_path / "w.bin", tmp_path / "written.bin"], interval_s=None) as trimmer:
        assert _perms(tmp_path / "w.bin") == {"r--p"}  # sealed: a write now faults instead of being dropped
        assert _perms(tmp_path / "written.bin") == {"rw-p"}  # has a written page: left alone
    assert [m.path for m in trimmer.targets] == [str((tmp_path / "w.bin").resolve())]
    assert _resident_in(file_mappings([tmp_path / "w.bin"])) == 0
    assert _resident_in(file_mappings([tmp_path / "written.bin"])) == resident["written.bin"]
    assert _resident_in(file_mappings([tmp_path / "other.bin"])) == resident["other.bin"]
    assert _perms(tmp_path / "w.bin") == {"rw-p"}  # the write permission is back
    assert written[5] == 7 and int(anon.sum()) == anon.size  # nothing written or anonymous was touched
    expected = np.fromfile(tmp_path / "w.bin", dtype=np.uint8)
    assert np.array_equal(weights, expected)  # the dropped pages read back as the file's bytes
    weights[0] = 1  # and the mapping is writable again


def test_onnx_runtime_outputs_are_bit_identical_while_its_weights_are_trimmed(tmp_path):
    spec = _matmul_graph(tmp_path / "g.onnx", 4096, 8192)  # 64 MiB of fp16 weights, mapped by ONNX Runtime
    data = tmp_path / "g.onnx.data"
    feeds = [{"x": np.random.default_rng(i).standard_normal((1, 4096)).astype(np.float16)} for i in range(4)]
    runner = OrtRunner(tmp_path / "g.onnx", spec, low_memory=True, threads=1)
    plain = [runner.run(f)["y"] for f in feeds]
    assert _resident_in(file_mappings([data])) > 32 * MB  # the run left its weights resident
    with PageTrimmer(roots=[data], interval_s=0.001) as trimmer:
        trimmed = [runner.run(f)["y"] for f in feeds]
    assert trimmer.targets and trimmer.ticks > 1
    assert all(np.array_equal(a, b) for a, b in zip(plain, trimmed))
    assert _resident_in(file_mappings([data])) == 0


def test_torch_reference_is_bit_identical_while_the_checkpoint_is_trimmed(tiny, tmp_path):
    checkpoint = shutil.copytree(tiny.checkpoint, tmp_path / "checkpoint")  # mapped by no other model here
    model = type(tiny.model).from_pretrained(checkpoint, dtype=torch.float32).eval()  # its own dtype: mapped, not converted
    mapped = file_mappings([checkpoint])
    assert mapped and all(m.perms == "rw-p" for m in mapped)  # torch maps safetensors private and writable
    pixels = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    ids = torch.randint(0, 100, (2, 9))

    def forward():
        with torch.no_grad():
            return FAMILY.reference_features(model, pixels), model.model.language_model(input_ids=ids).last_hidden_state

    plain = forward()
    with PageTrimmer(ranges=mapped, interval_s=0.001) as trimmer:
        trimmed = [forward() for _ in range(3)]
    assert len(trimmer.targets) == len(mapped) and trimmer.ticks > 1
    for outs in trimmed:
        assert all(torch.equal(a, b) for a, b in zip(plain, outs))
    assert _resident_in(mapped) == 0 and {m.perms for m in file_mappings([checkpoint])} == {"rw-p"}
