"""What a team sharing the console tripped on: every bad row of an upload by line, the log panel, the progress of a
retried job, a linear model in compare, the cancel question, the required selects, distillation's table."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from domainlm.console.app import Console  # noqa: E402
from domainlm.console.db import Job, Model, now  # noqa: E402
from domainlm.console.settings import ConsoleConfig  # noqa: E402
from domainlm.console.web import create_app  # noqa: E402
from tests.console_support import write_labelled  # noqa: E402


@pytest.fixture
def idle(tmp_path, tiny_model):
    home = tmp_path / "home"
    console = Console(ConsoleConfig(home=str(home), token="t", base_models=[tiny_model]))
    client = TestClient(create_app(console))
    client.get("/?token=t")
    client.headers["X-CSRF-Token"] = console.csrf
    labelled = write_labelled(tmp_path / "t.jsonl")
    train = client.post("/api/datasets", files={"file": ("train.jsonl", open(labelled, "rb"))})
    yield client, console, home, train.json(), tiny_model
    console.stop()


def _job(client, tiny, train, **config):
    r = client.post(
        "/api/jobs",
        json={
            "command": "finetune",
            "name": "j",
            "config": {"model": tiny, "train": train["path"], "max_seq_len": 64, **config},
        },
    )
    assert r.status_code == 201, r.text
    return r.json()


def test_an_upload_names_every_bad_row_by_line_invalid_json_included(idle, tmp_path):
    client, console, home, train, tiny = idle
    rows = Path(write_labelled(tmp_path / "rows.jsonl")).read_text(encoding="utf-8").splitlines()
    rows[1] = '{"text": "未闭合的引号, "label": "pos"}'  # line 2: not JSON
    rows[3] = '["a list", "pos"]'  # line 4: JSON, not an object
    rows[6] = '{"text": "", "label": "neg"}'  # line 7
    rows.append("{truncated")  # the last line
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    r = client.post("/api/datasets", files={"file": ("rows.jsonl", open(tmp_path / "rows.jsonl", "rb"))})
    assert r.status_code == 201, r.text
    assert r.json()["bad_rows"] == [
        [2, "not valid JSON"],
        [4, "expected a JSON object"],
        [7, "empty text"],
        [33, "not valid JSON"],
    ]
    assert r.json()["rows"] == 29
    page = client.get(f"/datasets/{r.json()['id']}", headers={"Accept-Language": "zh-CN"}).text
    assert "不是有效的 JSON" in page and "应为 JSON 对象" in page
    # the CLI still stops at the first one, naming it (without --skip-bad-rows)
    from domainlm.classify.data import Columns, read_examples
    from domainlm.errors import DomainLMError

    with pytest.raises(DomainLMError, match=r"rows.jsonl:2: not valid JSON \("):
        read_examples(str(tmp_path / "rows.jsonl"), Columns("text", None, "label"), False)


def test_the_log_panel_leaves_out_each_warning_with_its_source_line(idle):
    client, console, home, train, tiny = idle
    job = _job(client, tiny, train)
    lines = [f"[train] step {i} loss=0.{i}" for i in range(1, 6)]
    (Path(job["folder"]) / "job.log").write_text(
        "\n".join(
            [
                lines[0],
                "/venv/lib/python3.11/site-packages/domainlm/sweep/summary.py:309: UserWarning: Glyph 27169 missing",
                "  fig.tight_layout()",
                lines[1],
                "/x/y.py:12: FutureWarning: `foo` is deprecated",
                "  warnings.warn(",
                lines[2],
                "Map: 100%|██████████| 32/32 [00:00<00:00]",
                "  indented output of the job itself",
                *lines[3:],
            ]
        )
    )
    tail = client.get(f"/api/jobs/{job['id']}/log").text.splitlines()
    assert tail == [*lines[:3], "  indented output of the job itself", *lines[3:]]


def test_a_retried_job_shows_no_progress_of_the_attempt_before(idle):
    client, console, home, train, tiny = idle
    job = _job(client, tiny, train)
    folder = Path(job["folder"])
    (folder / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "split": "train", "loss": 0.5}) + "\n" for s in range(1, 22))
    )
    old = time.time() - 60
    os.utime(folder / "log.jsonl", (old, old))
    with console.sessions() as s:  # the first attempt failed at step 21; the retry has just started
        j = s.get(Job, job["id"])
        j.status, j.attempts, j.started_at = "running", 2, now() - timedelta(seconds=2)
        s.commit()
    progress = client.get(f"/api/jobs/{job['id']}").json()["progress"]
    assert progress["steps"] == 0 and progress["eta_s"] is None
    (folder / "log.jsonl").write_text(json.dumps({"step": 1, "split": "train", "loss": 0.7}) + "\n")  # the new attempt
    progress = client.get(f"/api/jobs/{job['id']}").json()["progress"]
    assert progress["steps"] == 1 and progress["eta_s"] is not None
    # pretraining resumes from its checkpoint: it keeps its steps, and its ETA counts only this attempt's pace
    with console.sessions() as s:
        j = s.get(Job, job["id"])
        j.command, j.config, j.progress_base = "pretrain", {**j.config, "max_steps": 100}, 20
        s.commit()
    (folder / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "split": "train", "loss": 0.5}) + "\n" for s in range(1, 21))
    )
    os.utime(folder / "log.jsonl", (old, old))
    assert client.get(f"/api/jobs/{job['id']}").json()["progress"] == {
        "steps": 20,
        "total": 100,
        "fraction": 0.2,
        "eta_s": None,
    }
    with open(folder / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 22, "split": "train", "loss": 0.5}) + "\n")
    eta = client.get(f"/api/jobs/{job['id']}").json()["progress"]["eta_s"]
    assert 2 * 78 / 2 <= eta <= 3 * 78 / 2 + 1  # 2 steps in about 2 s: 78 left at that pace (not 22 in 2 s)


def test_the_cancel_question_and_the_restart_speak_of_the_jobs_own_command(idle):
    client, console, home, train, tiny = idle
    job = _job(client, tiny, train)
    page = client.get(f"/jobs/{job['id']}").text
    assert 'data-confirm="Cancel job 1 (j)? Its process is stopped; Retry starts it over."' in page


def test_required_selects_start_empty_and_a_linear_model_has_no_learning_rate(idle, tmp_path):
    client, console, home, train, tiny = idle
    bad = Path(write_labelled(tmp_path / "bad.jsonl", bad_lines=True))
    client.post("/api/datasets", files={"file": ("bad.jsonl", open(bad, "rb"))})  # the newest upload
    for command in ("finetune", "sweep", "distill"):
        form = client.get(f"/jobs/new?command={command}").text
        train_select = re.search(r'<select name="train" id="f-train" >(.*?)</select>', form, re.S).group(1)
        assert train_select.lstrip().startswith('<option value="">(choose a dataset)</option>'), command
        assert "selected" not in train_select and "bad.jsonl · 30 rows · 2 bad rows" in train_select
    r = client.post("/jobs/new", data={"csrf": console.csrf, "command": "finetune", "model": tiny, "train": ""})
    assert r.status_code == 422 and "train: a value is required" in r.text
    # a linear model in compare: its method, seed and data; no learning rate, epochs, batch or length
    run = home / "jobs" / "linear-run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(
        "method: linear\nlearning_rate: 3.0e-05\nepochs: 3\nseeds: [1]\ntrain: x/train.jsonl\n"
    )
    with console.sessions() as s:
        s.add(Model(name="tfidf", kind="linear", path="jobs/linear-run", metrics={"dev accuracy": 0.5}))
        s.commit()
    table = client.get("/api/models/compare?ids=1").json()
    assert table["settings"][0] == {
        "method": "linear",
        "LoRA rank": "",
        "learning rate": "",
        "epochs": "",
        "batch size": "",
        "max seq len": "",
        "seed": "1",
        "base": "",
        "data": "train.jsonl",
    }
    assert (
        '<tr data-setting="learning rate"><td class="what">learning rate</td><td>–</td></tr>'
        in client.get("/models/compare?ids=1").text
    )


def test_a_distillation_job_shows_its_table_not_markdown_in_the_log(idle, tmp_path):
    client, console, home, train, tiny = idle
    job = _job(client, tiny, train)
    folder = Path(job["folder"])
    result = {
        "metric": "accuracy",
        "split": "test",
        "seeds": [1, 2],
        "speedup": 3.25,
        "speed_texts_per_s": {"teacher": 100.0, "student": 325.0},
        "models": {
            "teacher": {"mean": 0.9, "std": 0.0, "per_seed": [0.9, 0.9]},
            "student": {"mean": 0.85, "std": 0.01, "per_seed": [0.84, 0.86]},
            "floor": {"mean": 0.7, "std": 0.0, "per_seed": [0.7]},
        },
        "student_vs_floor": {
            "difference": 0.15,
            "ci95": [0.1, 0.2],
            "p_value": 0.001,
            "p_holm": 0.001,
            "seeds": [2, 1],
            "rows": 40,
        },
    }
    (folder / "distill.json").write_text(json.dumps(result))
    with console.sessions() as s:
        j = s.get(Job, job["id"])
        j.command, j.status = "distill", "succeeded"
        s.commit()
    detail = client.get(f"/api/jobs/{job['id']}").json()
    assert detail["headline"] == {
        "name": "accuracy (test, mean of 2)",
        "value": 0.85,
        "metric": "accuracy",
        "split": "test",
        "runs": 2,
        "floor": 0.7,
    }
    page = client.get(f"/jobs/{job['id']}").text
    rows = re.findall(r"<tr><td>(\w+)</td><td class=\"num( best)?\">([\d.]+) ± ([\d.]+)</td>", page)
    assert rows == [("teacher", " best", "90.0", "0.0"), ("student", "", "85.0", "1.0"), ("floor", "", "70.0", "0.0")]
    assert "Distilled student vs floor: +15.0 points, one-sided p = 0.001" in page and "3.2x as many" in page
    shutil.rmtree(folder)


def test_ids_and_methods_are_answered_as_the_schema_says(idle):
    client, console, home, train, tiny = idle
    big = 2**63
    assert client.get(f"/api/models/{big}").status_code == 422  # beyond SQLite's INTEGER: refused, not a 500
    assert client.get(f"/api/jobs/{big - 1}").json() == {"detail": f"job {big - 1} does not exist"}
    assert client.get(f"/api/models/compare?ids={big * 2}").status_code == 422
    r = client.options("/api/models/5/endpoint")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, POST"  # every method of the path
    r = client.delete("/api/models/compare?ids=1")
    assert r.status_code == 405 and r.headers["allow"] == "GET"  # not "model id 'compare' is not an integer"
    assert client.get("/api/schema/bogus").status_code == 422
    spec = client.get("/openapi.json").json()
    declared = spec["paths"]["/api/models/{model_id}"]["delete"]["responses"]
    assert set(declared) >= {"200", "401", "403", "404", "409", "422"}
    # server paths: not there 404, outside the readable folders 403, a NUL character is no file at all
    assert client.post("/api/models/register", json={"path": "no/such/folder"}).status_code == 404
    assert client.post("/api/models/register", json={"path": "/etc"}).status_code == 403
    assert client.post("/api/datasets/register", json={"path": "a\x00b"}).status_code == 404
    r = client.post(
        "/api/models/upload", content=b"--x\r\n5--x--\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert r.status_code == 422 and "not a well-formed multipart form" in r.json()["errors"]["file"]
    assert client.post("/api/models/1/predict", json={"texts": ["  "]}).status_code == 422  # the schema says no blank
