"""What running builds from a script costs on the embedded default, before and after its worker
processes stopped importing the user's ``__main__``.

    python benchmarks/script_start.py [--files 2000] [--rounds 5] [--workers 2]

h5bank's embedded cluster spawns worker processes without the user's main
module (:class:`pipeline.run.local.SpawnWithoutMain`), so scripts need no
``if __name__ == "__main__":`` guard. Before, each worker imported the main
script again (``multiprocessing``'s spawn), which this script has (it is
guarded). Each round builds the same folder on a fresh embedded cluster twice,
once each way, in alternating order; start-up included, as a user's script
pays it. Prints one JSON line per build, then the medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import dask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_images import Pictures, make_corpus

from pipeline.run.local import SpawnWithoutMain


def emit(figure: str, value: float, unit: str, **extra) -> None:
    print(
        json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **extra}), flush=True
    )


def build(root: Path, out: Path, workers_import_main: bool) -> float:
    name = SpawnWithoutMain.PROCESS_NAME
    if workers_import_main:  # as before: no worker process is recognised, main goes along
        SpawnWithoutMain.PROCESS_NAME = "(none)"
    try:
        out.unlink(missing_ok=True)
        started = time.perf_counter()
        bank = Pictures.create(out, root, progress=False)
        seconds = time.perf_counter() - started
    finally:
        SpawnWithoutMain.PROCESS_NAME = name
    assert len(bank) > 0 and bank.summary.writer_pid != os.getpid()
    bank.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path("/tmp/h5bank-bench/pngs"))
    args = parser.parse_args()
    paths = make_corpus(args.root, args.files, 4)
    common = {"files": len(paths), "workers": args.workers, "machine_cores": os.cpu_count()}
    times: dict[str, list[float]] = {"before": [], "after": []}
    with dask.config.set({"h5bank.local-cluster.n-workers": args.workers}):
        build(args.root, args.root.parent / "warm.h5", False)  # page cache, imports
        for k in range(args.rounds):
            order = ("before", "after") if k % 2 == 0 else ("after", "before")
            for variant in order:
                seconds = build(args.root, args.root.parent / f"{variant}.h5", variant == "before")
                times[variant].append(seconds)
                emit("embedded_build_seconds", seconds, "s", variant=variant, round=k, **common)
    for variant, values in times.items():
        emit("embedded_build_seconds_median", statistics.median(values), "s", variant=variant,
             **common)  # fmt: skip
    emit(
        "after_over_before",
        statistics.median(times["after"]) / statistics.median(times["before"]),
        "ratio",
        **common,
    )


if __name__ == "__main__":
    main()
