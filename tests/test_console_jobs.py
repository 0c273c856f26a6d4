"""Job creation through the HTML form and the API without running anything (the runner is not started here),
and lineage through pretraining snapshots read from a run folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from domainlm import config as cfglib  # noqa: E402
from domainlm.classify.config import FinetuneConfig  # noqa: E402
from domainlm.console.app import Console
from domainlm.console.db import Job  # noqa: E402
from domainlm.console.settings import ConsoleConfig  # noqa: E402
from domainlm.console.web import create_app  # noqa: E402
from domainlm.pretrain.config import PretrainConfig  # noqa: E402
from tests.console_support import write_labelled  # noqa: E402

TOKEN = "t0ken"


@pytest.fixture
def idle(tmp_path, tiny_model):
    """A console whose runner is not started: jobs stay queued, so forms and records can be checked alone."""
    home = tmp_path / "home"
    console = Console(ConsoleConfig(home=str(home), token=TOKEN, base_models=[tiny_model]))
    client = TestClient(create_app(console))  # no `with`: the lifespan (runner) does not start
    client.get(f"/?token={TOKEN}")
    train = client.post(
        "/api/datasets",
        headers={"X-CSRF-Token": console.csrf},
        files={"file": ("train.jsonl", open(write_labelled(tmp_path / "train.jsonl"), "rb"))},
    ).json()
    yield client, console, home, train, tiny_model
    console.stop()


def form(console, **values):
    return {
        "csrf": console.csrf,
        "command": "finetune",
        "valid_mode": "split",
        "max_seq_len": "64",
        **values,
    }  # 64 positions


def test_form_shows_each_error_next_to_its_field_and_keeps_the_input(idle):
    client, console, home, train, tiny = idle
    r = client.post(
        "/jobs/new",
        data=form(
            console,
            model=tiny,
            train=train["path"],
            epochs="99",
            learning_rate="0",
            batch_size="8",
            name="<script>alert(1)</script>",
        ),
    )
    assert r.status_code == 422
    field = re.search(r'<div class="field invalid" id="field-epochs">.*?</div>\s*</div>', r.text, re.S).group(0)
    assert '<div class="error" role="alert">epochs = 99 is out of range [1, 50]</div>' in field
    assert 'value="99"' in field
    assert "learning rate = 0.0 is out of range (0, 1]" in r.text and 'value="8"' in r.text
    assert "<script>alert(1)</script>" not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    assert client.get("/api/jobs").json() == []


def test_form_creates_a_job_that_the_cli_can_run_by_hand(idle):
    client, console, home, train, tiny = idle
    r = client.post(
        "/jobs/new",
        data=form(
            console,
            model=tiny,
            train=train["path"],
            epochs="2",
            method="lora",
            lora_rank="32",
            preset="few-shot",
            name="lora run",
            notify_webhook="http://127.0.0.1:9/hook",
        ),
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/jobs/1"
    job = client.get("/api/jobs/1").json()
    assert job["status"] == "queued" and job["notify"] == {"webhook": "http://127.0.0.1:9/hook"}
    cfg = cfglib.load(FinetuneConfig, f"{job['folder']}/job.yaml")
    assert (cfg.method, cfg.lora_rank, cfg.epochs, cfg.out) == ("lora", 32, 2, job["folder"])
    assert cfg.early_stopping_patience == 5  # as on the command line: the preset fills what was not given
    assert cfg.train == str(home.resolve() / train["path"]) and job["command_line"].endswith(
        f"finetune --config {job['folder']}/job.yaml"
    )
    clone = client.get("/jobs/new?clone=1").text
    assert 'value="lora run (copy)"' in clone and '<option value="32" selected>' in clone
    assert client.post("/jobs/1/cancel", data={"csrf": console.csrf}, follow_redirects=False).status_code == 303
    assert client.get("/api/jobs/1").json()["status"] == "cancelled"  # a queued job is cancelled at once
    assert client.post("/jobs/1/retry", data={"csrf": console.csrf}, follow_redirects=False).status_code == 303
    retried = client.get("/api/jobs/1").json()
    assert retried["status"] == "queued" and retried["command_line"].endswith("job.yaml --overwrite")


def test_dev_file_keeps_its_first_rows(idle, tmp_path):
    client, console, home, train, tiny = idle
    r = client.post(
        "/jobs/new", data=form(console, model=tiny, train=train["path"], valid_mode="dev", valid_max_rows="5")
    )
    assert r.status_code == 422 and "choose a dev file" in r.text
    r = client.post(
        "/jobs/new",
        data=form(console, model=tiny, train=train["path"], valid_mode="dev", dev=train["path"], valid_max_rows="5"),
        follow_redirects=False,
    )
    job = client.get("/api/jobs/1").json()
    dev = home.resolve() / "jobs" / f"0001-finetune-{Path(tiny).name}" / "dev.jsonl"
    assert r.status_code == 303 and job["config"]["dev"] == str(dev)
    source = (home / train["path"]).read_text(encoding="utf-8").splitlines()
    assert dev.read_text(encoding="utf-8").splitlines() == source[:5]


def test_each_job_type_has_its_form(idle):
    client, _, _, _, _ = idle
    pretrain = client.get("/jobs/new?command=pretrain").text
    assert 'id="f-max_steps"' in pretrain and "small-corpus" in pretrain and 'id="f-corpus"' in pretrain
    assert 'id="f-resume"' not in pretrain and 'id="f-out"' not in pretrain  # set by the console
    prepare = client.get("/jobs/new?command=prepare").text
    assert '<select name="input" id="f-input" multiple' in prepare
    schema = client.get("/api/schema/pretrain").json()
    fields = {f["name"]: f for s in schema["sections"] for f in s["fields"]}
    assert fields["learning_rate"]["range"] == "(0, 1]" and schema["presets"]["large-corpus"]["max_steps"] == 20000


def test_prepare_writes_its_corpus_in_a_folder_of_its_own(idle, tmp_path):
    client, console, home, _, tiny = idle
    (tmp_path / "docs.txt").write_text("第一句。第二句。\n\n第三句。第四句。\n", encoding="utf-8")
    docs = client.post(
        "/api/datasets",
        headers={"X-CSRF-Token": console.csrf},
        files={"file": ("docs.txt", open(tmp_path / "docs.txt", "rb"))},
    ).json()
    assert docs["kind"] == "documents"
    r = client.post(
        "/jobs/new",
        data={"csrf": console.csrf, "command": "prepare", "input": docs["path"], "tokenizer": tiny, "segment": "true"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    config = client.get("/api/jobs/1").json()["config"]
    assert config["input"] == [str(home.resolve() / docs["path"])] and config["segment"] is True
    assert config["out"] == str(home.resolve() / "jobs" / "0001-prepare" / "corpus")


def test_api_docs_page_lists_the_routes_without_a_cdn(idle):
    client = idle[0]
    docs = client.get("/docs").text
    assert "<code>/api/jobs/{job_id}/cancel</code>" in docs and "JobCreate" in docs
    assert "://" not in "".join(re.findall(r'(?:src|href)="([^"]*)"', docs))  # nothing loaded from elsewhere


def test_pretraining_snapshots_carry_lineage_into_fine_tuning(idle, corpus_dir):
    client, console, home, train, tiny = idle
    shutil.copytree(corpus_dir, home / "corpora" / "reviews")
    corpus = client.post(
        "/api/datasets/register", headers={"X-CSRF-Token": console.csrf}, json={"path": "corpora/reviews"}
    ).json()
    assert corpus["kind"] == "corpus"
    r = client.post(
        "/api/jobs",
        headers={"X-CSRF-Token": console.csrf},
        json={
            "command": "pretrain",
            "config": {"model": tiny, "corpus": corpus["path"], "min_lr": 0.5, "learning_rate": 0.1, "max_seq_len": 64},
        },
    )
    assert r.status_code == 422 and list(r.json()["errors"]) == ["min_lr"]  # a cross-field check, by field
    r = client.post(
        "/api/jobs",
        headers={"X-CSRF-Token": console.csrf},
        json={
            "command": "pretrain",
            "name": "domain",
            "config": {"model": tiny, "corpus": corpus["path"], "max_steps": 4, "save_steps": 2, "max_seq_len": 64},
        },
    )
    pre = r.json()
    assert cfglib.load(PretrainConfig, f"{pre['folder']}/job.yaml").corpus == str(
        home.resolve() / "corpora" / "reviews"
    )
    # the run folder as `domainlm pretrain` leaves it: snapshots, final, log and results
    folder = home / "jobs" / "0001-domain"
    for name in ("step-000002", "step-000004", "final"):
        shutil.copytree(tiny, folder / name)
    (folder / "log.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 2, "split": "valid", "loss": 6.1, "mlm_acc": 0.1},
                {"step": 4, "split": "valid", "loss": 5.9, "mlm_acc": 0.2},
            ]
        )
    )
    (folder / "results.json").write_text(json.dumps({"step": 4, "valid": {"loss": 5.9, "mlm_acc": 0.2}}))
    console.runner.reconcile()  # nothing running: no change
    with console.sessions() as s:
        job = s.get(Job, pre["id"])
        job.status = "running"
        s.commit()
    console.runner.reconcile()  # its process is gone and results.json is there: succeeded, outputs registered
    models = client.get("/api/models").json()
    assert sorted((m["kind"], m["step"]) for m in models) == [("final", 4), ("snapshot", 2), ("snapshot", 4)]
    snap = next(m for m in models if m["step"] == 2 and m["kind"] == "snapshot")
    assert snap["metrics"] == {"valid loss": 6.1, "valid mlm_acc": 0.1}
    headline = client.get("/api/jobs/1").json()["headline"]
    assert headline == {"name": "mlm_acc (valid)", "value": 0.2, "metric": "mlm_acc", "split": "valid"}
    r = client.post(
        "/api/jobs",
        headers={"X-CSRF-Token": console.csrf},
        json={
            "command": "finetune",
            "name": "clf",
            "config": {"model": f"model:{snap['id']}", "train": train["path"], "max_seq_len": 64},
        },
    )
    ft = r.json()
    ft_folder = home / ft["folder"].split(str(home.resolve()) + "/")[1]
    shutil.copytree(tiny, ft_folder / "model")
    (ft_folder / "metrics.json").write_text(json.dumps({"best_step": 3, "dev": {"accuracy": 0.75, "n": 8}}))
    with console.sessions() as s:
        job = s.get(Job, ft["id"])
        job.status = "running"
        s.commit()
    console.runner.reconcile()
    clf = next(m for m in client.get("/api/models").json() if m["kind"] == "classifier")
    assert [(n["type"], n.get("id")) for n in clf["lineage"]] == [
        ("base", None),
        ("job", pre["id"]),
        ("model", snap["id"]),
        ("job", ft["id"]),
        ("model", clf["id"]),
    ]
    assert clf["lineage"][0]["name"] == tiny and clf["metrics"] == {"dev accuracy": 0.75}
    page = client.get("/models").text
    assert page.count('class="node job"') == 5  # 3 pretraining models x 1 job + classifier x 2 jobs
    table = client.get(f"/api/models/compare?ids={snap['id']}&ids={clf['id']}").json()
    assert table["header"][:4] == ["model", "kind", "job", "step"] and "valid mlm_acc" in table["metrics"]
    assert client.get(f"/api/jobs/{ft['id']}").json()["status"] == "succeeded"


def test_a_linear_model_is_listed_and_deleting_it_keeps_its_job_folder(idle):
    client, console, home, train, _ = idle
    r = client.post(
        "/api/jobs",
        headers={"X-CSRF-Token": console.csrf},
        json={"command": "finetune", "name": "floor", "config": {"method": "linear", "train": train["path"]}},
    )
    assert r.status_code == 201, r.text  # no --model needed for the linear method
    folder = home / "jobs" / "0001-floor"
    (folder / "linear.json").write_text("{}")
    (folder / "linear.npz").write_bytes(b"x" * 10)
    (folder / "metrics.json").write_text(json.dumps({"dev": {"accuracy": 0.5, "n": 6}}))
    with console.sessions() as s:
        s.get(Job, 1).status = "running"
        s.commit()
    console.runner.reconcile()
    (model,) = client.get("/api/models").json()
    assert (model["kind"], model["size_bytes"], model["metrics"]) == ("linear", 12, {"dev accuracy": 0.5})
    assert model["can_try"] and model["path"] == str(folder.resolve())
    assert (
        client.delete(f"/api/models/{model['id']}?confirm=true", headers={"X-CSRF-Token": console.csrf}).status_code
        == 200
    )
    assert (
        not (folder / "linear.json").exists()
        and (folder / "job.yaml").is_file()
        and (folder / "metrics.json").is_file()
    )
