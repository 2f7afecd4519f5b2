"""An HTTP server answering every POST with one JSON-RPC result of a given size (argv[1] bytes of text),
chunked (no `Content-Length`), as a streaming JSON-RPC server does, for meshwarden tests.

Prints `PORT <n>` on stdout, then serves until killed.
"""

import socket, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
SIZE = int(sys.argv[1])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        n = int(self.headers.get("content-length", "0")); self.rfile.read(n)
        text = "x" * SIZE
        body = ('{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"%s"}]}}' % text).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 16384):
            c = body[i:i+16384]
            self.wfile.write(b"%x\r\n" % len(c) + c + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")
    def log_message(self, *a): pass
s = HTTPServer(("127.0.0.1", 0), H)
print(f"PORT {s.server_address[1]}", flush=True)
s.serve_forever()
