#!/usr/bin/env python3
"""An HTTP proxy that holds every request for a fixed delay before passing it on, for
`motley bench ingest --remote` and `motley bench fetch` against a local S3 emulator: the delay
stands in for the latency to a real object store (tens of milliseconds to first byte), which a
server on 127.0.0.1 does not have, and `--mbps` for the rate of one connection to it (S3 serves
one GET stream at tens of MB/s). Threaded, so requests in flight overlap as they would on a
network.

    python scripts/bench/latency_proxy.py --port 9100 --upstream http://127.0.0.1:9000 --delay-ms 40 [--mbps 25]
"""

import argparse
import http.client
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--delay-ms", type=float, default=40.0)
    ap.add_argument("--mbps", type=float, default=0.0,
                    help="each response body sent at most this many MB/s (0: as fast as it goes)")
    args = ap.parse_args()
    up = urllib.parse.urlsplit(args.upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def relay(self):
            time.sleep(args.delay_ms / 1000.0)
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else None
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            self.send_response(r.status)
            for k, v in r.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                if args.mbps <= 0:
                    self.wfile.write(data)
                else:
                    # Paced in 256 KiB pieces: one connection's rate, whatever the others do.
                    step, t0 = 256 << 10, time.monotonic()
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i:i + step])
                        ahead = t0 + (i + step) / (args.mbps * 1e6) - time.monotonic()
                        if ahead > 0:
                            time.sleep(ahead)
            conn.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
