"""Builds from local disk, an S3 server and an HTTP server; remote bank reads by id.

    python benchmarks/cloud_sources.py [--files 2000] [--workers 2] [--out DIR]

Starts a moto S3 server and a Range-honouring HTTP server (``tests/rangeserver.py``)
on 127.0.0.1, puts the same ``--files`` small PNGs (64x64 RGB, 10 class
folders) on local disk, in S3 and behind HTTP, and prints one JSON line per
figure:

- ``build_files_per_s`` for each source kind: ``Bank.create`` on a running
  LocalCluster of ``--workers`` processes (h5bank fetches each partition with
  one batched ``fs.cat``), checked identical to the local build;
- ``fetch_decode_files_per_s`` for each remote kind, ``batched`` (one
  ``fs.cat`` per 64 files, as h5bank does) against ``per_file`` (one
  ``cat_file`` request per file), both decoding on the same 2 workers;
- ``remote_open_read``: seconds and HTTP requests to open a remote bank and
  read one source by id (requests counted in the HTTP server's log and,
  for S3, in moto's).

moto answers about 300 small objects/s on these 2 cores (it is CPU-bound and
shares them with the workers): the S3 figures measure moto as much as h5bank.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import imageio.v3 as iio
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features import DirLabels, Image
from pipeline import TypedFile

HERE = Path(__file__).resolve().parents[1]


class Pictures(TypedFile):
    images = Image(mode="RGB")
    labels = DirLabels()


def emit(figure: str, value: float, unit: str, **extra) -> None:
    print(
        json.dumps({"figure": figure, "value": round(value, 4), "unit": unit, **extra}), flush=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], ready: str, log: Path) -> subprocess.Popen:
    errors = log.open("w")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{command[:3]} exited; see {log}")
        try:
            urllib.request.urlopen(ready, timeout=1)
            return process
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{command[:3]} did not answer {ready}")


def requests_in(log: Path) -> int:
    text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
    return len(re.findall(r'"?(GET|HEAD) ', text))


def make_corpus(root: Path, files: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(files):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        iio.imwrite(folder / f"img_{i:05d}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def fetch_decode(urls: list[str], options: dict, batched: bool) -> int:
    import fsspec

    fs, _ = fsspec.core.url_to_fs(urls[0], **options)
    paths = [fs._strip_protocol(u) for u in urls]
    if batched:
        data = fs.cat(paths)
        blobs = [data[p] for p in paths]
    else:
        blobs = [fs.cat_file(p) for p in paths]
    return sum(iio.imread(b, extension=".png").shape[0] for b in blobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(".bench") / "cloud")
    args = parser.parse_args()
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    (out / "www").mkdir(parents=True)
    corpus = out / "www" / "imgs"
    make_corpus(corpus, args.files)

    s3_port, port_file = free_port(), out / "http.port"
    moto = start(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
        f"http://127.0.0.1:{s3_port}/moto-api/",
        out / "moto.log",
    )
    http = subprocess.Popen(
        [sys.executable, str(HERE / "tests" / "rangeserver.py"), "--directory", str(out / "www"),
         "--port-file", str(port_file)],
        stderr=(out / "http.log").open("w"),
    )  # fmt: skip
    try:
        while not port_file.exists():
            time.sleep(0.02)
        base = f"http://127.0.0.1:{port_file.read_text()}"
        import fsspec
        from dask import delayed
        from distributed import Client, LocalCluster

        s3 = {"endpoint_url": f"http://127.0.0.1:{s3_port}", "key": "bench", "secret": "bench"}
        fs = fsspec.filesystem("s3", **s3)
        fs.mkdir("bench")
        fs.put(str(corpus), "bench/imgs", recursive=True)
        kinds = {
            "local": (str(corpus), None),
            "s3": ("s3://bench/imgs/", s3),
            "http": (f"{base}/imgs/", None),
        }
        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, dashboard_address=":0"
            ) as cl,
            Client(cl) as client,
        ):
            reference = None
            for kind, (sources, options) in kinds.items():
                started = time.perf_counter()
                bank = Pictures.create(
                    out / f"{kind}.h5", sources, scheduler=client, progress=False,
                    storage_options=options,
                )  # fmt: skip
                seconds = time.perf_counter() - started
                pixels = bank.images[:]
                if reference is None:
                    reference = pixels
                elif not np.array_equal(pixels, reference) or bank.failures():
                    raise SystemExit(f"the {kind} build differs from the local one")
                emit("build_files_per_s", len(bank) / seconds, "files/s", source=kind,
                     seconds=round(seconds, 3), workers=args.workers)  # fmt: skip
                bank.close()

            urls = {
                "s3": [f"s3://bench/imgs/{p.parent.name}/{p.name}" for p in sorted(corpus.rglob("*.png"))],
                "http": [f"{base}/imgs/{p.parent.name}/{p.name}" for p in sorted(corpus.rglob("*.png"))],
            }  # fmt: skip
            for kind, members in urls.items():
                options = s3 if kind == "s3" else {}
                for batched in (True, False):
                    parts = [members[i : i + 64] for i in range(0, len(members), 64)]
                    tasks = [delayed(fetch_decode)(p, options, batched) for p in parts]
                    started = time.perf_counter()
                    rows = sum(client.compute(tasks, sync=True))
                    seconds = time.perf_counter() - started
                    assert rows == 64 * len(members)
                    emit("fetch_decode_files_per_s", len(members) / seconds, "files/s",
                         source=kind, fetch="batched" if batched else "per_file",
                         seconds=round(seconds, 3))  # fmt: skip

        fs.put(str(out / "local.h5"), "bench/banks/local.h5")
        shutil.copy(out / "local.h5", out / "www" / "local.h5")
        first_id = f"class_0/img_{0:05d}.png"
        for kind, url, options, log in (
            ("http", f"{base}/local.h5", None, out / "http.log"),
            ("s3", "s3://bench/banks/local.h5", s3, out / "moto.log"),
        ):
            before = requests_in(log)
            started = time.perf_counter()
            with Pictures(url, storage_options=options) as bank:
                image = bank.images.get(first_id)
            seconds = time.perf_counter() - started
            time.sleep(0.2)  # let the server write its log
            assert image.shape == (64, 64, 3)
            emit("remote_open_read", seconds, "s", source=kind,
                 requests=requests_in(log) - before)  # fmt: skip
    finally:
        for process in (moto, http):
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
