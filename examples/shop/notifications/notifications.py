"""notifications: tells customers what happened to their orders.

Subscribes to order.confirmed and order.cancelled; Flotilla pushes each event here as a
structured CloudEvent (POST, application/cloudevents+json) with the trace of the order that
caused it. A 2xx acknowledges; anything else is retried, then dead-lettered.
Standard library only.
"""

import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/problem+json" if status >= 400 else "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            self.answer(200, {"status": "ok"})
        else:
            self.answer(404, {"title": "not found", "status": 404, "detail": f"no route {self.path}"})

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY:
            self.answer(413, {"title": "too large", "status": 413, "detail": "events are at most 1 MiB"})
            return
        try:
            event = json.loads(self.rfile.read(length))
            data = event.get("data") or {}
            order = data["order"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # Retrying a malformed event cannot help: acknowledge it and say so.
            print(f"level=warn ignoring a malformed event: {e}", flush=True)
            self.answer(200, {"ignored": True})
            return
        trace = (self.headers.get("traceparent") or "").split("-")
        trace_id = trace[1] if len(trace) == 4 else "-"
        if self.path == "/events/order-confirmed":
            print(f"level=info notify {data.get('customer', 'customer')}: order {order} confirmed, "
                  f"total {data.get('total')} event={event.get('id')} trace_id={trace_id}", flush=True)
        elif self.path == "/events/order-cancelled":
            print(f"level=info notify: order {order} cancelled ({data.get('reason', 'no reason')}) "
                  f"event={event.get('id')} trace_id={trace_id}", flush=True)
        else:
            self.answer(404, {"title": "not found", "status": 404, "detail": f"no route {self.path}"})
            return
        self.answer(200, {"notified": order})

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
server.serve_forever()
