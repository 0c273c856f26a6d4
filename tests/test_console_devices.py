"""Devices per job and the queue: GPUs and processes checked against the machine at creation, jobs started when
their devices are free (each with CUDA_VISIBLE_DEVICES of its own GPUs), the queue's order shown and changed, and
the machine's resources. GPUs are stated to the console here (this machine has none); processes are real."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from domainlm.console.app import Console  # noqa: E402
from domainlm.console.db import Job, open_database  # noqa: E402
from domainlm.console.devices import Gpu, Machine  # noqa: E402
from domainlm.console.runner import Runner, alive  # noqa: E402
from domainlm.console.settings import ConsoleConfig  # noqa: E402
from domainlm.console.web import create_app  # noqa: E402
from tests.console_support import wait_for, write_labelled  # noqa: E402

# a job: writes the GPUs it was given, waits until told to finish (a file), then leaves its done marker
PROGRAM = textwrap.dedent("""
    import os, pathlib, sys, time
    pathlib.Path("gpus").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    while not pathlib.Path("finish").exists():
        time.sleep(0.05)
    pathlib.Path("results.json").write_text("{}")
""")
TWO_GPUS = [Gpu(0, "NVIDIA H100 80GB HBM3", 80 * 2**30, 2**30, 3), Gpu(1, "NVIDIA H100 80GB HBM3", 80 * 2**30, 0, 0)]


class ProgramRunner(Runner):
    def command_line(self, job):
        return [sys.executable, "-c", PROGRAM]


@pytest.fixture
def queue_env(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path / 'console.db'}")
    runner = ProgramRunner(sessions, tmp_path, max_concurrent=1, poll=0.1, machine=Machine(tmp_path, TWO_GPUS))

    def add(gpus, processes=1, command="pretrain"):
        with sessions() as s:
            job = Job(name="j", command=command, config={}, gpus=gpus, processes=processes)
            s.add(job)
            s.flush()
            job.folder, job.queue_position = f"jobs/{job.id}", job.id
            (tmp_path / job.folder).mkdir(parents=True)
            s.commit()
            return job.id

    yield sessions, runner, add, tmp_path
    runner.stop()
    with sessions() as s:
        for job in s.query(Job):
            if alive(job.pid, job.proc_start):
                os.killpg(job.pid, 9)


def _state(sessions, job_id):
    with sessions() as s:
        j = s.get(Job, job_id)
        return j.status, j.devices


def test_jobs_start_when_their_gpus_are_free_each_with_its_own(queue_env):
    sessions, runner, add, home = queue_env
    a = add([0])  # GPU 0
    b = add([0])  # GPU 0 too: waits for a
    c = add(None)  # any free GPU: GPU 1
    d = add([])  # the CPU: one CPU-only job at a time
    e = add([])  # waits for d
    f = add([1], command="finetune")  # GPU 1 is c's
    with sessions() as s:
        plan = runner.plan(s)
    assert plan[a] == (True, [0]) and plan[c] == (True, [1]) and plan[d] == (True, [])
    assert plan[b] == (False, {"gpus": {0: a}, "need": 1}) and plan[f] == (False, {"gpus": {1: c}, "need": 1})
    assert plan[e] == (False, {"cpu": [d], "limit": 1})
    runner.start()
    gpus = {j: home / "jobs" / str(j) / "gpus" for j in (a, c, d)}
    wait_for(lambda: all(p.is_file() for p in gpus.values()), 20, what="three jobs to start")
    assert {j: p.read_text() for j, p in gpus.items()} == {a: "0", c: "1", d: ""}  # "": no GPU for a CPU job
    assert [_state(sessions, j)[0] for j in (b, e, f)] == ["queued"] * 3
    (home / "jobs" / str(a) / "finish").touch()  # GPU 0 frees: b starts on it, the rest still wait
    wait_for(lambda: _state(sessions, b) == ("running", [0]), 20, what="b on GPU 0")
    assert _state(sessions, a)[0] == "succeeded" and [_state(sessions, j)[0] for j in (e, f)] == ["queued"] * 2
    for j in (b, c, d):
        (home / "jobs" / str(j) / "finish").touch()
    wait_for(
        lambda: _state(sessions, f) == ("running", [1]) and _state(sessions, e) == ("running", []),
        20,
        what="the last two",
    )
    for j in (e, f):
        (home / "jobs" / str(j) / "finish").touch()
    wait_for(lambda: all(_state(sessions, j)[0] == "succeeded" for j in (a, b, c, d, e, f)), 20, what="all six")


def test_a_waiting_job_keeps_its_gpus_from_the_jobs_behind_it(queue_env):
    sessions, runner, add, home = queue_env
    first = add([0])
    both = add([0, 1], processes=2)  # waits for GPU 0; GPU 1 is kept for it
    later = add([1])  # would fit on GPU 1 now, but must not overtake `both` for ever
    with sessions() as s:
        plan = runner.plan(s)
    assert plan[first][0] and plan[both] == (False, {"gpus": {0: first}, "need": 2})
    assert plan[later] == (False, {"gpus": {1: both}, "need": 1})


def test_more_than_one_process_runs_under_torchrun(queue_env):
    sessions, runner, add, home = queue_env
    runner = Runner(sessions, home, machine=Machine(home, TWO_GPUS))
    job_id = add([0, 1], processes=2, command="finetune")
    with sessions() as s:
        argv = runner.command_line(s.get(Job, job_id))
    assert argv[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    assert argv[7:9] == ["domainlm.cli", "finetune"]
    with sessions() as s:
        s.get(Job, job_id).command = "prepare"  # one process only: never torchrun
        assert runner.command_line(s.get(Job, job_id))[1:4] == ["-m", "domainlm.cli", "prepare"]


@pytest.fixture
def console_env(tmp_path, tiny_model):
    home = tmp_path / "home"
    console = Console(
        ConsoleConfig(home=str(home), token="t", base_models=[tiny_model]), machine=Machine(home, TWO_GPUS[:1])
    )
    client = TestClient(create_app(console))
    client.get("/?token=t")
    train = client.post(
        "/api/datasets",
        headers={"X-CSRF-Token": console.csrf},
        files={"file": ("t.jsonl", open(write_labelled(tmp_path / "t.jsonl"), "rb"))},
    ).json()
    yield client, console, train["path"], tiny_model
    console.stop()


def test_devices_are_checked_against_the_machine_at_creation(console_env):
    client, console, train, tiny = console_env
    csrf = {"X-CSRF-Token": console.csrf}
    base = {"command": "finetune", "config": {"model": tiny, "train": train, "max_seq_len": 64}}

    def errors(**body):
        r = client.post("/api/jobs", headers=csrf, json={**base, **body})
        return r.status_code, r.json().get("errors")

    assert errors(gpus=[3]) == (422, {"gpus": "GPU 3 is not on this machine (it has 1: 0)"})
    assert errors(gpus=[0], processes=2) == (422, {"processes": "1 GPU(s) run 1 process(es), one per GPU, not 2"})
    assert errors(processes=2) == (422, {"processes": "2 processes need 2 GPUs, one each; this machine has 1"})
    assert errors(gpus=[], processes=999) == (
        422,
        {"processes": f"999 processes on the CPU: this machine has {os.cpu_count()} cores"},
    )
    r = client.post(
        "/api/jobs",
        headers=csrf,
        json={"command": "prepare", "processes": 2, "gpus": [0], "config": {"input": [train], "tokenizer": tiny}},
    )
    assert r.json()["errors"]["processes"] == (
        "a prepare job runs as one process; more than one is for finetune, pretrain and distill"
    )
    assert r.json()["errors"]["gpus"] == "a prepare job runs on the CPU"
    assert client.get("/api/jobs").json() == []  # nothing was created
    ok = client.post("/api/jobs", headers=csrf, json={**base, "gpus": [0]}).json()
    assert ok["devices"] == {"gpus": [0], "processes": 1, "assigned": None}
    # the form: the machine's GPUs to tick, a field error beside the devices
    form = client.get("/jobs/new").text
    assert 'id="f-gpu-0"' in form and "NVIDIA H100 80GB HBM3" in form and 'name="processes"' in form
    r = client.post(
        "/jobs/new",
        data={
            "csrf": console.csrf,
            "command": "finetune",
            "model": tiny,
            "train": train,
            "max_seq_len": "64",
            "gpus_mode": "pick",
            "processes": "two",
        },
    )
    assert r.status_code == 422
    assert "tick at least one GPU, or choose any free GPU or the CPU" in r.text
    assert "processes: expected a whole number, got &#39;two&#39;" in r.text


def test_the_queue_is_shown_in_order_and_can_be_reordered(console_env):
    client, console, train, tiny = console_env
    csrf = {"X-CSRF-Token": console.csrf}
    config = {"model": tiny, "train": train, "max_seq_len": 64}
    ids = [
        client.post(
            "/api/jobs", headers=csrf, json={"command": "finetune", "name": f"job {n}", "gpus": [0], "config": config}
        ).json()["id"]
        for n in range(3)
    ]
    with console.sessions() as s:  # the first one runs on GPU 0 (as the runner would have started it)
        j = s.get(Job, ids[0])
        j.status, j.devices = "running", [0]
        s.commit()
    moved = client.post(f"/api/jobs/{ids[2]}/move", headers=csrf, json={"direction": "up"}).json()
    assert moved == {"queue": [ids[2], ids[1]]}
    page = client.get("/jobs").text
    assert page.index(f'data-queued="{ids[2]}"') < page.index(f'data-queued="{ids[1]}"')
    assert f"waits for GPU 0 (job {ids[0]})" in page
    detail = client.get(f"/api/jobs/{ids[1]}").json()
    assert detail["queue"] == {"position": 2, "length": 2, "waiting_for": {"gpus": {"0": ids[0]}, "need": 1}}
    r = client.post(f"/jobs/{ids[1]}/up", data={"csrf": console.csrf}, follow_redirects=False)  # the page's button
    assert r.status_code == 303
    with console.sessions() as s:
        queued = sorted(s.query(Job).filter(Job.status == "queued"), key=lambda j: j.queue_position)
        assert [j.id for j in queued] == ids[1:]
    assert client.post(f"/api/jobs/{ids[0]}/move", headers=csrf, json={"direction": "up"}).status_code == 409  # running
    assert client.post("/api/jobs/999/move", headers=csrf, json={"direction": "up"}).status_code == 404
    retried = client.post(f"/api/jobs/{ids[1]}/cancel", headers=csrf)
    assert retried.json()["status"] == "cancelled"
    client.post(f"/api/jobs/{ids[1]}/retry", headers=csrf)  # a job queued again goes to the end of the queue
    assert client.get(f"/api/jobs/{ids[1]}").json()["queue"]["position"] == 2


def test_the_machine_is_on_its_page_and_on_every_job_page(console_env):
    client, console, train, tiny = console_env
    m = client.get("/api/resources").json()
    assert m["cpu"]["cores"] == os.cpu_count() and m["disk"]["path"] == str(console.home) and m["disk"]["total"] > 0
    assert m["memory"]["total"] > 0 and m["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3" and m["gpus"][0]["job"] is None
    page = client.get("/resources").text
    assert "NVIDIA H100 80GB HBM3" in page and "1.0 GiB of 80.0 GiB" in page
    job = client.post(
        "/api/jobs",
        headers={"X-CSRF-Token": console.csrf},
        json={"command": "finetune", "config": {"model": tiny, "train": train, "max_seq_len": 64}},
    ).json()
    assert 'id="machine"' in client.get(f"/jobs/{job['id']}").text
    # without a GPU (NVML finds none here): said so, on the page and in the form
    console.machine = console.runner.machine = Machine(console.home)
    assert client.get("/api/resources").json()["gpus"] == []
    assert 'id="no-gpu"' in client.get(f"/jobs/{job['id']}").text and "no GPU" in client.get("/resources").text
    assert "this machine has no GPU" in client.get("/jobs/new").text
