"""Shipping from the console (without a browser): a fine-tuned model exported to int8 ONNX, downloaded as a zip,
and served from its model page as an endpoint that answers and reports its metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from tests.test_console_flow import AUTH, idle  # noqa: E402, F401 - the console with no job running


def _run_here(console, job_id: int, run) -> None:
    """Run a job's command in this process (what its subprocess would do), then let the runner register it."""
    from domainlm.console.db import Job

    run()
    with console.sessions() as s:
        s.get(Job, job_id).status = "running"
        s.commit()
    console.runner.reconcile()


def test_export_int8_download_and_an_endpoint_from_the_model_page(idle, tmp_path):
    import io
    import json
    import urllib.request
    import zipfile

    from domainlm import config as cfglib
    from domainlm.classify.command import finetune
    from domainlm.classify.config import FinetuneConfig
    from domainlm.serve.config import ExportConfig
    from domainlm.serve.export import export
    from tests.console_support import FAST_FINETUNE, wait_for

    client, console, home, train, corpus, tiny = idle
    ft = client.post(
        "/api/jobs",
        headers=AUTH,
        json={
            "command": "finetune",
            "name": "reviews",
            "config": {"model": tiny, "train": train["path"], **FAST_FINETUNE, "floor": False},
        },
    ).json()
    _run_here(console, ft["id"], lambda: finetune(cfglib.load(FinetuneConfig, f"{ft['folder']}/job.yaml")))
    clf = client.get(f"/api/jobs/{ft['id']}", headers=AUTH).json()["models"][0]
    page = client.get(f"/models/{clf['id']}").text
    assert f'href="/jobs/new?command=export&base={clf["id"]}"' in page and 'id="start-endpoint"' in page
    form = client.get(f"/jobs/new?command=export&base={clf['id']}").text
    assert f'<option value="model:{clf["id"]}" selected>' in form

    r = client.post(
        "/jobs/new",
        data={
            "csrf": console.csrf,
            "command": "export",
            "model": f"model:{clf['id']}",
            "quantize": "int8",
            "data": train["path"],
            "max_seq_len": "32",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303
    job = client.get(r.headers["location"].replace("/jobs", "/api/jobs"), headers=AUTH).json()
    assert job["name"] == "export reviews" and job["command_line"].endswith(f"export --config {job['folder']}/job.yaml")
    _run_here(console, job["id"], lambda: export(cfglib.load(ExportConfig, f"{job['folder']}/job.yaml")))
    done = client.get(f"/api/jobs/{job['id']}", headers=AUTH).json()
    assert done["status"] == "succeeded" and done["headline"]["name"] == "int8 change of accuracy (points)"
    onnx = done["models"][0]
    info = json.loads((Path(onnx["path"]) / "export.json").read_text())
    assert (
        onnx["kind"] == "export"
        and onnx["metrics"]["int8 change accuracy (points)"] == info["data_metrics"]["int8_change_points"]["accuracy"]
    )
    assert onnx["metrics"]["fp32 accuracy"] == info["data_metrics"]["fp32"]["accuracy"]

    # the classifier's page: per label precision / recall and the confusion matrix; its job: the TensorBoard command
    page = client.get(f"/models/{clf['id']}").text
    assert page.count("<tr data-label=") == 2 and 'id="confusion"' in page and page.count('class="num diagonal"') == 2
    per_class = json.loads((Path(clf["path"]).parent / "metrics.json").read_text())["dev"]
    assert f'<td class="num">{per_class["per_class"]["neg"]["support"]}</td></tr>' in page
    assert sum(map(sum, per_class["confusion_matrix"])) == sum(v["support"] for v in per_class["per_class"].values())
    job_page = client.get(f"/jobs/{ft['id']}").text
    assert f"tensorboard --logdir {ft['folder']} --port 6006" in job_page
    # the classifier folder brought in again from the server is a classifier (Try and serve take it), not a base
    again = client.post("/api/models/register", headers=AUTH, json={"path": clf["path"], "name": "again"}).json()
    assert again["kind"] == "classifier" and again["can_try"]
    preds = client.post(f"/api/models/{again['id']}/predict", headers=AUTH, json={"texts": ["酒店很好"]}).json()
    assert preds[0]["labels"][0] in ("neg", "pos")

    # download: the folder as a zip
    r = client.get(f"/api/models/{onnx['id']}/download")
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert (
        r.headers["content-type"] == "application/zip"
        and "export/model.int8.onnx" in names
        and "export/export.json" in names
    )
    assert not list((home / "downloads").glob("*.zip"))  # the temporary zip is removed once sent

    # an endpoint: started from the page, URL and token shown, a prediction, /metrics relayed, stopped
    r = client.post(f"/models/{onnx['id']}/endpoint/start", data={"csrf": console.csrf}, follow_redirects=False)
    assert r.status_code == 303
    try:
        status = wait_for(
            lambda: (
                (st := client.get(f"/api/models/{onnx['id']}/endpoint").json())["state"] in ("ready", "stopped") and st
            ),
            60,
            what="the endpoint",
        )
        assert status["state"] == "ready", status
        page = client.get(f"/models/{onnx['id']}").text
        assert f'<code id="endpoint-url">{status["url"]}</code>' in page and status["token"] in page
        request = urllib.request.Request(
            status["url"] + "/predict",
            data=json.dumps({"text": ["酒店的服务非常好"]}).encode(),
            headers={"Authorization": f"Bearer {status['token']}", "Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
        assert answer["predictions"][0]["labels"][0] in ("neg", "pos")
        unauthorized = urllib.request.Request(status["url"] + "/predict", data=b'{"text": "x"}')
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(unauthorized, timeout=10)
        metrics = client.get(f"/api/models/{onnx['id']}/endpoint").json()["metrics"]
        assert metrics["requests"]["200"] == 1
    finally:
        pid = console.endpoints.running[onnx["id"]].proc.pid
        client.post(f"/models/{onnx['id']}/endpoint/stop", data={"csrf": console.csrf})
    assert client.get(f"/api/models/{onnx['id']}/endpoint").json() == {"state": "none"}
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
