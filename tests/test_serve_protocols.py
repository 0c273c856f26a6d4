"""`domainlm serve` in the stacks users run: huggingface_hub's InferenceClient and text-embeddings-inference bodies,
tritonclient over KServe v2, Prometheus' own parser on /metrics, with and without the token; the server's batches are
the runtime's; 415 for a body that is not JSON; Allow headers that list every method of a path."""

import json
import threading
import time

import httpx
import numpy as np
import pytest

from domainlm.classify.runtime import load as load_runtime
from tests.test_export import exported, trained  # noqa: F401 - shared session fixtures
from tests.test_serve import KNOWN, SlowRuntime, post_many, running, torch_rt  # noqa: F401

TEXTS = list(KNOWN)


def test_huggingface_inference_client_with_and_without_the_token(torch_rt):
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import HfHubHTTPError

    expected = torch_rt.predict(TEXTS[:1])[0]
    for token in (None, "s3cret"):
        with running(torch_rt, token=token) as url:
            out = InferenceClient(base_url=url, token=token).text_classification(TEXTS[0])
            assert out[0].label == "hotel" and sorted(o.label for o in out) == torch_rt.labels  # every label
            scores = {o.label: o.score for o in out}
            assert [scores[label] for label in torch_rt.labels] == pytest.approx(expected.tolist(), abs=1e-5)
            assert [o.score for o in out] == sorted(scores.values(), reverse=True)
            top = InferenceClient(base_url=url, token=token).text_classification(TEXTS[1], top_k=1)
            assert [(o.label, round(o.score, 4)) for o in top] == [
                ("pc", round(max(torch_rt.predict(TEXTS[1:2])[0]), 4))
            ]
            if token:
                with pytest.raises(HfHubHTTPError) as denied:
                    InferenceClient(base_url=url, token="wrong").text_classification(TEXTS[0])
                assert denied.value.response.status_code == 401


def test_tei_bodies_answer_as_text_embeddings_inference_does(torch_rt):
    with running(torch_rt, max_chars=60) as url, httpx.Client(base_url=url) as client:
        single = client.post("/predict", json={"inputs": TEXTS[0]}).json()
        assert isinstance(single, list) and single[0]["label"] == "hotel" and len(single) == 3
        batch = client.post("/predict", json={"inputs": TEXTS, "truncate": True}).json()
        assert [rows[0]["label"] for rows in batch] == [KNOWN[t] for t in TEXTS]
        assert client.post("/", json={"inputs": TEXTS[0]}).json() == [single]  # Inference Endpoints: one per input
        pairs = client.post(
            "/predict",
            json={
                "inputs": [["电脑性能", "屏幕电池"], ["书内容", "作者观点"]],
                "parameters": {"top_k": 2, "function_to_apply": "softmax"},
            },
        ).json()
        alone = torch_rt.predict(["电脑性能", "书内容"], ["屏幕电池", "作者观点"])
        assert [d["score"] for rows in pairs for d in rows] == pytest.approx(
            [x for row in alone.tolist() for x in sorted(row, reverse=True)[:2]], abs=1e-5
        )
        own = client.post("/predict", json={"text": TEXTS[0]}).json()  # this server's body, unchanged
        assert own["predictions"][0]["labels"] == ["hotel"]
        # truncate false: a text over the model's 32 tokens is refused, not cut; true (and the default) cuts it
        long = "酒店房间早餐入住" * 5
        refused = client.post("/predict", json={"inputs": [TEXTS[0], long], "truncate": False})
        assert refused.status_code == 413 and refused.json()["error"] == (
            'inputs[1] has more than 32 tokens, the model\'s length; send "truncate": true to cut it'
        )
        assert client.post("/predict", json={"inputs": long}).status_code == 200
        assert client.post("/predict", json={"inputs": TEXTS[0], "truncate": False}).status_code == 200
        for body, status, words in [
            (
                {"inputs": "x", "parameters": {"function_to_apply": "sigmoid"}},
                422,
                "this model's scores are its softmax",
            ),
            ({"inputs": "x", "parameters": {"top_k": 0}}, 422, "'parameters.top_k' must be a positive integer"),
            ({"inputs": [["a", "b"], ["c"]]}, 422, "all of one kind"),
            ({"inputs": ["ok", " "]}, 422, "inputs[1] is empty"),
            ({"inputs": "x", "text": "y"}, 422, "unknown field(s) text"),
            ({"inputs": "x", "parameters": {"k": 1}}, 422, "unknown parameter(s) k"),
        ]:
            r = client.post("/predict", json=body)
            assert r.status_code == status and words in r.json()["error"], (body, r.text)


def test_tritonclient_over_kserve_v2(torch_rt):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    expected = torch_rt.predict(TEXTS)
    with running(torch_rt, token="t0k", name="topics") as url:
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        auth = {"Authorization": "Bearer t0k"}
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("topics")
        assert not client.is_model_ready("other")
        meta = client.get_model_metadata("topics", headers=auth)
        assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert meta["parameters"]["labels"] == ["book", "hotel", "pc"]
        assert client.get_server_metadata(headers=auth)["name"] == "domainlm"
        text = triton.InferInput("text", [3], "BYTES")
        text.set_data_from_numpy(np.array(TEXTS, dtype=object), binary_data=False)
        wanted = [triton.InferRequestedOutput(n, binary_data=False) for n in ("label", "probabilities")]
        result = client.infer("topics", [text], outputs=wanted, headers=auth, request_id="r1")
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        assert labels == [KNOWN[t] for t in TEXTS] and result.get_response()["id"] == "r1"
        probs = result.as_numpy("probabilities")
        assert probs.shape == (3, 3) and probs.dtype == np.float32
        np.testing.assert_allclose(probs, expected, atol=1e-5)
        everything = client.infer("topics", [text], headers=auth)  # no outputs named: all, in JSON
        assert everything.as_numpy("chosen").tolist() == [[label == x for x in torch_rt.labels] for label in labels]
        with pytest.raises(InferenceServerException) as denied:
            client.infer("topics", [text])
        assert denied.value.status() == "401" and "token" in denied.value.message()
        with pytest.raises(InferenceServerException) as unknown:
            client.infer("other", [text], headers=auth)
        assert unknown.value.status() == "404" and "this server serves 'topics'" in unknown.value.message()
        client.close()
        # pairs as [n, 2] rows; the limits and the shape checked with the --flag named
        with httpx.Client(base_url=url, headers=auth) as http:
            body = {
                "inputs": [
                    {
                        "name": "text",
                        "datatype": "BYTES",
                        "shape": [2, 2],
                        "data": ["电脑性能", "屏幕电池", "书内容", "作者观点"],
                    }
                ]
            }
            got = http.post("/v2/models/topics/infer", json=body).json()
            out = {o["name"]: o for o in got["outputs"]}
            np.testing.assert_allclose(
                np.reshape(out["probabilities"]["data"], (2, 3)),
                torch_rt.predict(["电脑性能", "书内容"], ["屏幕电池", "作者观点"]),
                atol=1e-5,
            )
            for tensor, status, words in [
                ({"shape": [3], "data": ["a", "b"]}, 422, "inputs[0].data has 2 items but its shape [3] holds 3"),
                ({"shape": [1], "data": ["a"], "datatype": "FP32"}, 422, "inputs[0].datatype: Input should be 'BYTES'"),
                ({"shape": [65], "data": ["a"] * 65}, 413, "at most 64 per request (--max-texts)"),
                ({"shape": [1, 3], "data": ["a"] * 3}, 422, "give [n] or [n, 1] for n texts"),
            ]:
                r = http.post(
                    "/v2/models/topics/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", **tensor}]}
                )
                assert r.status_code == status and words in r.json()["error"], (tensor, r.text)


def test_prometheus_metrics_parse_and_count(torch_rt):
    from prometheus_client.parser import text_string_to_metric_families

    with running(torch_rt, name="topics") as url, httpx.Client(base_url=url) as client:
        for t in TEXTS:
            assert client.post("/predict", json={"text": t}).status_code == 200
        assert client.post("/", json={"inputs": TEXTS}).status_code == 200
        assert client.post("/predict", json={"text": ""}).status_code == 422
        r = client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        as_json = client.get("/metrics.json").json()

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("domainlm_requests_total", route="/predict", status="200") == 3
    assert value("domainlm_requests_total", route="/predict", status="422") == 1
    assert value("domainlm_requests_total", route="/", status="200") == 1
    assert value("domainlm_request_duration_seconds_count", route="/predict") == 4
    assert value("domainlm_texts_total") == 6 == as_json["texts"]
    assert value("domainlm_batch_size_count") == as_json["batches"]
    assert value("domainlm_batch_size_sum") == sum(int(k) * v for k, v in as_json["batch_sizes"].items())
    assert value("domainlm_gathered_requests_count") == sum(as_json["requests_per_gathering"].values()) == 4
    assert value("domainlm_batch_tokens_count") == as_json["batches"]
    assert value("domainlm_queue_depth") == 0
    info = next(labels for (name, labels) in samples if name == "domainlm_model_info")
    assert (
        dict(info)["name"] == "topics" and dict(info)["kind"] == torch_rt.kind
    )  # pytorch-fp32, or -bf16 on a CPU with bf16
    assert as_json["requests"] == {"total": 5, "200": 4, "422": 1}


def test_the_server_runs_the_runtimes_batches(exported):
    rt = load_runtime(str(exported[0]), "fp32")  # ONNX pads: batches are cut where padding + calls cost least
    texts = [
        "酒店",
        "电脑",
        "书内容作者观点很好",
        "酒店房间早餐入住交通方便服务周到价格有点贵",
        "书",
        "电脑性能屏幕电池",
    ]
    plan = rt.plan(rt.encode(texts))
    with running(rt, max_wait_ms=0) as url:
        assert httpx.post(url + "/predict", json={"text": texts}).status_code == 200
        m = httpx.get(url + "/metrics.json").json()
    sizes = {}
    for rows in plan.rows:
        sizes[str(len(rows))] = sizes.get(str(len(rows)), 0) + 1
    assert m["batch_sizes"] == sizes and m["batches"] == len(plan.rows) > 1


def test_json_sent_as_text_is_415_and_allow_lists_every_method(torch_rt):
    body = json.dumps({"text": TEXTS[0]})
    with running(torch_rt, name="topics") as url, httpx.Client(base_url=url) as client:
        for path in ("/predict", "/", "/v2/models/topics/infer"):
            r = client.post(path, content=body, headers={"Content-Type": "text/plain"})
            assert r.status_code == 415 and r.json()["error"].startswith("the body is sent as text/plain"), path
        assert (
            client.post(
                "/predict", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
            ).status_code
            == 200
        )
        for method, path, allow in [
            ("OPTIONS", "/predict", "POST"),
            ("PUT", "/", "POST"),
            ("OPTIONS", "/health", "GET"),
            ("HEAD", "/labels", "GET"),
            ("DELETE", "/v2/models/topics", "GET"),
        ]:
            r = client.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers)
        assert client.get("/nowhere").json() == {"error": "no route GET /nowhere (see /docs)"}


class TimedRuntime(SlowRuntime):
    """Records which thread tokenizes and which runs the model, and when."""

    def __init__(self, inner, delay):
        super().__init__(inner, delay)
        self.events = []

    def encode(self, texts, pairs=None, max_seq_len=None):
        start = time.perf_counter()
        out = super().encode(texts, pairs, max_seq_len)
        self.events.append(("encode", threading.current_thread().name, start, time.perf_counter()))
        return out

    def probs_batch(self, batch):
        start = time.perf_counter()
        out = super().probs_batch(batch)
        self.events.append(("model", threading.current_thread().name, start, time.perf_counter()))
        return out


def test_the_model_thread_only_runs_the_model_while_the_next_gathering_is_prepared(torch_rt):
    rt = TimedRuntime(torch_rt, 0.3)
    with running(rt, batching=False) as url:
        answers = post_many(url, [{"text": t} for t in TEXTS])
    assert [a.json()["predictions"][0]["labels"] for a in answers] == [[KNOWN[t]] for t in TEXTS]
    assert {name for kind, name, *_ in rt.events if kind == "encode"} == {"domainlm-gatherer"}
    assert {name for kind, name, *_ in rt.events if kind == "model"} == {"domainlm-model"}
    encodes = sorted(e[2] for e in rt.events if e[0] == "encode")
    first_model = min((e for e in rt.events if e[0] == "model"), key=lambda e: e[2])
    assert encodes[1] < first_model[3]  # the second request was tokenized while the model ran the first
