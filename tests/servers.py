"""Real servers on 127.0.0.1 for the cloud tests: moto (S3), the GCS emulator,
``rangeserver.py`` (files with Range requests) and ``faultserver.py`` (faults).

Each server is a separate process this session starts and stops by its PID
(SIGTERM, then SIGKILL if it lingers); :func:`stop_all` at the end of the
session (and at exit) stops any still running. A server that cannot start
skips its tests locally and fails them on CI (``CI=true``): a CI run must not
pass by skipping what it is meant to test.

Facts these follow (measured, see the project's notes on cloud sources):
moto is ready when ``GET /moto-api/`` answers; the GCS emulator when
``GET /storage/v1/b`` answers, and it listens with a backlog of 5, so clients
must fetch in small batches; ``rangeserver.py`` and ``faultserver.py`` write
their port to a file when they are ready and log one line per request.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
_RUNNING: list[subprocess.Popen] = []
_REQUEST = re.compile(r"^[A-Z]+ \S+ \d{3} ")  # the scripts' "METHOD PATH STATUS SIZE"


# Linux: servers get SIGTERM when this process dies, even by os._exit (pytest-timeout's
# thread method), so none outlives the session.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def popen(argv: list[str], log) -> subprocess.Popen:
    """Start a server process writing to ``log``; it is stopped at the end of the session."""
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if _PRCTL is not None else None,
    )
    _RUNNING.append(process)
    return process


def unavailable(reason: str) -> None:
    """Skip the test for a service that cannot run here; fail it on CI."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: cloud tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def refuses(port: int) -> bool:
    """Whether a connection to ``port`` is refused (nothing listens there)."""
    try:
        socket.create_connection((HOST, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # reset, timeout: something is still there
    return False


def stop(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a process this session started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    with contextlib.suppress(ValueError):
        _RUNNING.remove(process)


def stop_all() -> None:
    for process in list(reversed(_RUNNING)):
        stop(process)


atexit.register(stop_all)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered, even if not with 200
    except OSError:
        return False


class Server:
    """A server process on 127.0.0.1: started on a port, stopped by PID, restartable on that port."""

    def __init__(self, name: str, argv: Callable[[int], list[str]], ready_path: str, log: Path):
        self.name = name
        self._argv = argv
        self._ready_path = ready_path
        self.log = log
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, port: int | None = None) -> Server:
        """Start (again) on ``port``, this server's last port, or a free one; wait until it answers."""
        self.port = port or self.port or free_port()
        with open(self.log, "ab") as log:  # the child keeps its own descriptor
            self.process = popen(self._argv(self.port), log)
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.url + self._ready_path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)

    def wait_gone(self) -> None:
        """Reap a server stopped from elsewhere (a Dask worker) and check its port is free."""
        assert self.process is not None
        self.process.wait(timeout=60)
        stop(self.process)
        assert refuses(self.port), f"{self.name}: port {self.port} still answers"


def start_moto(folder: Path, port: int | None = None) -> Server:
    """A moto S3 server (``python -m moto.server``). Skips (fails on CI) if it cannot run."""
    if importlib.util.find_spec("moto") is None:
        unavailable("moto[server] is not installed")
    server = Server(
        "moto",
        lambda p: [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(p)],
        "/moto-api/",
        folder / "moto.log",
    )
    try:
        return server.start(port)
    except RuntimeError as error:
        unavailable(str(error))
        raise


def start_gcs(folder: Path) -> Server:
    """``gcp-storage-emulator`` in memory, with the bucket ``gbucket``."""
    executable = Path(sys.executable).with_name("gcp-storage-emulator")
    if not executable.exists() or importlib.util.find_spec("gcsfs") is None:
        unavailable("gcp-storage-emulator or gcsfs is not installed")

    def argv(port: int) -> list[str]:
        return [str(executable), "start", "--host", HOST, "--port", str(port), "--in-memory",
                "--default-bucket", "gbucket"]  # fmt: skip

    server = Server(
        "gcp-storage-emulator",
        argv,
        "/storage/v1/b",
        folder / "gcs.log",
    )
    try:
        return server.start()
    except RuntimeError as error:
        unavailable(str(error))
        raise


class ScriptServer:
    """A test server script of this folder, started on a free port it writes to a file.

    Its log counts the requests it answered (one ``METHOD PATH STATUS ...`` line each).
    """

    def __init__(self, script: str, args: list[str], folder: Path, name: str) -> None:
        self.log = folder / f"{name}.log"
        port_file = folder / f"{name}.port"
        port_file.unlink(missing_ok=True)
        path = Path(__file__).resolve().with_name(script)
        argv = [sys.executable, str(path), "--port", "0", "--port-file", str(port_file), *args]
        with open(self.log, "ab") as log:
            self.process = popen(argv, log)
        deadline = time.monotonic() + START_TIMEOUT
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                stop(self.process)
                unavailable(f"{script} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.url = f"http://{HOST}:{self.port}"

    def mark(self) -> int:
        """Where the log ends now: :meth:`requests_since` counts what comes after."""
        return self.log.stat().st_size

    def requests_since(self, mark: int) -> list[str]:
        """The request lines (``METHOD PATH STATUS SIZE``) logged after ``mark``."""
        with open(self.log, "rb") as f:
            f.seek(mark)
            lines = f.read().decode(errors="replace").splitlines()
        return [line for line in lines if _REQUEST.match(line)]

    def stop(self) -> None:
        stop(self.process)


class RangeServer(ScriptServer):
    """``tests/rangeserver.py`` serving ``root`` on ``host``; its log counts the requests it
    answered."""

    def __init__(self, root: Path, folder: Path, host: str = HOST) -> None:
        self.root = root
        args = ["--directory", str(root), "--host", host]
        super().__init__("rangeserver.py", args, folder, "rangeserver")
        self.url = f"http://{host}:{self.port}"


class FaultServer(ScriptServer):
    """``tests/faultserver.py``: S3 error XML, bare statuses and truncated bodies by path."""

    def __init__(self, folder: Path) -> None:
        super().__init__("faultserver.py", [], folder, "faultserver")


def marked_processes(variable: str, marker: str) -> list[int]:
    """Pids of the processes (other than this one) whose environment has ``variable=marker``:
    what a run started with that marker left running."""
    needle = f"{variable}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
