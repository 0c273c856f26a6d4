"""`domainlm serve`: right answers, dynamic batching seen in /metrics, every bad request's status and message,
503 from a full queue, multi-label thresholds, and the CLI end to end. Servers bind 127.0.0.1, free ports."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from domainlm.classify.runtime import Runtime, TorchRuntime
from domainlm.classify.runtime import load as load_runtime
from domainlm.serve.config import ServeConfig
from domainlm.serve.server import create_app
from tests.test_export import exported, trained  # noqa: F401 - shared session fixtures

KNOWN = {"酒店房间早餐入住": "hotel", "电脑性能屏幕电池": "pc", "书内容作者观点": "book"}


class SlowRuntime(Runtime):
    """A real runtime that takes `delay` seconds per batch, to fill the queue on purpose."""

    def __init__(self, inner: Runtime, delay: float):
        super().__init__(inner.tokenizer, inner.meta, inner.max_seq_len)
        self.inner, self.delay, self.kind = inner, delay, "slow-" + inner.kind

    def probs_batch(self, batch):
        time.sleep(self.delay)
        return self.inner.probs_batch(batch)


@contextlib.contextmanager
def running(runtime: Runtime, **options):
    """The app on uvicorn in a thread, on a free port of 127.0.0.1; yields its base URL."""
    cfg = ServeConfig(model="-", **options)
    server = uvicorn.Server(uvicorn.Config(create_app(runtime, cfg), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def torch_rt(trained):
    # fp32: the answers of a gathering equal each text's alone within fp32's rounding (in bf16, auto on a CPU that
    # has it, a text's scores move in the third decimal with the batch it runs in)
    return TorchRuntime(str(trained["ft"]), max_seq_len=32, precision="fp32")


def post_many(url: str, bodies: list, headers=None) -> list[httpx.Response]:
    """Concurrent POSTs, one client per thread, all released at once."""
    barrier = threading.Barrier(len(bodies))

    def one(body):
        with httpx.Client(timeout=30) as client:
            barrier.wait()
            return client.post(url + "/predict", json=body, headers=headers)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_answers_labels_for_pytorch_and_onnx_alike(torch_rt, exported):
    for rt in (torch_rt, load_runtime(str(exported[0]), "fp32")):
        with running(rt) as url:
            r = httpx.post(url + "/predict", json={"text": list(KNOWN), "top_k": 2})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == rt.kind
            assert [p["labels"] for p in body["predictions"]] == [[v] for v in KNOWN.values()]
            first = body["predictions"][0]
            assert [t["label"] for t in first["top_k"]][0] == "hotel" and len(first["top_k"]) == 2
            assert first["scores"]["hotel"] == first["top_k"][0]["score"] > 1 / 3
            one = httpx.post(url + "/predict", json={"text": "电脑性能屏幕电池"}).json()["predictions"]
            assert len(one) == 1 and one[0]["labels"] == ["pc"] and len(one[0]["top_k"]) == 3  # default --top-k
            assert httpx.get(url + "/labels").json() == {
                "labels": ["book", "hotel", "pc"],
                "multilabel": False,
                "thresholds": None,
            }
            assert httpx.get(url + "/health").json()["status"] == "ok"
            schema = httpx.get(url + "/openapi.json").json()
            assert "text_pair" in json.dumps(schema["paths"]["/predict"]["post"]["requestBody"])
            assert httpx.get(url + "/docs").status_code == 200


def test_concurrent_requests_are_batched(torch_rt):
    texts = list(KNOWN) * 4
    with running(SlowRuntime(torch_rt, 0.05), max_wait_ms=200, max_batch=32) as url:
        answers = post_many(url, [{"text": t} for t in texts])
        assert [a.json()["predictions"][0]["labels"][0] for a in answers] == [KNOWN[t] for t in texts]
        m = httpx.get(url + "/metrics.json").json()
    assert m["requests"]["200"] == 12 and m["texts"] == 12
    assert m["batches"] < 12 and m["max_batch_size"] > 1  # gathered, not one by one
    # a text repeated within a gathering runs once (the runtime's plan): at most 12 rows, at least the 3 texts
    assert 3 <= sum(int(k) * v for k, v in m["batch_sizes"].items()) < 12
    assert m["latency_ms"]["window"] == 12 and 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]


def test_a_gathering_of_texts_and_text_pairs_answers_each_request_its_own_rows(torch_rt):
    bodies = [
        {"text": "酒店房间早餐入住"},
        {"text": ["电脑性能", "书内容"], "text_pair": ["屏幕电池", "作者观点"]},
        {"text": ["书内容作者观点", "电脑性能屏幕电池"]},
        {"text": "酒店", "text_pair": "早餐入住"},
    ] * 2
    with running(SlowRuntime(torch_rt, 0.05), max_wait_ms=300, max_batch=32) as url:
        answers = post_many(url, bodies)
        gathered = httpx.get(url + "/metrics.json").json()["requests_per_gathering"]
    assert max(int(k) for k in gathered) > 1  # several requests, with and without pairs, went through one gathering
    for body, answer in zip(bodies, answers):
        texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
        pairs = body.get("text_pair")
        alone = torch_rt.predict(texts, [pairs] if isinstance(pairs, str) else pairs)
        got = [t["score"] for p in answer.json()["predictions"] for t in p["top_k"]]
        assert [x for row in alone.tolist() for x in sorted(row, reverse=True)] == pytest.approx(got, abs=1e-5)


def test_one_at_a_time_without_batching(torch_rt):
    with running(torch_rt, batching=False) as url:
        post_many(url, [{"text": t} for t in list(KNOWN) * 2])
        m = httpx.get(url + "/metrics.json").json()
    assert m["batches"] == 6 and m["max_batch_size"] == 1 and m["requests_per_gathering"] == {"1": 6}


BAD = [  # (raw body or JSON, status, words of the message)
    (b"{not json", 400, "not valid JSON"),
    ([1, 2], 422, "must be a JSON object"),
    ({}, 422, "'text' is required"),
    ({"text": 5}, 422, "'text' must be a string or a list of strings, not int"),
    ({"text": ["ok", 3]}, 422, "text[1] must be a string, not int"),
    ({"text": ["ok", None]}, 422, "text[1] must be a string, not NoneType"),
    ({"text": "   "}, 422, "text is empty"),
    ({"text": ["ok", ""]}, 422, "text[1] is empty"),
    ({"text": []}, 422, "'text' is an empty list"),
    ({"text": ["ok"] * 5}, 413, "at most 4 per request (--max-texts)"),
    ({"text": "长" * 51}, 413, "51 characters; at most 50 (--max-chars)"),
    ({"text": "ok", "top_k": 0}, 422, "'top_k' must be a positive integer"),
    ({"text": "ok", "top_k": "3"}, 422, "'top_k' must be a positive integer"),
    ({"text": ["a", "b"], "text_pair": "c"}, 422, "'text_pair' has 1 texts but 'text' has 2"),
    ({"text": "ok", "txt": "x"}, 422, "unknown field(s) txt"),
    (b'{"text": "' + b"x" * 600 + b'"}', 413, "at most 500 (--max-body-bytes)"),
]


def test_every_bad_request_gets_its_status_and_message(torch_rt):
    with running(torch_rt, max_texts=4, max_chars=50, max_body_bytes=500, token="s3cret") as url:
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.Client(base_url=url, headers=auth) as client:
            for body, status, words in BAD:
                r = (
                    client.post("/predict", content=body, headers={"Content-Type": "application/json"})
                    if isinstance(body, bytes)
                    else client.post("/predict", json=body)
                )
                assert r.status_code == status, (body, r.text)
                assert words in r.json()["error"], (body, r.json())
            # a body without a length is bounded too
            r = client.post("/predict", content=iter([b'{"text": "', b"y" * 700, b'"}']))
            assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]
            assert client.post("/predict", json={"text": "电脑性能屏幕电池"}).status_code == 200  # still serving
            metrics = client.get("/metrics.json").json()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(url + "/predict", json={"text": "ok"}, headers=headers)
            assert r.status_code == 401 and "token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url + "/labels").status_code == 401 and httpx.get(url + "/metrics.json").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no token
        assert (
            "access-control-allow-origin"
            not in httpx.options(
                url + "/predict", headers={"Origin": "http://x.example", "Access-Control-Request-Method": "POST"}
            ).headers
        )
    statuses = {s for _, s, _ in BAD}
    assert {int(k) for k in metrics["requests"] if k != "total"} == statuses | {200}
    assert metrics["requests"]["413"] == sum(s == 413 for _, s, _ in BAD) + 1


def test_full_queue_answers_503(torch_rt):
    with running(SlowRuntime(torch_rt, 0.4), queue_size=1, batching=False) as url:
        answers = post_many(url, [{"text": "酒店房间早餐入住"}] * 6)
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert "--queue-size" in busy.json()["error"] and busy.headers["retry-after"] == "1"
        assert all(a.json()["predictions"][0]["labels"] == ["hotel"] for a in answers if a.status_code == 200)
        m = httpx.get(url + "/metrics.json").json()
        assert m["requests"]["503"] == codes.count(503)
        assert httpx.post(url + "/predict", json={"text": "书内容作者观点"}).json()["predictions"][0]["labels"] == [
            "book"
        ]


def test_multilabel_answers_use_saved_thresholds(tmp_path, tiny_model, tokenizer):
    from domainlm.classify.model import load_classifier, save_classifier

    labels = ["a", "b", "c"]
    model = load_classifier(tiny_model, labels, True, "full", 16, 32)
    # thresholds 0 and above 1: label a and c always, b never, whatever the (untrained) scores
    folder = save_classifier(model, tokenizer, tmp_path / "ml", labels, True, thresholds=[0.0, 1.01, 0.0])
    with running(TorchRuntime(str(folder))) as url:
        r = httpx.post(url + "/predict", json={"text": ["酒店", "电脑屏幕电池"]}).json()
        assert [p["labels"] for p in r["predictions"]] == [["a", "c"], ["a", "c"]]
        assert set(r["predictions"][0]["scores"]) == {"a", "c"} and len(r["predictions"][0]["top_k"]) == 3
        assert httpx.get(url + "/labels").json()["thresholds"] == [0.0, 1.01, 0.0]


def test_cli_serve_an_export_end_to_end(exported):
    from domainlm.classify.runtime_options import int8_note

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DOMAINLM_SERVE_TOKEN": "t"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "domainlm.cli", "serve", str(exported[0]), "--port", "0", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the port is bound and listening, not before
        assert line.startswith(
            f"serving {exported[0]} as 'export-int8' (onnx-int8, 3 labels; cpu, int8, 1 thread, 32 tokens per text; "
        ), line
        assert int8_note("onnx-int8", "cpu") in line and int8_note("onnx-int8", "cpu").startswith("int8 ONNX Runtime")
        url = line.split(" on ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # no retry: the line came after the bind
        assert httpx.post(url + "/predict", json={"text": "电脑"}).status_code == 401  # token from the environment
        r = httpx.post(url + "/predict", json={"text": "电脑性能屏幕电池"}, headers={"Authorization": "Bearer t"})
        assert r.json()["model"] == "onnx-int8" and r.json()["predictions"][0]["labels"] == ["pc"]
        v2 = httpx.get(url + "/v2/models/export-int8", headers={"Authorization": "Bearer t"})
        assert v2.json()["name"] == "export-int8"  # the folder's name, without --name
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_port_in_use_and_an_empty_token_variable_are_one_line_each(exported, err, monkeypatch):
    from tests.conftest import one_line

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = one_line(err("serve", exported[0], "--port", port))
    assert message.strip() == (
        f"error: --port {port} is in use on 127.0.0.1; stop what listens there or choose "
        "another --port (0: any free port)"
    )
    monkeypatch.setenv("DOMAINLM_SERVE_TOKEN", "  ")
    assert "DOMAINLM_SERVE_TOKEN is set but empty, which would serve without authentication" in one_line(
        err("serve", exported[0], "--port", 0)
    )
    monkeypatch.setenv("DOMAINLM_SERVE_TOKEN", "")
    assert "DOMAINLM_SERVE_TOKEN is set but empty" in one_line(err("serve", exported[0], "--port", 0))


class BrokenRuntime(SlowRuntime):
    """Fails on batches of 20 tokens or more, like a model hitting an input it cannot take."""

    def probs_batch(self, batch):
        if batch["input_ids"].shape[1] >= 20:
            raise RuntimeError("kernel failed")
        return self.inner.probs_batch(batch)


def test_a_failing_batch_answers_500_and_the_server_goes_on(torch_rt):
    with running(BrokenRuntime(torch_rt, 0.0), batching=False) as url:
        r = httpx.post(url + "/predict", json={"text": "书" * 30})
        assert r.status_code == 500 and r.json()["error"] == "prediction failed: RuntimeError: kernel failed"
        assert httpx.post(url + "/predict", json={"text": "书内容作者观点"}).json()["predictions"][0]["labels"] == [
            "book"
        ]
        assert httpx.get(url + "/metrics.json").json()["requests"]["500"] == 1
