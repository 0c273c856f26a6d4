"""The requests of `domainlm serve`: their schema (documented in the OpenAPI page) and their checks, done by hand
so that each error names the field and the limit (the --flag) it breaks."""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, Field

from domainlm.serve.config import ServeConfig


class PredictRequest(BaseModel):
    """The body of POST /predict (documented in the OpenAPI schema; checked by hand for clear messages)."""

    text: str | list[str] = Field(description="one text, or a list of texts", examples=["酒店的服务非常好"])
    text_pair: str | list[str] | None = Field(None, description="second text(s) for pair tasks, as many as texts")
    top_k: int | None = Field(None, ge=1, description="how many best labels to list with their scores")


class Prediction(BaseModel):
    labels: list[str] = Field(description="the chosen label (multi-class) or every label over its threshold")
    scores: dict[str, float] = Field(description="probabilities of the chosen labels")
    top_k: list[dict] = Field(description="the k best labels: [{label, score}]")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: str


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _texts(value, name: str, cfg: ServeConfig) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise BadRequest(422, f"'{name}' must be a string or a list of strings, not {type(value).__name__}")
    if not items:
        raise BadRequest(422, f"'{name}' is an empty list")
    if len(items) > cfg.max_texts:
        raise BadRequest(413, f"'{name}' has {len(items)} texts; at most {cfg.max_texts} per request (--max-texts)")
    for i, t in enumerate(items):
        where = name if isinstance(value, str) else f"{name}[{i}]"
        if not isinstance(t, str):
            raise BadRequest(422, f"{where} must be a string, not {type(t).__name__}")
        if not t.strip():
            raise BadRequest(422, f"{where} is empty")
        if len(t) > cfg.max_chars:
            raise BadRequest(413, f"{where} has {len(t)} characters; at most {cfg.max_chars} (--max-chars)")
    return items


def parse_request(body: bytes, cfg: ServeConfig) -> tuple[list[str], list[str] | None, int]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # Python's parser stops at its recursion limit
        raise BadRequest(400, "the body nests JSON too deeply; send {\"text\": ...}") from None
    if not isinstance(payload, dict):
        raise BadRequest(422, 'the body must be a JSON object such as {"text": "..."}')
    unknown = sorted(set(payload) - set(PredictRequest.model_fields))
    if unknown:
        raise BadRequest(422, f"unknown field(s) {', '.join(unknown)}; expected text, text_pair, top_k")
    if "text" not in payload:
        raise BadRequest(422, "'text' is required: one string or a list of strings")
    texts = _texts(payload["text"], "text", cfg)
    pairs = None
    if payload.get("text_pair") is not None:
        pairs = _texts(payload["text_pair"], "text_pair", cfg)
        if len(pairs) != len(texts):
            raise BadRequest(422, f"'text_pair' has {len(pairs)} texts but 'text' has {len(texts)}")
    top_k = payload.get("top_k", cfg.top_k)
    if top_k is None:
        top_k = cfg.top_k
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadRequest(422, f"'top_k' must be a positive integer, not {top_k!r}")
    return texts, pairs, top_k


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"the body has {declared} bytes; at most {limit} (--max-body-bytes)")
    chunks, size = [], 0
    from starlette.requests import ClientDisconnect

    try:
        async for chunk in request.stream():  # also bounds bodies sent without a length
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"the body is over {limit} bytes (--max-body-bytes)")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody to answer; counted, not logged as a crash
        raise BadRequest(400, "the client disconnected before the whole body arrived") from None
    return b"".join(chunks)
