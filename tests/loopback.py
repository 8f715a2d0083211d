"""The profiler service on a free loopback port, in a background thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

TOKEN = "test-token"


@contextlib.contextmanager
def serving(profiler, token=TOKEN, **options):
    """Serve ``profiler`` on 127.0.0.1 at a port the OS picks; yields ``(server, "127.0.0.1:port")``
    and stops the server on exit. ``log_config=None`` leaves uvicorn's loggers to propagate."""
    from profilers._service import _server

    server = _server(profiler, token, host="127.0.0.1", port=0, log_config=None, **options)
    thread = threading.Thread(target=server.run, name="profiler-service", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the profiler service did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextlib.contextmanager
def serving_process(tmp_path, limits=None, **timing):
    """``search serve``'s :func:`profilers.serve` for the cpu target in a child process, as the
    command runs it (its own signal handling), on a free loopback port; yields
    ``(process, "127.0.0.1:port")``. Its temporary files go under ``tmp_path / "tmp"``. The
    process is killed on exit if still running."""
    import json
    import os
    import socket
    import subprocess
    import sys

    import httpx

    with socket.socket() as probe:  # a free port; nothing else binds loopback ports here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "tmp").mkdir(exist_ok=True)
    code = (
        "import json, sys\n"
        "from profilers import ServiceLimits, serve\n"
        "from targets import load_target\n"
        "limits, timing, port = json.loads(sys.argv[1])\n"
        f"serve(load_target('cpu'), port=port, token={TOKEN!r}, limits=ServiceLimits(**limits), **timing)\n"
    )
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    with open(tmp_path / "service.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code, json.dumps([limits or {}, timing, port])],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://{address}/health", headers={"Authorization": f"Bearer {TOKEN}"}).is_success:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start: {(tmp_path / 'service.log').read_text()}")
            time.sleep(0.1)
        yield process, address
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def memory_kib(pid):
    """``(current, peak)`` resident memory of process ``pid`` in KiB (VmRSS, VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
