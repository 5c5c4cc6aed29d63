"""A Dask cluster of several "hosts" on this machine: network and mount namespaces.

Each host is a network namespace with its own address on a private bridge
(veth pairs on ``10.<b>.<c>.0/24``, which this module creates and deletes),
its own host name (a UTS namespace) and its own ``/tmp`` (a tmpfs in a mount
namespace), where only the output folder is bind-mounted from this machine's
``/tmp``. The scheduler and each worker are ``dask scheduler`` / ``dask
worker`` processes started in their host, stopped by PID. This process (the
client) stays in the root namespaces and reaches them over the bridge, whose
address is ``bridge`` (an HTTP server bound there serves the sources).

Needs root (``CAP_NET_ADMIN``, ``CAP_SYS_ADMIN``) and ``ip`` / ``unshare``;
:func:`available` says why not otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent

# In a host: keep a handle on each folder of this machine's /tmp the host must see (the
# output folder; the code, when the repository or its environment lives under /tmp), give
# the host its own /tmp, put those folders back at their paths, name the host, run the command.
_ENTER = """set -e
mount --make-rprivate /
i=0
for p in $H5_KEEP; do mkdir -p "$H5_STASH/$i"; mount --bind "$p" "$H5_STASH/$i"; i=$((i+1)); done
mount -t tmpfs tmpfs /tmp
i=0
for p in $H5_KEEP; do mkdir -p "$p"; mount --bind "$H5_STASH/$i" "$p"; i=$((i+1)); done
hostname "$H5_HOSTNAME"
exec "$@"
"""


def available() -> str | None:
    """Why namespaces cannot be made here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root to create network and mount namespaces"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command"
    name = f"h5probe{os.getpid() % 100000}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *args] if netns is None else ["ip", "netns", "exec", netns, "ip", *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


class Hosts:
    """A bridge, and one namespace per host named in ``names`` (the first runs the scheduler)."""

    def __init__(self, shared: Path, names: list[str], logs: Path) -> None:
        tag = f"{os.getpid() % 10000}{random.randrange(100)}"
        self.tag = tag
        self.shared = shared
        self.logs = logs
        self.bridge_name = f"h5br{tag}"
        subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.bridge = f"{subnet}.1"
        self.addresses = {name: f"{subnet}.{i + 2}" for i, name in enumerate(names)}
        self.namespaces = {name: f"h5{tag}{name}" for name in names}
        self.processes: list[subprocess.Popen] = []
        self.stash = f"/run/h5bank-hosts-{tag}"  # mount points, empty outside the hosts
        self._made: list[tuple[str, ...]] = []

    def up(self) -> Hosts:
        _ip("link", "add", self.bridge_name, "type", "bridge")
        self._made.append(("link", "del", self.bridge_name))
        _ip("addr", "add", f"{self.bridge}/24", "dev", self.bridge_name)
        _ip("link", "set", self.bridge_name, "up")
        for k, (name, ns) in enumerate(self.namespaces.items()):
            _ip("netns", "add", ns)
            self._made.append(("netns", "del", ns))
            outside, inside = f"h5v{self.tag}{k}", f"h5i{self.tag}{k}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "master", self.bridge_name, "up")
            _ip("addr", "add", f"{self.addresses[name]}/24", "dev", inside, netns=ns)
            _ip("link", "set", inside, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)
        return self

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        """Run ``argv`` on host ``name``, in a process group of its own."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "SLURM_"))}
        keep = [self.shared, TESTS.parent, Path(sys.prefix)]
        env.update(
            H5_KEEP=" ".join(str(p) for p in keep if str(p).startswith("/tmp/")),
            H5_STASH=f"{self.stash}/{name}",
            H5_HOSTNAME=f"h5-{name}",
            PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        )
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        command = ["ip", "netns", "exec", self.namespaces[name], "unshare", "--mount", "--uts",
                   "sh", "-c", _ENTER, "sh", *argv]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.processes.append(process)
        return process

    def scheduler(self, name: str, port: int = 8786) -> str:
        address = f"tcp://{self.addresses[name]}:{port}"
        self.start(name, [str(VENV_BIN / "dask"), "scheduler", "--host", self.addresses[name],
                          "--port", str(port), "--no-dashboard"])  # fmt: skip
        return address

    def worker(self, name: str, scheduler: str) -> None:
        self.start(name, [str(VENV_BIN / "dask"), "worker", scheduler, "--host",
                          self.addresses[name], "--nthreads", "1", "--no-dashboard",
                          "--name", name, "--memory-limit", "2GiB"])  # fmt: skip

    def down(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for made in reversed(self._made):
            subprocess.run(["ip", *made], capture_output=True)
        self._made.clear()
        shutil.rmtree(self.stash, ignore_errors=True)
