"""A static HTTP/1.1 file server that honours single ``Range`` requests, for tests.

    python tests/rangeserver.py --port 0 --directory DIR --port-file FILE

Python's ``http.server`` ignores ``Range`` (HDF5 and zip reads over HTTP fail)
and listens with a backlog of 5 (concurrent fetches stall on dropped SYNs);
this one keeps connections alive, answers ``bytes=a-b`` with 206, listens
with a backlog of 256 and disables Nagle. It writes the port it bound to
``--port-file`` once it is ready, and logs one line per request (method,
path, status, and the body's bytes for a file) to stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class RangeHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def send_head(self):  # type: ignore[override]
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            return super().send_head()  # a redirect to "dir/" or a listing, both with a length
        try:
            f = open(path, "rb")  # noqa: SIM115 - handed to copyfile by the base class
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        match = _RANGE.match(self.headers.get("Range", "").strip())
        start, stop = 0, size
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                stop = min(size, int(match.group(2)) + 1) if match.group(2) else size
            else:  # a suffix: the last N bytes
                start = max(0, size - int(match.group(2)))
            if start >= size or start >= stop:
                f.close()
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            self._length = stop - start
            self.send_response(HTTPStatus.PARTIAL_CONTENT)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        else:
            self._length = stop - start
            self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Last-Modified", self.date_time_string(int(os.fstat(f.fileno()).st_mtime)))
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        f.seek(start)
        self._remaining = stop - start
        return f

    def copyfile(self, source, outputfile):  # type: ignore[override]
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        while remaining > 0:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)
        self._remaining = None

    def log_request(self, code="-", size="-") -> None:  # type: ignore[override]
        """The status and, for a file, the bytes of its body (a range's length)."""
        super().log_request(code, getattr(self, "_length", size))
        self._length = "-"

    def log_message(self, format: str, *args) -> None:
        sys.stderr.write(f"{self.command} {self.path} {' '.join(map(str, args[1:]))}\n")


class Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True


def serve(handler, port: int, port_file: str, host: str = "127.0.0.1") -> None:
    """Serve ``handler`` on ``host``; write the bound port to ``port_file`` once listening."""
    with Server((host, port), handler) as server:
        with open(port_file + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.replace(port_file + ".tmp", port_file)  # readers never see a half-written port
        server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--directory", default=".")
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    serve(partial(RangeHandler, directory=args.directory), args.port, args.port_file, args.host)


if __name__ == "__main__":
    main()
