"""The console's checks at job creation, bringing own models and corpora in, sweep and compare (without a
browser; the runner is started only where a job must run). Shipping a model: test_console_ship.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from domainlm.console.app import Console  # noqa: E402
from domainlm.console.settings import ConsoleConfig  # noqa: E402
from domainlm.console.web import create_app  # noqa: E402
from tests.console_support import write_labelled  # noqa: E402

TOKEN = "t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def idle(tmp_path, tiny_model, corpus_dir):
    """A console whose runner is not started, with a labelled file and a corpus store registered."""
    home = tmp_path / "home"
    console = Console(ConsoleConfig(home=str(home), token=TOKEN, base_models=[tiny_model]))
    client = TestClient(create_app(console))
    client.get(f"/?token={TOKEN}")
    train = client.post(
        "/api/datasets",
        headers={"X-CSRF-Token": console.csrf},
        files={"file": ("train.jsonl", open(write_labelled(tmp_path / "train.jsonl"), "rb"))},
    ).json()
    shutil.copytree(corpus_dir, home / "store")
    corpus = client.post("/api/datasets/register", headers=AUTH, json={"path": "store"}).json()
    yield client, console, home, train, corpus, tiny_model
    console.stop()


def _field_error(html: str, name: str) -> str | None:
    m = re.search(rf'id="field-{name}">.*?<div class="error" role="alert">(.*?)</div>', html, re.S)
    return m and m.group(1)


def test_every_start_up_check_is_a_field_error_at_creation_all_at_once(idle):
    client, console, home, train, corpus, tiny = idle
    r = client.post(
        "/jobs/new",
        data={
            "csrf": console.csrf,
            "command": "pretrain",
            "model": tiny,
            "corpus": corpus["path"],
            "max_seq_len": "512",
            "max_steps": "0",
            "batch_size": "4",
            "global_batch_size": "6",
        },
    )
    assert r.status_code == 422
    # the model has 64 positions; named as the form names the field, together with the range error
    assert _field_error(r.text, "max_seq_len") == (
        f"max seq len 512 exceeds what the model {tiny.rstrip('/').split('/')[-1]} can take (64 positions); "
        "use max seq len 64 or less"
    )
    assert _field_error(r.text, "max_steps") == "max steps = 0 is out of range [1, inf]"
    assert _field_error(r.text, "global_batch_size") == "global batch size 6 is not a multiple of batch size 4"
    assert client.get("/api/jobs", headers=AUTH).json() == []

    # a corpus from another vocabulary
    other = home / "other-store"
    shutil.copytree(home / "store", other)
    meta = (other / "meta.json").read_text().replace('"vocab_hash": "', '"vocab_hash": "x')
    (other / "meta.json").write_text(meta)
    client.post("/api/datasets/register", headers=AUTH, json={"path": "other-store"})
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={"command": "pretrain", "config": {"model": tiny, "corpus": "other-store", "max_seq_len": 64}},
    )
    assert r.status_code == 422 and list(r.json()["errors"]) == ["corpus"]
    assert "was tokenized with a different vocabulary" in r.json()["errors"]["corpus"]

    # fine-tuning: positions, the test file's labels against the training labels, the metric
    test = home / "datasets" / "test.jsonl"
    test.write_text('{"text": "好", "label": "neutral"}\n', encoding="utf-8")
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "config": {
                "model": tiny,
                "train": train["path"],
                "test": "datasets/test.jsonl",
                "max_seq_len": 100,
                "metric": "nonsense",
            },
        },
    )
    errors = r.json()["errors"]
    assert set(errors) == {"max_seq_len", "test", "metric"}
    assert errors["test"] == "datasets/test.jsonl:1: label(s) ['neutral'] never seen in training (known: neg, pos)"
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={"command": "pretrain", "config": {"model": tiny, "corpus": corpus["path"], "max_seq_len": 64}},
    )
    assert r.status_code == 201


def test_a_configuration_error_offers_clone_and_fix_not_resume(idle):
    client, console, home, train, corpus, tiny = idle
    job = client.post(
        "/api/jobs",
        headers=AUTH,
        json={"command": "pretrain", "config": {"model": tiny, "corpus": corpus["path"], "max_seq_len": 64}},
    ).json()
    from domainlm.console.db import Job

    with console.sessions() as s:
        j = s.get(Job, job["id"])
        j.status, j.exit_code, j.error = "failed", 2, "--split 1,1: bad"
        s.commit()
    detail = client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()
    assert not detail["resumable"] and detail["config_error"]
    assert client.post(f"/api/jobs/{job['id']}/retry", headers=AUTH).status_code == 409
    page = client.get(f"/jobs/{job['id']}").text
    assert 'id="retry"' not in page and "Clone and fix" in page
    with console.sessions() as s:  # killed: no checkpoint yet, so it starts over ("Retry"); with one it resumes
        s.get(Job, job["id"]).exit_code = -9
        s.commit()
    assert client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()["restart_label"] == "Retry"
    (home / detail["folder"] / "checkpoints" / "step-000010").mkdir(parents=True)
    assert client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()["restart_label"] == "Resume"
    assert '<button class="button primary" id="retry">Resume</button>' in client.get(f"/jobs/{job['id']}").text


def test_own_models_and_corpora_come_in_from_the_pages(tmp_path, tiny_model, corpus_dir):
    import io
    import tarfile
    from pathlib import Path

    roots = tmp_path / "shared"
    shutil.copytree(tiny_model, roots / "my-bert")
    shutil.copytree(Path(__file__).parent / "fixtures" / "paddle_ernie" / "current", roots / "paddle-ernie")
    (roots / "vocab-only").mkdir()
    shutil.copy(
        Path(__file__).parent / "fixtures" / "paddle_ernie" / "current" / "vocab.txt",
        roots / "vocab-only" / "vocab.txt",
    )
    shutil.copytree(corpus_dir, roots / "store")
    (roots / "empty").mkdir()
    home = tmp_path / "home"
    console = Console(ConsoleConfig(home=str(home), token=TOKEN, base_models=[], import_roots=[str(roots)]))
    client = TestClient(create_app(console))
    client.get(f"/?token={TOKEN}")
    try:
        page = client.get("/models").text
        assert 'id="register-model"' in page and str(roots) in page
        r = client.post(
            "/models/register",
            data={"csrf": console.csrf, "path": str(roots / "my-bert"), "name": "my bert"},
            follow_redirects=False,
        )
        assert r.status_code == 303
        bert = client.get(r.headers["location"].replace("/models", "/api/models")).json()
        assert bert["kind"] == "base" and bert["name"] == "my bert" and (Path(bert["path"]) / "config.json").is_file()
        assert (roots / "my-bert" / "config.json").is_file()  # copied, the user's folder only read
        paddle = client.post("/api/models/register", headers=AUTH, json={"path": str(roots / "paddle-ernie")}).json()
        assert paddle["kind"] == "base" and (Path(paddle["path"]) / "conversion.json").is_file()  # converted
        vocab = client.post("/api/models/register", headers=AUTH, json={"path": str(roots / "vocab-only")}).json()
        assert vocab["kind"] == "tokenizer"
        r = client.post("/models/register", data={"csrf": console.csrf, "path": str(roots / "empty")})
        assert r.status_code == 422 and "empty holds no model" in r.text
        r = client.post("/api/models/register", headers=AUTH, json={"path": "/etc"})
        assert "outside the folders the console may read" in r.json()["errors"]["path"]

        # an archive of a model folder
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            t.add(tiny_model, arcname="packed-bert")
        r = client.post(
            "/models/upload",
            data={"csrf": console.csrf},
            files={"file": ("packed-bert.tar.gz", buf.getvalue())},
            follow_redirects=False,
        )
        assert r.status_code == 303
        packed = client.get(r.headers["location"].replace("/models", "/api/models")).json()
        assert packed["name"] == "packed-bert" and packed["kind"] == "base"
        assert not list((home / "models").glob(".unpack-*")) and not list((home / "models").glob(".upload-*"))

        # the create forms: base models to start from, vocabularies for prepare only
        pretrain_form = client.get("/jobs/new?command=pretrain").text
        assert f'value="model:{bert["id"]}"' in pretrain_form and f'value="model:{vocab["id"]}"' not in pretrain_form
        assert f'value="model:{vocab["id"]}"' in client.get("/jobs/new?command=prepare").text

        # a corpus store on the server, registered from the datasets page
        r = client.post(
            "/datasets/register",
            data={"csrf": console.csrf, "path": str(roots / "store"), "name": "legal"},
            follow_redirects=False,
        )
        assert r.status_code == 303
        corpus = client.get(r.headers["location"].replace("/datasets", "/api/datasets")).json()
        assert (
            corpus["kind"] == "corpus" and corpus["name"] == "legal" and (home / corpus["path"] / "meta.json").is_file()
        )
        r = client.post(
            "/api/jobs",
            headers=AUTH,
            json={
                "command": "pretrain",
                "config": {"model": f"model:{bert['id']}", "corpus": corpus["path"], "max_seq_len": 64},
            },
        )
        assert r.status_code == 201 and r.json()["base_model_id"] == bert["id"]

        # the user's name for a model, not its folder: in errors, on the job page and in the list
        named = client.post(
            "/api/models/register", headers=AUTH, json={"path": str(roots / "my-bert"), "name": "demo-base (folder)"}
        ).json()
        assert named["path"].endswith("/models/demo-base_folder_")  # the folder keeps safe characters only
        r = client.post(
            "/jobs/new",
            data={
                "csrf": console.csrf,
                "command": "pretrain",
                "model": f"model:{named['id']}",
                "corpus": corpus["path"],
                "max_seq_len": "512",
            },
        )
        assert _field_error(r.text, "max_seq_len") == (
            "max seq len 512 exceeds what the model demo-base (folder) "
            "can take (64 positions); use max seq len 64 or less"
        )
        # "Pretrain further" starts from what the model takes (64 positions), not the form's 512
        form = client.get(f"/jobs/new?command=pretrain&base={named['id']}").text
        assert re.search(r'id="f-max_seq_len"[^>]*value="64"', form)
        job = client.post(
            "/api/jobs",
            headers=AUTH,
            json={
                "command": "pretrain",
                "config": {"model": f"model:{named['id']}", "corpus": corpus["path"], "max_seq_len": 64},
            },
        ).json()
        assert job["model"] == "demo-base (folder)"
        job_page = client.get(f"/jobs/{job['id']}").text
        assert f'<a href="/models/{named["id"]}" id="job-model">demo-base (folder)</a>' in job_page
        assert '<div class="sub">demo-base (folder)</div>' in client.get("/jobs").text
        assert "demo-base_folder_" not in client.get("/jobs").text
    finally:
        console.stop()


def _fake_pretrain_job(client, console, home, tiny, corpus):
    """A pretraining job whose run folder holds two step-N snapshots (as `domainlm pretrain --save-steps` leaves it)."""
    from domainlm.console.db import Job

    pre = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "pretrain",
            "name": "domain pt",
            "config": {"model": tiny, "corpus": corpus["path"], "max_seq_len": 64, "max_steps": 4, "save_steps": 2},
        },
    ).json()
    folder = home / "jobs" / f"{pre['id']:04d}-domain-pt"
    for name in ("step-000002", "step-000004", "final"):
        shutil.copytree(tiny, folder / name)
    (folder / "results.json").write_text('{"step": 4}')
    with console.sessions() as s:
        s.get(Job, pre["id"]).status = "running"
        s.commit()
    console.runner.reconcile()
    return pre


def test_sweep_job_is_checked_at_creation_runs_as_the_cli_and_shows_table_tests_and_plot(idle):
    from domainlm import config as cfglib
    from domainlm.sweep.command import SweepConfig, sweep

    client, console, home, train, corpus, tiny = idle
    pre = _fake_pretrain_job(client, console, home, tiny, corpus)
    page = client.get("/jobs/new?command=sweep").text
    assert f'<option value="{pre["id"]}" >job {pre["id"]}: domain pt (2 snapshots)</option>' in page
    base = {
        "csrf": console.csrf,
        "command": "sweep",
        "pretrain_jobs": str(pre["id"]),
        "train": train["path"],
        "test": train["path"],
        "epochs": "1",
        "batch_size": "8",
        "precision": "fp32",
        "logging_freq": "1",
        "floor": "true",
    }
    r = client.post("/jobs/new", data={**base, "max_seq_len": "128", "seeds": "1,1", "metrics": "accuracy,bogus"})
    assert r.status_code == 422
    assert "max seq len 128 exceeds what the model" in _field_error(r.text, "max_seq_len")
    assert _field_error(r.text, "seeds") == "seeds: [1, 1] repeats a seed"
    assert _field_error(r.text, "metrics").startswith("metrics: [&#39;bogus&#39;] not computed for a multiclass task")
    r = client.post(
        "/jobs/new",
        data={**base, "max_seq_len": "32", "seeds": "1,2", "name": "which checkpoint"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    job = client.get(r.headers["location"].replace("/jobs", "/api/jobs"), headers=AUTH).json()
    assert job["progress"]["total"] == 6 and job["command_line"].endswith(f"sweep {job['folder']}/job.yaml")
    cfg = cfglib.load(SweepConfig, f"{job['folder']}/job.yaml")
    assert [m.name for m in cfg.models] == ["domain-pt"] and cfg.models[0].base == tiny
    sweep(cfg)  # what the job's process runs
    from domainlm.console.db import Job

    with console.sessions() as s:
        s.get(Job, job["id"]).status = "running"
        s.commit()
    console.runner.reconcile()
    done = client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()
    assert (
        done["status"] == "succeeded"
        and done["progress"]["steps"] == 6
        and done["headline"]["name"].startswith("accuracy best")
    )
    assert len(done["models"]) == 6 and done["models"][0]["name"] == "which checkpoint domain-pt base seed-1"
    page = client.get(f"/jobs/{job['id']}").text
    results = (home / job["folder"].split(str(home.resolve()) + "/")[1] / "results.json").read_text()
    import json

    assert json.loads(results)["conclusion"].replace("'", "&#39;") in page
    assert page.count("<tr") >= 4 and "p (Holm)" in page and f'src="/jobs/{job["id"]}/files/metric_vs_step.png"' in page
    png = client.get(f"/jobs/{job['id']}/files/metric_vs_step.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert client.get(f"/jobs/{job['id']}/files/job.yaml").status_code == 404

    # a cell's lineage goes through the snapshot it was fine-tuned from and the pretraining job, to the base
    cell = next(m for m in done["models"] if m["name"] == "which checkpoint domain-pt step-000004 seed-1")
    assert [(n["type"], n["name"]) for n in cell["lineage"]] == [
        ("base", tiny),
        ("job", "domain pt"),
        ("model", "domain pt step-000004"),
        ("job", "which checkpoint"),
        ("model", "which checkpoint domain-pt step-000004 seed-1"),
    ]
    # the headline shows the floor fitted beside; My models groups the cells under their job and filters them
    floor_value = json.loads(results)["floor"]["test"]["accuracy"]
    assert done["headline"]["floor"] == round(floor_value, 4)
    assert f"· floor {round(floor_value, 4)}</span>" in client.get("/jobs").text
    page = client.get("/models?kind=classifier&q=step-000004").text
    assert page.count("<tr data-model=") == 2 and f'<tbody class="group" data-group="{job["id"]}">' in page
    assert "2 of 9 models" in page
    assert f'<div class="floor-note" data-field="floor">floor test accuracy {floor_value:.4f}</div>' in page

    # compare two checkpoints' classifiers: settings, curves, the floor beside, the paired test over both seeds
    models = {m["name"]: m for m in done["models"]}
    a, b = models["which checkpoint domain-pt step-000004 seed-1"], models["which checkpoint domain-pt base seed-2"]
    table = client.get(f"/api/models/compare?ids={a['id']}&ids={b['id']}", headers=AUTH).json()
    assert [c["method"] for c in table["settings"]] == ["full", "full"] and [c["seed"] for c in table["settings"]] == [
        "1",
        "2",
    ]
    assert table["settings"][0]["base"] == "domain pt step-000004" and table["settings"][0]["epochs"] == 1  # its name
    assert table["settings"][0]["data"] == train["path"].split("/")[-1]
    assert all(c["metric"] and c["loss"] for c in table["curves"])  # one validation point per epoch, a loss per step
    assert table["floors"][0]["method"] and table["floors"][0] == table["floors"][1]  # the sweep's one floor
    test = table["test"]
    assert test["seeds"] == [2, 2] and test["rows"] == 32 and 0 <= test["p_value"] <= 1
    assert "Paired test, " in table["markdown"] and "| method |" in table["markdown"].replace(
        " | LoRA rank", " | method | LoRA rank"
    )
    page = client.get(f"/models/compare?ids={a['id']}&ids={b['id']}").text
    assert 'id="paired-test"' in page and 'id="floor-row"' in page and 'data-curves="' in page
    assert '<div class="sub" data-field="method">full</div>' in client.get("/models").text
    assert '<div class="sub" data-field="method">full</div>' in client.get("/jobs").text

    # three models: each against the first, Holm-adjusted; the floor competes for the green "best" of the first metric
    c = models["which checkpoint domain-pt step-000002 seed-1"]
    table = client.get(f"/api/models/compare?ids={a['id']}&ids={b['id']}&ids={c['id']}", headers=AUTH).json()
    assert [(t["a"], t["b"]) for t in table["tests"]] == [(a["name"], b["name"]), (a["name"], c["name"])]
    assert all(t["p_holm"] >= t["p_value"] for t in table["tests"]) and table["test"] is None
    assert table["floor_values"] == [floor_value] * 3 and table["floor_metric"] == "test accuracy"
    first = table["metrics"][0]
    assert table["best"][first] == max([m["metrics"][first] for m in table["models"]] + [floor_value])
    page = client.get(f"/models/compare?ids={a['id']}&ids={b['id']}&ids={c['id']}").text
    floor_row = re.search(r'<tr id="floor-row">.*?</tr>', page, re.S).group(0)
    assert floor_row.count('class="num best"') == (3 if floor_value == table["best"][first] else 0)
    assert page.count('class="paired"') == 2 and "each model against the first, Holm-adjusted" in page


def test_the_smaller_things_a_user_noticed(idle):
    client, console, home, train, corpus, tiny = idle
    job = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "name": "alpha",
            "config": {"model": tiny, "train": train["path"], "max_seq_len": 64},
        },
    ).json()
    # the command that reruns it, as typed
    assert job["command_line"] == f"domainlm finetune --config {job['folder']}/job.yaml"
    # an e-mail address without an SMTP server is refused at creation, not silently never sent
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "config": {"model": tiny, "train": train["path"], "max_seq_len": 64},
            "notify": {"email": "team@example.org"},
        },
    )
    assert r.json()["errors"] == {
        "notify_email": "e-mail notifications are off: start the console with --smtp-host (or use a webhook)"
    }
    assert "off: the console was started without --smtp-host" in client.get("/jobs/new").text
    # the log panel: the last lines, without progress bars and warnings, and a link to the whole log
    folder = Path(job["folder"])
    lines = [f"[train] step {i} loss=0.{i}" for i in range(1, 301)]
    (folder / "job.log").write_text(
        "\n".join(
            lines[:150]
            + ["Map: 100%|██████████| 32/32 [00:00<00:00]", "/x/y.py:12: UserWarning: something", "  warnings.warn("]
            + lines[150:]
        )
    )
    tail = client.get(f"/api/jobs/{job['id']}/log").text.splitlines()
    assert tail == lines[-200:]
    assert client.get(f"/jobs/{job['id']}/files/job.log").text.count("\n") == 302
    # missing pages are pages; the API still answers JSON
    r = client.get("/models/999", headers={"Accept": "text/html"})
    assert r.status_code == 404 and 'id="error-page"' in r.text and "model 999 does not exist" in r.text
    assert client.get("/api/models/999", headers=AUTH).json() == {"detail": "model 999 does not exist"}
    # the form shows the console's own default (100), which is what the job gets
    assert re.search(r'id="f-valid_max_rows"[^>]*value="100"', client.get("/jobs/new").text)
    # a prepare job with no input marks the field
    r = client.post("/jobs/new", data={"csrf": console.csrf, "command": "prepare", "tokenizer": tiny})
    assert r.status_code == 422 and _field_error(r.text, "input")
    # the job list: filter by status, search
    client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "pretrain",
            "name": "beta",
            "config": {"model": tiny, "corpus": corpus["path"], "max_seq_len": 64},
        },
    )
    client.post(f"/api/jobs/{job['id']}/cancel", headers=AUTH)
    assert [j["name"] for j in client.get("/api/jobs?status=cancelled", headers=AUTH).json()] == ["alpha"]
    assert [j["name"] for j in client.get("/api/jobs?q=pretrain", headers=AUTH).json()] == ["beta"]
    page = client.get("/jobs?q=bet").text
    assert 'data-job="2"' in page and 'data-job="1"' not in page and 'value="bet"' in page
    # a corpus shows its documents and stats as a table; a file its first rows; both can be deleted
    page = client.get(f"/datasets/{corpus['id']}").text
    assert 'id="corpus-stats"' in page and '<span class="sub">documents</span>80' in page
    page = client.get(f"/datasets/{train['id']}").text
    assert page.count('<td class="sub num">') == 10 and "&#34;label&#34;" in page
    r = client.post(f"/datasets/{corpus['id']}/delete", data={"csrf": console.csrf, "confirm": "true"})
    assert r.status_code == 409 and "job(s) 2 still use" in r.text  # the queued pretraining reads it
    client.post("/api/jobs/2/cancel", headers=AUTH)
    assert (
        client.post(f"/datasets/{corpus['id']}/delete", data={"csrf": console.csrf}).status_code == 422
    )  # unconfirmed
    r = client.post(
        f"/datasets/{corpus['id']}/delete", data={"csrf": console.csrf, "confirm": "true"}, follow_redirects=False
    )
    assert r.status_code == 303 and not (home / "store").exists()
    # a listed hub name that is not on this machine says so; a local folder does not
    console.cfg.base_models = [tiny, "nobody/not-downloaded-zh"]
    form = client.get("/jobs/new").text
    assert "nobody/not-downloaded-zh (not on this machine: needs the hub)</option>" in form
    assert f"{tiny}</option>" in form and 'href="/models#add-model"' in form


def test_cross_field_checks_are_reported_together(idle):
    client, console, home, train, corpus, tiny = idle
    r = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "config": {
                "model": tiny,
                "train": train["path"],
                "max_seq_len": 64,
                "metric": "bogus",
                "method": "lora",
                "lora_rank": 12,
                "folds": 1,
            },
        },
    )
    errors = r.json()["errors"]
    assert set(errors) == {"metric", "lora_rank", "folds"}  # three checks of FinetuneConfig.check, one answer
    assert errors["lora_rank"] == "--lora-rank 12 is not allowed: choose 8, 16, 32 or 64"
