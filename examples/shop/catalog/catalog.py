#!/usr/bin/env python3
"""catalog: the shop's products, served from SQLite. Python 3, standard library only.

    GET /healthz          200 {"status": "ok"}
    GET /products         200 [{"sku", "name", "price"}, ...]
    GET /products/{sku}   200 {"sku", "name", "price"}, or 404 problem+json

Reads PORT (default: any free port), FLOTILLA_DATA_DIR (default ./data) and FLOTILLA_SERVICE.
Prints one line per request to stdout; stops cleanly on SIGTERM or SIGINT, exit status 0.
"""

import json
import os
import signal
import sqlite3
import sys
import threading
import time
from contextlib import closing
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# Prices in cents, so that they are exact; JSON shows them in currency units. The espresso
# machine costs more than the payments service's limit of 1,000 on purpose.
SEED = [
    ("TEA-001", "Sencha green tea, 100 g", 1250),
    ("MUG-002", "Stoneware mug", 1800),
    ("KETTLE-003", "Gooseneck kettle", 6400),
    ("GRINDER-004", "Burr coffee grinder", 18900),
    ("ESPRESSO-005", "Espresso machine", 149900),
    ("BEANS-006", "Coffee beans, 1 kg", 2490),
]

SCHEMA = """
    CREATE TABLE IF NOT EXISTS products (
        sku         TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        price_cents INTEGER NOT NULL
    )
"""

# Replicas share the data directory, so a connection may wait briefly for another's lock.
BUSY_TIMEOUT_SECONDS = 5

# Longest request body read (and dropped) before answering 405, so the client sees the answer
# rather than a reset connection.
MAX_DRAINED_BODY = 1 << 20


def connect(path):
    # Autocommit: transactions are opened explicitly where they matter.
    return sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)


def init_db(data_dir):
    """Creates the database on first start, stocked with SEED; returns its path."""
    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "catalog.db")
    with closing(connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        # Immediate, so that replicas starting together cannot both find the table empty.
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(SCHEMA)
            if conn.execute("SELECT NOT EXISTS (SELECT 1 FROM products)").fetchone()[0]:
                conn.executemany(
                    "INSERT INTO products (sku, name, price_cents) VALUES (?, ?, ?)", SEED
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return path


def product(row):
    sku, name, price_cents = row
    return {"sku": sku, "name": name, "price": price_cents / 100}


class CatalogHandler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes each connection after its answer, so no idle keep-alive connection can
    # hold up a graceful stop.
    protocol_version = "HTTP/1.0"
    server_version = "catalog/1.0"
    # Bounds how long a silent client can keep a handler thread (and so a stop) waiting.
    timeout = 10

    def parse_request(self):
        self.started = time.monotonic()
        return super().parse_request()

    def do_GET(self):
        self.route()

    def do_HEAD(self):
        self.route()

    def do_POST(self):
        self.reject_method()

    do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_POST

    def route(self):
        segments = urlsplit(self.path).path.split("/")[1:]
        try:
            if segments == ["healthz"]:
                self.send_json(HTTPStatus.OK, {"status": "ok"})
            elif segments == ["products"]:
                self.list_products()
            elif len(segments) == 2 and segments[0] == "products" and segments[1]:
                self.get_product(unquote(segments[1]))
            else:
                self.send_not_found()
        except (sqlite3.Error, OSError) as err:
            print(f"{self.command} {self.path_only()}: {err!r}", file=sys.stderr, flush=True)
            self.send_problem(
                HTTPStatus.INTERNAL_SERVER_ERROR, "the service failed to handle the request"
            )

    def reject_method(self):
        segments = urlsplit(self.path).path.split("/")[1:]
        known = segments in (["healthz"], ["products"]) or (
            len(segments) == 2 and segments[0] == "products" and segments[1]
        )
        self.drain_body()
        if known:
            self.send_problem(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{self.command} is not allowed on {self.path_only()}",
                extra_headers={"Allow": "GET, HEAD"},
            )
        else:
            self.send_not_found()

    def list_products(self):
        with closing(connect(self.server.db_path)) as conn:
            rows = conn.execute(
                "SELECT sku, name, price_cents FROM products ORDER BY sku"
            ).fetchall()
        self.send_json(HTTPStatus.OK, [product(row) for row in rows])

    def get_product(self, sku):
        with closing(connect(self.server.db_path)) as conn:
            row = conn.execute(
                "SELECT sku, name, price_cents FROM products WHERE sku = ?", (sku,)
            ).fetchone()
        if row is None:
            self.send_problem(HTTPStatus.NOT_FOUND, f"no product with sku {sku}")
        else:
            self.send_json(HTTPStatus.OK, product(row))

    def path_only(self):
        return urlsplit(self.path).path if getattr(self, "path", None) else "-"

    def drain_body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= MAX_DRAINED_BODY:
            self.rfile.read(length)

    def send_json(self, status, body, content_type="application/json", extra_headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_problem(self, status, detail, extra_headers=None):
        status = HTTPStatus(status)
        body = {
            "type": "about:blank",
            "title": status.phrase,
            "status": status.value,
            "detail": detail,
        }
        self.send_json(status, body, "application/problem+json", extra_headers)

    def send_not_found(self):
        self.send_problem(HTTPStatus.NOT_FOUND, f"no route for {self.command} {self.path_only()}")

    def send_error(self, code, message=None, explain=None):
        # http.server answers malformed requests and unknown methods with an HTML page; every
        # error here is problem+json instead.
        self.close_connection = True
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        self.send_problem(status, message or status.description)

    def log_request(self, code="-", size="-"):
        status = code.value if isinstance(code, HTTPStatus) else code
        elapsed_ms = int((time.monotonic() - getattr(self, "started", time.monotonic())) * 1000)
        command = getattr(self, "command", None) or "-"
        # Probes arrive every few seconds per instance; logging them would bury the real traffic.
        if self.path_only() == "/healthz" and status == 200:
            return
        # The trace id of W3C `traceparent`, so Flotilla can line this up with the request's
        # other log lines.
        parts = (self.headers.get("traceparent") or "").split("-") if hasattr(self, "headers") else []
        trace = f" trace_id={parts[1]}" if len(parts) == 4 and len(parts[1]) == 32 else ""
        print(f"{command} {self.path_only()} {status} {elapsed_ms}ms{trace}", flush=True)

    def log_message(self, format, *args):
        # Silences http.server's own stderr log; log_request above prints ours.
        pass


class CatalogServer(ThreadingHTTPServer):
    # Non-daemon handler threads make server_close() wait for in-flight requests.
    daemon_threads = False

    def __init__(self, address, db_path):
        super().__init__(address, CatalogHandler)
        self.db_path = db_path


def main():
    sys.stdout.reconfigure(line_buffering=True)
    name = os.environ.get("FLOTILLA_SERVICE") or "catalog"
    try:
        port = int(os.environ.get("PORT") or 0)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        print(
            f"{name}: error: PORT must be a port number, not {os.environ.get('PORT')!r}",
            file=sys.stderr,
        )
        return 1

    db_path = init_db(os.environ.get("FLOTILLA_DATA_DIR") or "data")

    server = None
    stopping = threading.Event()

    def stop(signum, frame):
        if stopping.is_set():
            return
        stopping.set()
        print(f"{name} shutting down", flush=True)
        if server is not None:
            # shutdown() waits for serve_forever() to return, and serve_forever() runs on this
            # very thread, so it must be called from another one.
            threading.Thread(target=server.shutdown, daemon=True).start()

    # Handlers go in before the socket opens: a SIGTERM right after start must still be graceful.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    server = CatalogServer(("127.0.0.1", port), db_path)
    print(f"{name} listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        if not stopping.is_set():
            server.serve_forever()
    finally:
        server.server_close()
    print(f"{name} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
