"""Job notifications: a signed webhook (JSON POST) and e-mail over SMTP, delivered by a background thread with
retries and exponential backoff, so that a slow or failing receiver never holds up the runner.

Webhook receivers check `X-Domainlm-Signature: sha256=<hex HMAC-SHA256 of the raw body with the shared secret>`.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import smtplib
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage

SIGNATURE_HEADER = "X-Domainlm-Signature"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass
class SmtpSettings:
    host: str
    port: int = 25
    user: str | None = None
    password: str | None = None
    starttls: bool = False
    sender: str = "domainlm@localhost"


@dataclass
class _Delivery:
    channel: str  # webhook | email
    target: str
    payload: dict
    attempt: int = 0


class Notifier:
    """send() only queues; one thread delivers, retrying each failure after backoff x 2^attempt seconds."""

    def __init__(
        self,
        secret: bytes,
        smtp: SmtpSettings | None = None,
        retries: int = 5,
        backoff: float = 2.0,
        timeout: float = 10.0,
        on_result=None,
    ):
        self.secret, self.smtp = secret, smtp
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.on_result = on_result  # (delivery, ok, message) -> None, for the job's event log
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name="domainlm-notify", daemon=True)
        self._thread.start()

    def send(self, payload: dict, webhook: str | None = None, email: str | None = None) -> None:
        with self._cv:
            if webhook:
                heapq.heappush(
                    self._heap, (time.monotonic(), next(self._order), _Delivery("webhook", webhook, payload))
                )
            if email and self.smtp is not None:
                heapq.heappush(self._heap, (time.monotonic(), next(self._order), _Delivery("email", email, payload)))
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return len(self._heap)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cv.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopped:
                    return
                _, _, item = heapq.heappop(self._heap)
            try:
                self._deliver(item)
                self._report(item, True, "delivered")
            except Exception as e:  # any failure of a receiver is retried, then reported, never raised
                item.attempt += 1
                if item.attempt <= self.retries:
                    with self._cv:
                        due = time.monotonic() + self.backoff * 2 ** (item.attempt - 1)
                        heapq.heappush(self._heap, (due, next(self._order), item))
                else:
                    self._report(item, False, f"gave up after {item.attempt} attempts: {e}")

    def _report(self, item: _Delivery, ok: bool, message: str) -> None:
        if self.on_result is not None:
            try:
                self.on_result(item, ok, message)
            except Exception as e:  # the event log must not stop deliveries
                print(f"notification log failed: {e}", file=sys.stderr)

    def _deliver(self, item: _Delivery) -> None:
        if item.channel == "webhook":
            body = json.dumps(item.payload, ensure_ascii=False, sort_keys=True).encode()
            request = urllib.request.Request(
                item.target,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self.secret, body),
                    "X-Domainlm-Event": item.payload.get("event", ""),
                    "User-Agent": "domainlm-console",
                },
            )
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # non-2xx raises HTTPError
                response.read()
            return
        smtp = self.smtp
        assert smtp is not None
        msg = EmailMessage()
        msg["Subject"] = item.payload.get("summary", "domainlm job")
        msg["From"], msg["To"] = smtp.sender, item.target
        msg.set_content(email_text(item.payload))
        with smtplib.SMTP(smtp.host, smtp.port, timeout=self.timeout) as client:
            if smtp.starttls:
                client.starttls()
            if smtp.user:
                client.login(smtp.user, smtp.password or "")
            client.send_message(msg)


def email_text(payload: dict) -> str:
    """The e-mail's body, in the language of whoever created the job."""
    from domainlm.console.i18n import translator

    _ = translator(payload.get("language", "en"))
    job = payload.get("job", {})
    lines = [
        payload.get("summary", ""),
        "",
        f"{_('job')}: {job.get('id')} {job.get('name')} ({job.get('command')})",
        f"{_('status')}: {_(job.get('status'))}",
    ]
    if payload.get("metric"):
        lines.append(f"{payload['metric']['name']}: {payload['metric']['value']}")
        if payload["metric"].get("floor") is not None:
            lines.append(f"{_('classical floor')}: {payload['metric']['floor']}")
    if payload.get("error"):
        lines.append(f"{_('error')}: {_.message(payload['error'])}")
    if job.get("url"):
        lines.append(f"{_('details')}: {job['url']}")
    return "\n".join(lines) + "\n"
