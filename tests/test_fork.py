"""Banks and ``fork``: what a forked child (a DataLoader worker) inherits must not lock
the parent out of its own files; and groups declared empty are filled by ``add``."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from features import Array
from pipeline import BankBusyError, Group, TypedFile


class Experiment(TypedFile):
    logs = Group(loss=Array())
    checkpoints = Group()
    runs = Group(nested=Group())


def _sleep(started, seconds: float) -> None:
    import time

    started.set()
    time.sleep(seconds)


def test_a_forked_child_does_not_keep_a_closed_writable_bank_locked(tmp_path):
    path = tmp_path / "experiment.h5"
    bank = Experiment(path, mode="a")
    bank.logs.add("run-1", {"loss": np.arange(3.0)})
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_sleep, args=(started, 30))
    child.start()  # like a persistent DataLoader worker, forked while the bank is open
    try:
        assert started.wait(60)
        bank.close()
        with Experiment(path) as again:  # HDF5's lock would refuse this if the child held it
            assert np.array_equal(again.logs.loss.get("run-1"), np.arange(3.0))
        with Experiment(path, mode="r+") as writer:
            writer.logs.add("run-2", {"loss": np.ones(2)})
    finally:
        child.kill()
        child.join()
    with Experiment(path) as done:
        assert done.ids == ["run-1", "run-2"]


def _use(bank: TypedFile, queue) -> None:
    try:
        queue.put(("ok", bank.logs.loss.get("run-1").tolist()))
    except Exception as error:  # what the child got, for the parent to check
        queue.put((type(error).__name__, str(error)))


def test_a_forked_child_reopens_a_read_only_bank_and_refuses_a_writable_one(tmp_path):
    path = tmp_path / "experiment.h5"
    with Experiment(path, mode="a") as bank:
        bank.logs.add("run-1", {"loss": np.arange(3.0)})
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_use, args=(bank, queue))
        child.start()
        kind, message = queue.get(timeout=60)
        child.join()
        assert kind == BankBusyError.__name__ and f"process ({child.pid})" in message
        assert bank.ids == ["run-1"]  # the parent's handle still works
    reader = Experiment(path)
    child = context.Process(target=_use, args=(reader, queue))
    child.start()
    assert queue.get(timeout=60) == ("ok", [0.0, 1.0, 2.0])
    child.join()
    assert reader.ids == ["run-1"] and reader.h5.id.valid
    reader.close()


def test_groups_declared_empty_are_listed_and_filled_by_add(tmp_path):
    path = tmp_path / "experiment.h5"
    with Experiment(path, mode="a") as bank:
        assert bank.root.children() == ["logs", "checkpoints", "runs"]
        assert bank.runs.children() == ["nested"]
        bank.checkpoints.add("epoch-0", {"w": np.ones((2, 3)), "b": np.zeros(3)})
        bank.runs.nested.add("epoch-0", {"x": np.arange(4)})
    with Experiment(path) as bank:
        got = bank.checkpoints.get("epoch-0")
        assert sorted(got) == ["b", "w"] and np.array_equal(got["w"], np.ones((2, 3)))
        assert np.array_equal(bank.runs.nested.x.get("epoch-0"), np.arange(4))
        with pytest.raises(AttributeError, match="no member 'missing'"):
            bank.checkpoints.missing  # noqa: B018


def test_only_read_only_banks_pickle(tmp_path):
    import pickle

    path = tmp_path / "experiment.h5"
    with Experiment(path, mode="a") as bank:
        bank.logs.add("run-1", {"loss": np.arange(3.0)})
        with pytest.raises(TypeError, match="mode='r'"):
            pickle.dumps(bank)
    with Experiment(path) as bank:
        copy = pickle.loads(pickle.dumps(bank))
        assert type(copy) is Experiment and copy.ids == ["run-1"]
        assert copy.h5 is not bank.h5  # its own handle, opened in this process
        copy.close()


def _read_through(bank: TypedFile, queue) -> None:
    try:
        queue.put(("ok", bank.logs.loss.get("run-1").tolist(), bank.ids))
    except Exception as error:
        queue.put((type(error).__name__, str(error), []))


def test_a_forked_child_reads_correctly_while_the_parent_has_other_handles(tmp_path):
    """HDF5 shares one file (one descriptor) between all handles on it in a process: the
    child's reopened bank reads through it, so that descriptor must still be the file."""
    path = tmp_path / "experiment.h5"
    with Experiment(path, mode="a") as bank:
        bank.logs.add("run-1", {"loss": np.arange(3.0)})
    train, val = Experiment(path), Experiment(path)  # two handles on one file
    train.logs.loss.get("run-1")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_through, args=(val, queue))
    child.start()
    assert queue.get(timeout=60) == ("ok", [0.0, 1.0, 2.0], ["run-1"])
    child.join()
    assert train.ids == ["run-1"] and val.logs.loss.get("run-1").tolist() == [0.0, 1.0, 2.0]
    train.close()
    val.close()


class Split(Experiment):
    def __init__(self, path, split: str) -> None:
        super().__init__(path)
        self.split = split


def test_pickling_keeps_what_a_subclass_set_on_the_instance(tmp_path):
    import pickle

    path = tmp_path / "experiment.h5"
    with Experiment(path, mode="a") as bank:
        bank.logs.add("run-1", {"loss": np.arange(3.0)})
    with Split(path, "val") as bank:
        copy = pickle.loads(pickle.dumps(bank))
        assert copy.split == "val" and copy.ids == ["run-1"] and copy.h5 is not bank.h5
        copy.close()
