"""Banks from someone else: each crafted case of ``tests/crafted.py``, read as a user would.

A bank that points out of itself is refused by every reader and command,
naming the dataset and the file it points to, and nothing of the planted
secret comes out; sizes a file declares without storing them are refused
before anything is allocated; ``verify`` names what is wrong; ``info``,
``ls``, ``show`` and ``verify`` run in a child process, so even a crash of
HDF5 is one line.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from crafted import SECRET, Base, base_bank, crafted

from pipeline import TypedFile
from pipeline.cli import main
from pipeline.cli.isolation import isolated
from pipeline.errors import DamagedBankError, UnsafeBankError
from pipeline.format import layout

POINTERS = ["external_storage", "virtual_dataset", "virtual_relative", "external_link"]
H5BANK = [sys.executable, "-m", "pipeline.cli"]
MEMORY = 2 << 30  # the address space the CLI gets here: Python, h5py and numpy take ~1 GiB


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``h5bank ARGS`` in its own process, under :data:`MEMORY` of address space."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    return subprocess.run(
        [*H5BANK, *args], capture_output=True, text=True, timeout=timeout, preexec_fn=limit
    )


def inline(*args: str) -> subprocess.CompletedProcess[str]:
    """``h5bank ARGS`` in this process (click's runner: no fork, no memory limit), for the
    checks that need neither."""
    result = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder, made = tmp_path_factory.mktemp("crafted"), {}

    def case(name: str) -> str:
        if name not in made:
            made[name] = crafted(name, folder / name)
        return made[name]

    return case


@pytest.mark.parametrize("case", POINTERS)
def test_a_bank_pointing_out_of_itself_is_refused_naming_the_dataset_and_the_target(cases, case):
    bank = cases(case)
    with pytest.raises(UnsafeBankError) as refused:
        TypedFile(bank)
    message = str(refused.value)
    assert "allow_external=True" in message
    assert SECRET not in message
    where = "/leak" if case == "external_link" else "/notes/data"
    target = "private.h5" if case != "external_storage" else "secret.txt"
    assert where in message and target in message


@pytest.mark.parametrize("case", [*POINTERS, "external_link_fifo"])
@pytest.mark.parametrize("command", [["info"], ["ls"], ["show", "s0", "--out", "x.png"]])
def test_every_command_refuses_it_in_one_line_and_nothing_of_the_secret_comes_out(
    cases, case, command, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    bank = cases(case)
    run = inline(*command[:1], bank, *command[1:])
    assert run.returncode == 1, run
    assert SECRET not in run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and "UnsafeBankError" in run.stderr, run.stderr


@pytest.mark.parametrize("case", [*POINTERS, "external_link_fifo"])
def test_verify_reports_the_pointer_as_the_banks_problem(cases, case):
    run = inline("verify", "--data", cases(case))
    assert run.returncode == 1
    assert SECRET not in run.stdout + run.stderr
    assert " to " in run.stderr or "another file" in run.stderr, run.stderr


def test_the_caller_may_opt_in_and_then_reads_through_the_pointer(cases, client):
    """The refusal is what keeps the secret in: opted in, the pointer is followed, also by
    the Dask workers that reopen the file for a lazy array."""
    bank = cases("external_storage")
    with Base(bank, allow_external=True) as opened:
        assert SECRET in opened.get("s0")["notes"]
        assert SECRET.encode() in bytes(client.compute(opened.notes.to_dask()).result())
    run = cli("info", "--allow-external", bank)
    assert run.returncode == 0, run.stderr


def test_a_sharded_banks_own_shard_is_the_one_pointer_allowed(tmp_path):
    """A virtual dataset over a file the bank's shard index names, beside the bank, opens; the
    same file unnamed, or named with a folder, is refused."""
    bank = base_bank(tmp_path / "bank.h5")
    shard = tmp_path / "bank.shard-0.h5"
    with h5py.File(shard, "w") as f:
        f["notes"] = np.frombuffer(b"shard text", dtype="u1")
    with h5py.File(bank, "r+") as f:
        source = h5py.VirtualSource(shard.name, "notes", shape=(10,))
        virtual = h5py.VirtualLayout(shape=(10,), dtype="u1")
        virtual[:] = source
        del f["notes/data"]
        f["notes"].create_virtual_dataset("data", virtual)
        f["notes/refs"][0] = (0, 10)
    for named, opens in (([], False), ([f"sub/{shard.name}"], False), ([shard.name], True)):
        with h5py.File(bank, "r+") as f:
            f.attrs[layout.ATTR_SHARDS] = json.dumps(named)
        if opens:
            with TypedFile(bank) as opened:
                assert opened.get("s0")["notes"] == "shard text"
        else:
            with pytest.raises(UnsafeBankError, match=r"bank\.shard-0\.h5"):
                TypedFile(bank)


def test_a_remote_bank_pointing_out_of_itself_is_refused(cases, http_server):
    bank = cases("external_storage")
    shutil.copy(bank, http_server.root / "crafted.h5")
    with pytest.raises(UnsafeBankError, match=r"secret\.txt"):
        TypedFile(f"{http_server.url}/crafted.h5")


@pytest.mark.parametrize(
    ("case", "named"),
    [("huge_ids", "/__sources__/id"), ("huge_span", "/notes/data")],
)
def test_declared_sizes_with_nothing_stored_are_refused_before_allocating(cases, case, named):
    bank = cases(case)
    assert os.path.getsize(bank) < 1 << 20
    with pytest.raises(DamagedBankError, match=named):
        TypedFile(bank)
    for command in (["info"], ["ls"], ["show", "s0"], ["verify", "--data"]):
        run = cli(command[0], bank, *command[1:])
        assert run.returncode == 1
        assert named in run.stderr and "MemoryError" not in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1


def test_a_huge_refs_table_is_read_only_as_far_as_the_ids_go(cases, tmp_path):
    bank = cases("huge_refs")
    run = cli("info", bank)
    assert run.returncode == 0 and "values" in run.stdout, run.stderr
    assert cli("ls", bank).stdout.split() == ["s0", "s1", "s2"]
    with TypedFile(bank) as opened:
        np.testing.assert_array_equal(opened.get("s2")["values"], np.arange(4, dtype="f4"))
    run = cli("verify", bank)
    assert run.returncode == 1 and "values/refs has 2147483648 rows" in run.stderr


def test_verify_data_walks_only_the_chunks_that_are_stored(cases):
    """A (2^40,) dataset of one-byte chunks, ten written: ten chunks read, not 2^40."""
    run = cli("verify", "--data", cases("huge_chunk_walk"), timeout=60)
    assert run.returncode == 0 and "every chunk checked" in run.stdout, run.stderr


def test_an_attribute_declaring_more_than_it_stores_is_one_line(cases):
    bank = cases("huge_attribute")
    with pytest.raises(DamagedBankError):
        TypedFile(bank)
    run = cli("info", bank)
    assert run.returncode == 1 and "DamagedBankError" in run.stderr
    assert run.stderr.count("\n") == 1


def test_ids_with_terminal_escapes_are_printed_escaped(cases):
    bank = cases("ansi_id")
    out = cli("ls", bank).stdout
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;pwned\\x07\\x1b[2Jfake" in out.splitlines()


def _crash(bank: str) -> None:
    faulthandler.disable()  # pytest's dump of the child's stack is noise here
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_reading_a_bank_is_reported_as_a_damaged_file(tmp_path, monkeypatch):
    """What an HDF5 segfault does to a command: the forked child dies, the parent says so."""
    monkeypatch.delenv("H5BANK_NO_FORK", raising=False)
    monkeypatch.delenv("H5BANK_TRACEBACK", raising=False)
    with pytest.raises(DamagedBankError, match="SIGSEGV") as refused:
        isolated(_crash)(bank=str(tmp_path / "x.h5"))
    assert "x.h5" in str(refused.value)


def test_a_good_bank_reads_the_same_through_every_command(tmp_path):
    """The checks refuse nothing h5bank wrote: a plain bank passes them all."""
    bank = base_bank(tmp_path / "good.h5")
    assert cli("verify", "--data", bank).returncode == 0
    assert cli("ls", bank).stdout.split() == ["s0", "s1", "s2"]
    run = cli("info", bank)
    assert run.returncode == 0 and "notes" in run.stdout
    with TypedFile(bank) as opened:
        assert opened.get("s1")["notes"] == "note 1"
