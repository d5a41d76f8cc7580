"""`vlmdeploy bench` runs end to end on the tiny recipe (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json

from vlmdeploy.runtime.cli import main


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", "tiny", "--dir", str(tmp_path / "b"), "--runs", "1", "--contexts", "8", "24",
            "--new-tokens", "3", "--batch", "2", "--quantize", "int8", "int8-compute", "--bandwidth-gib", "0.05", "--json", str(out),
            "--visual-tokens", "0.5", "--compression", "pool"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    table = report["table"]
    assert {"vlmdeploy fp32", "vlmdeploy int8", "vlmdeploy int8-compute", "vlmdeploy fp32 portable", "hf eager fp32"} <= set(table)
    computed = json.loads((tmp_path / "b" / "int8-compute" / "manifest.json").read_text())["source"]["int8_compute"]
    assert set(computed) == {"vision", "prefill"}
    for name in ("vlmdeploy fp32", "hf eager fp32"):
        row = table[name]
        assert {"load_s", "ttft_s", "tok_s@8", "tok_s@24", "b2_tok_s@8", "peak_rss_gb"} <= set(row)
        assert all(v["median"] > 0 for v in row.values())
    assert "decode vlmdeploy fp32/hf" in report["ratios"] and report["ratios"]["ttft int8-compute/hf"] > 0
    for base in ("fp32", "int8-compute"):  # compression runners time the first token only
        assert set(table[f"vlmdeploy {base} pool 0.5"]) == {"load_s", "ttft_s", "peak_rss_gb"}
        assert report["ratios"][f"ttft {base} pool 0.5/{base}"] > 0 and report["ratios"][f"ttft {base} pool 0.5/hf"] > 0
    assert 0 <= report["greedy_agreement"]["vlmdeploy int8 vs fp32"] <= 1
    assert report["machine"]["read_bandwidth_gbs"] > 0
    assert "vlmdeploy fp32" in capsys.readouterr().out
