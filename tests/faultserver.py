"""An HTTP/1.1 server that answers with faults, for tests of retries and error messages.

    python tests/faultserver.py --port 0 --port-file FILE

What it answers depends on a segment of the request's path (anywhere in it,
so an S3 client's ``/<bucket>/<key>`` and a plain URL both reach it):

- ``s3-503``, ``s3-500``, ``s3-404``, ``s3-403``: the S3 error XML S3 sends
  with that status (``ServiceUnavailable``, ``InternalError``, ``NoSuchKey``,
  ``AccessDenied``);
- ``status-NNN``: status ``NNN`` with an empty body;
- ``truncated``: 200 with ``Content-Length: 1000``, 100 bytes of it, then
  the connection is closed;
- anything else: 200 with 100 bytes; an S3 listing (``?list-type=2``) finds
  nothing.

HEAD answers the same status and headers without a body. It writes the port
it bound to ``--port-file`` once it is ready, and logs one line per request
(``METHOD PATH STATUS -``) to stderr, flushed at once.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
from http.server import BaseHTTPRequestHandler

from rangeserver import serve

_S3_ERRORS = {
    503: ("ServiceUnavailable", "Please reduce the load on this server."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    404: ("NoSuchKey", "The specified key does not exist."),
    403: ("AccessDenied", "Access Denied"),
}
_S3 = re.compile(r"^s3-(\d{3})$")
_STATUS = re.compile(r"^status-(\d{3})$")


class FaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, body: bool) -> None:
        path, _, query = self.path.partition("?")
        if "list-type=2" in query.split("&"):  # an S3 listing: nothing under any prefix
            bucket = path.strip("/").split("/")[0]
            data = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{bucket}</Name><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
                "<IsTruncated>false</IsTruncated></ListBucketResult>"
            ).encode()
            return self._send(200, data, "application/xml", body)
        segments = path.split("/")
        for segment in segments:
            match = _S3.match(segment)
            if match and int(match.group(1)) in _S3_ERRORS:
                status = int(match.group(1))
                code, message = _S3_ERRORS[status]
                data = (
                    '<?xml version="1.0" encoding="UTF-8"?>\n'
                    f"<Error><Code>{code}</Code><Message>{message}</Message>"
                    f"<RequestId>fault-{os.getpid()}</RequestId></Error>"
                ).encode()
                return self._send(status, data, "application/xml", body)
            match = _STATUS.match(segment)
            if match:
                return self._send(int(match.group(1)), b"", "text/plain", body)
            if segment == "truncated":
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                if body:
                    self.wfile.write(b"t" * 100)
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                return None
        return self._send(200, b"o" * 100, "application/octet-stream", body)

    def _send(self, status: int, data: bytes, content_type: str, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def log_request(self, code="-", size="-") -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.command} {self.path} {int(code)} -\n")
        sys.stderr.flush()

    def log_message(self, format: str, *args) -> None:
        pass  # only the request lines above


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args()
    serve(FaultHandler, args.port, args.port_file)


if __name__ == "__main__":
    main()
