"""Serving a bank to PyTorch: batch specs, getters, and a ``Dataset`` per bank.

A *batch spec* says what one item of a training set is, as a dict (or a
tuple, or a single item) of :class:`Input` / :class:`Target` entries. Each
names a feature column of the bank and a :class:`Getter` that turns an item
index into that column's data::

    loader = bank.serve(
        dict(x=Input("data/images", GetId()), y=Target("data/labels", GetId())),
        batch_size=64, shuffle=True, num_workers=2,
    )
    for batch in loader:  # {"x": uint8 tensor (64, H, W, C), "y": int64 tensor (64,)}
        ...

Getters: :class:`GetId` (item *i* is source *i*, in the shape it was
stored), :class:`GetIndex` (item *i* is row *i* of the concatenated data),
:class:`AsSlice` (item *i* is a fixed-length window over the concatenated
data, for sounds and sequences).

Why a dataset object and not h5py datasets: HDF5 handles must not cross a
``fork``, and cannot be pickled for ``spawn``. :class:`BankDataset` keeps a
read-only :class:`~pipeline.bank.typedfile.TypedFile`, which pickles as a recipe
and reopens the file on first use in each ``DataLoader`` worker. A batch is
read in one call per feature (``__getitems__``), with the rows sorted, so a
random batch of 64 images is one array filled run by run. The arrays returned
are fresh NumPy arrays, never views of HDF5 buffers.

torch is an optional extra (``pip install 'h5bank[torch]'``); this module
imports it only in :func:`serve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.bank.proxies import FeatureProxy
from pipeline.format import layout
from pipeline.format.rows import absolute_rows, one_request, read_span, take_rows

# -- getters ----------------------------------------------------------------------------------


class Getter:
    """How an item index becomes one feature column's data. Subclass it for other schemes."""

    def length(self, proxy: FeatureProxy) -> int:
        """How many items the column gives."""
        raise NotImplementedError

    def get(self, proxy: FeatureProxy, index: int) -> Any:
        """Item ``index`` (``0 <= index < length``)."""
        raise NotImplementedError

    def get_many(self, proxy: FeatureProxy, indices: np.ndarray) -> list[Any]:
        """Items ``indices`` in that order; override to read them in one request."""
        return [self.get(proxy, int(i)) for i in indices]

    def get_batch(self, proxy: FeatureProxy, indices: np.ndarray) -> Any:
        """Items ``indices`` as one array ``(len(indices), ...)`` when they stack, else a list."""
        return _stack(self.get_many(proxy, indices))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class GetId(Getter):
    """Item *i* is source *i* (commit order): its data as ``proxy.get(id)`` returns it.

    An image comes back in its shape, a label as an ``int``, a sound as its
    samples. Every source must have data for the feature.
    """

    def length(self, proxy: FeatureProxy) -> int:
        return len(proxy.bank)

    def get(self, proxy: FeatureProxy, index: int) -> Any:
        return self.get_many(proxy, np.asarray([index]))[0]

    def get_many(self, proxy: FeatureProxy, indices: np.ndarray) -> list[Any]:
        return proxy.get_rows(indices)

    def get_batch(self, proxy: FeatureProxy, indices: np.ndarray) -> Any:
        block = proxy.stacked_rows(indices)  # fixed-shape features: one array, no per-item work
        return block if block is not None else _stack(proxy.get_rows(indices))


class GetIndex(Getter):
    """Item *i* is row *i* of the feature's concatenated data (``proxy[i]``)."""

    def length(self, proxy: FeatureProxy) -> int:
        return len(proxy)

    def get(self, proxy: FeatureProxy, index: int) -> Any:
        return proxy.dataset[index]

    def get_many(self, proxy: FeatureProxy, indices: np.ndarray) -> list[Any]:
        return list(take_rows(proxy.dataset, indices))

    def get_batch(self, proxy: FeatureProxy, indices: np.ndarray) -> Any:
        return take_rows(proxy.dataset, indices)


class AsSlice(Getter):
    """Item *i* is a window of ``length`` rows of the concatenated data, every ``downsampling``-th.

    Window *i* is ``data[i * shift : i * shift + (length - 1) * downsampling + 1 : downsampling]``,
    NumPy's slice of the concatenation of every source (windows cross source
    boundaries, as in h5mapper). ``shift`` defaults to the span of a window,
    so windows do not overlap; a smaller shift makes them overlap.
    """

    def __init__(self, length: int, shift: int | None = None, downsampling: int = 1) -> None:
        if int(length) < 1 or int(downsampling) < 1:
            raise ValueError(
                f"AsSlice needs length >= 1 and downsampling >= 1, got {length}, {downsampling}"
            )
        self.length_ = int(length)
        self.downsampling = int(downsampling)
        self.shift = int(shift) if shift is not None else self.span
        if self.shift < 1:
            raise ValueError(f"AsSlice shift must be >= 1, got {shift}")

    @property
    def span(self) -> int:
        """Rows of data one window covers."""
        return (self.length_ - 1) * self.downsampling + 1

    def length(self, proxy: FeatureProxy) -> int:
        n = len(proxy)
        return 0 if n < self.span else (n - self.span) // self.shift + 1

    def get(self, proxy: FeatureProxy, index: int) -> Any:
        start = index * self.shift
        window = read_span(proxy.dataset, start, start + self.span)
        return window if self.downsampling == 1 else window[:: self.downsampling].copy()

    def get_many(self, proxy: FeatureProxy, indices: np.ndarray) -> list[Any]:
        data = proxy.dataset
        starts = indices * self.shift
        # Windows of a batch that lie close together are read in one request.
        if not len(indices):
            return []
        low, high = int(starts.min()), int(starts.max()) + self.span
        row_bytes = data.dtype.itemsize * math.prod(data.shape[1:])
        if one_request(low, high, self.span * len(indices), row_bytes):
            block = data[low:high]
            return [
                block[s - low : s - low + self.span : self.downsampling].copy()
                for s in starts.tolist()
            ]
        return [self.get(proxy, int(i)) for i in indices]

    def __repr__(self) -> str:
        return (
            f"AsSlice(length={self.length_}, shift={self.shift}, downsampling={self.downsampling})"
        )


def _stack(values: list[Any]) -> Any:
    """One array of ``values`` when they are arrays (or numbers) of one shape, else the list."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        first = values[0]
        if all(v.shape == first.shape and v.dtype == first.dtype for v in values):
            return np.stack(values)
        return values
    if values and all(isinstance(v, (int, float, np.number)) for v in values):
        return np.asarray(values)
    return values


# -- batch items ------------------------------------------------------------------------------


@dataclass
class BatchItem:
    """One entry of a batch spec: feature ``key`` (its path), read with ``getter``.

    ``transform``, if given, is applied to each item's array (in the
    ``DataLoader`` worker), e.g. to scale images to float.
    """

    key: str
    getter: Getter = field(default_factory=GetId)
    transform: Callable[[Any], Any] | None = None


class Input(BatchItem):
    """A model input."""


class Target(BatchItem):
    """A training target."""


# -- the dataset ------------------------------------------------------------------------------


BatchSpec = BatchItem | Mapping[str, BatchItem] | Sequence[BatchItem]


class BankDataset:
    """A map-style dataset over a bank (what ``torch.utils.data.DataLoader`` takes).

    Parameters
    ----------
    bank
        A bank opened read-only (``TypedFile``; :class:`pipeline.serve.BankDataset`
        also takes its path). A bank opened for writing serves in this process
        (``num_workers=0``) only.
    batch
        The batch spec: a :class:`BatchItem`, a dict of them, or a tuple or
        list of them. Items come out in the same structure. Every entry must
        give the same number of items.
    """

    def __init__(self, bank: Any, batch: BatchSpec) -> None:
        self.bank = bank
        self._named = isinstance(batch, Mapping)
        if isinstance(batch, BatchItem):
            self._keys: list[Any] | None = None
            items = [batch]
        elif isinstance(batch, Mapping):
            self._keys = list(batch)
            items = list(batch.values())
        elif isinstance(batch, Sequence) and not isinstance(batch, str):
            self._keys = list(range(len(batch)))
            items = list(batch)
        else:
            raise TypeError(
                "batch must be an Input/Target (BatchItem), a dict or a tuple of them; "
                f"got {type(batch).__name__}"
            )
        for item in items:
            if not isinstance(item, BatchItem):
                raise TypeError(f"batch entries must be Input/Target items, got {item!r}")
        if not items:
            raise ValueError("the batch spec is empty: give at least one Input or Target")
        self.items = items
        self._kind = type(batch)
        lengths = [item.getter.length(self._proxy(item)) for item in items]
        if len(set(lengths)) > 1:
            shown = ", ".join(
                f"{name}={item.key!r} {item.getter!r}: {n}"
                for name, item, n in zip(self._keys or [0], items, lengths, strict=True)
            )
            raise ValueError(f"the batch entries give different numbers of items ({shown})")
        self._length = lengths[0]

    def _proxy(self, item: BatchItem) -> FeatureProxy:
        try:
            proxy = self.bank.feature(item.key)
        except AttributeError:
            proxy = None
        if not isinstance(proxy, FeatureProxy) or proxy.column is None:
            known = ", ".join(sorted(layout.iter_columns(self.bank.h5))) or "none"
            raise KeyError(
                f"{item.key!r} is not a feature with data in {self.bank.path} (features: {known})"
            )
        return proxy

    def __len__(self) -> int:
        return self._length

    def _check(self, asked: np.ndarray) -> np.ndarray:
        return absolute_rows(asked, self._length, "item")

    def __getitem__(self, index: Any) -> Any:
        """Item ``index``; or, for a list of indices, the whole batch collated (see :meth:`batch`)."""
        if isinstance(index, (list, np.ndarray)):
            return self.batch(index)
        return self.__getitems__([index])[0]

    def batch(self, indices: Sequence[int]) -> Any:
        """Items ``indices`` as one batch shaped like the spec, each entry one array.

        Each entry is read with its getter's ``get_batch``: a fixed-shape
        feature's rows come back as one array without per-item work. Entries
        whose items do not stack (images of different sizes, text) are lists.
        This is what :func:`serve`'s ``DataLoader`` calls, once per batch.
        """
        where = self._check(np.asarray(indices, dtype=np.int64).reshape(-1))
        columns = []
        for item in self.items:
            proxy = self._proxy(item)
            if item.transform is None:
                columns.append(item.getter.get_batch(proxy, where))
            else:
                got = item.getter.get_many(proxy, where)
                columns.append(_stack([item.transform(v) for v in got]))
        if self._keys is None:
            return columns[0]
        if self._named:
            return dict(zip(self._keys, columns, strict=True))
        return list(columns) if self._kind is list else tuple(columns)

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Items ``indices``, each feature read in one request (``DataLoader`` calls this)."""
        where = self._check(np.asarray(indices, dtype=np.int64).reshape(-1))
        if not len(where):
            return []
        columns = []
        for item in self.items:
            values = item.getter.get_many(self._proxy(item), where)
            if item.transform is not None:
                values = [item.transform(v) for v in values]
            columns.append(values)
        rows = list(zip(*columns, strict=True))
        if self._keys is None:
            return [row[0] for row in rows]
        if self._named:
            return [dict(zip(self._keys, row, strict=True)) for row in rows]
        return [list(row) if self._kind is list else tuple(row) for row in rows]

    def __repr__(self) -> str:
        items = ", ".join(f"{type(i).__name__}({i.key!r}, {i.getter!r})" for i in self.items)
        return f"<BankDataset of {self.bank.path!r}: {len(self)} items; {items}>"


class BlockShuffle:
    """A sampler that shuffles blocks of neighbouring items, then items within a few blocks.

    Each pass cuts the ``length`` items into blocks of ``block`` consecutive
    indices, shuffles the blocks, and yields the items of ``window`` blocks
    at a time in a shuffled order (LitData shuffles its chunks the same
    way). A batch then comes from a few runs of neighbouring sources: over a
    remote bank, a few whole chunks fetched and kept for the next batches,
    instead of a request per item. Every item comes once per pass; a pass
    is less random than a full shuffle (items of one window are seen
    together), more so with a larger ``window``.

    With ``batch`` and ``workers`` (a ``DataLoader``'s ``batch_size`` and
    ``num_workers``), the shuffled blocks are dealt to ``workers`` streams
    and whole batches taken from the streams in turn: the loader hands
    batch ``k`` to worker ``k % workers``, so each worker reads blocks no
    other worker reads, and fetches each chunk once rather than every
    worker fetching it. Once the shortest stream has no whole batch left,
    the rest of every stream comes last.

    ``serve(bank, spec, shuffle="blocks")`` makes one with ``block`` the rows
    of a chunk of the first entry's column, ``window=4`` and the loader's
    batch size and workers. Pass ``seed`` for the same order every run (each
    pass still differs from the last).
    """

    def __init__(
        self,
        length: int,
        block: int,
        window: int = 4,
        seed: int | None = None,
        *,
        batch: int | None = None,
        workers: int = 1,
    ) -> None:
        if int(block) < 1 or int(window) < 1:
            raise ValueError(f"block and window must be at least 1, got {block} and {window}")
        if batch is not None and int(batch) < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.length, self.block, self.window = int(length), int(block), int(window)
        self.batch = None if batch is None else int(batch)
        self.workers = max(1, int(workers)) if self.batch else 1
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.length

    def _order(self, starts: np.ndarray) -> np.ndarray:
        """The items of the blocks at ``starts``, shuffled ``window`` blocks at a time."""
        windows = []
        for group in range(0, len(starts), self.window):
            items = np.concatenate(
                [
                    np.arange(s, min(s + self.block, self.length))
                    for s in starts[group : group + self.window]
                ]
            )
            self._rng.shuffle(items)
            windows.append(items)
        return np.concatenate(windows) if windows else np.zeros(0, np.int64)

    def __iter__(self) -> Any:
        starts = np.arange(0, self.length, self.block)
        self._rng.shuffle(starts)
        streams = [self._order(starts[w :: self.workers]) for w in range(self.workers)]
        if self.workers == 1:
            yield from streams[0].tolist()
            return
        size = self.batch
        assert size is not None  # several workers only come with a batch size
        rounds = min(len(s) for s in streams) // size
        for k in range(rounds):
            for stream in streams:
                yield from stream[k * size : (k + 1) * size].tolist()
        for stream in streams:
            yield from stream[rounds * size :].tolist()


def _blocks_of(dataset: BankDataset) -> int:
    """Rows of a chunk of the dataset's first entry's column (256 when it has no chunks)."""
    chunks = dataset._proxy(dataset.items[0]).column.data.chunks  # type: ignore[union-attr]
    return int(chunks[0]) if chunks else 256


def _torch() -> Any:
    try:
        import torch.utils.data
    except ImportError as error:
        raise ImportError(
            f"serving a bank needs PyTorch: pip install 'h5bank[torch]' ({error})"
        ) from None
    return torch


def serve(
    bank: Any,
    batch: BatchSpec | None = None,
    **dataloader_kwargs: Any,
) -> Any:
    """A ``torch.utils.data.DataLoader`` over ``bank`` yielding batches shaped like ``batch``.

    ``dataloader_kwargs`` are the ``DataLoader``'s (``batch_size``, ``shuffle``,
    ``sampler``, ``drop_last``, ``num_workers``, ``pin_memory``,
    ``persistent_workers``...); ``shuffle="blocks"`` shuffles blocks of
    neighbouring items (:class:`BlockShuffle`), for banks read over a network
    (it does not use ``generator``: pass ``sampler=BlockShuffle(..., seed=...)``
    for a repeatable order).
    Each batch is read in one call
    (:meth:`BankDataset.batch`): the loader gets a ``BatchSampler`` made of
    ``batch_size``, ``shuffle`` / ``sampler`` and ``drop_last``, and no
    per-item collation. With a ``collate_fn``, a ``batch_sampler`` or
    ``batch_size=None``, items are read and collated one by one instead.
    With ``batch=None``, ``bank`` must itself be a ``torch.utils.data.Dataset``
    (a bank type that also subclasses it, with its own ``__getitem__``).
    """
    torch = _torch()
    data = torch.utils.data
    if batch is None:
        if not isinstance(bank, data.Dataset):
            raise TypeError(
                "serve() needs a batch spec (a dict of Input/Target items), unless the bank "
                "type is itself a torch.utils.data.Dataset with its own __getitem__"
            )
        return data.DataLoader(bank, **dataloader_kwargs)
    dataset = BankDataset(bank, batch)
    options = dict(dataloader_kwargs)
    size = options.pop("batch_size", 1)
    if size is None or options.get("batch_sampler") is not None or "collate_fn" in options:
        return data.DataLoader(dataset, batch_size=size, **options)  # item by item, as asked
    # A batch in one call: the loader's sampler yields lists of indices, the dataset reads
    # each list at once (dataset[[i, j, ...]]), and the loader only turns arrays into tensors.
    shuffle, drop_last = options.pop("shuffle", False), options.pop("drop_last", False)
    sampler = options.pop("sampler", None)
    if sampler is not None and shuffle:
        raise ValueError("sampler option is mutually exclusive with shuffle")
    if shuffle == "blocks":
        sampler = BlockShuffle(
            len(dataset), _blocks_of(dataset), batch=size, workers=options.get("num_workers", 0)
        )
    elif isinstance(shuffle, str):
        raise ValueError(f"shuffle must be True, False or 'blocks', got {shuffle!r}")
    if sampler is None:
        generator = options.get("generator")
        sampler = (
            data.RandomSampler(dataset, generator=generator)
            if shuffle
            else data.SequentialSampler(dataset)
        )
    batches = data.BatchSampler(sampler, size, drop_last)
    return data.DataLoader(dataset, batch_size=None, sampler=batches, **options)
