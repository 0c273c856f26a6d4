"""Helpers for the console tests: labelled data, a webhook receiver and an SMTP sink on 127.0.0.1, waiting."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import EN_DOCS, ZH_DOCS

# one epoch of 4 steps on the tiny model: the quickest real fine-tuning run
FAST_FINETUNE = {"epochs": 1, "batch_size": 8, "max_seq_len": 32, "logging_freq": 1, "precision": "fp32"}


def write_labelled(path, bad_lines: bool = False, labels: tuple[str, str] = ("neg", "pos")) -> str:
    rows = [{"text": t, "label": labels[i % 2]} for i, t in enumerate((ZH_DOCS + EN_DOCS) * 4)]
    if bad_lines:
        rows[2]["text"] = ""  # line 3
        rows[4]["label"] = ""  # line 5
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float = 120, every: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class WebhookReceiver:
    """Answers 500 to the first `fail_first` requests (to exercise retries), then 200; keeps every request."""

    def __init__(self, fail_first: int = 1):
        self.requests: list[dict] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": body})
                self.send_response(500 if len(receiver.requests) <= receiver.fail_first else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


class SmtpSink:
    def __init__(self):
        from aiosmtpd.controller import Controller

        self.messages: list = []
        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                sink.messages.append(envelope)
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self):
        self.controller.stop()
