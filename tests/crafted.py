"""Crafted banks: what an attacker (or a damaged disk) can hand h5bank, made from a real bank.

Each case of :data:`CASES` writes one file from a small valid bank built with
h5bank's own ``add()``, changed with plain h5py the way a crafted file would
be: pointers out of the file (to a planted secret), sizes declared but not
stored, hostile feature records. :func:`mutants` adds seeded random
truncations and byte flips of the valid bank. ``tests/test_untrusted.py``
checks each case by name; ``tests/test_fuzz.py`` runs every case through
every reader and CLI command; ``python tests/crafted.py DIR`` writes them all
to look at by hand.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from features import Array, Image, String
from pipeline import TypedFile

SECRET = "TOP-SECRET-4f9c2e"  # planted in files a crafted bank points to; must never come out


class Base(TypedFile):
    notes = String()
    values = Array()
    images = Image(size=(8, 8), mode="RGB")


def base_bank(path: str | os.PathLike[str]) -> str:
    """A small valid bank: 3 sources with a string, a ragged array and an 8x8 image."""
    path = os.fspath(path)
    bank = Base(path, mode="a")
    rng = np.random.default_rng(0)
    for k in range(3):
        bank.add(
            f"s{k}",
            {
                "notes": f"note {k}",
                "values": np.arange(k + 2, dtype="f4"),
                "images": rng.integers(0, 255, (8, 8, 3), dtype="u1"),
            },
        )
    bank.close()
    return path


def secret_file(folder: Path) -> Path:
    """A file outside any bank, holding :data:`SECRET` (readable by its owner only)."""
    path = folder / "secret.txt"
    path.write_text(f"root:x:0:0:{SECRET}:/root:/bin/sh\n" * 4)
    path.chmod(0o600)
    return path


def secret_h5(folder: Path) -> Path:
    path = folder / "private.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.frombuffer((SECRET * 8).encode(), dtype="u1")
    path.chmod(0o600)
    return path


def _replace(f: h5py.File, name: str, **create: object) -> None:
    del f[name]
    f.create_dataset(name, **create)


def external_storage(bank: str, folder: Path) -> None:
    """The string column's bytes live in another file (HDF5 external raw storage)."""
    secret = secret_file(folder)
    size = secret.stat().st_size
    with h5py.File(bank, "r+") as f:
        _replace(f, "notes/data", shape=(size,), dtype="u1", external=[(str(secret), 0, size)])
        f["notes/refs"][0] = (0, size)


def virtual_dataset(bank: str, folder: Path) -> None:
    """The string column is a virtual dataset over another user's private file."""
    private = secret_h5(folder)
    n = len(SECRET) * 8
    layout = h5py.VirtualLayout(shape=(n,), dtype="u1")
    layout[:] = h5py.VirtualSource(str(private), "data", shape=(n,))
    with h5py.File(bank, "r+") as f:
        del f["notes/data"]
        f["notes"].create_virtual_dataset("data", layout)
        f["notes/refs"][0] = (0, n)


def virtual_relative(bank: str, folder: Path) -> None:
    """A virtual dataset over a file beside the bank that its shard index does not name."""
    private = secret_h5(folder)
    n = len(SECRET) * 8
    layout = h5py.VirtualLayout(shape=(n,), dtype="u1")
    layout[:] = h5py.VirtualSource(private.name, "data", shape=(n,))
    with h5py.File(bank, "r+") as f:
        del f["notes/data"]
        f["notes"].create_virtual_dataset("data", layout)
        f["notes/refs"][0] = (0, n)


def external_link(bank: str, folder: Path) -> None:
    """A group of the bank is an external link into another file."""
    private = secret_h5(folder)
    with h5py.File(bank, "r+") as f:
        f["leak"] = h5py.ExternalLink(str(private), "/")


def external_link_fifo(bank: str, folder: Path) -> None:
    """An external link to a FIFO: following it blocks forever."""
    fifo = folder / "pipe.h5"
    if not fifo.exists():
        os.mkfifo(fifo)
    with h5py.File(bank, "r+") as f:
        f["values/extra"] = h5py.ExternalLink(str(fifo), "/")


def huge_refs(bank: str, folder: Path) -> None:
    """A refs table declaring 2^31 rows (32 GiB) in a file of a few KB."""
    with h5py.File(bank, "r+") as f:
        f["values/refs"].resize((1 << 31, 2))


def huge_ids(bank: str, folder: Path) -> None:
    """An id table declaring 10^8 ids, and a commit record that agrees."""
    with h5py.File(bank, "r+") as f:
        f["__sources__/id"].resize((10**8,))
        f.attrs.modify("h5bank_committed", np.int64(10**8))
        for column in ("notes", "values", "images"):
            f[f"{column}/refs"].resize((10**8, 2))


def huge_span(bank: str, folder: Path) -> None:
    """A ref spanning 2^34 bytes of a data dataset that declares them but stores none."""
    with h5py.File(bank, "r+") as f:
        f["notes/data"].resize((1 << 34,))
        f["notes/refs"][0] = (0, 1 << 34)


def huge_chunk_walk(bank: str, folder: Path) -> None:
    """A dataset of 2^40 one-byte rows in one-row chunks, ten of them written."""
    with h5py.File(bank, "r+") as f:
        extra = f.create_dataset("extra", shape=(1 << 40,), dtype="u1", chunks=(1,))
        extra[:10] = 1


def huge_attribute(bank: str, folder: Path) -> None:
    """A root attribute whose dataspace declares 2^30 elements but stores a handful."""
    with h5py.File(bank, "r+") as f:
        space = h5py.h5s.create_simple((4,))
        attr = h5py.h5a.create(f.id, b"extra", h5py.h5t.STD_I64LE, space)
        attr.write(np.arange(4, dtype="i8"))
    _patch_attribute_dims(bank, b"extra", 4, 1 << 30)


def _patch_attribute_dims(bank: str, name: bytes, old: int, new: int) -> None:
    """Rewrite the dataspace size of attribute ``name`` in the raw bytes (h5py cannot)."""
    data = bytearray(Path(bank).read_bytes())
    at = data.find(name + b"\0")
    old_bytes, new_bytes = old.to_bytes(8, "little"), new.to_bytes(8, "little")
    where = data.find(old_bytes, at)
    if at < 0 or where < 0 or where - at > 256:
        raise RuntimeError(f"attribute {name!r} not found in {bank}")
    data[where : where + 8] = new_bytes
    Path(bank).write_bytes(bytes(data))


def _record(bank: str, column: str, record: dict[str, object]) -> None:
    """Replace ``column``'s feature record in the bank's schema attribute."""
    with h5py.File(bank, "r+") as f:
        schema = json.loads(f.attrs["h5bank_schema"])
        features = schema.get("features", schema)
        for key in list(features):
            if key.strip("/") == column:
                features[key] = record
        f.attrs["h5bank_schema"] = json.dumps(schema)


def image_bomb(bank: str, folder: Path) -> None:
    _record(
        bank,
        "images",
        {"class": "features.image.Image", "attrs": {"size": [60000, 60000], "max_pixels": None}},
    )


def sound_bomb(bank: str, folder: Path) -> None:
    _record(bank, "values", {"class": "features.sound.Sound", "attrs": {"sr": 2e9}})


def bad_pattern(bank: str, folder: Path) -> None:
    _record(bank, "notes", {"class": "features.text.String", "attrs": {"pattern": "("}})


def ansi_id(bank: str, folder: Path) -> None:
    """An id holding terminal escapes (retitle the window, clear the screen)."""
    b = TypedFile(bank, mode="r+")
    b.add("\x1b]0;pwned\x07\x1b[2Jfake", {"values": np.arange(3, dtype="f4")})
    b.close()


CASES: dict[str, Callable[[str, Path], None]] = {
    f.__name__: f
    for f in (
        external_storage,
        virtual_dataset,
        virtual_relative,
        external_link,
        external_link_fifo,
        huge_refs,
        huge_ids,
        huge_span,
        huge_chunk_walk,
        huge_attribute,
        image_bomb,
        sound_bomb,
        bad_pattern,
        ansi_id,
    )
}


def crafted(name: str, folder: Path) -> str:
    """Write case ``name`` into ``folder``; its bank's path."""
    folder.mkdir(parents=True, exist_ok=True)
    bank = base_bank(folder / f"{name}.h5")
    CASES[name](bank, folder)
    return bank


def mutants(valid: str, folder: Path, n: int, seed: int = 0) -> Iterator[str]:
    """``n`` damaged copies of the bank ``valid``: truncated, or with bytes flipped."""
    original = Path(valid).read_bytes()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        data = bytearray(original)
        if k % 4 == 0:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.choice((1, 2, 4, 16))):
                at = rng.randrange(len(data))
                data[at] = rng.randrange(256)
        path = folder / f"mutant-{seed}-{k}.h5"
        path.write_bytes(bytes(data))
        yield str(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "crafted")
    for case in CASES:
        print(crafted(case, out / case))
