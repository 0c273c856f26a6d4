"""Shipping a model from the console: its folder as a zip, and `domainlm serve` endpoints.

An endpoint is `domainlm serve MODEL --host 127.0.0.1 --port P` in its own process group, with a token of its
own (passed in the environment, so that it stays out of `ps`). The console lists its URL and token, relays its
/metrics.json, and stops it (SIGTERM, then SIGKILL) on request or when the console stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from domainlm.errors import DomainLMError

SERVABLE = ("classifier", "linear", "export")


def zip_model(path: Path, files: tuple[str, ...] | None, into: Path) -> Path:
    """A zip of the model folder (or of the named files only) in a temporary file under `into`."""
    into.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=into, prefix=".download-", suffix=".zip")
    os.close(fd)
    with zipfile.ZipFile(name, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        chosen = (
            [path / f for f in files]
            if files
            else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        )
        for p in chosen:
            if p.is_file():
                z.write(p, f"{path.name}/{p.relative_to(path)}")
    return Path(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Endpoint:
    model_id: int
    proc: subprocess.Popen
    port: int
    token: str
    log: Path
    started: float = field(default_factory=time.time)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, route: str, timeout: float = 1.0) -> dict | None:
        request = urllib.request.Request(self.url + route, headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None


class Endpoints:
    def __init__(self, home: Path, grace: float = 5.0):
        self.home, self.grace = home, grace
        self.running: dict[int, Endpoint] = {}
        self._lock = threading.Lock()

    def start(self, model_id: int, path: Path, kind: str) -> Endpoint:
        if kind not in SERVABLE:
            raise DomainLMError(f"a {kind} is not a classifier: fine-tune it first, then serve the classifier")
        with self._lock:
            current = self.running.get(model_id)
            if current is not None and current.proc.poll() is None:
                return current
            port, token = _free_port(), secrets.token_urlsafe(18)
            log = self.home / "endpoints" / f"model-{model_id}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            argv = [
                sys.executable,
                "-m",
                "domainlm.cli",
                "serve",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            with open(log, "w", encoding="utf-8") as out:
                out.write(f"$ domainlm {' '.join(argv[4:])}\n")
                out.flush()
                proc = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=dict(os.environ, DOMAINLM_SERVE_TOKEN=token, PYTHONUNBUFFERED="1"),
                    start_new_session=True,
                )
            self.running[model_id] = Endpoint(model_id, proc, port, token, log)
            return self.running[model_id]

    def status(self, model_id: int, metrics: bool = True) -> dict:
        """state: none | starting | ready | stopped (with the serve command's last line)."""
        ep = self.running.get(model_id)
        if ep is None:
            return {"state": "none"}
        out = {"url": ep.url, "token": ep.token, "pid": ep.proc.pid, "log": str(ep.log)}
        if ep.proc.poll() is not None:
            lines = [ln for ln in ep.log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
            errors = [ln[7:] for ln in lines if ln.startswith("error: ")]
            return {
                **out,
                "state": "stopped",
                "exit_code": ep.proc.returncode,
                "error": (errors or lines[-1:] or [""])[-1] if ep.proc.returncode else "",
            }
        health = ep.get("/health", 0.5)
        if health is None:
            return {**out, "state": "starting", "seconds": round(time.time() - ep.started)}
        return {**out, "state": "ready", "health": health, "metrics": ep.get("/metrics.json") if metrics else None}

    def stop(self, model_id: int) -> bool:
        with self._lock:
            ep = self.running.pop(model_id, None)
        if ep is None:
            return False
        if ep.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ep.proc.pid, signal.SIGTERM)
            try:
                ep.proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ep.proc.pid, signal.SIGKILL)
                ep.proc.wait()
        return True

    def stop_all(self) -> None:
        for model_id in list(self.running):
            self.stop(model_id)
