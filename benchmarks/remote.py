"""Training from a remote bank: a ``DataLoader`` epoch over HTTP against the same bank on disk.

    python benchmarks/remote.py [--bank /tmp/h5bank-bench/performance/h5bank-20000.h5]
        [--batches 150]

Serves the bank's folder with ``tests/rangeserver.py`` (HTTP/1.1, Range
requests, one log line per request with its size) on 127.0.0.1: server and
loader share this machine's cores. Prints one JSON line per figure:

- ``dataloader_epoch`` of the local bank (batch 64, 2 workers, shuffle,
  ``GetId`` for images and labels, best of 2 epochs);
- ``dataloader_batches`` over HTTP: ``--batches`` batches of the same loader
  on the bank's URL (an epoch over HTTP takes minutes), items per second,
  with the requests and bytes the server answered per batch, and the ratio
  to the local epoch's rate (the issue's target: at least 0.5).

The bank is any h5bank file whose features include ``images`` and
``labels`` (``benchmarks/performance.py`` leaves one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]

from servers import RangeServer  # noqa: E402

from pipeline import TypedFile, serve  # noqa: E402
from pipeline.serve import GetId, Input, Target  # noqa: E402


def emit(figure: str, value: float, unit: str, **extra: object) -> None:
    print(
        json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **extra}), flush=True
    )


def loader(bank: TypedFile, shuffle: bool | str = True):
    spec = dict(x=Input("images", GetId()), y=Target("labels", GetId()))
    return serve(bank, spec, batch_size=64, shuffle=shuffle, num_workers=2, persistent_workers=True)


def rate(batches, limit: int | None = None) -> tuple[float, int]:
    """Items per second over ``batches`` (the first ``limit`` of them), and the batches read."""
    started, items, count = time.perf_counter(), 0, 0
    for batch in batches:
        items += len(batch["y"])
        count += 1
        if limit is not None and count >= limit:
            break
    return items / (time.perf_counter() - started), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=Path, default=Path("/tmp/h5bank-bench/performance/h5bank-20000.h5"))  # fmt: skip
    parser.add_argument("--batches", type=int, default=150)
    args = parser.parse_args()
    for shuffle in (True, "blocks"):
        with TypedFile(args.bank) as bank:
            local = loader(bank, shuffle)
            best = max(rate(local)[0] for _ in range(2))
            emit("dataloader_epoch", best, "items/s", where="local disk", shuffle=shuffle,
                 sources=len(bank))  # fmt: skip
        with tempfile.TemporaryDirectory() as logs:
            server = RangeServer(args.bank.parent, Path(logs))
            try:
                url = f"{server.url}/{args.bank.name}"
                with TypedFile(url) as bank:
                    remote = loader(bank, shuffle)
                    rate(remote, 4)  # workers started, the bank opened in each
                    mark = server.mark()
                    items_per_second, count = rate(remote, args.batches)
                    answered = server.requests_since(mark)
            finally:
                server.stop()
        sizes = [int(line.split()[3]) for line in answered if line.split()[3].isdigit()]
        emit(
            "dataloader_batches", items_per_second, "items/s", where="HTTP, 127.0.0.1",
            shuffle=shuffle, batches=count, requests_per_batch=len(answered) / count,
            bytes_per_batch=sum(sizes) / count, ratio_to_local=items_per_second / best,
        )  # fmt: skip


if __name__ == "__main__":
    main()
