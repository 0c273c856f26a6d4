"""The whole flow of the console in headless Chromium (Debian's package, driven by Playwright), against a real
`domainlm console` server that runs real subprocesses on the tiny model: register a local base model and a
corpus store from the pages -> a bad max length refused at creation -> pretrain with two snapshots -> a sweep
over base and snapshots with 2 seeds -> compare two fine-tuned models, then three long-named ones -> export int8 ->
an endpoint and a prediction from it -> download the model -> the sweep, its plot and compare in Chinese.

Screenshots (1280 px wide) go to $DOMAINLM_SCREENSHOTS (default: the test's temporary folder)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.test_console_browser import ARGS, CHROMIUM, TOKEN, kill_leftover_jobs, stop_server

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from tests.console_support import free_port, write_labelled  # noqa: E402


def wait_status(page, status: str, timeout: int) -> None:
    """Until the job ends: the page as the server draws it then (the page reloads itself on a change of state;
    reading it before that reload finishes would read the page being left)."""
    ends = ", ".join(f"#job[data-status='{s}']" for s in (status, "failed", "cancelled", "interrupted"))
    page.locator(ends).wait_for(timeout=timeout)
    assert page.inner_text("#status") == status, page.inner_text("#error")


def test_own_model_to_endpoint_in_the_browser(tmp_path, tiny_model, corpus_dir):
    shots = Path(os.environ.get("DOMAINLM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shared = tmp_path / "shared"  # the server's folders a user may bring in (--import-roots)
    shutil.copytree(tiny_model, shared / "bert-tiny-zh")
    shutil.copytree(corpus_dir, shared / "reviews-store")
    train = write_labelled(tmp_path / "reviews.jsonl")
    home, port = tmp_path / "home", free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "domainlm.cli",
            "console",
            "--home",
            str(home),
            "--port",
            str(port),
            "--token",
            TOKEN,
            "--import-roots",
            str(shared),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert server.stdout.readline().startswith("domainlm console: http://127.0.0.1:")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            page.set_default_timeout(90_000)
            page.goto(f"{base}/?token={TOKEN}")

            # my own base model and corpus store, from the pages
            page.click("text=My models")
            page.fill("#f-model-path", str(shared / "bert-tiny-zh"))
            page.click("#register-model-button")
            page.wait_for_url(f"{base}/models/1")
            page.screenshot(path=str(shots / "registered.png"))
            assert page.inner_text("h1").startswith("bert-tiny-zh") and page.inner_text(".kind") == "base"
            page.click("text=Datasets")
            page.click("summary:has-text('Register from the server')")
            page.fill("#f-path", str(shared / "reviews-store"))
            page.fill("#f-rname", "reviews corpus")
            page.click("#register-button")
            page.wait_for_url(f"{base}/datasets/1")
            assert "corpus" in page.inner_text("h1")
            page.click("text=Datasets")
            page.set_input_files("#f-file", train)
            page.click("#upload-button")
            page.wait_for_url(f"{base}/datasets/2")
            assert page.locator("#preview tr").count() == 10  # its first rows, Chinese text included
            page.screenshot(path=str(shots / "dataset.png"), full_page=True)

            # pretraining: the form's default length (512) is more than the model's 64 positions: a field error, at once
            page.goto(f"{base}/jobs/new?command=pretrain")
            page.select_option("#f-model", "model:1")
            page.fill("#f-max_steps", "4")
            page.click("#create")
            error = page.locator("#field-max_seq_len .error")
            assert error.inner_text() == (
                "max seq len 512 exceeds what the model bert-tiny-zh can take (64 positions); "
                "use max seq len 64 or less"
            )
            page.locator("#field-max_seq_len").screenshot(path=str(shots / "field-error.png"))
            assert page.evaluate("fetch('/api/jobs').then(r => r.json())") == []  # nothing was created
            for field, value in (
                ("max_seq_len", "64"),
                ("batch_size", "4"),
                ("save_steps", "2"),
                ("eval_steps", "2"),
                ("checkpoint_steps", "2"),
            ):
                page.fill(f"#f-{field}", value)
            page.click("summary:has-text('Advanced options')")
            page.fill("#f-logging_freq", "1")
            page.fill("#f-num_workers", "0")
            page.select_option("#f-precision", "fp32")
            page.fill("#f-name", "酒店评论领域")  # a Chinese name: the sweep's plot shows it in its legend
            page.click("#create")
            page.wait_for_url(f"{base}/jobs/1")
            wait_status(page, "succeeded", 120_000)
            assert [r.inner_text().split("\t")[0] for r in page.query_selector_all("#models tbody tr")] == [
                "酒店评论领域 step-000002",
                "酒店评论领域 step-000004",
                "酒店评论领域 final",
            ]

            # a sweep over the base model and both snapshots, 2 seeds
            page.goto(f"{base}/jobs/new?command=sweep")
            page.select_option("#f-pretrain_jobs", ["1"])
            page.fill("#f-seeds", "1,2")
            page.select_option("#f-train", label="reviews.jsonl · 32 rows")
            page.select_option("#f-test", label="reviews.jsonl · 32 rows")
            for field, value in (("epochs", "1"), ("batch_size", "8"), ("max_seq_len", "32")):
                page.fill(f"#f-{field}", value)
            page.click("summary:has-text('Advanced options')")
            page.select_option("#f-precision", "fp32")
            page.fill("#f-logging_freq", "1")
            page.fill("#f-name", "which checkpoint")
            page.click("#create")
            page.wait_for_url(f"{base}/jobs/2")
            wait_status(page, "succeeded", 240_000)
            assert page.inner_text("#progress") == "6 / 6 cells"
            assert page.inner_text("#conclusion").strip()  # the "what to ship" sentence
            rows = [r.inner_text().split("\t")[:2] for r in page.query_selector_all("#sweep-table tbody tr")]
            assert [r[1].lstrip("★ ") for r in rows[:3]] == ["base", "step 2", "step 4"] and rows[3][0] == "floor"
            assert "p (Holm)" in page.text_content("#sweep-table thead")
            page.wait_for_function("document.getElementById('plot-1').naturalWidth > 0")
            page.screenshot(path=str(shots / "sweep.png"), full_page=True)

            # compare a snapshot's classifier with the base model's (settings and curves)
            page.click("text=My models")
            names = {
                r.get_attribute("data-model"): r.query_selector_all("td")[1].inner_text().split("\n")[0]
                for r in page.query_selector_all("#models tr[data-model]")
            }
            a = next(i for i, n in names.items() if n == "which checkpoint 酒店评论领域 step-000004 seed-1")
            b = next(i for i, n in names.items() if n == "which checkpoint 酒店评论领域 base seed-1")
            c = next(i for i, n in names.items() if n == "which checkpoint 酒店评论领域 step-000002 seed-2")
            page.screenshot(path=str(shots / "models.png"))
            page.check(f"tr[data-model='{a}'] input[type=checkbox]")
            page.check(f"tr[data-model='{b}'] input[type=checkbox]")
            page.click("#compare")
            assert [c.inner_text() for c in page.query_selector_all("tr[data-setting='method'] td")] == [
                "method",
                "full",
                "full",
            ]
            assert [c.inner_text() for c in page.query_selector_all("tr[data-setting='base'] td")] == [
                "base",
                "酒店评论领域 step-000004",
                "bert-tiny-zh",
            ]  # my models by their names, not their folders
            assert int(page.get_attribute("#chart-compare-metric", "data-points")) == 2  # one validation point each
            assert int(page.get_attribute("#chart-compare-loss", "data-points")) > 2
            assert "Paired test" in page.inner_text("#paired-test") and "| method |" in page.inner_text("#markdown")
            page.screenshot(path=str(shots / "compare.png"), full_page=True)
            # three long-named models: the label column keeps its words on one line, nothing scrolls sideways
            page.goto(f"{base}/models/compare?ids={a}&ids={b}&ids={c}")
            assert page.evaluate("document.querySelector('#compare-table td.what').getBoundingClientRect().width") > 100
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            assert page.evaluate("(s => s.scrollWidth <= s.clientWidth)(document.querySelector('.scroll'))")
            assert page.locator("#paired-test .paired").count() == 2  # each against the first

            # export int8 with the accuracy change on the labelled data
            page.goto(f"{base}/models/{a}")
            page.click("#export")
            assert page.input_value("#f-model") == f"model:{a}"
            page.select_option("#f-quantize", "int8")
            page.select_option("#f-data", label="reviews.jsonl · 32 rows")
            page.fill("#f-max_seq_len", "32")
            page.click("#create")
            page.wait_for_url(f"{base}/jobs/3")
            wait_status(page, "succeeded", 120_000)
            assert page.inner_text("#headline").startswith("int8 change of accuracy (points)")
            page.click("#models tbody tr a")

            # an endpoint for the export, a prediction from it, its /metrics on the page
            page.click("#start-endpoint")
            page.wait_for_function("document.getElementById('endpoint-state').textContent === 'ready'", timeout=60_000)
            url, token = page.inner_text("#endpoint-url"), page.inner_text("#endpoint-token")
            request = urllib.request.Request(
                url + "/predict",
                data=json.dumps({"text": ["酒店的服务非常好"]}).encode(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
            assert answer["predictions"][0]["labels"][0] in ("neg", "pos")
            page.wait_for_function("document.getElementById('endpoint-metrics').textContent.includes('\"200\": 1')")
            page.screenshot(path=str(shots / "model-endpoint.png"), full_page=True)

            # the model folder as a zip
            with page.expect_download() as download:
                page.click("#download")
            names = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes())).namelist()
            assert "export/model.int8.onnx" in names and "export/tokenizer.json" in names
            page.click("#stop-endpoint")
            page.wait_for_selector("#start-endpoint")
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # nothing wider than the window

            # in Chinese: the sweep's page with its plot (a Chinese legend, drawn with a CJK font), compare, models
            page.click("#lang-zh-CN")
            page.goto(f"{base}/jobs/2")
            page.wait_for_function("document.getElementById('plot-1').naturalWidth > 0")
            assert page.inner_text("#sweep h2") == "该发布哪个模型"
            page.screenshot(path=str(shots / "sweep-zh.png"), full_page=True)
            page.locator("#plot-1").screenshot(path=str(shots / "metric-vs-step-zh.png"))
            page.goto(f"{base}/models/compare?ids={a}&ids={b}&ids={c}")
            assert page.inner_text("tr[data-setting='learning rate'] td.what") == "学习率"
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
            page.screenshot(path=str(shots / "compare-zh.png"), full_page=True)
            page.goto(f"{base}/models")
            page.screenshot(path=str(shots / "models-zh.png"))
            page.goto(f"{base}/jobs")
            page.screenshot(path=str(shots / "jobs-zh.png"))
            browser.close()
    finally:
        stop_server(server)
        kill_leftover_jobs(home)
