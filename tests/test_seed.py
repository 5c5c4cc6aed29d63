"""h5mapper's README, snippet by snippet, with only the import changed.

h5mapper's README (the seed this project keeps the shape of) is what people
bring code from. Each of its Python snippets is below as a script, as close
to the original as it can be: ``import h5mapper as h5m`` became
``import pipeline as h5m``, and what the README leaves out (the data, the
bodies of ``load`` and ``plot``, the ``....`` of a call) is filled in and
marked ``# filled in``. Each script runs the way a user runs one, with
``python script.py`` and no ``if __name__ == "__main__":`` guard, on the
embedded default (a local Dask cluster of worker processes). Checks are
``assert`` statements in the scripts: a failing one exits non-zero.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

pytest.importorskip("torch")

# h5mapper's Quickstart: the Experiment, create with n_workers, add on the fly, then reading by
# id, by refs and by slice (the README's `>>` lines), and set / __setitem__ ("the same
# interface is also implemented for set(source, data) and __setitem__").
EXPERIMENT = """
import numpy as np  # filled in
import pipeline as h5m

class Experiment(h5m.TypedFile):

    data = h5m.Group(
            images=h5m.Image(),
            labels=h5m.DirLabels()
            )
    logs = h5m.Group(
            loss=h5m.Array()
            )

# create instance from raw sources
exp = Experiment.create("experiment.h5",
        # those are then used as ids :
        sources=["planes/01.jpeg", "planes/02.jpeg"],
        n_workers=8)
losses_array = np.linspace(1.0, 0.1, 10000)  # filled in
# add id <-> data on the fly :
exp.logs.add("train", dict(loss=losses_array))

# 1/ By their id
out = exp.logs.get("train")
assert list(out) == ["loss"] and np.array_equal(out["loss"], losses_array), out  # filled in
assert np.array_equal(exp.logs["train"]["loss"], losses_array)  # filled in
# 2/ By the index of their ids through their refs attribute
assert exp.data.images[exp.data.images.refs[0]].shape == (32, 32)  # filled in: assert
# 3/ with any item supported by the h5py.Dataset
assert exp.data.labels[:32].tolist() == [0, 0]  # filled in: assert
# set(source, data) and __setitem__
exp.logs.set("train", dict(loss=losses_array * 2))
assert np.array_equal(exp.logs["train"]["loss"], losses_array * 2)  # filled in
exp.data.labels[:2] = np.array([0, 0])
print("ids", exp.ids)  # filled in
"""

# h5mapper's Feature section: MyFeature as written, a TypedFile of it, read, plot, write.
MY_FEATURE = '''
import numpy as np  # filled in
import pipeline as h5m


class MyFeature(h5m.Feature):

    # only sources matching this pattern will be passed to load(...)
    __re__ = r".special$"

    # args for the h5py.Dataset
    __ds_kwargs__ = dict(compression='lzf', chunks=(1, 350))

    def __init__(self, my_extraction_param=0):
        self.my_extraction_param = my_extraction_param

    @property
    def attrs(self):
        # those are then written in the h5py.Group.attrs
        return {"p": self.my_extraction_param}

    def load(self, source):
        """your method to get an np.ndarray or a dict thereof
        from a path, an url, whatever sources you have..."""
        data = np.loadtxt(source).reshape(-1, 350)  # filled in
        return data

    def plot(self, data):
        """custom plotting method for this kind of data"""
        # ...
        return f"plotted {data.shape}"  # filled in

# attach it
class Data(h5m.TypedFile):
    feat = MyFeature(47)

# load sources...
f = Data.create("data.h5", sources=["arrays/"])  # filled in: ....

# read your data through __getitem__
batch = f.feat[4:8]

# access your method
assert f.feat.plot(batch) == "plotted (4, 350)"  # filled in: assert

# modify the file through __setitem__
f.feat[4:8] = batch ** 2
assert np.allclose(f.feat[4:8], batch ** 2) and f.feat.attrs["p"] == 47  # filled in
assert len(f) == 3 and f.feat.shape == (9, 350)  # filled in: not.special was left out
'''

# h5mapper's serve section: a bank type that is also a torch Dataset, in a DataLoader.
DATASET = """
import numpy as np  # filled in
import torch
import pipeline as h5m


class MyInputFeature(h5m.Feature):  # filled in
    def __init__(self, n):
        self.n = n

    def load(self, source):
        return np.full((1, self.n), len(source.id), dtype=np.float32)


sources = ["classes/"]  # filled in


class MyDS(h5m.TypedFile, torch.utils.data.Dataset):

    x = MyInputFeature(42)
    labels = h5m.DirLabels()

    def __getitem__(self, item):
        return self.x[item], self.labels[item]

    def __len__(self):
        return len(self.x)

ds = MyDS.create("train.h5", sources, keep_open=True)

dl = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=8, pin_memory=True)
seen = 0  # filled in: one epoch
for x, y in dl:
    assert x.shape[1:] == (42,) and x.dtype == torch.float32 and y.dtype == torch.int64
    seen += len(x)
assert seen == len(ds) == 40, seen
"""

# The TypedFile(..., keep_open=True) and serve() with a batch object of Input / Target.
SERVE = """
import torch  # filled in
import pipeline as h5m


class Train(h5m.TypedFile):  # filled in: a bank with data/image and data/labels
    data = h5m.Group(image=h5m.Image(size=(16, 16), mode="L"), labels=h5m.DirLabels())


Train.create("train.h5", ["classes/"], n_workers=2)  # filled in

f = h5m.TypedFile("train.h5", keep_open=True)
loader = f.serve(
    # batch object :
    dict(
        x=h5m.Input(key='data/image', getter=h5m.GetId()),
        labels=h5m.Target(key='data/labels', getter=h5m.GetId())
    ),
    # Dataloader kwargs :
    num_workers=8, pin_memory=True, batch_size=32, shuffle=True
)
batches = list(loader)  # filled in: one epoch
assert [len(b["x"]) for b in batches] == [32, 8], [len(b["x"]) for b in batches]
assert batches[0]["x"].shape[1:] == (16, 16) and batches[0]["labels"].dtype == torch.int64
assert sorted(torch.cat([b["labels"] for b in batches]).tolist()) == [0] * 20 + [1] * 20
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The files the snippets name: two 32x32 JPEGs, ``.special`` arrays, two class folders."""
    root = tmp_path_factory.mktemp("seed")
    rng = np.random.default_rng(7)
    (root / "planes").mkdir()
    for name in ("01", "02"):
        iio.imwrite(root / "planes" / f"{name}.jpeg", rng.integers(0, 255, (32, 32), np.uint8))
    (root / "arrays").mkdir()
    for i in range(3):
        np.savetxt(root / "arrays" / f"{i}.special", rng.random(3 * 350))
    np.savetxt(root / "arrays" / "not.special.txt", rng.random(350))  # not ".special$"
    for label in ("cats", "dogs"):
        (root / "classes" / label).mkdir(parents=True)
        for i in range(20):
            iio.imwrite(
                root / "classes" / label / f"{i}.png", rng.integers(0, 255, (24, 24, 3), np.uint8)
            )
    return root


def run_script(folder: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    script = folder / f"{name}.py"
    script.write_text(textwrap.dedent(text))
    result = subprocess.run(
        [sys.executable, script.name], cwd=folder, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{name}.py failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_quickstart_experiment_create_add_and_every_way_to_read(folder):
    result = run_script(folder, "experiment", EXPERIMENT)
    assert "ids ['planes/01.jpeg', 'planes/02.jpeg', 'train']" in result.stdout


def test_my_feature_exactly_as_written(folder):
    run_script(folder, "my_feature", MY_FEATURE)


def test_a_bank_type_that_is_a_torch_dataset_in_a_dataloader_of_8_workers(folder):
    run_script(folder, "dataset", DATASET)


def test_typedfile_keep_open_then_serve_a_batch_object(folder):
    run_script(folder, "serve", SERVE)
