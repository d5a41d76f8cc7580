"""Export memory curve (docs/PERFORMANCE.md "Export memory"): peak RSS and wall time of
`vlmdeploy export --dtype fp16` (validation on) for LLaVA-1.5-shaped checkpoints of several sizes.

    python scripts/export_memory.py --size 0.5b --dir /work/big        # checkpoint made once, then exported
    python scripts/export_memory.py --size 7b --dir /work/big --keep-artifact

Every size has LLaVA-1.5-7B's vision tower (CLIP ViT-L/14-336) and a Llama of growing width/depth; the
7b size is the `llava` recipe itself; 7b-trunc has its widths with 4 vision and 2 text layers (the
HF comparison in tests/test_export_large.py). Each checkpoint is written by `make bigckpt`'s generator (seeded,
fp16, one shard in memory at a time). The export runs as a child process; a sampler reads
/proc/PID/status of it and its descendants every 0.1 s: the peak of the summed VmRSS, the summed VmHWM
(exact per-process peaks), and the peak anonymous RSS (memory that cannot be paged out; the rest is
file pages of mmapped weights, which the kernel can drop under pressure). The result JSON also holds
each graph's validation diffs (equal runs of one checkpoint give equal diffs) and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlmdeploy.export import bigckpt
from vlmdeploy.export.recipes import TinyConfig

# The Llama's sizes per checkpoint size; the vision tower is CLIP ViT-L/14-336 in all.
TEXT = {
    "0.5b": dict(text_hidden=1024, text_layers=12, text_heads=16, text_kv_heads=16, text_intermediate=2816),
    "2b": dict(text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=16, text_intermediate=5632),
}
# LLaVA-1.5-7B's widths (CLIP ViT-L/14-336, Llama 4096 wide, vocab 32064) cut to 4 vision and 2 text
# layers (0.77B parameters): small enough for HF `generate` beside the export (tests/test_export_large.py).
TRUNCATED = dict(vision_layers=4, text_layers=2)
SIZES = ("0.5b", "2b", "7b", "7b-trunc")


def size_config(size: str) -> TinyConfig:
    cfg = bigckpt.tiny_config_for("llava")
    if size == "7b":
        return cfg
    return dataclasses.replace(cfg, **(TRUNCATED if size == "7b-trunc" else TEXT[size]))


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pids


def run_sampled(cmd: list[str], log_path: Path) -> dict:
    """Run `cmd`; peak RSS of its process tree, sampled every 0.1 s."""
    peak = {"rss": 0, "hwm": 0, "anon": 0, "file": 0}
    hwm = {}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            stats = {p: _status(p) for p in _tree(proc.pid)}
            for p, s in stats.items():
                hwm[p] = max(hwm.get(p, 0), s.get("VmHWM", 0))
            for key, field in (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile")):
                peak[key] = max(peak[key], sum(s.get(field, 0) for s in stats.values()))
            time.sleep(0.1)
    peak["hwm"] = sum(hwm.values())
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - t0, **{f"peak_{k}_bytes": v for k, v in peak.items()}}


def validation_diffs(artifact: Path) -> dict[str, list[float]]:
    """Each graph's validation diffs (per run) from the manifest: equal runs of one checkpoint give equal diffs."""
    manifest = artifact / "manifest.json"
    if not manifest.exists():
        return {}
    validation = json.loads(manifest.read_text())["validation"]
    return {name: [r["max_abs_diff"] for r in record["runs"]] for name, record in validation.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, required=True)
    p.add_argument("--dir", type=Path, default=Path("/work/big"))
    p.add_argument("--keep-artifact", action="store_true")
    p.add_argument("--extra", nargs="*", default=[], help="more `vlmdeploy export` flags")
    a = p.parse_args(argv)
    ckpt, out = a.dir / f"ckpt-{a.size}", a.dir / f"art-{a.size}"
    if not ckpt.exists():
        bigckpt.write_checkpoint("llava", ckpt, cfg=size_config(a.size))
    shutil.rmtree(out, ignore_errors=True)
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    exe = Path(sys.executable).with_name("vlmdeploy")
    cmd = [str(exe), "export", "--model", str(ckpt), "--out", str(out), "--dtype", "fp16", *a.extra]
    result = {"size": a.size, "weights_bytes": weights, **run_sampled(cmd, a.dir / f"export-{a.size}.log")}
    result["artifact_bytes"] = sum(f.stat().st_size for f in out.glob("*")) if out.exists() else 0
    result["validation_max_abs_diff"] = validation_diffs(out)
    result["load_average"] = os.getloadavg()  # other jobs share the cores: wall time depends on them
    result["hwm_over_weights"] = result["peak_hwm_bytes"] / weights
    print(json.dumps(result))
    if not a.keep_artifact:
        shutil.rmtree(out, ignore_errors=True)
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
