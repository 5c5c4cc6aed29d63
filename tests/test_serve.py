"""Serving banks to PyTorch: batch specs, getters, DataLoader workers and their file handles.

Banks are built from generated files with ``scheduler="threads"`` (one on the
session's two-process ``LocalCluster``), then read through ``bank.serve`` /
``BankDataset`` exactly as a training script would. Bank types and the getters
that report which process read an item live in ``servebank.py``, so workers
started with ``spawn`` can import them.
"""

from __future__ import annotations

import collections
import fcntl
import gc
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import write_images, write_sounds
from servebank import (
    Media,
    Pictures,
    PicturesDataset,
    Position,
    ProxyDataset,
    Ragged,
    Sounds,
    Tables,
    WhoReads,
)

from pipeline import AsSlice, BankBusyError, BankDataset, GetId, GetIndex, Input, Target

CLASSES = ("cats", "dogs", "owls")
SPEC = dict(x=Input("images", GetId()), y=Target("labels", GetId()))


def build(bank_type, path, sources, scheduler="threads"):
    return bank_type.create(path, [str(s) for s in sources], scheduler=scheduler, progress=False)


# -- banks ------------------------------------------------------------------------------------


@pytest.fixture
def picture_files(tmp_path) -> Path:
    """15 PNGs in three class folders, of mixed sizes and modes."""
    root = tmp_path / "images"
    write_images(root, classes=CLASSES, per_class=5)
    return root


@pytest.fixture
def pictures(tmp_path, picture_files):
    bank = build(Pictures, tmp_path / "pictures.h5", [picture_files])
    yield bank
    bank.close()


@pytest.fixture
def ragged(tmp_path, picture_files):
    bank = build(Ragged, tmp_path / "ragged.h5", [picture_files])
    yield bank
    bank.close()


@pytest.fixture
def sounds(tmp_path):
    root = tmp_path / "sounds"
    write_sounds(root, per_class=3)
    bank = build(Sounds, tmp_path / "sounds.h5", [root])
    yield bank
    bank.close()


@pytest.fixture
def media(tmp_path, picture_files):
    root = tmp_path / "sounds"
    write_sounds(root)
    bank = build(Media, tmp_path / "media.h5", [picture_files, root])
    yield bank
    bank.close()


@pytest.fixture
def tables(tmp_path):
    """``.npy`` files of 3 to 9 rows of 3 values, and five plain ids ``item-<n>``."""
    folder = tmp_path / "arrays"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for k in range(4):
        np.save(folder / f"a_{k}.npy", rng.standard_normal((3 + 2 * k, 3)).astype(np.float32))
    bank = build(Tables, tmp_path / "tables.h5", [folder, *(f"item-{n}" for n in range(5))])
    yield bank
    bank.close()


# -- helpers ------------------------------------------------------------------------------------


def decoded_sources(root: Path, feature) -> dict[str, np.ndarray]:
    """Each PNG under ``root`` decoded by ``feature``, by source id."""
    return {
        p.relative_to(root).as_posix(): feature.decode(p.read_bytes(), p.name)
        for p in sorted(root.rglob("*.png"))
    }


def pixels_to_ids(bank, picture_files) -> dict[bytes, str]:
    """Which source an image is, from its pixels (the generated images are noise: all differ).

    Checks on the way that the bank holds what decoding each source file gives.
    """
    sources = decoded_sources(picture_files, bank.images.feature)
    assert sorted(sources) == sorted(bank.ids)
    for id_, image in sources.items():
        np.testing.assert_array_equal(bank.images.get(id_), image)
    which = {image.tobytes(): id_ for id_, image in sources.items()}
    assert len(which) == len(sources)
    return which


def one_epoch(loader, which) -> list[tuple[str, int]]:
    """``(source id, label)`` of every item a ``SPEC`` loader yields over one epoch."""
    served = []
    for batch in loader:
        x, y = batch["x"], batch["y"]
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (16, 16, 3)
        assert y.dtype == torch.int64 and len(y) == len(x) <= 4
        served += [
            (which[image.tobytes()], label)
            for image, label in zip(x.numpy(), y.tolist(), strict=True)
        ]
    return served


def shut_down(iterator) -> None:
    """Stop a ``DataLoader`` iterator's workers now (torch's private ``_shutdown_workers``).

    An iterator that raised stays in a reference cycle through the traceback; left to the
    garbage collector, torch stops its workers only after a 5 s timeout for each.
    """
    iterator._shutdown_workers()


def assert_labelled(served, bank):
    """Every source served exactly once, each with the label of its folder."""
    assert sorted(id_ for id_, _ in served) == sorted(bank.ids)
    names = bank.labels.names
    assert names == sorted(CLASSES)
    for id_, label in served:
        assert names[label] == id_.split("/")[0], id_


# -- 1. one epoch, every item once, with its label ----------------------------------------------


def test_a_shuffled_loader_serves_every_item_once_with_its_label(tmp_path, picture_files, client):
    bank = build(Pictures, tmp_path / "pictures.h5", [picture_files], scheduler=client)
    which = pixels_to_ids(bank, picture_files)

    loader = bank.serve(SPEC, batch_size=4, shuffle=True, num_workers=2)

    assert_labelled(one_epoch(loader, which), bank)
    bank.close()


def test_persistent_workers_serve_every_item_in_each_of_two_epochs(pictures, picture_files):
    which = pixels_to_ids(pictures, picture_files)
    spec = {**SPEC, "who": Input("images", WhoReads())}
    loader = pictures.serve(
        spec, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True
    )

    readers = []
    for _ in range(2):
        served, who = [], []
        for batch in loader:
            served += one_epoch([batch], which)
            who += batch["who"].tolist()
        assert_labelled(served, pictures)
        # the entries of an item line up: item i is source i for GetId and WhoReads alike
        assert [pictures.ids[i] for i, _, _ in who] == [id_ for id_, _ in served]
        readers.append({(pid, handle) for _, pid, handle in who})

    # the same two workers in both epochs, each with the one handle it opened
    assert readers[0] == readers[1]
    pids = {pid for pid, _ in readers[0]}
    assert len(pids) == len(readers[0]) == 2 and os.getpid() not in pids


def test_block_shuffle_gives_every_item_once_from_a_few_blocks_at_a_time():
    from pipeline.serve import BlockShuffle

    sampler = BlockShuffle(100, block=10, window=3, seed=4)
    passes = [list(sampler), list(sampler)]
    for order in passes:
        assert sorted(order) == list(range(100)) and len(sampler) == 100
        for start in range(0, 100, 30):  # each window's 30 items come from 3 blocks of 10
            assert len({i // 10 for i in order[start : start + 30]}) <= 3, order
    assert passes[0] != passes[1] and passes[0] != sorted(passes[0])
    assert list(BlockShuffle(100, 10, 3, seed=4)) == passes[0]  # a seed repeats the order
    assert sorted(BlockShuffle(103, 10, 3)) == list(range(103))  # a last block of 3
    with pytest.raises(ValueError, match="at least 1"):
        BlockShuffle(10, block=0)


def test_block_shuffle_for_workers_gives_each_worker_blocks_of_its_own():
    """Batch k goes to worker k % workers: no block is read by two workers."""
    from pipeline.serve import BlockShuffle

    order = list(BlockShuffle(1003, block=50, window=2, seed=1, batch=16, workers=3))
    assert sorted(order) == list(range(1003))
    batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    whole = 3 * (300 // 16)  # rounds while every stream (7 or 6 blocks) has a whole batch
    blocks = [set(), set(), set()]
    for k, batch in enumerate(batches[:whole]):
        blocks[k % 3] |= {i // 50 for i in batch}
    assert all(blocks) and not (
        blocks[0] & blocks[1] or blocks[1] & blocks[2] or blocks[0] & blocks[2]
    )
    for k in range(whole):  # a batch: its window's 2 blocks, or 4 where it spans two windows
        assert len({i // 50 for i in batches[k]}) <= 4, batches[k]
    assert list(BlockShuffle(20, 5, 1, seed=2, workers=4)) == list(BlockShuffle(20, 5, 1, seed=2))
    with pytest.raises(ValueError, match="batch must be at least 1"):
        BlockShuffle(10, 2, batch=0, workers=2)


def test_shuffle_blocks_serves_every_item_once_with_its_label(pictures, picture_files):
    which = pixels_to_ids(pictures, picture_files)
    loader = pictures.serve(SPEC, batch_size=4, shuffle="blocks", num_workers=2)
    assert_labelled(one_epoch(loader, which), pictures)
    with pytest.raises(ValueError, match="'blocks'"):
        pictures.serve(SPEC, batch_size=4, shuffle="yes")


def test_pin_memory_serves_the_same_batches(pictures, picture_files):
    which = pixels_to_ids(pictures, picture_files)
    loader = pictures.serve(SPEC, batch_size=4, shuffle=True, num_workers=2, pin_memory=True)

    if torch.accelerator.is_available():
        batches = list(loader)
        assert all(b["x"].is_pinned() and b["y"].is_pinned() for b in batches)
    else:  # CPU-only torch says it cannot pin, and serves plain tensors
        with pytest.warns(UserWarning, match="no accelerator is found"):
            batches = list(loader)
        assert not any(b["x"].is_pinned() for b in batches)

    assert_labelled(one_epoch(batches, which), pictures)


# -- 2. fork and spawn; a bank type that is a Dataset -------------------------------------------


@pytest.mark.parametrize("context", [None, "spawn"], ids=["default", "spawn"])
def test_workers_started_by_fork_or_spawn(pictures, picture_files, context):
    which = pixels_to_ids(pictures, picture_files)
    spec = {**SPEC, "who": Input("images", WhoReads())}
    loader = pictures.serve(
        spec, batch_size=4, shuffle=True, num_workers=2, multiprocessing_context=context
    )

    served, pids = [], set()
    for batch in loader:
        served += one_epoch([batch], which)
        pids |= {pid for _, pid, _ in batch["who"].tolist()}

    assert_labelled(served, pictures)
    assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.parametrize("context", [None, "spawn"], ids=["default", "spawn"])
def test_a_bank_type_that_is_a_dataset_serves_itself(tmp_path, picture_files, context):
    build(Pictures, tmp_path / "pictures.h5", [picture_files]).close()
    bank = PicturesDataset(tmp_path / "pictures.h5")
    images, labels = bank.images[:], bank.labels[:]

    loader = bank.serve(batch_size=4, shuffle=True, num_workers=2, multiprocessing_context=context)

    served = []
    for index, x, y in loader:
        np.testing.assert_array_equal(x.numpy(), images[index.numpy()])
        np.testing.assert_array_equal(y.numpy(), labels[index.numpy()])
        served += index.tolist()
    assert sorted(served) == list(range(len(bank))) == list(range(15))
    bank.close()


# -- 3. each worker opens its own handle; writable banks stay in their process ------------------


def test_each_forked_worker_opens_the_bank_for_itself(pictures):
    parent_file = pictures.h5
    parent_handle = parent_file.id.id
    loader = pictures.serve(
        Input("images", WhoReads()), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )

    rows = torch.cat(list(loader)).tolist()

    assert sorted(i for i, _, _ in rows) == list(range(len(pictures)))
    handles = collections.defaultdict(set)
    for _, pid, handle in rows:
        handles[pid].add(handle)
    assert len(handles) == 2 and os.getpid() not in handles
    assert all(len(h) == 1 for h in handles.values())  # opened once, on its first read
    assert parent_handle not in set().union(*handles.values())  # not the inherited copy
    # the parent's handle is untouched by the workers closing their copies, and still reads
    assert pictures.h5 is parent_file and parent_file.id.valid
    assert parent_file.id.id == parent_handle
    first = pictures.ids[0]
    assert pictures.images.get(first).shape == (16, 16, 3)
    assert pictures.labels.names[pictures.labels.get(first)] == first.split("/")[0]


def locked_by_a_reader(path) -> bool:
    """Whether someone holds HDF5's lock on ``path`` (an exclusive ``flock`` is refused)."""
    with open(path, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_workers_closing_their_copies_leave_the_parents_lock(pictures):
    if not locked_by_a_reader(pictures.path):
        pytest.skip("HDF5 does not flock files on this file system")
    loader = pictures.serve(
        Input("images"), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )

    assert sum(len(batch) for batch in loader) == len(pictures)
    del loader
    gc.collect()  # the workers have exited

    assert locked_by_a_reader(pictures.path)  # a writer still cannot open it under us


def test_a_read_only_bank_pickles_as_a_recipe(pictures):
    copy = pickle.loads(pickle.dumps(pictures))

    assert type(copy) is Pictures and copy.mode == "r" and copy.path == pictures.path
    assert copy.h5 is not pictures.h5 and copy.h5.id.valid
    np.testing.assert_array_equal(copy.images[:], pictures.images[:])
    assert copy.labels.names == pictures.labels.names
    copy.close()
    assert pictures.images[:1].shape == (1, 16, 16, 3)  # closing the copy leaves the original


@pytest.mark.filterwarnings("ignore:Got pickle error:UserWarning")
def test_a_writable_bank_refuses_to_be_pickled(pictures):
    path = pictures.path
    pictures.close()
    bank = Pictures(path, mode="r+")
    try:
        with pytest.raises(TypeError, match=r"mode 'r\+'.*only read-only banks.*mode='r'"):
            pickle.dumps(bank)
        loader = bank.serve(SPEC, batch_size=4, num_workers=2, multiprocessing_context="spawn")
        with pytest.raises(TypeError, match="only read-only banks"):
            next(iter(loader))
    finally:
        bank.close()


def test_a_writable_bank_fails_clearly_in_forked_workers_and_serves_in_process(
    pictures, picture_files
):
    which = pixels_to_ids(pictures, picture_files)
    path = pictures.path
    pictures.close()
    bank = Pictures(path, mode="r+")

    loader = bank.serve(SPEC, batch_size=4, num_workers=2, multiprocessing_context="fork")
    failed = iter(loader)
    with pytest.raises(
        BankBusyError, match=r"open with mode 'r\+' in process \d+; another process .*mode='r'"
    ):
        next(failed)
    assert all(w.is_alive() for w in failed._workers)  # still running, forked while writable

    in_process = bank.serve(SPEC, batch_size=4, shuffle=True, num_workers=0)
    assert_labelled(one_epoch(in_process, which), bank)
    bank.close()

    # the live workers hold no share of the writer's lock: the bank opens again, intact
    assert not locked_by_a_reader(path)
    reopened = Pictures(path)
    assert pixels_to_ids(reopened, picture_files) == which
    reopened.close()
    shut_down(failed)


@pytest.mark.parametrize(
    "context",
    [
        "fork",
        "spawn",
    ],
)
def test_feature_proxies_read_the_bank_in_workers(pictures, context):
    # what row r holds, from the source files: reading the bank here would fill the chunk
    # caches the forked workers inherit (HDF5 shares them between handles on one file)
    decoded = decoded_sources(Path(pictures.path).parent / "images", pictures.images.feature)
    rows = np.argsort(np.asarray(pictures.images.refs)[:, 0])  # row r is source rows[r]
    sources = [pictures.ids[i] for i in rows]
    images = np.stack([decoded[id_] for id_ in sources])
    labels = np.array([sorted(CLASSES).index(id_.split("/")[0]) for id_ in sources])
    loader = torch.utils.data.DataLoader(
        ProxyDataset(pictures), batch_size=5, num_workers=2, multiprocessing_context=context
    )

    batches = list(loader)

    np.testing.assert_array_equal(torch.cat([x for x, _ in batches]).numpy(), images)
    np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), labels)


# -- 4. AsSlice windows and GetIndex rows -------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "shift", "downsampling"),
    [
        pytest.param(100, None, 1, id="back-to-back"),
        pytest.param(100, 30, 1, id="overlapping"),
        pytest.param(64, 16, 3, id="downsampled-overlapping"),
        pytest.param(10, 50, 4, id="downsampled-with-gaps"),
        pytest.param(25, 1, 2, id="every-start"),
        pytest.param(1, None, 1, id="single-samples"),
    ],
)
def test_as_slice_windows_are_numpy_slices_of_the_concatenation(
    sounds, length, shift, downsampling
):
    data = sounds.sound[:]
    n = len(data)
    span = (length - 1) * downsampling + 1
    step = span if shift is None else shift
    count = (n - span) // step + 1
    starts = [i * step for i in range(count)]
    assert starts[-1] + span <= n < starts[-1] + step + span  # the next window would not fit
    expected = [data[s : s + span : downsampling] for s in starts]

    ds = BankDataset(sounds, Input("sound", AsSlice(length, shift, downsampling)))

    assert len(ds) == count
    for i in range(count):
        assert ds[i].shape == (length,)
        np.testing.assert_array_equal(ds[i], expected[i], err_msg=f"window {i}")
    for indices in (range(count), [count - 1, 0, count // 2], [count - 1, count - 2]):
        for i, window in zip(indices, ds.__getitems__(list(indices)), strict=True):
            np.testing.assert_array_equal(window, expected[i], err_msg=f"window {i}")
    np.testing.assert_array_equal(ds[-1], expected[-1])
    with pytest.raises(IndexError):
        ds[count]


def test_as_slice_windows_through_a_shuffled_loader(sounds):
    data = sounds.sound[:]
    window = AsSlice(64, shift=40, downsampling=2)  # span 127: windows overlap
    count = (len(data) - 127) // 40 + 1
    loader = sounds.serve(
        (Input("sound", window), Target("sound", Position(window))),
        batch_size=8,
        shuffle=True,
        num_workers=2,
    )

    served = []
    for x, index in loader:
        assert x.dtype == torch.int16 and tuple(x.shape[1:]) == (64,)  # stored rows
        for values, i in zip(x.numpy(), index.tolist(), strict=True):
            np.testing.assert_array_equal(values, data[i * 40 : i * 40 + 127 : 2])
            served.append(i)
    assert sorted(served) == list(range(count))


def test_as_slice_over_rows_of_arrays_and_past_the_data(tables):
    rows = tables.rows[:]  # (3 + 5 + 7 + 9, 3)
    ds = BankDataset(tables, Input("rows", AsSlice(4, shift=3)))

    assert len(ds) == (len(rows) - 4) // 3 + 1
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], rows[3 * i : 3 * i + 4])

    assert len(BankDataset(tables, Input("rows", AsSlice(len(rows) + 1)))) == 0
    for bad in (dict(length=0), dict(length=4, shift=0), dict(length=4, downsampling=0)):
        with pytest.raises(ValueError, match="AsSlice"):
            AsSlice(**bad)


@pytest.mark.parametrize(
    ("bank", "key"),
    [
        ("tables", "rows"),  # rows from .npy files, concatenated
        ("tables", "codes"),  # one array per plain id, stacked
        ("sounds", "sound"),
        ("pictures", "images"),
        ("pictures", "labels"),  # the stored label numbers
        ("ragged", "images"),  # flat: row i is one value
    ],
)
def test_get_index_items_are_the_features_rows(request, bank, key):
    bank = request.getfixturevalue(bank)
    proxy = bank.feature(key)
    ds = BankDataset(bank, Input(key, GetIndex()))
    n = len(proxy)

    assert len(ds) == n
    everything = proxy[:]
    served = ds.__getitems__(list(range(n)))
    np.testing.assert_array_equal(np.stack(served), everything)
    for i in sorted({0, 1, n // 3, n // 2, n - 2, n - 1}):
        np.testing.assert_array_equal(ds[i], proxy[i])
        np.testing.assert_array_equal(ds[i - n], proxy[i])
    shuffled = np.random.default_rng(0).permutation(n)[:50]
    for i, value in zip(shuffled, ds.__getitems__(shuffled.tolist()), strict=True):
        np.testing.assert_array_equal(value, proxy[int(i)])


def test_get_index_through_a_shuffled_loader(tables):
    rows = tables.rows[:]
    loader = tables.serve(
        (Input("rows", GetIndex()), Target("rows", Position(GetIndex()))),
        batch_size=5,
        shuffle=True,
        num_workers=2,
    )

    served = []
    for x, index in loader:
        np.testing.assert_array_equal(x.numpy(), rows[index.numpy()])
        served += index.tolist()
    assert sorted(served) == list(range(len(rows)))


# -- 5. ragged images -----------------------------------------------------------------------------


def test_ragged_images_come_back_each_in_its_own_shape(ragged, picture_files):
    sources = {id_: iio.imread(picture_files / id_) for id_ in ragged.ids}
    shapes = {image.shape for image in sources.values()}
    assert len(shapes) > 5 and {2, 3} == {len(s) for s in shapes}  # sizes and modes differ
    spec = dict(x=Input("images", GetId()), i=Input("images", Position()))

    # one item at a time: each converted to a tensor in its own shape
    loader = ragged.serve(spec, batch_size=None, shuffle=True, num_workers=2)
    served = []
    for item in loader:
        id_ = ragged.ids[item["i"]]
        assert item["x"].dtype == torch.uint8
        np.testing.assert_array_equal(item["x"].numpy(), sources[id_], err_msg=id_)
        served.append(id_)
    assert sorted(served) == sorted(sources)

    # batches kept as lists of items, read in one request per feature
    loader = ragged.serve(spec, batch_size=4, shuffle=True, num_workers=2, collate_fn=list)
    served = []
    for batch in loader:
        assert 1 <= len(batch) <= 4
        for item in batch:
            id_ = ragged.ids[item["i"]]
            assert item["x"].shape == sources[id_].shape
            np.testing.assert_array_equal(item["x"], sources[id_], err_msg=id_)
            np.testing.assert_array_equal(item["x"], ragged.images.get(id_))
            served.append(id_)
    assert sorted(served) == sorted(sources)


# -- 6. spec structures, transforms, indices and errors -------------------------------------------


def test_items_keep_the_structure_of_the_spec(pictures):
    first = pictures.ids[0]
    image, label = pictures.images.get(first), pictures.labels.get(first)

    named = BankDataset(pictures, dict(y=Target("labels"), x=Input("images")))
    item = named[0]
    assert list(item) == ["y", "x"]
    assert item["y"] == label and isinstance(item["y"], int)
    np.testing.assert_array_equal(item["x"], image)

    pair = BankDataset(pictures, (Input("images"), Target("labels")))[0]
    assert type(pair) is tuple and len(pair) == 2 and pair[1] == label
    np.testing.assert_array_equal(pair[0], image)

    listed = BankDataset(pictures, [Input("images"), Target("labels")]).__getitems__([0, 1])
    assert [type(i) for i in listed] == [list, list]
    assert listed[0][1] == label

    single = BankDataset(pictures, Input("images"))
    np.testing.assert_array_equal(single[0], image)
    assert all(isinstance(i, np.ndarray) for i in single.__getitems__([0, 1, 2]))

    by_path = BankDataset(pictures.path, dict(x=Input("images")))  # a path opens the bank
    np.testing.assert_array_equal(by_path[0]["x"], image)
    by_path.bank.close()

    # through a loader: a dict batch is keyed the same, a tuple batch comes as a sequence
    batch = next(iter(pictures.serve(dict(y=Target("labels"), x=Input("images")), batch_size=3)))
    assert list(batch) == ["y", "x"] and tuple(batch["x"].shape) == (3, 16, 16, 3)
    x, y = next(iter(pictures.serve((Input("images"), Target("labels")), batch_size=3)))
    assert tuple(x.shape) == (3, 16, 16, 3) and y.tolist()[0] == label
    single_batch = next(iter(pictures.serve(Input("images"), batch_size=3)))
    assert isinstance(single_batch, torch.Tensor) and tuple(single_batch.shape) == (3, 16, 16, 3)


def test_transform_is_applied_to_each_item(pictures):
    spec = dict(
        x=Input("images", GetId(), transform=lambda a: a.astype(np.float32) / 255),
        y=Target("labels", GetId(), transform=lambda v: v + 100),
    )
    ds = BankDataset(pictures, spec)
    for i, id_ in enumerate(pictures.ids):
        item = ds[i]
        assert item["x"].dtype == np.float32
        np.testing.assert_allclose(item["x"], pictures.images.get(id_) / 255, rtol=1e-6)
        assert item["y"] == pictures.labels.get(id_) + 100

    labels = []
    for batch in pictures.serve(spec, batch_size=4, num_workers=2):  # applied in the workers
        assert batch["x"].dtype == torch.float32 and 0 <= batch["x"].min() <= batch["x"].max() <= 1
        labels += batch["y"].tolist()
    assert labels == [pictures.labels.get(id_) + 100 for id_ in pictures.ids]


def test_negative_and_out_of_range_indices(pictures):
    ds = BankDataset(pictures, SPEC)
    n = len(ds)
    assert n == 15

    for i in (-1, -n, -7):
        np.testing.assert_array_equal(ds[i]["x"], ds[i + n]["x"])
        assert ds[i]["y"] == ds[i + n]["y"]
    batch = ds.__getitems__([-1, 0, -n])
    np.testing.assert_array_equal(batch[0]["x"], ds[n - 1]["x"])
    np.testing.assert_array_equal(batch[2]["x"], batch[1]["x"])

    for bad in (n, n + 1, -n - 1, 10**9):
        with pytest.raises(IndexError, match=f"out of range for {n} items"):
            ds[bad]
    with pytest.raises(IndexError):
        ds.__getitems__([0, 1, n])


def test_unknown_features_are_refused_with_the_features_there_are(tmp_path, picture_files):
    bank = build(Media, tmp_path / "pictures-only.h5", [picture_files])  # no sound data
    try:
        with pytest.raises(KeyError, match=r"'pixels' is not a feature.*features: images, labels"):
            BankDataset(bank, dict(x=Input("pixels"), y=Target("labels")))
        with pytest.raises(KeyError, match=r"'sound' is not a feature with data"):
            BankDataset(bank, Input("sound", AsSlice(10)))
    finally:
        bank.close()


def test_entries_giving_different_numbers_of_items_are_refused(media):
    with pytest.raises(
        ValueError, match=r"different numbers of items \(x='images' GetIndex\(\): 15, y='sound' "
    ):
        BankDataset(media, dict(x=Input("images", GetIndex()), y=Target("sound", GetIndex())))
    with pytest.raises(ValueError, match="different numbers of items"):
        BankDataset(media, (Input("images", GetIndex()), Input("sound", AsSlice(10))))


def test_get_id_on_a_source_without_the_feature_names_the_source(media):
    sound_ids = [id_ for id_ in media.ids if id_.endswith((".wav", ".flac"))]
    image_ids = [id_ for id_ in media.ids if id_.endswith(".png")]
    assert len(sound_ids) == 4 and len(image_ids) == 15
    ds = BankDataset(media, dict(x=Input("images", GetId()), y=Target("labels", GetId())))
    assert len(ds) == len(media) == 19

    first_image = media.index(image_ids[0])
    assert ds[first_image]["x"].shape == (16, 16, 3)
    for id_ in sound_ids:
        with pytest.raises(
            ValueError, match=rf"source '{re.escape(id_)}' has no data for feature 'images'"
        ):
            ds[media.index(id_)]
    with pytest.raises(ValueError, match=rf"source '{re.escape(sound_ids[0])}'"):
        ds.__getitems__([first_image, media.index(sound_ids[0])])
    failing = iter(media.serve(ds.items[0], batch_size=4, num_workers=2))  # the whole column
    with pytest.raises(ValueError, match="has no data for feature 'images'"):
        for _ in failing:
            pass
    shut_down(failing)

    sound = BankDataset(media, Input("sound", GetId()))
    np.testing.assert_array_equal(sound[media.index(sound_ids[0])], media.sound.get(sound_ids[0]))
    with pytest.raises(
        ValueError, match=rf"source '{re.escape(image_ids[0])}' has no data for feature 'sound'"
    ):
        sound[first_image]


def test_specs_that_are_not_specs_are_refused(pictures):
    with pytest.raises(ValueError, match="the batch spec is empty"):
        BankDataset(pictures, {})
    with pytest.raises(TypeError, match="got str"):
        BankDataset(pictures, "images")
    with pytest.raises(TypeError, match="Input/Target"):
        BankDataset(pictures, [Input("images"), "labels"])
    with pytest.raises(TypeError, match="Input/Target"):
        BankDataset(pictures, dict(x="images"))
    with pytest.raises(TypeError, match="needs a batch spec"):
        pictures.serve(batch_size=4)  # Pictures is not a torch Dataset


# -- 7. items are independent, writable copies -----------------------------------------------------


@pytest.mark.parametrize(
    ("bank", "item", "stackable"),
    [
        ("pictures", Input("images", GetId()), True),  # a batch is one read of rows
        ("pictures", Input("images", GetIndex()), True),
        ("ragged", Input("images", GetId()), False),  # flat: each source reshaped
        ("sounds", Input("sound", GetId()), False),
        ("sounds", Input("sound", AsSlice(50, shift=20, downsampling=2)), True),  # overlapping
        ("tables", Input("rows", GetIndex()), True),
    ],
)
def test_items_are_independent_writable_copies(request, bank, item, stackable):
    ds = BankDataset(request.getfixturevalue(bank), item)

    first = ds[0]
    assert isinstance(first, np.ndarray) and first.flags.writeable
    kept = first.copy()
    first[...] = 0
    np.testing.assert_array_equal(ds[0], kept)  # the next read is not the mutated array

    batch = ds.__getitems__([0, 1, 0])  # read together, returned apart
    assert all(a.flags.writeable for a in batch)
    second = batch[1].copy()
    batch[0][...] = 0
    np.testing.assert_array_equal(batch[1], second)
    np.testing.assert_array_equal(batch[2], kept)
    np.testing.assert_array_equal(ds.__getitems__([0, 1])[0], kept)

    if stackable:  # torch's default_collate warns about arrays it cannot write
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0))
        assert sum(len(b) for b in batches) == len(ds)
        assert not [w for w in caught if "not writable" in str(w.message)]


# -- 8. no torch at import time --------------------------------------------------------------------


def test_pipeline_does_not_import_torch(pictures):
    code = (
        "import sys, pipeline, pipeline.serve, features\n"
        "assert 'torch' not in sys.modules, 'importing pipeline imported torch'\n"
        f"ds = pipeline.BankDataset({pictures.path!r}, pipeline.Input('images'))\n"
        "assert ds[0].shape == (16, 16, 3)\n"
        "assert 'torch' not in sys.modules, 'a BankDataset imported torch'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent
    )
    assert result.returncode == 0, result.stderr


# -- bugs the first version had ---------------------------------------------------------------------


def test_entries_on_one_feature_with_different_lengths_are_refused(sounds):
    with pytest.raises(ValueError, match="different numbers of items"):
        BankDataset(sounds, dict(x=Input("sound", AsSlice(100)), y=Target("sound", GetIndex())))
    with pytest.raises(ValueError, match="different numbers of items"):
        BankDataset(sounds, dict(y=Target("sound", GetIndex()), x=Input("sound", AsSlice(100))))


def test_an_empty_batch_is_empty(pictures):
    assert BankDataset(pictures, SPEC).__getitems__([]) == []


def test_out_of_range_names_the_index_asked_for(pictures):
    with pytest.raises(IndexError, match="item -100 out of range"):
        BankDataset(pictures, SPEC)[-100]


@pytest.mark.parametrize("empty", [(), []], ids=["tuple", "list"])
def test_an_empty_tuple_spec_says_it_is_empty(pictures, empty):
    with pytest.raises(ValueError, match="the batch spec is empty"):
        BankDataset(pictures, empty)


# -- a batch in one call ----------------------------------------------------------------------


def test_serve_reads_each_batch_in_one_call_and_keeps_the_loader_options(pictures):
    loader = pictures.serve(SPEC, batch_size=4, shuffle=True, drop_last=True)
    assert loader.batch_size is None  # the loader does not collate: each index is a batch
    assert isinstance(loader.sampler, torch.utils.data.BatchSampler)
    assert len(loader) == 15 // 4  # drop_last: 3 full batches of 4
    batches = list(loader)
    assert [len(b["y"]) for b in batches] == [4, 4, 4]
    shape = (4, *pictures.images.shape[1:])
    assert all(b["x"].shape == shape and b["x"].dtype == torch.uint8 for b in batches)
    rows = np.concatenate([b["y"].numpy() for b in batches])
    assert rows.dtype == np.int64 and len(rows) == 12
    kept = pictures.serve(SPEC, batch_size=4)  # not shuffled, nothing dropped: bank order
    labels = np.concatenate([b["y"].numpy() for b in kept])
    np.testing.assert_array_equal(labels, pictures.labels[:])
    first = next(iter(kept))
    np.testing.assert_array_equal(first["x"].numpy(), pictures.images[:4])


def test_a_batch_equals_its_items_collated(pictures):
    dataset = BankDataset(pictures, SPEC)
    rows = [7, 0, 7, 14]
    batch = dataset[rows]
    items = dataset.__getitems__(rows)
    np.testing.assert_array_equal(batch["x"], np.stack([i["x"] for i in items]))
    np.testing.assert_array_equal(batch["y"], [i["y"] for i in items])
    single = BankDataset(pictures, (Input("images", GetIndex()), Target("labels", GetId())))
    x, y = single[np.array([1, 2])]
    assert x.shape == (2, *pictures.images.shape[1:])
    assert list(y) == [pictures.labels[1], pictures.labels[2]]


def test_ragged_items_come_batched_as_lists(ragged):
    loader = ragged.serve(Input("images", GetId()), batch_size=5)
    first = next(iter(loader))
    assert isinstance(first, list) and len(first) == 5
    for image, id_ in zip(first, ragged.ids[:5], strict=True):
        np.testing.assert_array_equal(image.numpy(), ragged.images.get(id_))


def test_a_transform_applies_per_item_in_the_batched_path(pictures):
    spec = dict(x=Input("images", GetId(), transform=lambda a: a.mean(axis=2)))
    batch = next(iter(pictures.serve(spec, batch_size=3)))
    np.testing.assert_allclose(batch["x"].numpy(), pictures.images[:3].mean(axis=3))


def test_a_collate_fn_or_batch_sampler_reads_item_by_item(pictures):
    seen = []

    def collate(items):
        seen.append(len(items))
        return items

    loader = pictures.serve(SPEC, batch_size=6, collate_fn=collate)
    assert loader.batch_size == 6 and sum(len(b) for b in loader) == 15 and seen == [6, 6, 3]
    sampler = torch.utils.data.BatchSampler(range(15), 5, False)
    assert [len(b["y"]) for b in pictures.serve(SPEC, batch_sampler=sampler)] == [5, 5, 5]
    with pytest.raises(ValueError, match="mutually exclusive"):
        pictures.serve(SPEC, batch_size=2, sampler=range(15), shuffle=True)
