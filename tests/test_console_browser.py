"""The console in headless Chromium (Debian's package, driven by Playwright): what a user does, end to end, against
a real `domainlm console` server process that runs real fine-tuning subprocesses on the tiny model (the first one in
two processes under torchrun), in English and, after the switch, in Chinese.

Screenshots (1280 px wide) go to $DOMAINLM_SCREENSHOTS (default: the test's temporary folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)
pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

from tests.console_support import free_port, wait_for, write_labelled  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "browser-test-token"


def start_server(home: Path, port: int, tiny_model: str) -> subprocess.Popen:
    proc = subprocess.Popen(
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
            "--base-models",
            tiny_model,
            "--cancel-grace",
            "3",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    line = proc.stdout.readline()
    assert line.startswith("domainlm console: http://127.0.0.1:"), line
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def kill_leftover_jobs(home: Path) -> None:
    from domainlm.console.db import Job, open_database
    from domainlm.console.runner import alive

    with open_database(f"sqlite:///{home / 'console.db'}")() as s:
        for job in s.query(Job):
            if alive(job.pid, job.proc_start):
                os.killpg(job.pid, signal.SIGKILL)


def job_group_alive(home: Path, job_id: int) -> bool:
    from domainlm.console.db import Job, open_database

    with open_database(f"sqlite:///{home / 'console.db'}")() as s:
        pgid = s.get(Job, job_id).pid
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_train_watch_try_cancel_and_restart_in_the_browser(tmp_path, tiny_model):
    shots = Path(os.environ.get("DOMAINLM_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    home, port = tmp_path / "home", free_port()
    base = f"http://127.0.0.1:{port}"
    train = write_labelled(tmp_path / "reviews.jsonl", labels=("负面", "正面"))
    server = start_server(home, port, tiny_model)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)  # the first model load in the server imports torch
            questions = []
            page.on("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))  # "Cancel job 2 ...?"
            page.goto(f"{base}/?token={TOKEN}")
            assert page.url == f"{base}/jobs" and "No jobs yet" in page.inner_text("main")

            # a dataset, checked on upload
            page.click("text=Datasets")
            page.set_input_files("#f-file", train)
            page.click("#upload-button")
            page.wait_for_url(f"{base}/datasets/1")
            rows = page.query_selector_all("#distribution tr")
            assert [r.inner_text().split("\t")[:2] for r in rows] == [["负面", "16"], ["正面", "16"]]

            # the create form: an out-of-range value comes back next to its field, the rest as typed
            page.click("text=Create job")
            assert page.is_hidden("#field-lora_rank") and page.is_hidden("#field-dev")  # full method, split validation
            page.select_option("#f-method", "lora")
            assert page.is_visible("#field-lora_rank")
            page.select_option("#f-method", "full")
            page.click("[data-preset=few-shot]")  # fills the fields from the CLI's preset
            assert page.input_value("#f-epochs") == "20" and float(page.input_value("#f-learning_rate")) == 5e-05
            page.fill("#f-epochs", "99")
            page.fill("#f-batch_size", "8")
            page.fill("#f-max_seq_len", "32")
            page.click("summary:has-text('Advanced options')")
            page.fill("#f-logging_freq", "1")
            page.select_option("#f-precision", "fp32")
            page.fill("#f-name", "reviews sentiment")
            assert page.inner_text("#field-gpus #no-gpu").startswith("no GPU")  # this machine: the CPU
            page.fill("#f-processes", "2")  # two processes: torchrun
            page.click("#create")
            error = page.locator("#field-epochs .error")
            assert error.inner_text() == "epochs = 99 is out of range [1, 50]"  # as the form names it
            assert page.input_value("#f-batch_size") == "8" and page.input_value("#f-name") == "reviews sentiment"
            page.locator("#field-epochs").screenshot(path=str(shots / "form-error.png"))
            page.fill("#f-epochs", "1")
            page.click("#create")

            # the job page: status, curve and log update by themselves
            page.wait_for_url(f"{base}/jobs/1")
            page.locator("#job[data-status='succeeded']").wait_for(timeout=150_000)  # the page as redrawn at the end
            page.wait_for_selector("#chart-loss[data-points]")
            assert int(page.get_attribute("#chart-loss", "data-points")) == 2  # one point per logged step
            log = page.inner_text("#log")
            assert "global batch 16 = 8 x 1 accumulation x 2 processes" in log and "[train] step 2" in log
            assert page.inner_text("#devices") == "CPU · 2 processes (torchrun)"
            command = page.text_content("#command-line")
            assert "torchrun --standalone --nproc-per-node 2 -m domainlm.cli finetune" in command
            assert page.inner_text("#machine #no-gpu") == "no GPU"  # the machine, on every job page
            page.screenshot(path=str(shots / "job.png"))

            # in Chinese: the switch is remembered; a classifier's page shows each label's precision and recall
            page.click("#lang-zh-CN")
            page.wait_for_function("document.documentElement.lang === 'zh-CN'")
            assert page.inner_text("#status") == "成功" and page.get_attribute("#status", "data-status") == "succeeded"
            assert page.inner_text("#devices") == "CPU · 2 个进程（torchrun）"
            page.screenshot(path=str(shots / "job-zh.png"), full_page=True)
            page.goto(f"{base}/models/1")
            assert page.inner_text("h1 .kind") == "分类器" and page.locator("#per-label tr[data-label]").count() == 2
            assert page.inner_text("#per-class h2").startswith("各类别表现")
            page.screenshot(path=str(shots / "model-zh.png"), full_page=True)
            page.click("#per-class a[href$='_confusion.png']")  # the matplotlib plot: labels in Chinese, no boxes
            page.locator("img").screenshot(path=str(shots / "confusion-zh.png"))
            page.goto(f"{base}/jobs/new")
            assert page.inner_text("#section-devices h2").endswith("设备")
            page.locator("#section-devices").screenshot(path=str(shots / "devices-zh.png"))
            page.screenshot(path=str(shots / "new-job-zh.png"), full_page=True)
            page.goto(f"{base}/resources")
            page.screenshot(path=str(shots / "resources-zh.png"))
            page.click("#lang-en")
            page.wait_for_function("document.documentElement.lang === 'en'")

            # my models: lineage, then try it
            page.click("text=My models")
            row = page.locator("tr[data-model='1']")
            assert [s.strip() for s in row.locator(".lineage").inner_text().split("→")] == [
                Path(tiny_model).name,
                "job 1",
                "reviews sentiment",
            ]
            page.screenshot(path=str(shots / "models.png"))
            row.locator("text=Try").click()
            page.fill("#f-text", "酒店的服务非常好\nthe schedule slipped")
            page.click("#predict")
            results = page.locator("#results tbody tr")
            assert results.count() == 2
            assert results.nth(0).locator("td").nth(1).inner_text() in ("负面", "正面")
            page.screenshot(path=str(shots / "try.png"), full_page=True)

            # a second job, cloned; the console restarts while it runs; then it is cancelled
            page.goto(f"{base}/jobs/new?clone=1")
            assert (
                page.input_value("#f-name") == "reviews sentiment (copy)" and page.input_value("#f-max_seq_len") == "32"
            )
            assert page.input_value("#f-processes") == "2"  # the devices are cloned too
            page.fill("#f-processes", "1")
            page.fill("#f-epochs", "50")
            page.click("#create")
            page.wait_for_url(f"{base}/jobs/2")
            page.wait_for_function("document.getElementById('status').textContent === 'running'", timeout=60_000)
            stop_server(server)
            server = start_server(home, port, tiny_model)
            page.reload()  # the same cookie still works: the token is kept in the home folder
            assert page.inner_text("#status") == "running"  # adopted, not lost
            page.wait_for_function("!document.getElementById('progress').textContent.startsWith('0 ')")  # a step
            page.click("#cancel")
            # the page redraws itself once the state changes: wait for the redrawn one, not the text before it
            page.locator("#job[data-status='cancelled']").wait_for(timeout=30_000)
            assert questions == [
                "Cancel job 2 (reviews sentiment (copy))? Its process is stopped; Retry starts it over."
            ]
            assert page.locator("#retry").inner_text() == "Retry"
            assert wait_for(lambda: not job_group_alive(home, 2), 10, what="job 2's process group to end")
            # Retry: the new attempt starts from 0, not from where the cancelled one stopped
            page.click("#retry")
            page.locator("#job:not([data-status='cancelled'])").wait_for()  # redrawn for the new attempt
            assert page.inner_text("#progress").startswith("0 ") and page.inner_text("#eta") == "–"
            page.click("#cancel")
            # the page redraws itself once the state changes: wait for the redrawn one, not the text before it
            page.locator("#job[data-status='cancelled']").wait_for(timeout=30_000)
            page.goto(f"{base}/jobs")
            assert [s.inner_text() for s in page.query_selector_all("#jobs [data-field=status]")] == [
                "cancelled",
                "succeeded",
            ]
            page.screenshot(path=str(shots / "jobs.png"))
            browser.close()
    finally:
        stop_server(server)
        kill_leftover_jobs(home)
