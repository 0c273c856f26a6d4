"""The runner's process handling with real processes: small Python programs stand in for the training command
(they start in well under a second), so cancel, escalation, reconcile and adoption are tested quickly."""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import pytest

pytest.importorskip("sqlalchemy")

from domainlm.console.db import Event, Job, open_database  # noqa: E402
from domainlm.console.runner import Runner, alive  # noqa: E402
from tests.console_support import wait_for  # noqa: E402

# A job that starts a child in its own process group, reports both pids, and ignores SIGTERM when told to.
PROGRAM = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    if sys.argv[1] == "fail":  # what the CLI does with bad input: one `error:` line, exit status 2
        print("loading...")
        print("error: data/train.jsonl:7: no label (pass --skip-bad-rows to skip and count such rows)", file=sys.stderr)
        sys.exit(2)
    stubborn = sys.argv[1] == "stubborn"
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                              "signal.signal(signal.SIGTERM, signal.SIG_IGN) "
                              "if %r else None; time.sleep(60)" % stubborn])
    open("pids", "w").write(f"{os.getpid()} {child.pid}")
    seconds = float(sys.argv[2])
    time.sleep(seconds)
    if sys.argv[3] != "-":
        open(sys.argv[3], "w").write("{}")
    child.kill()
""")


class ProgramRunner(Runner):
    """The runner with each job's command replaced by PROGRAM, its arguments taken from the job's config."""

    def command_line(self, job):
        c = job.config
        argv = [sys.executable, "-c", PROGRAM, c.get("mode", "polite"), str(c.get("seconds", 60)), c.get("marker", "-")]
        return argv + (["--resume", "auto"] if job.resume and job.command == "pretrain" else [])


@pytest.fixture
def runner_env(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path / 'console.db'}")
    runners = []

    def make(**kw):
        r = ProgramRunner(sessions, tmp_path, poll=0.1, **kw)
        runners.append(r)
        return r

    def add(command="pretrain", **config):
        with sessions() as s:
            job = Job(name="j", command=command, config=config)
            s.add(job)
            s.flush()
            job.folder = f"jobs/{job.id}"
            (tmp_path / job.folder).mkdir(parents=True)
            s.commit()
            return job.id

    yield sessions, make, add, tmp_path
    for r in runners:
        r.stop()
    with sessions() as s:  # leave no process behind
        for job in s.query(Job):
            if alive(job.pid, job.proc_start):
                os.killpg(job.pid, signal.SIGKILL)


def status(sessions, job_id):
    with sessions() as s:
        return s.get(Job, job_id)


def pids(home, job_id):
    path = home / "jobs" / str(job_id) / "pids"
    return wait_for(
        lambda: path.is_file() and path.read_text().split() and [int(p) for p in path.read_text().split()],
        30,
        0.05,
        "the job's pids",
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"  # a zombie child of the runner


def test_cancel_terminates_the_whole_process_group(runner_env):
    sessions, make, add, home = runner_env
    runner = make(grace=30)
    runner.start()
    job = add(mode="polite")
    leader, child = pids(home, job)
    assert os.getpgid(child) == os.getpgid(leader) == leader
    assert runner.cancel(job) == "running"
    wait_for(lambda: status(sessions, job).status == "cancelled", 10, what="cancelled")
    assert gone(leader) and wait_for(lambda: gone(child), 5, what="the child to end")  # SIGTERM reached the child
    with sessions() as s:
        kinds = [e.kind for e in s.query(Event).filter(Event.job_id == job).order_by(Event.id)]
    assert kinds == ["started", "cancel", "cancelled"]


def test_cancel_escalates_to_sigkill_after_the_grace_period(runner_env):
    sessions, make, add, home = runner_env
    runner = make(grace=0.5)
    runner.start()
    job = add(mode="stubborn")
    leader, child = pids(home, job)
    runner.cancel(job)
    wait_for(lambda: status(sessions, job).status == "cancelled", 10, what="cancelled")
    j = status(sessions, job)
    assert j.exit_code == -signal.SIGKILL and (j.finished_at - j.cancel_requested_at).total_seconds() >= 0.5
    assert wait_for(lambda: gone(child), 5, what="the stubborn child to be killed")


def test_queue_respects_the_concurrency_limit_and_cancels_queued_jobs(runner_env):
    sessions, make, add, home = runner_env
    runner = make(max_concurrent=1)
    first, second, third = add(seconds=0.5, marker="results.json"), add(seconds=0.5, marker="results.json"), add()
    runner.start()
    assert status(sessions, first).status == "running" or wait_for(
        lambda: status(sessions, first).status == "running", 5
    )
    assert status(sessions, second).status == "queued"
    assert runner.cancel(third) == "cancelled"  # never started
    wait_for(lambda: status(sessions, second).status == "succeeded", 20, what="the second job")
    assert (
        status(sessions, first).status == "succeeded"
        and status(sessions, first).finished_at <= status(sessions, second).started_at
    )
    assert status(sessions, third).pid is None


def test_restart_marks_dead_jobs_interrupted_and_resume_continues_them(runner_env):
    sessions, make, add, home = runner_env
    runner = make()
    runner.start()
    job = add(command="pretrain")
    leader, _ = pids(home, job)
    runner.stop()  # the console goes away; the job runs on in its own session
    assert not gone(leader) and status(sessions, job).status == "running"
    os.killpg(leader, signal.SIGKILL)  # ...then dies while nobody watches (reboot, OOM killer)
    wait_for(lambda: gone(leader), 5)
    restarted = make()
    restarted.reconcile()
    j = status(sessions, job)
    assert j.status == "interrupted" and "not watching" in j.error
    with sessions() as s:
        s.get(Job, job).status, s.get(Job, job).resume = "queued", True
        s.commit()
    assert restarted.command_line(status(sessions, job))[-2:] == ["--resume", "auto"]


def test_restart_adopts_a_job_that_is_still_running(runner_env):
    sessions, make, add, home = runner_env
    runner = make()
    runner.start()
    job = add(command="pretrain", seconds=2, marker="results.json")
    leader, _ = pids(home, job)
    runner.stop()
    restarted = make()
    restarted.start()  # reconcile: alive, so still running, and watched by pid
    assert status(sessions, job).status == "running" and job not in restarted.procs
    wait_for(lambda: status(sessions, job).status == "succeeded", 20, what="the adopted job to finish")
    assert gone(leader)


def test_notifications_never_block_and_give_up_after_retries():
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from domainlm.console.notify import Notifier

    seen, results = [], []

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(0.3)  # a slow receiver that always fails
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notifier = Notifier(b"k", retries=2, backoff=0.05, on_result=lambda item, ok, msg: results.append((ok, msg)))
    try:
        started = time.monotonic()
        notifier.send(
            {"event": "job.failed", "job": {"id": 1}}, webhook=f"http://127.0.0.1:{server.server_address[1]}/"
        )
        assert time.monotonic() - started < 0.05  # queued, not delivered, by the caller
        wait_for(lambda: results, 10, 0.05, "the delivery to give up")
        assert len(seen) == 3 and results == [(False, "gave up after 3 attempts: HTTP Error 503: Service Unavailable")]
        assert json.loads(seen[0]) == {"event": "job.failed", "job": {"id": 1}}
    finally:
        notifier.stop()
        server.shutdown()


def test_a_failing_command_is_failed_with_the_clis_error_line(runner_env):
    sessions, make, add, home = runner_env
    runner = make()
    runner.start()
    job = add(command="finetune", mode="fail")
    wait_for(lambda: status(sessions, job).status == "failed", 20, what="the failure")
    j = status(sessions, job)
    assert (
        j.exit_code == 2
        and j.error == "data/train.jsonl:7: no label (pass --skip-bad-rows to skip and count such rows)"
    )
