"""The runtime never phones home: onnxruntime 1.32 (official wheels) starts native 1DS telemetry at import
and resolves mobile.events.data.microsoft.com ~9 s later unless ORT_DISABLE_TELEMETRY=1 was set before
the import; runtime/offline.py sets it. Each check runs a fresh interpreter that loads and runs a tiny
model through `import_onnxruntime()`, with the CI variables that also mute ORT's telemetry removed, so
only offline.py can be what switches it off."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

# besides ORT_DISABLE_TELEMETRY, onnxruntime 1.32 suppresses its telemetry when it sees these (CI / its
# own tests); keep them out of the child so a pass means offline.py did it
MUTING_ENV = ("ORT_DISABLE_TELEMETRY", "ORT_RUNNING_UNIT_TESTS", "GITHUB_ACTIONS", "TF_BUILD")
# without the switch the first DNS query came 9.28-9.41 s after start (3 runs, with or without a session):
# run past it under strace, and keep the whole file under ~20 s
RUN_S = 11.0

CHILD = textwrap.dedent("""
    import json, socket, sys, time
    a, b = socket.socketpair()  # a known AF_UNIX socket, before any hook: proves strace saw this process
    a.close(); b.close()
    hooked = "--audit" in sys.argv
    events = []
    if hooked:
        NET = ("socket.__new__", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
               "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "socket.bind")
        def hook(event, args):
            if event in NET:
                events.append([event, repr(args)[:200]])
        sys.addaudithook(hook)
    import numpy as np
    from vlmdeploy.runtime.offline import import_onnxruntime, telemetry_store_open
    ort = import_onnxruntime()
    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    x = np.arange(-2, 2, dtype=np.float32).reshape(1, 4)
    assert sess.run(None, {"x": x})[0].tolist() == [[0, 0, 0, 1]]
    t0 = time.time()
    while time.time() - t0 < float(sys.argv[2]):
        sess.run(None, {"x": x})
        time.sleep(0.25)
    hook_works = None
    if hooked:  # positive control: one local socket must show up as the last event
        n = len(events)
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
        hook_works = len(events) == n + 1 and events[-1][0] == "socket.__new__"
        del events[n:]
    print("RESULT " + json.dumps({"events": events, "hook_works": hook_works, "store_open": telemetry_store_open()}))
""")

@pytest.fixture
def tiny_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    return path


def _child_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MUTING_ENV}
    home = tmp_path / "home"
    home.mkdir()
    env["HOME"] = str(home)  # telemetry's device id / queue would land here: checked below
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


def _run_child(tmp_path, cmd: list, timeout: float):
    (tmp_path / "child.py").write_text(CHILD)
    return subprocess.run(cmd, env=_child_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def _result(proc) -> dict:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("RESULT "):])


def _no_telemetry_files(tmp_path):
    made = [str(p.relative_to(tmp_path)) for p in (tmp_path / "home").rglob("*")]
    assert not made, f"onnxruntime's telemetry wrote its device id / event queue: {made}"


def test_no_network_syscalls_under_strace(tmp_path, tiny_model):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace); the audit-hook test still runs")
    trace = tmp_path / "net.strace"
    proc = _run_child(tmp_path, [strace, "-f", "-qq", "-e", "trace=%network",
                                 "-o", str(trace), sys.executable, str(tmp_path / "child.py"), str(tiny_model),
                                 str(RUN_S)], timeout=RUN_S + 30)
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    result = _result(proc)
    calls = trace.read_text().splitlines()
    assert any("socketpair(AF_UNIX" in c for c in calls), "strace saw none of the child's syscalls:\n" + "\n".join(calls)
    inet = [c for c in calls if re.search(r"AF_INET6?\b", c)]
    assert not inet, "network syscalls (telemetry?):\n" + "\n".join(inet)
    assert result["store_open"] is not True
    _no_telemetry_files(tmp_path)


def test_no_python_network_use_nor_telemetry_store(tmp_path, tiny_model):
    """Without strace: an audit hook sees Python-level socket use only (ORT's telemetry is native); the
    native telemetry's footprint, its device id and event queue opened at import, is checked directly."""
    proc = _run_child(tmp_path, [sys.executable, str(tmp_path / "child.py"), str(tiny_model), "2", "--audit"],
                      timeout=60)
    result = _result(proc)
    assert result["hook_works"], "the audit hook saw no socket at all"
    assert result["events"] == [], f"Python-level network use: {result['events']}"
    assert result["store_open"] is not True, "onnxruntime's telemetry queue is open: telemetry is running"
    _no_telemetry_files(tmp_path)


def test_warns_when_onnxruntime_was_imported_first(monkeypatch):
    from vlmdeploy.runtime import offline

    fake = type(sys)("onnxruntime")
    fake.disable_telemetry_events = lambda: None
    monkeypatch.setitem(sys.modules, "onnxruntime", fake)
    monkeypatch.setattr(offline, "telemetry_store_open", lambda: True)
    monkeypatch.setattr(offline, "_warned", False)
    monkeypatch.setenv(offline.TELEMETRY_ENV, "1")
    with pytest.warns(RuntimeWarning, match="ORT_DISABLE_TELEMETRY=1"):
        assert offline.import_onnxruntime() is fake
    assert os.environ[offline.TELEMETRY_ENV] == "1"
