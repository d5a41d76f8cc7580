"""Exporting over a directory never deletes what vlmdeploy did not write, and replacing an artifact
leaves the old or the new one at DIR at every instant (issue: reliability, items 1-3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vlmdeploy.runtime.manifest import clean_stale, load_manifest, replace_dir


def _export(tiny, out):
    from vlmdeploy.export.exporter import export_model

    export_model(str(tiny.checkpoint), out, log=lambda m: None)


def test_foreign_manifest_json_is_refused_and_nothing_is_deleted(tiny, tmp_path):
    out = tmp_path / "proj"
    (out / "src").mkdir(parents=True)
    (out / "src" / "main.py").write_text("print('mine')\n")
    (out / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a vlmdeploy manifest; nothing was replaced"):
        _export(tiny, out)
    assert (out / "src" / "main.py").read_text() == "print('mine')\n" and (out / "manifest.json").read_text() == "{}"


def test_reexport_refuses_to_delete_user_files_and_engines(tiny, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(tiny.artifact, out)
    (out / "NOTES.txt").write_text("keep me")
    (out / "engines").mkdir()
    (out / "engines" / "decoder.plan").write_bytes(b"plan")
    with pytest.raises(FileExistsError, match=r"files the export did not write \(NOTES.txt, engines/decoder.plan\)"):
        _export(tiny, out)
    assert (out / "NOTES.txt").read_text() == "keep me" and (out / "engines" / "decoder.plan").exists()
    load_manifest(out)  # the artifact itself is untouched


def test_reexport_over_a_clean_artifact_replaces_it(tiny, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(tiny.artifact, out)
    _export(tiny, out)
    load_manifest(out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no hidden leftovers


def test_replace_is_an_atomic_exchange(tmp_path):
    """While replacing, `out` never goes missing: the swap is one renameat2(RENAME_EXCHANGE)."""
    out, new = tmp_path / "out", tmp_path / ".out.partial-1-x"
    out.mkdir()
    (out / "old").write_text("old")
    new.mkdir()
    (new / "new").write_text("new")
    seen = []
    real_rmtree = shutil.rmtree
    shutil.rmtree = lambda p, **k: (seen.append(out.exists()), real_rmtree(p, **k))
    try:
        replace_dir(new, out)
    finally:
        shutil.rmtree = real_rmtree
    assert (out / "new").read_text() == "new" and not new.exists()
    assert seen == [True]


def test_a_kill_between_renames_is_repaired_by_the_next_export(tiny, tmp_path):
    """On a filesystem without atomic exchange the old artifact is parked as .DIR.old-PID; a process
    killed right there leaves DIR missing. The next export puts it back before anything else, and
    removes the partial folders of dead exports."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = dead.stdout.strip()
    out = tmp_path / "art"
    shutil.copytree(tiny.artifact, tmp_path / f".art.old-{pid}")
    (tmp_path / f".art.partial-{pid}-abc").mkdir()
    (tmp_path / f".art.partial-{os.getpid()}-live").mkdir()  # ours, still running: kept
    clean_stale(out)
    load_manifest(out)  # the parked artifact is back at DIR
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [f".art.partial-{os.getpid()}-live"]


def test_cli_says_what_was_refused(tiny, tmp_path, capsys):
    from vlmdeploy.runtime.cli import main

    out = tmp_path / "art"
    shutil.copytree(tiny.artifact, out)
    (out / "NOTES.txt").write_text("keep me")
    assert main(["export", "--model", str(tiny.checkpoint), "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "NOTES.txt" in err and "nothing was replaced" in err and "Traceback" not in err
    assert json.loads((out / "manifest.json").read_text())["format"] == "vlmdeploy-artifact"
