"""A throwaway PostgreSQL server on loopback, from Debian's ``postgresql`` package, for the tests and
benchmarks that run studies on PostgreSQL (``tests/install-postgres.sh`` installs the package).

Run as root, the server runs as the ``postgres`` user the package creates: PostgreSQL refuses root.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def server_binaries() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``createdb`` (Debian keeps them out of PATH), or None."""
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    found = shutil.which("initdb")
    candidates = [Path(f) for f in reversed(folders)] + ([Path(found).resolve().parent] if found else [])
    return next((c for c in candidates if all((c / b).exists() for b in ("initdb", "pg_ctl", "createdb"))), None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Start a fresh server on 127.0.0.1 and yield its SQLAlchemy URL; stop it and delete its files after."""
    binaries = server_binaries()
    if binaries is None:
        raise FileNotFoundError("PostgreSQL server binaries not found: run tests/install-postgres.sh")
    folder = Path(tempfile.mkdtemp(prefix="search-postgres-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def pg(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, text=True, cwd=folder)

    try:
        pg(str(binaries / "initdb"), "-D", str(data), "-U", "search", "--auth=trust", "-E", "UTF8")
        options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c fsync=off -c max_connections=200"
        pg(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o", options, "-w", "start")
        try:
            pg(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "search", "search")
            yield f"postgresql://search@127.0.0.1:{port}/search"
        finally:
            pg(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"PostgreSQL: {' '.join(exc.cmd)} failed: {exc.stderr or exc.stdout}") from exc
    finally:
        shutil.rmtree(folder, ignore_errors=True)
