"""`domainlm serve MODEL`: an HTTP JSON API over a classifier (PyTorch, an ONNX export or the linear floor: whatever
classify.runtime.load opens) with dynamic batching.

Requests are checked (size, JSON, types, limits) in the event loop, then queued. One worker thread owns the
model: it takes the first waiting request, gathers more for up to --max-wait-ms or --max-batch texts, sorts the
texts by length, runs them in batches, and answers each request with its own rows. When --queue-size requests
already wait, a new one gets 503 at once instead of a growing delay. No exception of a request escapes its
answer, so one bad batch never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from domainlm.classify.runtime import ClassifierRuntime, Runtime
from domainlm.errors import DomainLMError
from domainlm.serve.config import ServeConfig
from domainlm.serve.requests import BadRequest, PredictRequest, PredictResponse, parse_request, read_body


@dataclass
class Job:
    texts: list[str]
    pairs: list[str] | None
    top_k: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass
class Metrics:
    started: float = field(default_factory=time.time)
    requests: Counter = field(default_factory=Counter)  # by status code
    texts: int = 0
    batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)  # texts per model batch -> count
    gathered: Counter = field(default_factory=Counter)  # requests per gathering -> count
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=20_000))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self, queued: int) -> dict:
        with self.lock:
            lat = np.asarray(self.latencies_ms, dtype=float)
            pct = {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 99)} if len(lat) else {}
            sizes = sum(k * v for k, v in self.batch_sizes.items())
            return {"uptime_s": round(time.time() - self.started, 1),
                    "requests": {"total": sum(self.requests.values()), **{str(k): v for k, v in sorted(self.requests.items())}},
                    "texts": self.texts, "batches": self.batches,
                    "mean_batch_size": round(sizes / self.batches, 3) if self.batches else 0.0,
                    "max_batch_size": max(self.batch_sizes, default=0),
                    "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "requests_per_gathering": {str(k): v for k, v in sorted(self.gathered.items())},
                    "latency_ms": {"window": len(lat), **pct}, "queued": queued}


class Batcher:
    """The worker thread that owns the model."""

    def __init__(self, runtime: ClassifierRuntime, cfg: ServeConfig, metrics: Metrics):
        self.runtime, self.cfg, self.metrics = runtime, cfg, metrics
        # texts per model batch: a GPU needs larger batches than a CPU to be busy (classify.runtime.batch_limits)
        self.max_batch = cfg.max_batch or (256 if getattr(runtime, "device", "cpu") == "cuda" else 32)
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.queue_size)
        self.thread = threading.Thread(target=self._loop, name="domainlm-batcher", daemon=True)
        self.stopping = False

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        with contextlib.suppress(queue.Full):  # a full queue wakes the worker anyway
            self.queue.put_nowait(None)
        self.thread.join(timeout=5)

    def submit(self, job: Job) -> bool:
        try:
            self.queue.put_nowait(job)
            return True
        except queue.Full:
            return False

    def _gather(self, first: Job) -> list[Job]:
        jobs, n = [first], len(first.texts)
        if not self.cfg.batching:
            return jobs
        deadline = time.perf_counter() + self.cfg.max_wait_ms / 1000
        while n < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop: answer what was gathered first
                self.stopping = True
                break
            jobs.append(job)
            n += len(job.texts)
        return jobs

    def _loop(self) -> None:
        while not self.stopping:
            first = self.queue.get()
            if first is None:
                break
            jobs = self._gather(first)
            try:
                self._run(jobs)
            except Exception as e:  # noqa: BLE001 - answered as 500, the worker goes on
                _answer_all(jobs, [None] * len(jobs), error=e)

    def _run(self, jobs: list[Job]) -> None:
        rt = self.runtime
        probs, sizes = _token_probs(rt, jobs, self.max_batch) if isinstance(rt, Runtime) else _text_probs(rt, jobs)
        with self.metrics.lock:
            self.metrics.batches += len(sizes)
            self.metrics.batch_sizes.update(sizes)
            self.metrics.gathered[len(jobs)] += 1
            self.metrics.texts += len(probs)
        answers, start = [], 0
        for job in jobs:
            answers.append(rt.decide(probs[start : start + len(job.texts)], job.top_k))
            start += len(job.texts)
        _answer_all(jobs, answers)


def _token_probs(rt: Runtime, jobs: list[Job], max_batch: int) -> tuple[np.ndarray, list[int]]:
    """A token model: the gathered texts encoded, cut into batches of like lengths, run batch by batch."""
    features = _encode(rt, jobs)
    probs = np.empty((len(features), len(rt.labels)), dtype=np.float32)
    sizes = []
    for idx in length_groups([len(f["input_ids"]) for f in features], max_batch):
        probs[idx] = rt.probs_batch(rt.feed([features[j] for j in idx]))
        sizes.append(len(idx))
    return probs, sizes


def _text_probs(rt: ClassifierRuntime, jobs: list[Job]) -> tuple[np.ndarray, list[int]]:
    """Any other kind (the linear floor): its own `predict`, once for the jobs without a text pair and once for
    those with."""
    probs = np.empty((sum(len(job.texts) for job in jobs), len(rt.labels)), dtype=np.float32)
    sizes = []
    for where, texts, pairs in _by_pairing(jobs):
        probs[where] = rt.predict(texts, pairs)
        sizes.append(len(texts))
    return probs, sizes


def _encode(rt: Runtime, jobs: list[Job]) -> list[dict]:
    """Features of every text of the gathered jobs, in job order: one tokenizer call for the jobs without a text
    pair and one for those with (a fast tokenizer's call has a fixed cost that a call per request repeats)."""
    features: list = [None] * sum(len(job.texts) for job in jobs)
    for where, texts, pairs in _by_pairing(jobs):
        for i, f in zip(where, rt.encode(texts, pairs)):
            features[i] = f
    return features


def _by_pairing(jobs: list[Job]):
    """(rows, texts, pairs or None) of the gathered jobs without a text pair, then of those with one."""
    for paired in (False, True):
        where, texts, pairs, start = [], [], [], 0
        for job in jobs:
            if (job.pairs is not None) == paired:
                where += range(start, start + len(job.texts))
                texts += job.texts
                pairs += job.pairs or []
            start += len(job.texts)
        if texts:
            yield where, texts, pairs if paired else None


def length_groups(lengths: list[int], max_batch: int, slack: float = 1.3, extra: int = 8) -> list[np.ndarray]:
    """Indices sorted by length, cut into batches of at most max_batch whose longest text is at most
    slack x shortest + extra tokens. On a CPU a padded token costs as much as a real one, and the server
    measured slower with one batch of texts of mixed lengths than with one request at a time."""
    order = np.argsort(lengths, kind="stable")
    groups, start = [], 0
    for i in range(1, len(order) + 1):
        if i == len(order) or i - start >= max_batch or lengths[order[i]] > slack * lengths[order[start]] + extra:
            groups.append(order[start:i])
            start = i
    return groups


def _answer_all(jobs: list[Job], results: list, error: BaseException | None = None) -> None:
    """Settle the futures of a gathering with one wake-up of the event loop (a wake-up per request costs the
    loop, which parses the next requests meanwhile, a system call and a pass through its ready queue)."""

    def settle() -> None:
        for job, result in zip(jobs, results):
            if job.future.done():  # the client went away
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    jobs[0].loop.call_soon_threadsafe(settle)


def create_app(runtime: ClassifierRuntime, cfg: ServeConfig) -> FastAPI:
    from contextlib import asynccontextmanager

    metrics = Metrics()
    batcher = Batcher(runtime, cfg, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="domainlm classifier", version="1", lifespan=lifespan,
                  description=f"{runtime.kind} classifier with {len(runtime.labels)} labels"
                              f"{' (multi-label)' if runtime.multilabel else ''}. Send `Authorization: Bearer TOKEN` "
                              "if the server was started with --token.")
    app.state.metrics, app.state.batcher, app.state.runtime = metrics, batcher, runtime
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        with metrics.lock:
            metrics.requests[status] += 1
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def unauthorized(request: Request) -> JSONResponse | None:
        if not cfg.token:
            return None
        given = request.headers.get("authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {cfg.token}".encode()):
            return None
        return error(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # the last line of defence
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health", summary="liveness: the model is loaded and the worker runs")
    async def health() -> dict:
        alive = batcher.thread.is_alive()
        return {"status": "ok" if alive else "worker stopped", "model": runtime.kind, "labels": len(runtime.labels),
                "queued": batcher.queue.qsize()}

    @app.get("/labels", summary="the label set, multi-label flag and thresholds")
    async def labels(request: Request):
        denied = unauthorized(request)
        if denied:
            return denied
        return {"labels": runtime.labels, "multilabel": runtime.multilabel,
                "thresholds": [float(t) for t in runtime.thresholds] if runtime.multilabel else None}

    @app.get("/metrics", summary="request counts, batch sizes, latency percentiles (ms)")
    async def get_metrics(request: Request):
        denied = unauthorized(request)
        if denied:
            return denied
        return metrics.snapshot(batcher.queue.qsize())

    @app.post("/predict", summary="labels and scores for one text or a list", response_model=PredictResponse,
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": PredictRequest.model_json_schema()}}}},
              responses={400: {"description": "malformed JSON"}, 401: {"description": "missing or wrong token"},
                         413: {"description": "body, text count or text length over the limits"},
                         422: {"description": "missing, empty or non-string texts"},
                         503: {"description": "the queue is full; retry later"}})
    async def predict(request: Request):
        started = time.perf_counter()
        denied = unauthorized(request)
        if denied:
            return denied
        try:
            texts, pairs, top_k = parse_request(await read_body(request, cfg.max_body_bytes), cfg)
        except BadRequest as e:
            return error(e.status, e.message)
        loop = asyncio.get_running_loop()
        job = Job(texts, pairs, top_k, loop.create_future(), loop)
        if not batcher.submit(job):
            return error(503, f"the server is busy: {cfg.queue_size} requests are waiting (--queue-size); retry later",
                         headers={"Retry-After": "1"})
        try:
            predictions = await job.future
        except Exception as e:  # noqa: BLE001 - a failed batch answers its requests, the server goes on
            return error(500, f"prediction failed: {type(e).__name__}: {e}")
        with metrics.lock:
            metrics.requests[200] += 1
            metrics.latencies_ms.append(1000 * (time.perf_counter() - started))
        # serialized here: a returned dict would be validated again against response_model (which documents the
        # answer in /docs): 0.11 ms against 0.014 ms per answer on the 2-core test machine
        return Response(json.dumps({"predictions": predictions, "model": runtime.kind}, ensure_ascii=False),
                        media_type="application/json")

    return app


def build(cfg: ServeConfig) -> tuple[ServeConfig, FastAPI]:
    """The app `serve` runs: the model loaded by the one classifier runtime, with the options resolved."""
    from domainlm.classify.runtime import load

    if cfg.token is not None and not cfg.token.strip():
        raise DomainLMError("--token is empty, which would serve without authentication; give a token, or leave "
                            "--token out to serve without one")
    if not cfg.token and os.environ.get("DOMAINLM_SERVE_TOKEN"):  # keeps the token out of `ps`
        cfg = dataclasses.replace(cfg, token=os.environ["DOMAINLM_SERVE_TOKEN"])
    runtime = load(cfg.model, cfg.precision, cfg.device, cfg.threads, cfg.max_seq_len)
    return cfg, create_app(runtime, cfg)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    cfg, app = build(cfg)
    runtime = app.state.runtime
    print(f"serving {cfg.model} ({runtime.kind}, {len(runtime.labels)} labels) on http://{cfg.host}:{cfg.port} "
          f"(docs: /docs; batching {'on' if cfg.batching else 'off'})", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)
