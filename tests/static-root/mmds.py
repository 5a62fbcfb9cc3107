"""A metadata service (MMDS v2: a token from PUT /latest/api/token, the
metadata on GET /) that counts its successful reads into a file.

    mmds.py PORT_FILE READS_FILE
"""

import http.server
import json
import sys
from pathlib import Path

port_file, reads_file = Path(sys.argv[1]), Path(sys.argv[2])
TOKEN = "static-root-session"
reads = 0
reads_file.write_text("0")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        if self.path != "/latest/api/token":
            return self.send_error(404)
        self._answer(TOKEN.encode(), "text/plain")

    def do_GET(self):
        global reads
        if self.path != "/" or self.headers.get("X-metadata-token") != TOKEN:
            return self.send_error(401)
        reads += 1
        reads_file.write_text(str(reads))
        self._answer(json.dumps({"instanceID": "static-root", "envID": "busybox"}).encode(), "application/json")

    def _answer(self, body, content_type):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
port_file.write_text(str(server.server_address[1]))
server.serve_forever()
