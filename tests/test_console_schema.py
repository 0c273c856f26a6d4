"""The console's OpenAPI document keeps its promises: schemathesis (`st run --checks all`, a fixed seed, a bounded
number of examples) against a real `domainlm console` server finds no failure: no 500 (ids beyond what SQLite holds
are refused first), every status code and content type declared, OPTIONS and 405 answers whose Allow header lists
the path's methods, and every request the schema calls valid accepted.

Three operations check what they are sent beyond any schema (a job's options against the files and models on the
server, an uploaded file's content): for them a 422 naming the problem is an expected answer to a well-formed
request, and the configuration below says so; every other operation must accept whatever its schema allows."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from tests.console_support import free_port  # noqa: E402
from tests.test_console_browser import stop_server  # noqa: E402

CONFIG = """
[[operations]]
include-name = ["POST /api/jobs", "POST /api/datasets", "POST /api/models/upload"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]
"""


def test_schemathesis_finds_no_failure_in_the_console_api(tmp_path, tiny_model):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "domainlm.cli",
            "console",
            "--home",
            str(tmp_path / "home"),
            "--port",
            str(port),
            "--token",
            "T",
            "--base-models",
            tiny_model,
            "--max-upload-mb",
            "1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().startswith("domainlm console: http://127.0.0.1:")
        (tmp_path / "schemathesis.toml").write_text(CONFIG)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(tmp_path / "schemathesis.toml"),
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "all",
                "-H",
                "Authorization: Bearer T",
                "--max-examples",
                "30",
                "--seed",
                "20260101",
                "--workers",
                "1",
                "--max-failures",
                "20",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )
        summary = run.stdout[run.stdout.rfind("SUMMARY") :]
        assert run.returncode == 0, run.stdout[-6000:]
        assert "Tested: 2" in summary and "generated" in summary and "failure" not in summary.split("Test cases:")[1]
    finally:
        stop_server(server)
