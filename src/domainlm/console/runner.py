"""The job queue: each job is `python -m domainlm.cli COMMAND --config job.yaml` in its own process group (under
`torchrun --nproc-per-node N` when it asks for N > 1 processes).

- Jobs start in queue order (changeable: move up / down) when their devices are free: the GPUs a job names, or as
  many free GPUs as it has processes; a CPU-only job when fewer than `max_concurrent` CPU-only jobs run. A job that
  waits keeps what it waits for from the jobs behind it. CUDA_VISIBLE_DEVICES gives each job its GPUs.
- Cancel: SIGTERM to the whole group (DataLoader workers included), SIGKILL after a grace period.
- Jobs outlive the console: they run in their own session, so restarting the console does not stop training.
  On start the runner reconciles: a running job whose process is still alive is adopted and watched; one whose
  process is gone is marked interrupted and can be resumed (`--resume auto` for pretraining).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

from domainlm.console import catalog, devices
from domainlm.console.db import Event, Job, now

LOG_NAME = "job.log"
DONE_MARKERS = {
    "finetune": ("metrics.json", "summary.json"),
    "pretrain": ("results.json",),
    "prepare": ("corpus/meta.json",),
    "sweep": ("results.json",),
    "export": ("export/export.json",),
    "distill": ("distill.json",),
}


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]  # a zombie has finished


def alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    if Path("/proc").is_dir():
        return proc_start_time(pid) is not None and proc_start_time(pid) == start
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def last_error(log: Path) -> str:
    """The CLI's `error: ...` line, else the last line (a traceback's last line names the exception)."""
    try:
        lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error: ")]
    return (errors[-1][7:] if errors else lines[-1] if lines else "")[:2000]


def queue(s) -> list[Job]:
    """Queued jobs in the order they start (queue position, then age)."""
    return s.query(Job).filter(Job.status == "queued").order_by(Job.queue_position, Job.id).all()


def next_position(s) -> int:
    from sqlalchemy import func

    return (s.query(func.max(Job.queue_position)).scalar() or 0) + 1


def display(argv: list[str]) -> str:
    """A job's command line as a user types it: `domainlm ...` or `torchrun ... -m domainlm.cli ...`."""
    if argv[1:3] == ["-m", "torch.distributed.run"]:
        return " ".join(["torchrun", *argv[3:]])
    return " ".join(["domainlm", *argv[3:]])


class Runner:
    def __init__(
        self,
        sessions,
        home: Path,
        max_concurrent: int = 1,
        grace: float = 10.0,
        on_event=None,
        poll: float = 0.5,
        machine: devices.Machine | None = None,
    ):
        self.sessions, self.home = sessions, home
        self.max_concurrent, self.grace, self.poll = max_concurrent, grace, poll
        self.machine = machine or devices.Machine(home, gpus=[])
        self.on_event = on_event or (lambda job, kind, message: None)
        self.procs: dict[int, subprocess.Popen] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="domainlm-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; running jobs go on and are adopted by the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:  # one bad tick (a locked database) must not end the queue
                print(f"runner: {e}", file=sys.stderr)
            self._wake.wait(self.poll)
            self._wake.clear()

    def reconcile(self) -> None:
        with self.sessions() as s:
            for job in s.query(Job).filter(Job.status == "running"):
                if job.id in self.procs or alive(job.pid, job.proc_start):
                    continue
                if self._completed(job):
                    self._finish(s, job, "succeeded", None)
                else:
                    self._finish(
                        s, job, "interrupted", None, "the job's process ended while the console was not watching"
                    )
            s.commit()

    # ---- one pass: finished jobs, cancel escalation, then start queued ones ------------------------------
    def tick(self) -> None:
        with self._lock, self.sessions() as s:
            running = s.query(Job).filter(Job.status == "running").all()
            for job in running:
                proc = self.procs.get(job.id)
                code = proc.poll() if proc is not None else (None if alive(job.pid, job.proc_start) else "gone")
                if code is None:
                    if job.cancel_requested_at and now() - job.cancel_requested_at > timedelta(seconds=self.grace):
                        self._signal(job, signal.SIGKILL)
                    continue
                self.procs.pop(job.id, None)
                if job.cancel_requested_at:
                    self._finish(s, job, "cancelled", None if code == "gone" else code)
                elif code == "gone":  # adopted after a restart: the exit status is lost; the outputs tell
                    ok = self._completed(job)
                    self._finish(
                        s,
                        job,
                        "succeeded" if ok else "failed",
                        None,
                        "" if ok else last_error(self.home / job.folder / LOG_NAME),
                    )
                elif code == 0:
                    self._finish(s, job, "succeeded", 0)
                elif code < 0:
                    self._finish(s, job, "interrupted", code, f"killed by signal {-code}")
                else:
                    self._finish(s, job, "failed", code, last_error(self.home / job.folder / LOG_NAME))
            for job_id, (start, detail) in self.plan(s).items():
                if start:
                    self._launch(s, s.get(Job, job_id), detail)
            s.commit()

    def plan(self, s) -> dict[int, tuple[bool, object]]:
        """For each queued job in order: (True, the GPUs it gets) if it can start now, else (False, why it waits)."""
        total = self.machine.gpu_count()
        running = s.query(Job).filter(Job.status == "running").all()
        holder = {g: j.id for j in running for g in (j.devices or [])}
        free = [g for g in range(total) if g not in holder]
        cpu_jobs = [j.id for j in running if not j.devices]
        cpu_slots = self.max_concurrent - len(cpu_jobs)
        out: dict[int, tuple[bool, object]] = {}
        for job in queue(s):
            need = devices.wanted(job, total)
            if need == 0:
                if cpu_slots > 0:
                    cpu_slots -= 1
                    out[job.id] = (True, [])
                    cpu_jobs.append(job.id)
                else:
                    out[job.id] = (False, {"cpu": cpu_jobs[:], "limit": self.max_concurrent})
                continue
            chosen = list(job.gpus) if job.gpus is not None else free[:need]
            if len(chosen) == need and all(g in free for g in chosen):
                out[job.id] = (True, chosen)
                free = [g for g in free if g not in chosen]
                holder.update(dict.fromkeys(chosen, job.id))
                continue
            asked = list(job.gpus) if job.gpus is not None else list(range(total))
            out[job.id] = (False, {"gpus": {g: holder[g] for g in asked if g in holder}, "need": need})
            for g in job.gpus if job.gpus is not None else free[:need]:  # kept for this job, not the ones behind
                if g in free:
                    free.remove(g)
                    holder[g] = job.id
        return out

    def _completed(self, job: Job) -> bool:
        folder = self.home / job.folder
        return any((folder / m).is_file() for m in DONE_MARKERS[job.command])

    def command_line(self, job: Job) -> list[str]:
        spec = str(self.home / job.folder / "job.yaml")
        # the sweep takes its file as an argument; its finished cells are kept when it runs again
        argv = [
            sys.executable,
            "-m",
            "domainlm.cli",
            job.command,
            *([spec] if job.command == "sweep" else ["--config", spec]),
        ]
        if job.processes > 1 and job.command in devices.DISTRIBUTED:  # one process per GPU (or CPU share), gloo/NCCL
            argv[1:3] = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(job.processes),
                "-m",
                "domainlm.cli",
            ]
        if job.resume and job.command == "pretrain":
            argv += ["--resume", "auto"]  # from its newest checkpoint
        elif job.resume and job.command in ("finetune", "distill"):
            argv += ["--overwrite"]  # fine-tuning starts over: the failed attempt's own files are replaced
        return argv

    def _launch(self, s, job: Job, gpus: list[int]) -> None:
        folder = self.home / job.folder
        argv = self.command_line(job)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.machine.gpu_count():  # its GPUs only (none: the CPU), numbered as NVML and the pages number them
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
        job.devices = gpus
        job.progress_base = catalog.steps_done(job, folder) if job.command in ("pretrain", "sweep") else 0
        with open(folder / LOG_NAME, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=str(folder),
                    env=env,
                    start_new_session=True,
                )
            except OSError as e:
                self._finish(s, job, "failed", None, f"could not start: {e}")
                return
        self.procs[job.id] = proc
        job.status, job.pid, job.proc_start = "running", proc.pid, proc_start_time(proc.pid)
        job.started_at, job.finished_at, job.exit_code, job.error = now(), None, None, ""
        job.attempts += 1
        job.cancel_requested_at = None
        where = f"GPU {', '.join(map(str, gpus))}" if gpus else "CPU"
        self._event(s, job, "started", f"attempt {job.attempts} on {where}: {display(argv)}")

    def _finish(self, s, job: Job, status: str, code, error: str = "") -> None:
        job.status, job.exit_code, job.error, job.finished_at = status, code, error, now()
        catalog.register_outputs(s, job, self.home)
        metric = catalog.headline(job, self.home / job.folder) if status == "succeeded" else None
        message = error or (f"{metric['name']} = {metric['value']}" if metric else "")
        self._event(s, job, status, message)

    def _event(self, s, job: Job, kind: str, message: str) -> None:
        s.add(Event(job_id=job.id, kind=kind, message=message))
        self.on_event(job, kind, message)

    # ---- requests from pages and the API ------------------------------------------------------------------
    def cancel(self, job_id: int) -> str:
        with self._lock, self.sessions() as s:
            job = s.get(Job, job_id)
            if job is None:
                return "missing"
            if job.status == "queued":
                self._finish(s, job, "cancelled", None)
            elif job.status == "running" and not job.cancel_requested_at:
                job.cancel_requested_at = now()
                self._signal(job, signal.SIGTERM)
                s.add(Event(job_id=job.id, kind="cancel", message=f"SIGTERM sent; SIGKILL after {self.grace:g} s"))
            status = job.status
            s.commit()
        self.wake()
        return status

    def _signal(self, job: Job, sig: int) -> None:
        if job.pid and alive(job.pid, job.proc_start):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, sig)
