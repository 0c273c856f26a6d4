"""`domainlm serve MODEL`: an HTTP API over a classifier (PyTorch, an ONNX export or the linear floor: whatever
classify.runtime opens) with dynamic batching, in three protocols behind one queue (serve.batching):
- its own JSON: POST /predict {"text": ..., "text_pair": ..., "top_k": ...};
- Hugging Face's: POST / and POST /predict {"inputs": ..., "parameters": {...}, "truncate": ...}, answered as
  text-embeddings-inference (/predict) and Inference Endpoints (/, what huggingface_hub's InferenceClient calls) do;
- KServe v2 / Open Inference Protocol: /v2, /v2/health/*, /v2/models/{name}[/ready|/infer] (serve.kserve).
GET /metrics is in the Prometheus text format, GET /metrics.json the same counts as JSON (serve.metrics).

Requests are checked (content type, size, JSON, fields, limits) in the event loop and answered there; the model
runs on the batcher's threads. With --token, every route but the health probes needs `Authorization: Bearer TOKEN`
(one FastAPI dependency). Every status a route answers is declared in the OpenAPI schema, with the limits in force.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hmac
import json
import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from domainlm.classify.metrics import best_k
from domainlm.classify.runtime import ClassifierRuntime, Runtime, RuntimeOptions, open_runtime
from domainlm.classify.runtime_options import int8_note
from domainlm.errors import DomainLMError
from domainlm.serve import kserve
from domainlm.serve.batching import Batcher, Job
from domainlm.serve.config import ServeConfig
from domainlm.serve.metrics import CountRequests, ServerMetrics
from domainlm.serve.requests import (
    BadRequest,
    ErrorBody,
    LabelScore,
    PredictResponse,
    Query,
    check_content_type,
    inline_schema,
    parse_request,
    read_body,
    request_models,
)

ERRORS = {
    400: "malformed JSON, or the client went away",
    401: "missing or wrong token",
    404: "no model of that name",
    413: "body, text count, text length or tokens over the limits",
    415: "the body is not sent as application/json",
    422: "a field is missing, of the wrong type or empty",
    500: "the model failed on this batch",
    503: "the queue is full (retry after a second), or the worker stopped",
}


class Health(BaseModel):
    status: str
    model: str
    labels: int
    queued: int


class Labels(BaseModel):
    labels: list[str]
    multilabel: bool
    thresholds: list[float] | None


def errors(*codes: int) -> dict:
    return {code: {"model": ErrorBody, "description": ERRORS[code]} for code in codes}


def json_answer(body, status: int = 200) -> Response:
    # serialized here: a returned dict would be validated again against a response model (which documents the
    # answer in /docs): 0.11 ms against 0.014 ms per answer on a 2-core machine
    return Response(json.dumps(body, ensure_ascii=False), status_code=status, media_type="application/json")


def token_dependency(token: str):
    """The one check of `Authorization: Bearer TOKEN`, as a FastAPI dependency (declared in the OpenAPI schema)."""
    scheme = HTTPBearer(auto_error=False, description="the --token of `domainlm serve` (or DOMAINLM_SERVE_TOKEN)")
    expected = token.encode()

    async def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:  # noqa: B008
        given = credentials.credentials.encode() if credentials is not None else b""
        if credentials is None or not hmac.compare_digest(given, expected):
            raise HTTPException(
                401,
                "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def hf_answer(runtime: ClassifierRuntime, probs, top_k: int | None) -> list[list[dict]]:
    """Per text, the labels with their scores, best first (the k best with top_k)."""
    best = best_k(probs, top_k or len(runtime.labels))
    return [
        [{"label": runtime.labels[j], "score": round(float(p[j]), 6)} for j in order] for p, order in zip(probs, best)
    ]


def create_app(runtime: ClassifierRuntime, cfg: ServeConfig) -> FastAPI:
    name = cfg.name or Path(cfg.model).name or "model"
    batcher = Batcher(runtime, cfg)
    options = runtime.options
    metrics = ServerMetrics(
        batcher.queue.qsize,
        {
            "name": name,
            "kind": runtime.kind,
            "labels": str(len(runtime.labels)),
            "device": options.device,
            "precision": options.precision,
            "max_seq_len": str(options.max_seq_len),
        },
    )
    batcher.metrics = metrics
    auth = [Depends(token_dependency(cfg.token))] if cfg.token else []
    denied = (401,) if cfg.token else ()
    domain_body, hf_body = request_models(cfg, runtime.activation_name)
    body_schema = {"anyOf": [inline_schema(domain_body), inline_schema(hf_body)]}
    infer_model = kserve.infer_request_model(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(
        title="domainlm classifier",
        version="1",
        lifespan=lifespan,
        description=f"{runtime.kind} classifier with {len(runtime.labels)} labels"
        f"{' (multi-label)' if runtime.multilabel else ''}, served as `{name}`. "
        "Protocols: this server's JSON and Hugging Face's (POST /predict, POST /), KServe v2 "
        "(/v2/...). Metrics: /metrics (Prometheus), /metrics.json."
        + (" Send `Authorization: Bearer TOKEN`." if cfg.token else ""),
    )
    app.state.metrics, app.state.batcher, app.state.runtime, app.state.name = metrics, batcher, runtime, name
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=cfg.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(CountRequests, metrics=metrics)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 405:  # every method of the path, not only those of the first route matching it
            allowed = allowed_methods(app, request.url.path)
            return error(
                405,
                f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        if exc.status_code == 404:
            return error(404, f"no route {request.method} {request.url.path} (see /docs)")
        return error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        return error(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}")

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:  # the last line of defence
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    async def infer(query: Query):
        """The query's probabilities [texts, labels], through the one queue."""
        loop = asyncio.get_running_loop()
        job = Job(query.texts, query.pairs, query.strict, loop.create_future(), loop)
        if not batcher.submit(job):
            raise BadRequest(
                503, f"the server is busy: {cfg.queue_size} requests are waiting (--queue-size); retry later"
            )
        try:
            return await job.future
        except BadRequest:
            raise
        except Exception as e:  # noqa: BLE001 - a failed batch answers its requests, the server goes on
            raise BadRequest(500, f"prediction failed: {type(e).__name__}: {e}") from None

    def refused(e: BadRequest) -> JSONResponse:
        return error(e.status, e.message, headers={"Retry-After": "1"} if e.status == 503 else None)

    async def classify(request: Request, per_input: bool) -> Response:
        """Either body; a Hugging Face body is answered one list per input (`per_input`, what Inference Endpoints
        and huggingface_hub expect) or as text-embeddings-inference does (one list for a single string)."""
        try:
            check_content_type(request)
            query = parse_request(await read_body(request, cfg.body_limit()), cfg, runtime.activation_name)
            probs = await infer(query)
        except BadRequest as e:
            return refused(e)
        if not query.hf:
            return json_answer({"predictions": runtime.decide(probs, query.top_k), "model": runtime.kind})
        rows = hf_answer(runtime, probs, query.top_k)
        return json_answer(rows[0] if query.single and not per_input else rows)

    hf_one = {"type": "array", "items": LabelScore.model_json_schema()}
    hf_many = {"type": "array", "items": hf_one}
    own = inline_schema(PredictResponse)
    post_errors = errors(400, *denied, 413, 415, 422, 500, 503)
    request_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}}}

    @app.post(
        "/predict",
        summary="labels and scores of one text or a list (this server's or the HF body)",
        dependencies=auth,
        openapi_extra=request_body,
        response_class=Response,
        responses={
            200: {
                "description": "this server's answer, or text-embeddings-inference's (one list of labels "
                "and scores for a string, one per input for a list)",
                "content": {"application/json": {"schema": {"anyOf": [own, hf_one, hf_many]}}},
            },
            **post_errors,
        },
    )
    async def predict(request: Request):
        return await classify(request, per_input=False)

    @app.post(
        "/",
        summary="the Hugging Face Inference Endpoints route (huggingface_hub's InferenceClient)",
        dependencies=auth,
        openapi_extra=request_body,
        response_class=Response,
        responses={
            200: {
                "description": "one list of labels and scores per input (or this server's answer)",
                "content": {"application/json": {"schema": {"anyOf": [own, hf_many]}}},
            },
            **post_errors,
        },
    )
    async def root(request: Request):
        return await classify(request, per_input=True)

    @app.get("/health", summary="liveness: the model is loaded and the worker runs", response_model=Health)
    async def health():
        return {
            "status": "ok" if batcher.alive else "worker stopped",
            "model": runtime.kind,
            "labels": len(runtime.labels),
            "queued": batcher.queue.qsize(),
        }

    @app.get(
        "/labels",
        summary="the label set, multi-label flag and thresholds",
        dependencies=auth,
        response_model=Labels,
        responses=errors(*denied),
    )
    async def labels():
        return {
            "labels": runtime.labels,
            "multilabel": runtime.multilabel,
            "thresholds": [float(t) for t in runtime.thresholds] if runtime.multilabel else None,
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text format)",
        dependencies=auth,
        response_class=Response,
        responses={
            200: {
                "description": "the Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            **errors(*denied),
        },
    )
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/metrics.json",
        summary="request counts, batch sizes, latency percentiles (ms) as JSON",
        dependencies=auth,
        responses=errors(*denied),
    )
    async def metrics_json() -> dict:
        return metrics.snapshot()

    add_v2_routes(app, runtime, name, auth, denied, infer, refused, infer_model, batcher)
    return app


def add_v2_routes(
    app: FastAPI,
    runtime: ClassifierRuntime,
    served: str,
    auth: list,
    denied: tuple,
    infer,
    refused,
    infer_model,
    batcher: Batcher,
) -> None:
    """KServe v2 / Open Inference Protocol routes (REST): health, metadata, readiness, inference."""
    cfg: ServeConfig = batcher.cfg
    empty = {"description": "yes (an empty body)", "content": {}}

    def known(model: str) -> None:
        if model != served:
            raise BadRequest(404, f"no model {model!r}: this server serves {served!r} (/v2/models/{served})")

    @app.get(
        "/v2",
        summary="v2 server metadata",
        response_model=kserve.ServerMetadata,
        dependencies=auth,
        responses=errors(*denied),
        tags=["KServe v2"],
    )
    async def v2_server():
        from domainlm import __version__

        return {"name": "domainlm", "version": __version__, "extensions": []}

    @app.get(
        "/v2/health/live", summary="v2 liveness", response_class=Response, responses={200: empty}, tags=["KServe v2"]
    )
    async def v2_live():
        return Response(status_code=200)

    @app.get(
        "/v2/health/ready",
        summary="v2 readiness",
        response_class=Response,
        responses={200: empty, **errors(503)},
        tags=["KServe v2"],
    )
    async def v2_ready():
        if not batcher.alive:
            return JSONResponse({"error": "the worker stopped"}, status_code=503)
        return Response(status_code=200)

    @app.get(
        "/v2/models/{name}",
        summary="v2 model metadata: inputs, outputs, labels",
        dependencies=auth,
        response_model=kserve.ModelMetadata,
        responses=errors(*denied, 404),
        tags=["KServe v2"],
    )
    async def v2_model(name: str):
        try:
            known(name)
        except BadRequest as e:
            return refused(e)
        return kserve.model_metadata(name, runtime)

    @app.get(
        "/v2/models/{name}/ready",
        summary="v2 model readiness",
        response_class=Response,
        responses={200: empty, **errors(404, 503)},
        tags=["KServe v2"],
    )
    async def v2_model_ready(name: str):
        try:
            known(name)
        except BadRequest as e:
            return refused(e)
        if not batcher.alive:
            return JSONResponse({"error": "the worker stopped"}, status_code=503)
        return Response(status_code=200)

    @app.post(
        "/v2/models/{name}/infer",
        summary="v2 inference: texts in (BYTES), labels and probabilities out",
        dependencies=auth,
        response_class=Response,
        tags=["KServe v2"],
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(infer_model)}}}
        },
        responses={
            200: {
                "description": "the outputs asked for (all by default)",
                "content": {"application/json": {"schema": inline_schema(kserve.InferResponse)}},
            },
            **errors(400, *denied, 404, 413, 415, 422, 500, 503),
        },
    )
    async def v2_infer(request: Request, name: str):
        try:
            known(name)
            check_content_type(request)
            if request.headers.get("inference-header-content-length") is not None:
                raise BadRequest(
                    415,
                    "binary tensor data is not taken here; send the texts as JSON "
                    "(tritonclient: set_data_from_numpy(..., binary_data=False))",
                )
            body = await read_body(request, cfg.body_limit())
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise BadRequest(400, f"the body is not valid JSON: {e}") from None
            query, wanted, request_id = kserve.parse_infer(payload, infer_model, cfg)
            probs = await infer(query)
        except BadRequest as e:
            return refused(e)
        return json_answer(kserve.infer_response(name, runtime, probs, wanted, request_id))


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of every route whose path matches (the Allow header of a 405)."""
    found: set[str] = set()
    for route in app.routes:
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and methods and regex.match(path):
            found |= set(methods)
    return sorted(found)


# ---- the command ------------------------------------------------------------------------------------------------


def resolve_token(cfg: ServeConfig) -> ServeConfig:
    """--token, else DOMAINLM_SERVE_TOKEN (which keeps it out of `ps`); an empty one of either is refused, since
    it would serve without authentication."""
    if cfg.token is not None and not cfg.token.strip():
        raise DomainLMError(
            "--token is empty, which would serve without authentication; give a token, or leave "
            "--token out to serve without one"
        )
    env = os.environ.get("DOMAINLM_SERVE_TOKEN")
    if cfg.token is None and env is not None:
        if not env.strip():
            raise DomainLMError(
                "DOMAINLM_SERVE_TOKEN is set but empty, which would serve without authentication; "
                "put a token in it, or unset it to serve without one"
            )
        cfg = dataclasses.replace(cfg, token=env)
    return cfg


def build(cfg: ServeConfig) -> tuple[ServeConfig, FastAPI]:
    """The app `serve` runs: the model opened by the one classifier runtime, its options resolved once."""
    cfg = resolve_token(cfg)
    if cfg.name and ("/" in cfg.name or not cfg.name.strip()):
        raise DomainLMError(f"--name {cfg.name!r}: a model name is one path segment (no '/', not blank)")
    runtime = open_runtime(cfg.model, RuntimeOptions.of(cfg))
    cfg = dataclasses.replace(cfg, name=cfg.name or Path(cfg.model).resolve().name)
    return cfg, create_app(runtime, cfg)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not (a port in use, an address not of this machine)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise DomainLMError(f"--host {host}: not an address to listen on ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise DomainLMError(
                f"--port {port} is in use on {host}; stop what listens there or choose another "
                "--port (0: any free port)"
            ) from None
        raise DomainLMError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def start_line(cfg: ServeConfig, runtime: ClassifierRuntime, port: int) -> str:
    options = runtime.options
    if not isinstance(runtime, Runtime):
        options = options.replace(max_seq_len=0)  # no tokens: no length to state
    details = [f"{runtime.kind}, {len(runtime.labels)} labels", options.describe()]
    note = int8_note(runtime.kind, options.device)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    return (
        f"serving {cfg.model} as {cfg.name!r} ({'; '.join(details + ([note] if note else []))}) on "
        f"http://{host}:{port} (docs: /docs; batching {'on' if cfg.batching else 'off'})"
    )


def serve(cfg: ServeConfig) -> None:
    """Bind first (a port in use is one line, before the model loads), then load, then say where it serves."""
    import uvicorn

    cfg = resolve_token(cfg)
    sock = bind(cfg.host, cfg.port)
    try:
        cfg, app = build(cfg)
        print(start_line(cfg, app.state.runtime, sock.getsockname()[1]), flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
    finally:
        sock.close()
