"""The host side of tests/linux/vunet_init.sh: an HTTP server on ``ADDRESS:PORT`` (run inside the
test's network namespace) that answers ``GET /blob`` with the file BLOB and ``POST /up`` with the
sha256 of the body it received (also appended to LOG)::

    python net_http_peer.py ADDRESS PORT BLOB LOG
"""

from __future__ import annotations

import hashlib
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def main(address: str, port: str, blob: str, log: str) -> None:
    data = Path(blob).read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            digest = hashlib.sha256(self.rfile.read(length)).hexdigest()
            with open(log, "a") as out:
                out.write(f"{length} {digest}\n")
            body = digest.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    HTTPServer((address, int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:5])
