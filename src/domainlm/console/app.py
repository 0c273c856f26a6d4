"""The console application: its state (database, runner, notifier) and the operations behind pages and API.

`web.create_app(console)` returns the FastAPI app; pages (pages.py) and the JSON API (api.py) call the same methods
here, so everything a page does can be scripted.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from domainlm.console import catalog, devices, i18n
from domainlm.console.db import FINISHED, Dataset, Event, Job, Model, now, open_database
from domainlm.console.jobs import JobFactory
from domainlm.console.notify import Notifier, SmtpSettings
from domainlm.console.runner import LOG_NAME, Runner, display, next_position, queue
from domainlm.console.security import csrf_token, inside, load_or_create_secret
from domainlm.console.settings import ConsoleConfig
from domainlm.console.ship import Endpoints
from domainlm.errors import DomainLMError

HERE = Path(__file__).parent
NOISE = re.compile(r"\d+%\|.*\|| warnings\.warn\(|Warning: |^\s*warnings\.warn")
# a Python warning's first line ("path.py:12: UserWarning: ..."); the line after it, indented, is its source line
WARNING_HEAD = re.compile(r"^\S.*:\d+: \w*Warning: ")


class Conflict(DomainLMError):
    """A request that cannot be done in the current state (cancel a finished job, delete a model in use)."""


class Console:
    def __init__(
        self, cfg: ConsoleConfig, url: str = "", notify_backoff: float = 2.0, machine: devices.Machine | None = None
    ):
        self.cfg = cfg
        self.home = Path(cfg.home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.token = load_or_create_secret(self.home / ".console-token", cfg.token)
        self.csrf = csrf_token(self.token)
        secret = load_or_create_secret(self.home / ".webhook-secret", cfg.webhook_secret)
        self.url = url
        self.sessions = open_database(cfg.database or f"sqlite:///{self.home / 'console.db'}")
        smtp = None
        if cfg.smtp_host:
            smtp = SmtpSettings(
                cfg.smtp_host,
                cfg.smtp_port,
                cfg.smtp_user,
                os.environ.get("DOMAINLM_SMTP_PASSWORD"),
                cfg.smtp_starttls,
                cfg.smtp_from,
            )
        self.notifier = Notifier(secret.encode(), smtp, backoff=notify_backoff, on_result=self._delivery_logged)
        self.machine = machine or devices.Machine(self.home)
        self.runner = Runner(
            self.sessions, self.home, cfg.max_concurrent, cfg.cancel_grace, on_event=self._notify, machine=self.machine
        )
        self.factory = JobFactory(self.home, list(cfg.base_models), email=bool(cfg.smtp_host))
        self.endpoints = Endpoints(self.home)
        self._models: OrderedDict = OrderedDict()
        self._models_lock = threading.Lock()

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        self.endpoints.stop_all()
        self.runner.stop()
        self.notifier.stop()

    # ---- notifications -----------------------------------------------------------------------------------
    def _notify(self, job: Job, kind: str, message: str) -> None:
        if kind not in ("started", "succeeded", "failed", "cancelled", "interrupted") or not job.notify:
            return
        _ = i18n.translator(job.notify.get("lang", i18n.DEFAULT))  # the language of whoever created the job
        summary = _("[domainlm] job {id} '{name}' {event}", id=job.id, name=job.name, event=_(kind))
        payload = {
            "event": f"job.{kind}",
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "job": {
                "id": job.id,
                "name": job.name,
                "command": job.command,
                "status": job.status,
                "url": f"{self.url}/jobs/{job.id}" if self.url else "",
            },
            "summary": summary + (f": {_.message(message)}" if message and kind != "started" else ""),
            "language": _.lang,
        }
        if kind == "succeeded":
            payload["metric"] = catalog.headline(job, self.home / job.folder)
        if kind in ("failed", "interrupted"):
            payload["error"] = message
        self.notifier.send(payload, job.notify.get("webhook"), job.notify.get("email"))

    def _delivery_logged(self, item, ok: bool, message: str) -> None:
        with self.sessions() as s:
            s.add(
                Event(
                    job_id=item.payload["job"]["id"],
                    kind=f"{item.channel} {'sent' if ok else 'failed'}",
                    message=f"{item.payload['event']} to {item.target}: {message}",
                )
            )
            s.commit()

    # ---- jobs --------------------------------------------------------------------------------------------
    def create_job(
        self,
        command: str,
        values: dict,
        name: str = "",
        description: str = "",
        notify: dict | None = None,
        gpus: list[int] | None = None,
        processes: int = 1,
        lang: str = i18n.DEFAULT,
        found: dict | None = None,
    ) -> tuple[Job | None, dict]:
        """A job from a form or the API: every problem at once ({field: message}; `found`: the form's own), else the
        job, queued last. gpus: None = any free GPUs (one per process) on a machine that has them; [] = the CPU only."""
        with self.sessions() as s:
            errors = {**devices.check(self.machine, command, gpus, processes), **(found or {})}
            job, more = self.factory.build(s, command, values, name, description, notify)
            errors.update(more)
            if job is None or errors:
                s.rollback()
                return None, errors
            job.gpus, job.processes, job.queue_position = gpus, processes, next_position(s)
            if lang != i18n.DEFAULT and job.notify:
                job.notify = {**job.notify, "lang": lang}
            s.add(Event(job_id=job.id, kind="queued", message="created"))
            s.commit()
        self.runner.wake()
        return job, {}

    def _train_rows(self, s, job: Job) -> int | None:
        if job.command != "finetune":
            return None
        rel = os.path.relpath(job.config.get("train", ""), self.home)
        found = s.query(Dataset).filter(Dataset.path == rel).first()
        return found.rows if found else None

    def job_summary(self, s, job: Job, plan: dict | None = None) -> dict:
        """plan: the runner's plan of the queue (reused when summarising many jobs)."""
        folder = self.home / job.folder
        done = job.status in FINISHED
        out = {
            "id": job.id,
            "name": job.name,
            "description": job.description,
            "command": job.command,
            "status": job.status,
            "error": job.error,
            "exit_code": job.exit_code,
            "attempts": job.attempts,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "model": self.model_name(s, job),
            "base_model_id": job.base_model_id,
            "method": _method_label(job.config) if job.command in ("finetune", "sweep") else "",
            "progress": catalog.progress(job, folder, self._train_rows(s, job), now()),
            "headline": catalog.headline(job, folder) if done else None,
            "cancelling": bool(job.cancel_requested_at) and job.status == "running",
            "devices": {
                "gpus": self._asked_gpus(job),
                "processes": job.processes,
                "assigned": job.devices if job.status == "running" else None,
            },
            "queue": None,
            **self._restart(job, folder),
        }
        if job.status == "queued":
            waiting = queue(s)
            plan = plan if plan is not None else self.runner.plan(s)
            start, why = plan.get(job.id, (True, None))
            out["queue"] = {
                "position": [j.id for j in waiting].index(job.id) + 1 if job in waiting else None,
                "length": len(waiting),
                "waiting_for": None if start else why,
            }
        return out

    def _asked_gpus(self, job: Job) -> list[int] | None:
        """The GPUs a job asked for, as it will get them: a job that cannot use one, or a machine without any, is the
        CPU ([]), not "any free GPU" (None)."""
        if job.gpus is None and (job.command not in devices.GPU_COMMANDS or not self.machine.gpu_count()):
            return []
        return job.gpus

    def model_name(self, s, job: Job) -> str | None:
        """The model a job starts from as the user knows it: one of my models by its name, a listed base model
        by its name, else the path relative to the home folder."""
        if job.base_model_id:
            m = s.get(Model, job.base_model_id)
            if m is not None:
                return m.name
        value = job.config.get("model") or job.config.get("student") or job.config.get("tokenizer")
        if not value:
            return None
        home = str(self.home.resolve()) + "/"
        return value[len(home) :] if str(value).startswith(home) else value

    @staticmethod
    def _restart(job: Job, folder: Path) -> dict:
        """Whether running the job again can help, and how: a configuration error (the CLI's exit status 2: a bad
        option or file) fails the same way again, so it gets "clone and fix" instead; pretraining resumes only
        from a checkpoint it wrote, else it starts over."""
        unsuccessful = job.status in ("failed", "cancelled", "interrupted")
        config_error = job.status == "failed" and job.exit_code == 2
        checkpoint = job.command == "pretrain" and any((folder / "checkpoints").glob("step-*"))
        return {
            "resumable": unsuccessful and not config_error,
            "config_error": config_error,
            "restart_label": "Resume" if checkpoint else "Retry",
            "tensorboard": str(folder)
            if any(folder.glob("tensorboard")) or any(folder.glob("*/tensorboard"))
            else None,
        }

    def job_detail(self, s, job: Job) -> dict:
        out = self.job_summary(s, job)
        out["config"] = job.config
        out["folder"] = str(self.home / job.folder)
        out["notify"] = job.notify
        out["command_line"] = display(self.runner.command_line(job))  # what reruns it by hand
        out["events"] = [
            {"kind": e.kind, "message": e.message, "at": _iso(e.created_at)}
            for e in s.query(Event).filter(Event.job_id == job.id).order_by(Event.id)
        ]
        out["models"] = [
            self.model_summary(m) for m in s.query(Model).filter(Model.job_id == job.id).order_by(Model.id)
        ]
        return out

    def log_tail(self, job: Job, lines: int = 200) -> str:
        path = self.home / job.folder / LOG_NAME
        if not path.is_file():
            return ""
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
        # progress bars (tqdm: "NN%|###|") and library warnings are noise here; the file keeps everything
        kept, after_warning = [], False
        for line in (raw.split("\r")[-1] for raw in text.splitlines()):
            if WARNING_HEAD.search(line) or NOISE.search(line) or (after_warning and line.startswith("  ")):
                after_warning = after_warning or bool(WARNING_HEAD.search(line))
                continue
            after_warning = False
            kept.append(line)
        return "\n".join(kept[-lines:])

    def cancel(self, job_id: int) -> str:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job is not None and job.status in FINISHED:
                raise Conflict(f"job {job_id} has already {job.status}")
        return self.runner.cancel(job_id)

    def retry(self, job_id: int) -> None:
        """Queue an unsuccessful job again; pretraining continues from its newest checkpoint (--resume auto)."""
        with self.sessions() as s:
            job = s.get(Job, job_id)
            if job.status not in ("failed", "cancelled", "interrupted"):
                raise Conflict(
                    f"job {job_id} is {job.status}; only failed, cancelled or interrupted jobs can be resumed"
                )
            if self._restart(job, self.home / job.folder)["config_error"]:
                raise Conflict(
                    f"job {job_id} failed on its configuration ({job.error}); running it again would fail "
                    "the same way: clone it and fix the option"
                )
            job.status, job.resume, job.cancel_requested_at, job.error = "queued", True, None, ""
            job.queue_position = next_position(s)  # the end of the queue, as a new job
            s.add(Event(job_id=job.id, kind="queued", message="resume" if job.command == "pretrain" else "retry"))
            s.commit()
        self.runner.wake()

    def move(self, job_id: int, direction: str) -> list[int]:
        """Move a queued job one place up or down the queue; returns the queue's job ids in their new order."""
        with self.runner._lock, self.sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                raise KeyError(job_id)
            if job.status != "queued":
                raise Conflict(f"job {job_id} is {job.status}; only queued jobs can be moved")
            order = queue(s)
            i = order.index(job)
            j = i - 1 if direction == "up" else i + 1
            if 0 <= j < len(order):
                order[i], order[j] = order[j], order[i]
            for position, queued in enumerate(order, 1):  # renumbered: positions are unique and dense again
                queued.queue_position = position
            s.commit()
            ids = [q.id for q in order]
        self.runner.wake()
        return ids

    def resources(self) -> dict:
        """The machine now (console.devices), each GPU with the running job that holds it, and the queue's jobs."""
        out = self.machine.snapshot()
        with self.sessions() as s:
            running = s.query(Job).filter(Job.status == "running").all()
            users = {g: {"id": j.id, "name": j.name} for j in running for g in (j.devices or [])}
            for gpu in out["gpus"]:
                gpu["job"] = users.get(gpu["index"])
            out["jobs"] = {
                "running": [
                    {"id": j.id, "name": j.name, "gpus": j.devices or [], "processes": j.processes} for j in running
                ],
                "queued": len(queue(s)),
                "cpu_slots": self.cfg.max_concurrent,
            }
        return out

    # ---- models ------------------------------------------------------------------------------------------
    def model_summary(self, m: Model, session=None) -> dict:
        from sqlalchemy.orm import object_session

        session = session or object_session(m)
        job = m.job
        return {
            "id": m.id,
            "name": m.name,
            "kind": m.kind,
            "path": str(self.home / m.path),
            "job_id": m.job_id,
            "job_name": job.name if job else None,
            "job_command": job.command if job else None,
            "step": m.step,
            "metrics": m.metrics,
            "size_bytes": m.size_bytes,
            "created_at": _iso(m.created_at),
            "lineage": catalog.lineage(m, session, self.home),
            "can_try": m.kind in ("classifier", "linear"),
            "method": self._method(m),
            "floor": self._floor(m),
        }

    def _floor(self, m: Model) -> dict | None:
        """The classical floor fitted beside a classifier, on the split its headline metric is on."""
        from domainlm.console import compare

        found = compare.floor(self.home, m)
        if not found:
            return None
        metric = next((k for k in ("accuracy", "f1_micro") if k in found["metrics"]), None)
        if metric is None:
            return None
        return {"split": found["split"], "metric": metric, "value": round(found["metrics"][metric], 4)}

    def _method(self, m: Model) -> str:
        from domainlm.console import compare

        if m.kind in ("classifier", "linear"):
            c = compare.settings(self.home, m)
            return compare.method_label(c["method"], c["LoRA rank"])
        return {"snapshot": "MLM", "final": "MLM", "base": "base model"}.get(m.kind, "")

    def _load(self, m: Model):
        """The model behind the interface `domainlm predict` uses (classify.runtime.load; transformer or linear)."""
        from transformers.utils import logging as hf_logging

        from domainlm.classify.runtime import load

        hf_logging.disable_progress_bar()
        path = str(inside(self.home, m.path))
        with self._models_lock:
            if path not in self._models:
                self._models[path] = load(path)
                while len(self._models) > 2:
                    self._models.popitem(last=False)
            self._models.move_to_end(path)
            return self._models[path]

    def preload(self, m: Model) -> None:
        def load() -> None:
            try:
                self._load(m)
            except Exception as e:  # noqa: BLE001 - "try" reports the same error when it is used
                print(f"console: preloading {m.name}: {e}", file=sys.stderr)

        threading.Thread(target=load, name=f"preload-{m.id}", daemon=True).start()

    def predict(self, m: Model, texts: list[str], top_k: int = 5) -> list[dict]:
        """Labels and scores for each text, through the code `domainlm predict` uses."""
        if m.kind not in ("classifier", "linear"):
            raise Conflict(f"{m.name} is a pretraining {m.kind}, not a classifier: fine-tune it first")
        texts = [t.strip() for t in texts if t.strip()]
        if not texts:
            raise DomainLMError("type at least one text")
        if len(texts) > 100:  # answering the first 100 would pass silently for all of them
            raise DomainLMError(
                f"{len(texts)} texts: try answers at most 100 at a time; use `domainlm predict` for more"
            )
        runtime = self._load(m)  # its own max_seq_len (saved with it), else its job's
        with self.sessions() as s:
            job = s.get(Job, m.job_id) if m.job_id else None
            max_seq_len = None if "max_seq_len" in runtime.meta else (job.config if job else {}).get("max_seq_len")
        with self._models_lock:  # one forward pass at a time per loaded model
            probs = runtime.predict(texts, None, 16, max_seq_len)
        return [
            {"text": text, "labels": d["labels"], "scores": d["top_k"]}
            for text, d in zip(texts, runtime.decide(probs, top_k, digits=4))
        ]

    def delete_model(self, model_id: int) -> dict:
        with self.sessions() as s:
            m = s.get(Model, model_id)
            if m is None:
                raise KeyError(model_id)
            path = inside(self.home, m.path)
            if path == self.home or path == self.home / "jobs":
                raise Conflict(f"refusing to delete {m.path}")
            users = s.query(Job).filter(Job.base_model_id == m.id, Job.status.in_(("queued", "running"))).all()
            if users:
                raise Conflict(
                    f"{m.name} is the base of job(s) {', '.join(str(j.id) for j in users)} that have not finished"
                )
            size = m.size_bytes
            self.endpoints.stop(model_id)
            if m.kind == "linear":  # its files only: the folder is also its job's run folder
                for name in catalog.LINEAR_FILES:
                    (path / name).unlink(missing_ok=True)
            elif path.is_dir():
                shutil.rmtree(path)
            with self._models_lock:
                self._models.pop(str(path), None)
            s.delete(m)
            s.commit()
        return {"deleted": model_id, "path": str(path), "size_bytes": size}

    # ---- shipping --------------------------------------------------------------------------------------------
    def start_endpoint(self, model_id: int) -> dict:
        with self.sessions() as s:
            m = s.get(Model, model_id)
            if m is None:
                raise KeyError(model_id)
            path, kind = inside(self.home, m.path), m.kind
        self.endpoints.start(model_id, path, kind)
        return self.endpoints.status(model_id, metrics=False)

    # ---- own models and corpora ---------------------------------------------------------------------------
    def register_model(self, path: str, name: str = "") -> dict:
        from domainlm.console import imports

        with self.sessions() as s:
            record = imports.register_model(s, self.home, list(self.cfg.import_roots), path, name)
            s.commit()
            return self.model_summary(record)

    def upload_model(self, tmp: Path, filename: str, name: str = "") -> dict:
        from domainlm.console import imports

        with self.sessions() as s:
            record = imports.upload_model(s, self.home, tmp, filename, name)
            s.commit()
            return self.model_summary(record)

    def register_dataset(self, path: str, fields: dict) -> Dataset:
        from domainlm.console import imports

        with self.sessions() as s:
            record = imports.register_dataset(s, self.home, list(self.cfg.import_roots), path, fields)
            s.commit()
            return record

    def compare(self, s, ids: list[int]) -> dict:
        """The selected models side by side: settings, metrics, floors, curves, the paired test (console/compare.py)."""
        from domainlm.console import compare

        return compare.table(s, self.home, ids, self.model_summary)


def _method_label(config: dict) -> str:
    from domainlm.console.compare import method_label

    return method_label(config.get("method"), config.get("lora_rank"))


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=timezone.utc).isoformat(timespec="seconds")
