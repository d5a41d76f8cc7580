"""Import ONNX Runtime with its telemetry off: the runtime never phones home.

Official onnxruntime wheels (1.29 and later, measured on 1.32) ship 1DS telemetry on Linux and macOS,
compiled into the native extension (`onnxruntime_pybind11_state*.so`), not into any Python code. At
`import onnxruntime` it creates a device id and an offline event queue under
`$XDG_CACHE_HOME` (else `~/.cache`)`/Microsoft/DeveloperTools/.onnxruntime/` (`deviceid`,
`onnxruntime.db`), and ~9 s later a native thread resolves `mobile.events.data.microsoft.com`
(DNS on port 53) to upload to `https://mobile.events.data.microsoft.com/OneCollector/1.0/`; with
`import onnxruntime` alone, no session needed.

The one off switch is the environment variable `ORT_DISABLE_TELEMETRY=1`, read ONCE, when the
native module initializes, and latched for the process: set after the import it does nothing,
and `onnxruntime.disable_telemetry_events()` only suppresses some events (the uploader still runs
and still sends). With the variable set before the import: no socket, no DNS, no cache files.
Every `import onnxruntime` in the runtime goes through `import_onnxruntime()` below.
"""

from __future__ import annotations

import os
import sys
import warnings

TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
_DISABLING = ("1", "true", "yes")  # values measured to switch it off ("0" does not)
_STORE = os.path.join(".onnxruntime", "onnxruntime.db")
_warned = False


def disable_onnxruntime_telemetry() -> None:
    """Set the switch for this process and the processes it starts; must run before onnxruntime is
    first imported (anywhere in the process) to have any effect. Overrides ORT_DISABLE_TELEMETRY=0."""
    os.environ[TELEMETRY_ENV] = "1"


def telemetry_store_open() -> bool | None:
    """Whether this process holds ONNX Runtime's telemetry queue (`.onnxruntime/onnxruntime.db`) open,
    the sign that its telemetry started; None where /proc/self/fd cannot be read (not Linux)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(_STORE):
                return True
        except OSError:  # closed meanwhile, or the listing's own descriptor
            continue
    return False


def import_onnxruntime():
    """`import onnxruntime` with telemetry off; returns the module.

    If something imported onnxruntime before this (telemetry then already started, and nothing can
    stop it in this process), warns once with the fix: set ORT_DISABLE_TELEMETRY=1 in the environment,
    or import vlmdeploy's runtime before anything that imports onnxruntime."""
    global _warned
    preloaded = "onnxruntime" in sys.modules
    preset = os.environ.get(TELEMETRY_ENV, "").strip().lower() in _DISABLING
    disable_onnxruntime_telemetry()

    import onnxruntime

    # also the documented runtime API (Windows' ETW provider; elsewhere it only drops some events)
    off = getattr(onnxruntime, "disable_telemetry_events", None)
    if off is not None:
        off()
    if preloaded and not _warned:
        store = telemetry_store_open()
        if store or (store is None and not preset):
            _warned = True
            warnings.warn(
                "onnxruntime was imported before vlmdeploy could switch its telemetry off, so this process may "
                f"send usage data to Microsoft. Set {TELEMETRY_ENV}=1 in the environment, or import "
                "vlmdeploy.runtime before anything that imports onnxruntime.",
                RuntimeWarning, stacklevel=2)
    return onnxruntime
