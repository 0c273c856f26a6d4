"""The console's JSON API in process (TestClient), running real `domainlm finetune` subprocesses on the tiny model."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from email import message_from_bytes, policy
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from domainlm import config as cfglib  # noqa: E402
from domainlm.classify.config import FinetuneConfig  # noqa: E402
from domainlm.console.app import Console
from domainlm.console.db import Model  # noqa: E402
from domainlm.console.settings import ConsoleConfig, field_specs  # noqa: E402
from domainlm.console.web import create_app  # noqa: E402
from tests.console_support import FAST_FINETUNE, SmtpSink, WebhookReceiver, wait_for, write_labelled  # noqa: E402

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def receivers():
    hook, smtp = WebhookReceiver(fail_first=1), SmtpSink()
    yield hook, smtp
    hook.close()
    smtp.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, receivers):
    home = tmp_path_factory.mktemp("console-home")
    cfg = ConsoleConfig(
        home=str(home),
        token=TOKEN,
        base_models=[tiny_model],
        webhook_secret="s3cret",
        max_upload_mb=0.02,
        cancel_grace=2,
        smtp_host="127.0.0.1",
        smtp_port=receivers[1].port,
    )
    console = Console(cfg, url="http://testserver", notify_backoff=0.2)
    with TestClient(create_app(console)) as client:
        yield client, console, home, tiny_model


def upload(client, path, name=None):
    with open(path, "rb") as f:
        return client.post("/api/datasets", headers=AUTH, files={"file": (name or Path(path).name, f)})


def test_check_values_reports_every_bad_field_at_once():
    cfg, errors = cfglib.check_values(
        FinetuneConfig,
        {"train": "t.jsonl", "out": "o", "model": "m", "epochs": 99, "learning_rate": "fast", "valid_ratio": 0.9},
    )
    assert cfg is None
    assert errors == {
        "epochs": "--epochs = 99 is out of range [1, 50]",
        "learning_rate": "--learning-rate: expected float, got 'fast'",
        "valid_ratio": "--valid-ratio = 0.9 is out of range [0.01, 0.5]",
    }
    _, errors = cfglib.check_values(
        FinetuneConfig, {"train": "t", "out": "o", "model": "m", "method": "lora", "lora_rank": 12}
    )
    assert list(errors) == ["lora_rank"] and "8, 16, 32 or 64" in errors["lora_rank"]


def test_form_fields_come_from_the_config_dataclass():
    specs = field_specs("finetune")
    assert specs["epochs"].range == "[1, 50]" and specs["epochs"].default == 3
    assert specs["epochs"].help == FinetuneConfig.__dataclass_fields__["epochs"].metadata["help"]
    assert specs["lora_rank"].choices == [8, 16, 32, 64]
    assert specs["method"].choices == ["full", "lora", "linear"] and specs["train"].widget == "dataset"
    assert "out" not in specs and specs["learning_rate"].range == "(0, 1]"
    # the console keeps at most 100 validation rows (the CLI's own default keeps a fifth of train, uncapped)
    assert specs["valid_max_rows"].default == 100 and FinetuneConfig.__dataclass_fields__["valid_max_rows"].default == 0


def test_every_call_needs_the_token(env):
    client, console, _, _ = env
    assert client.get("/api/jobs").status_code == 401
    assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    page = client.get("/jobs")
    assert page.status_code == 401 and "access token" in page.text
    assert client.get("/docs").status_code == 401 and client.get("/openapi.json").status_code == 401
    assert client.get("/static/console.js").status_code == 401
    browser = TestClient(client.app)
    first = browser.get(f"/jobs?token={TOKEN}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/jobs"  # the token leaves the address bar
    assert (
        "httponly" in first.headers["set-cookie"].lower() and "samesite=strict" in first.headers["set-cookie"].lower()
    )
    assert browser.get("/jobs").status_code == 200 and browser.get("/openapi.json").status_code == 200
    # a state-changing call on the cookie alone needs the CSRF token
    assert browser.post("/api/jobs/999/cancel").status_code == 403
    assert browser.post("/api/jobs/999/cancel", headers={"X-CSRF-Token": console.csrf}).status_code == 404
    assert browser.post("/jobs/new", data={"command": "finetune"}).status_code == 403  # form without its field
    evil = browser.post("/api/jobs/999/cancel", headers={"X-CSRF-Token": console.csrf, "Origin": "http://evil.example"})
    assert evil.status_code == 403


def test_bad_options_are_422_with_field_names_and_create_nothing(env):
    client, _, home, tiny = env
    train = upload(client, write_labelled(home.parent / "t422.jsonl")).json()["path"]
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "config": {
                "model": tiny,
                "train": train,
                "epochs": 99,
                "batch_size": 0,
                "method": "lora",
                "lora_rank": 12,
                "warmup_ratio": "lots",
                "bogus": 1,
                "out": "/tmp/x",
            },
        },
    )
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert set(errors) == {"epochs", "batch_size", "warmup_ratio", "bogus", "out"}
    assert errors["epochs"] == "--epochs = 99 is out of range [1, 50]"
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "config": {"model": tiny, "train": train, "method": "lora", "lora_rank": 12, "max_seq_len": 64},
            "notify": {"webhook": "ftp://x", "email": "nope"},
        },
    )
    assert set(r.json()["errors"]) == {"lora_rank", "notify_webhook", "notify_email"}
    assert client.get("/api/jobs", headers=AUTH).json() == []
    assert not (home / "jobs").exists()


def test_paths_outside_home_are_refused(env, tmp_path):
    client, console, home, tiny = env
    outside = Path(write_labelled(tmp_path / "outside.jsonl"))
    (home / "link.jsonl").symlink_to(outside)
    for value in ("../outside.jsonl", str(outside), "link.jsonl", "datasets/../../outside.jsonl"):
        r = client.post(
            "/api/jobs", headers=AUTH, json={"command": "finetune", "config": {"model": tiny, "train": value}}
        )
        assert r.status_code == 422 and "outside the console's home" in r.json()["errors"]["train"], value
        r = client.post("/api/datasets/register", headers=AUTH, json={"path": value})
        assert r.status_code == 403 and "outside" in r.json()["errors"]["path"]  # a folder it may not read
    r = client.post("/api/jobs", headers=AUTH, json={"command": "finetune", "config": {"model": "/etc", "train": "x"}})
    assert "listed base model" in r.json()["errors"]["model"]
    # a record pointing outside home (a tampered database) is never deleted from
    with console.sessions() as s:
        s.add(Model(name="evil", kind="snapshot", path="../" + tmp_path.name))
        s.commit()
        evil = s.query(Model).filter(Model.name == "evil").one().id
    r = client.delete(f"/api/models/{evil}?confirm=true", headers=AUTH)
    assert r.status_code == 409 and outside.is_file()


def test_uploads_are_checked_sanitised_and_size_limited(env, tmp_path):
    client, _, home, _ = env
    r = upload(client, write_labelled(tmp_path / "bad.jsonl", bad_lines=True), name="../../my data (1).jsonl")
    assert r.status_code == 201
    d = r.json()
    assert d["rows"] == 30 and d["distribution"] == {"pos": 16, "neg": 14} and d["kind"] == "labelled"
    assert d["bad_rows"] == [[3, "empty text"], [5, "no label"]]
    assert Path(d["path"]).parent == Path("datasets") and d["path"].endswith("-my_data_1_.jsonl")
    assert (home / d["path"]).is_file()
    before = sorted(p.name for p in (home / "datasets").iterdir())
    big = b'{"text": "x", "label": "a"}\n' * 1000  # 28 KB, over the 20 KB limit
    r = client.post("/api/datasets", headers=AUTH, files={"file": ("big.jsonl", big)})
    assert r.status_code == 413
    chunks = iter([big[i : i + 4096] for i in range(0, len(big), 4096)])  # no Content-Length: counted as it streams
    r = client.post(
        "/api/datasets?filename=big.jsonl", headers={**AUTH, "Content-Type": "application/octet-stream"}, content=chunks
    )
    assert r.status_code == 413
    r = client.post("/api/datasets", headers=AUTH, files={"file": ("model.bin", b"\x00\x01")})
    assert r.status_code == 422 and "unsupported file type" in r.json()["errors"]["file"]
    r = client.post("/api/datasets", headers=AUTH, files={"file": ("x.csv", b"sentence,label\nhello,a\n")})
    assert r.status_code == 422 and "missing column(s) text" in r.json()["errors"]["file"]
    assert sorted(p.name for p in (home / "datasets").iterdir()) == before  # nothing kept from refused uploads


def _signed(secret: bytes, request) -> bool:
    expected = "sha256=" + hmac.new(secret, request["body"], hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, request["headers"]["X-Domainlm-Signature"])


def test_finetune_job_runs_registers_its_model_and_notifies(env, receivers):
    client, console, home, tiny = env
    hook, smtp = receivers
    train = upload(client, write_labelled(home.parent / "train.jsonl")).json()["path"]
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "name": "sentiment <b>v1</b>",
            "config": {"model": tiny, "train": train, **FAST_FINETUNE},
            "notify": {"webhook": hook.url, "email": "team@example.org"},
        },
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert Path(job["folder"], "job.yaml").is_file()
    assert cfglib.load(FinetuneConfig, str(Path(job["folder"], "job.yaml"))).epochs == 1  # the CLI reads it back
    done = wait_for(
        lambda: (
            (j := client.get(f"/api/jobs/{job['id']}", headers=AUTH).json())["status"] not in ("queued", "running")
            and j
        ),
        what="the job to finish",
    )
    assert done["status"] == "succeeded", client.get(f"/api/jobs/{job['id']}/log", headers=AUTH).text
    assert done["progress"]["fraction"] == 1.0 and done["progress"]["steps"] == 4
    assert done["headline"]["name"] == "accuracy (dev)" and 0 <= done["headline"]["value"] <= 1
    curves = client.get(f"/api/jobs/{job['id']}/curves", headers=AUTH).json()
    assert [r["step"] for r in curves["run"]["train"]] == [1, 2, 3, 4] and "accuracy" in curves["run"]["valid"][0]
    assert "[train] step 4" in client.get(f"/api/jobs/{job['id']}/log", headers=AUTH).text

    (model,) = done["models"]
    assert model["kind"] == "classifier" and model["path"] == str(Path(job["folder"]) / "model")
    assert [n["type"] for n in model["lineage"]] == ["base", "job", "model"] and model["lineage"][0]["name"] == tiny
    assert model["size_bytes"] > 0 and "dev accuracy" in model["metrics"]
    preds = client.post(
        f"/api/models/{model['id']}/predict", headers=AUTH, json={"texts": ["酒店很好", "the hotel"]}
    ).json()
    assert [p["text"] for p in preds] == ["酒店很好", "the hotel"]
    for p in preds:
        assert p["labels"][0] in ("neg", "pos") and p["labels"][0] == p["scores"][0]["label"]
        assert abs(sum(s["score"] for s in p["scores"]) - 1) < 1e-3
    table = client.get(f"/api/models/compare?ids={model['id']}", headers=AUTH).json()
    assert "dev accuracy" in table["header"] and table["rows"][0][0] == "sentiment <b>v1</b>"
    page = client.get(f"/models/{model['id']}", headers=AUTH).text
    assert "sentiment &lt;b&gt;v1&lt;/b&gt;" in page and "<b>v1</b>" not in page  # user text is escaped

    # webhook: started and succeeded, each signed; the first delivery got a 500 and was retried
    wait_for(lambda: len({json.loads(r["body"])["event"] for r in hook.requests[1:]}) == 2, 20, what="webhooks")
    events = [json.loads(r["body"]) for r in hook.requests]
    assert events[0]["event"] == events[1]["event"] == "job.started"  # the retry of the refused first delivery
    assert all(_signed(b"s3cret", r) for r in hook.requests)
    assert not _signed(b"other", hook.requests[0])
    ok = [e for e in events if e["event"] == "job.succeeded"][0]
    assert ok["job"]["id"] == job["id"] and ok["metric"] == done["headline"]
    assert ok["job"]["url"] == f"http://testserver/jobs/{job['id']}"
    wait_for(lambda: len(smtp.messages) == 2, 20, what="e-mails")
    mails = {message_from_bytes(m.content, policy=policy.default)["Subject"].strip(): m for m in smtp.messages}
    assert set(mails) == {
        "[domainlm] job 1 'sentiment <b>v1</b>' started",
        f"[domainlm] job 1 'sentiment <b>v1</b>' succeeded: {ok['metric']['name']} = {ok['metric']['value']}",
    }
    assert smtp.messages[0].rcpt_tos == ["team@example.org"]

    # a second job from this model: lineage goes through it; cancel stops its whole process group
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "name": "second",
            "config": {"model": f"model:{model['id']}", "train": train, **FAST_FINETUNE, "epochs": 50},
        },
    )
    second = r.json()
    assert second["base_model_id"] == model["id"] and second["config"]["model"] == model["path"]
    running = wait_for(
        lambda: (j := client.get(f"/api/jobs/{second['id']}", headers=AUTH).json())["status"] == "running" and j,
        what="the second job to start",
    )
    with console.sessions() as s:
        from domainlm.console.db import Job

        pgid = s.get(Job, running["id"]).pid
    assert os.getpgid(pgid) == pgid  # its own process group
    assert client.delete(f"/api/models/{model['id']}?confirm=true", headers=AUTH).status_code == 409  # in use
    assert client.post(f"/api/jobs/{second['id']}/cancel", headers=AUTH).json()["status"] == "running"
    final = wait_for(
        lambda: (j := client.get(f"/api/jobs/{second['id']}", headers=AUTH).json())["status"] == "cancelled" and j,
        30,
        what="the cancel",
    )
    assert final["resumable"] and client.post(f"/api/jobs/{second['id']}/cancel", headers=AUTH).status_code == 409
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)

    # delete needs confirmation, then removes the files and the record
    assert client.delete(f"/api/models/{model['id']}", headers=AUTH).status_code == 422
    r = client.delete(f"/api/models/{model['id']}?confirm=true", headers=AUTH)
    assert r.status_code == 200 and not Path(model["path"]).exists() and Path(job["folder"], "metrics.json").is_file()
    assert client.get(f"/api/models/{model['id']}", headers=AUTH).status_code == 404
