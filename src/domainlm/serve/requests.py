"""The bodies of POST /predict and POST /: this server's own (`text`, `text_pair`, `top_k`) and the Hugging Face one
(`inputs`, `parameters`, `truncate`: text-embeddings-inference, Inference Endpoints, `huggingface_hub`).

`request_models` builds their pydantic models from the limits in force, so that the OpenAPI schema states every
limit the server checks (texts per request, characters per text, top_k, text pairs as many as texts). The checks
themselves are written out in `parse_request`, so that each error names the field and the --flag it breaks; the
schema tests (schemathesis) hold the two to the same rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from domainlm.serve.config import ServeConfig

JSON_TYPES = ("application/json",)  # and any application/*+json


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Query:
    """A checked request: its texts (and pairs), and how to answer it."""

    texts: list[str]
    pairs: list[str] | None
    top_k: int | None  # None: every label (the Hugging Face answer)
    strict: bool = False  # "truncate": false: a text over the model's length is refused, not cut
    hf: bool = False  # an `inputs` body, answered as Hugging Face servers answer
    single: bool = False  # `inputs` was one string (text-embeddings-inference answers one list, not a list of lists)


# ---- schemas ----------------------------------------------------------------------------------------------------


class LabelScore(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    labels: list[str] = Field(description="the chosen label (multi-class) or every label at or over its threshold")
    scores: dict[str, float] = Field(description="probabilities of the chosen labels")
    top_k: list[LabelScore] = Field(description="the k best labels, best first")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model: str


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, in one line")


def request_models(cfg: ServeConfig, activation: str) -> tuple[type[BaseModel], type[BaseModel]]:
    """(this server's body, the Hugging Face body) with the limits of `cfg`; `activation` is the model's own
    function_to_apply (softmax, or sigmoid for a multi-label model)."""
    # a text: a non-space character, at most --max-chars characters; 1 to --max-texts texts per request
    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_chars, pattern=r"\S")]
    Texts = Annotated[list[Text], Field(min_length=1, max_length=cfg.max_texts)]
    Positive = Annotated[int, Field(ge=1)]
    Singles = Annotated[
        list[Annotated[list[Text], Field(min_length=1, max_length=1)]],  # [[text], ...]
        Field(min_length=1, max_length=cfg.max_texts),
    ]
    Pairs = Annotated[
        list[Annotated[list[Text], Field(min_length=2, max_length=2)]],  # [[text, text_pair], ...]
        Field(min_length=1, max_length=cfg.max_texts),
    ]

    class PredictRequest(BaseModel):
        """One text or a list; for pair tasks as many text pairs as texts."""

        model_config = ConfigDict(extra="forbid", json_schema_extra=_pairs_match(cfg.max_texts))
        text: Text | Texts = Field(
            description=f"one text, or a list of 1 to {cfg.max_texts} (--max-texts); each "
            f"at most {cfg.max_chars} characters (--max-chars)",
            examples=["酒店的服务非常好"],
        )
        text_pair: Text | Texts | None = Field(None, description="second text(s) for pair tasks, as many as texts")
        top_k: Positive | None = Field(None, description=f"how many best labels to list (default {cfg.top_k})")

    class HFParameters(BaseModel):
        model_config = ConfigDict(extra="forbid")
        top_k: Positive | None = Field(None, description="list only the k best labels (default: every label)")
        function_to_apply: Literal[activation] | None = Field(  # type: ignore[valid-type]
            None, description=f"the model's own: {activation} (the scores are its probabilities)"
        )

    class HFRequest(BaseModel):
        """The Hugging Face body: `inputs` one text, a list of texts, or a list of [text] / [text, text_pair]."""

        model_config = ConfigDict(extra="forbid")
        inputs: Text | Texts | Singles | Pairs = Field(
            description=f"1 to {cfg.max_texts} texts (--max-texts), each at most {cfg.max_chars} characters",
            examples=["酒店的服务非常好"],
        )
        parameters: HFParameters | None = None
        truncate: bool | None = Field(
            None, description="false: a text over the model's length is refused (413) instead of cut (default: cut)"
        )

    return PredictRequest, HFRequest


def _pairs_match(max_texts: int):
    """JSON Schema cannot say "as many text pairs as texts"; it can list the cases: no pair, one text and one pair
    (a string or a list of one), or two lists of n items for each n the limit allows."""

    def extra(schema: dict) -> None:
        one = {"anyOf": [{"type": "string"}, {"type": "array", "maxItems": 1}]}
        cases = [{"properties": {"text_pair": {"type": "null"}}}, {"properties": {"text": one, "text_pair": one}}]
        cases += [
            {
                "properties": {
                    "text": {"type": "array", "minItems": n, "maxItems": n},
                    "text_pair": {"type": "array", "minItems": n, "maxItems": n},
                }
            }
            for n in range(2, max_texts + 1)
        ]
        schema["anyOf"] = cases

    return extra


def inline_schema(model: type[BaseModel]) -> dict:
    """A model's JSON Schema with its definitions written in place (a schema put into the OpenAPI document by hand
    cannot point into its own $defs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# ---- checks -----------------------------------------------------------------------------------------------------


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
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(422, f"{where} is not valid Unicode (it holds a lone surrogate \\u escape)") from None
    return items


def _top_k(value, name: str = "top_k") -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # 3.0 is an integer to JSON Schema
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(422, f"'{name}' must be a positive integer, not {value!r}")
    return value


def parse_request(body: bytes, cfg: ServeConfig, activation: str = "softmax") -> Query:
    """A checked request of either body, or BadRequest naming what is wrong."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:  # Python's parser stops at its recursion limit
        raise BadRequest(400, 'the body nests JSON too deeply; send {"text": ...}') from None
    if not isinstance(payload, dict):
        raise BadRequest(422, 'the body must be a JSON object such as {"text": "..."} or {"inputs": "..."}')
    if "inputs" in payload:
        return _hf_request(payload, cfg, activation)
    unknown = sorted(set(payload) - {"text", "text_pair", "top_k"})
    if unknown:
        raise BadRequest(
            422,
            f"unknown field(s) {', '.join(unknown)}; expected text, text_pair, top_k (or the "
            "Hugging Face body: inputs, parameters, truncate)",
        )
    if "text" not in payload:
        raise BadRequest(422, "'text' is required: one string or a list of strings")
    texts = _texts(payload["text"], "text", cfg)
    pairs = None
    if payload.get("text_pair") is not None:
        pairs = _texts(payload["text_pair"], "text_pair", cfg)
        if len(pairs) != len(texts):
            raise BadRequest(422, f"'text_pair' has {len(pairs)} texts but 'text' has {len(texts)}")
    top_k = _top_k(payload.get("top_k"))
    return Query(texts, pairs, cfg.top_k if top_k is None else top_k)


def _hf_request(payload: dict, cfg: ServeConfig, activation: str) -> Query:
    unknown = sorted(set(payload) - {"inputs", "parameters", "truncate"})
    if unknown:
        raise BadRequest(
            422, f"unknown field(s) {', '.join(unknown)}; the Hugging Face body has inputs, parameters, truncate"
        )
    inputs = payload["inputs"]
    pairs = None
    if isinstance(inputs, list) and inputs and all(isinstance(x, list) for x in inputs):
        if len(inputs) > cfg.max_texts:
            raise BadRequest(
                413, f"'inputs' has {len(inputs)} texts; at most {cfg.max_texts} per request (--max-texts)"
            )
        sizes = {len(x) for x in inputs}
        if not sizes <= {1, 2} or len(sizes) > 1:
            raise BadRequest(
                422, "'inputs' as a list of lists takes [text] or [text, text_pair] items, all of one kind"
            )
        texts = [_texts(x[0], f"inputs[{i}][0]", cfg)[0] for i, x in enumerate(inputs)]
        if sizes == {2}:
            pairs = [_texts(x[1], f"inputs[{i}][1]", cfg)[0] for i, x in enumerate(inputs)]
    elif isinstance(inputs, (str, list)):
        texts = _texts(inputs, "inputs", cfg)
    else:
        raise BadRequest(
            422,
            f"'inputs' must be a string, a list of strings, or a list of [text, text_pair] lists, "
            f"not {type(inputs).__name__}",
        )
    parameters = payload.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise BadRequest(422, f"'parameters' must be an object, not {type(parameters).__name__}")
    unknown = sorted(set(parameters) - {"top_k", "function_to_apply"})
    if unknown:
        raise BadRequest(422, f"unknown parameter(s) {', '.join(unknown)}; expected top_k, function_to_apply")
    function = parameters.get("function_to_apply")
    if function is not None and function != activation:
        raise BadRequest(
            422,
            f"'function_to_apply' {function!r}: this model's scores are its {activation} "
            f"probabilities; send {activation!r} or leave it out",
        )
    truncate = payload.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise BadRequest(422, f"'truncate' must be true or false, not {truncate!r}")
    return Query(
        texts,
        pairs,
        _top_k(parameters.get("top_k"), "parameters.top_k"),
        strict=truncate is False,
        hf=True,
        single=isinstance(inputs, str),
    )


def check_content_type(request: Request) -> None:
    """JSON bodies only: a body sent as another media type is 415 (a missing Content-Type is taken for JSON)."""
    given = request.headers.get("content-type")
    if given is None:
        return
    media = given.split(";", 1)[0].strip().lower()
    if media not in JSON_TYPES and not (media.startswith("application/") and media.endswith("+json")):
        raise BadRequest(
            415,
            f"the body is sent as {media or 'an empty media type'}; send it as application/json "
            "(Content-Type: application/json)",
        )


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
