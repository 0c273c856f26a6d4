"""`domainlm serve` keeps the promises of its OpenAPI schema: schemathesis (`st run --checks all`, a fixed seed, a
bounded number of examples) against a live server on 127.0.0.1, with the token, finds no failure: no 5xx, every
status and content type declared, answers as their schemas say, valid requests accepted and invalid ones refused,
405 with an Allow header for undeclared methods, 401 without the token."""

import subprocess
import sys

import httpx

from domainlm.classify.runtime import load as load_runtime
from tests.test_export import exported, trained  # noqa: F401 - shared session fixtures
from tests.test_serve import running

# the model's name in the v2 routes (any other name is 404, tested beside the protocols); 413 (a body, a text or a
# list over the limits) is how this server refuses what is too large, as text-embeddings-inference does, and
# schemathesis' default list of refusals lacks it
CONFIG = """
[parameters]
"path.name" = "topics"

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "413", "415", "422"]
"""


def test_schemathesis_finds_no_failure(exported, tmp_path):
    # texts and pairs of at most 20 characters stay within the model's 64 tokens, so that "truncate": false
    # (refused over the model's length) is never a valid request refused
    rt = load_runtime(str(exported[0]), "int8", max_seq_len=64)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with running(rt, token="t0k", name="topics", max_texts=4, max_chars=20, queue_size=1024) as url:
        schema = httpx.get(url + "/openapi.json").json()
        assert schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "15",
                "--seed",
                "7",
                "--workers",
                "1",
                "--no-color",
                "--generation-database",
                "none",
                "-H",
                "Authorization: Bearer t0k",
                "--request-timeout",
                "20",
                "--max-failures",
                "20",
            ],
            capture_output=True,
            text=True,
            timeout=240,
            cwd=tmp_path,
        )  # its cache goes there
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "No issues found" in run.stdout and "12 selected / 12 total" in run.stdout, report
