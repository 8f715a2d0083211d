"""The profiler service on a free loopback port, in a background thread of the test process."""

from __future__ import annotations

import contextlib
import threading
import time

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
