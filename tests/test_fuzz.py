"""Fuzzing the readers: every crafted case, and seeded truncations and byte flips of a valid
bank, through every reader and every inspection command.

Each file is probed in a forked child, under an address-space limit
(``RLIMIT_AS``: the parent's size plus :data:`HEADROOM`) and a time bound
(:data:`SECONDS`, a hang detector, far above the ~0.1 s a probe takes). The
child opens the bank with ``TypedFile``, reads every source by id and every
feature as a Dask array, then runs ``h5bank info``, ``ls``, ``show`` and
``verify --data``. Every step must end in data or in a documented error (an
``H5BankError``; ``OSError`` where h5py could not read a damaged chunk after
the file opened), each command in exit code 0 or 1 with at most one line on
stderr, and nothing of the planted secret may come out.

``H5BANK_FUZZ=N`` sets the number of mutants (default 300; a longer run:
``H5BANK_FUZZ=5000 H5BANK_FUZZ_SEED=7 pytest tests/test_fuzz.py``, or
``make fuzz``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import traceback
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from crafted import CASES, SECRET, base_bank, crafted, mutants

from pipeline import TypedFile
from pipeline.cli import main
from pipeline.errors import H5BankError

matplotlib.use("Agg")
import matplotlib.pyplot

MUTANTS = int(os.environ.get("H5BANK_FUZZ", "300"))
SEED = int(os.environ.get("H5BANK_FUZZ_SEED", "0"))
SECONDS = 60
HEADROOM = 512 << 20  # address space a probe may add to what the parent process has mapped
AT_ONCE = os.cpu_count() or 1  # probes running at once
EXPECTED = (H5BankError, OSError)


def _read_everything(path: str) -> list[str]:
    """What a user's script does with a bank; the text of everything read."""
    seen = []
    with TypedFile(path) as bank:
        for id_ in bank.ids:
            seen.append(repr(bank.get(id_)))
        for name, array in bank.to_dask().items():
            seen.append(f"{name}: {np.asarray(array.compute(scheduler='sync'))!r}")
    return seen


def _step(name: str, run, report: dict) -> None:
    try:
        out = run()
        report[name] = {"ok": True, "leak": SECRET in "".join(out)}
    except EXPECTED as error:
        report[name] = {"ok": False, "error": type(error).__name__, "leak": SECRET in str(error)}
    except BaseException as error:  # an error h5bank does not document: the finding
        report[name] = {
            "ok": False,
            "unexpected": f"{type(error).__name__}: {error}"[:500],
            "trace": traceback.format_exc()[-1500:],
            "leak": SECRET in str(error),
        }


def _commands(path: str, folder: Path, report: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    runner = CliRunner()
    out = str(folder / "shown.png")
    for args in (["info", path], ["ls", path], ["show", path, "s0", "--out", out],
                 ["verify", "--data", path]):  # fmt: skip
        result = runner.invoke(main, args, catch_exceptions=True)
        stderr = result.stderr if hasattr(result, "stderr") else ""
        text = result.output + stderr
        report[" ".join(args[:1])] = {
            "code": result.exit_code,
            "lines": len(
                [line for line in stderr.splitlines() if line.strip() and "warning:" not in line]
            ),
            "raised": None
            if result.exception is None or isinstance(result.exception, SystemExit)
            else f"{type(result.exception).__name__}: {result.exception}"[:300],
            "hint": "H5BANK_TRACEBACK" in text or "MemoryError" in text,
            "leak": SECRET in text,
        }


def probe(path: str, folder: Path) -> dict:
    """Probe ``path`` in a forked child; what each step did."""
    return finish(start(path, folder))


def start(path: str, folder: Path) -> tuple[int, int]:
    """Fork the child probing ``path``: its pid and the pipe its report comes on."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: bounded, and never returns into pytest
        code = 1
        try:
            os.close(read)
            os.environ["H5BANK_NO_FORK"] = "1"  # this child is the isolation
            size = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM, size + HEADROOM))
            signal.alarm(SECONDS)
            report: dict = {}
            _step("read", lambda: _read_everything(path), report)
            _commands(path, folder / str(os.getpid()), report)
            with os.fdopen(write, "w") as pipe:
                json.dump(report, pipe)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def finish(child: tuple[int, int]) -> dict:
    """The report of a probe :func:`start` forked, once it ended."""
    pid, read = child
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"died": signal.Signals(os.WTERMSIG(status)).name}
    return json.loads(text) if text else {"died": f"exit {os.WEXITSTATUS(status)}"}


def probe_all(paths: list[str], folder: Path) -> Iterator[tuple[str, dict]]:
    """Each of ``paths`` with its report, probed :data:`AT_ONCE` at a time."""
    running: list[tuple[str, tuple[int, int]]] = []
    for path in paths:
        running.append((path, start(path, folder)))
        if len(running) == AT_ONCE:
            done, child = running.pop(0)
            yield done, finish(child)
    for done, child in running:
        yield done, finish(child)


def problems(report: dict) -> list[str]:
    """What in a probe's report breaks the promise (see the module docstring)."""
    if "died" in report:
        return [f"the probe died: {report['died']} (a hang past {SECONDS}s is SIGALRM)"]
    found = []
    for step, outcome in report.items():
        if outcome.get("leak"):
            found.append(f"{step}: the secret came out")
        if outcome.get("unexpected"):
            found.append(f"{step}: {outcome['unexpected']}\n{outcome['trace']}")
        if "code" in outcome:
            if outcome["code"] not in (0, 1) or outcome["raised"]:
                found.append(f"h5bank {step}: exit {outcome['code']} {outcome['raised']}")
            if outcome["lines"] > 1 or outcome["hint"]:
                found.append(f"h5bank {step}: not one documented line on stderr")
    return found


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("fuzz")
    files = [crafted(name, folder / name) for name in CASES]
    valid = base_bank(folder / "valid.h5")
    files.extend(mutants(valid, folder / "mutants", MUTANTS, SEED))
    # Once here, so each forked probe finds dask, matplotlib and the CLI imported and warm.
    os.environ["H5BANK_NO_FORK"] = "1"
    try:
        _read_everything(valid)
        _commands(valid, folder, {})
    finally:
        del os.environ["H5BANK_NO_FORK"]
    return files


def test_the_probe_sees_a_leak_and_a_bad_exit(tmp_path):
    """The fuzz can fail: a bank whose notes hold the secret is reported as a leak."""
    bank = base_bank(tmp_path / "leaky.h5")
    with TypedFile(bank, mode="r+") as opened:
        opened.add("s9", {"notes": SECRET})
    assert "read: the secret came out" in problems(probe(bank, tmp_path))
    assert problems({"x": {"code": 2, "raised": None, "lines": 1, "hint": False}})


@pytest.mark.timeout(max(300, MUTANTS // 5))  # a longer run (H5BANK_FUZZ) gets its time
def test_every_crafted_and_damaged_bank_ends_in_data_or_a_documented_error(corpus, tmp_path):
    failures = {}
    outcomes: dict[str, int] = {}
    for path, report in probe_all(corpus, tmp_path):
        found = problems(report)
        if found:
            failures[Path(path).name] = found
        read = report.get("read", {})
        key = "read ok" if read.get("ok") else f"read {read.get('error', 'died')}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"fuzz: {len(corpus)} files (seed {SEED}): {outcomes}")
    assert not failures, json.dumps(failures, indent=1)[:20000]
