"""The KServe v2 / Open Inference Protocol (REST, JSON tensors), as Triton, KServe and Seldon speak it and
`tritonclient.http` calls it.

The model takes one input, `text` (BYTES): shape [n] or [n, 1] for n texts, [n, 2] for n (text, text pair) rows,
its data the texts as a flat list in row order. It answers up to three outputs (all, unless `outputs` names some):
`label` (BYTES [n]: the chosen label; a multi-label model's chosen labels joined by commas), `probabilities`
(FP32 [n, labels], in the order of the label set) and `chosen` (BOOL [n, labels]). Outputs are JSON: a request for
binary output (Triton's binary extension) is answered in JSON too, which tritonclient reads alike.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from domainlm.classify.runtime import ClassifierRuntime
from domainlm.serve.config import ServeConfig
from domainlm.serve.requests import BadRequest, Query, _texts

OUTPUTS = ("label", "probabilities", "chosen")


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="labels: the label set, in the order of the probabilities")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["label", "probabilities", "chosen"]
    parameters: dict[str, Any] | None = None


class OutputTensor(BaseModel):
    name: str
    datatype: Literal["BYTES", "FP32", "BOOL"]
    shape: list[int]
    data: list[str] | list[float] | list[bool]


class InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[OutputTensor]


def infer_request_model(cfg: ServeConfig) -> type[BaseModel]:
    """The v2 inference request, with the limits of `cfg` stated in its schema (the data's count follows the
    shape; each text at most --max-chars). Counts and lengths are checked by `parse_infer`, with the --flag named."""
    text = {"type": "string", "minLength": 1, "maxLength": cfg.max_chars, "pattern": r"\S"}
    shapes = []
    for n in range(1, cfg.max_texts + 1):  # JSON Schema cannot multiply: each row count is one case
        shapes.append({"properties": {"shape": {"enum": [[n], [n, 1]]}, "data": {"minItems": n, "maxItems": n}}})
        shapes.append({"properties": {"shape": {"enum": [[n, 2]]}, "data": {"minItems": 2 * n, "maxItems": 2 * n}}})

    class TextTensor(BaseModel):
        """The texts: shape [n] or [n, 1], or [n, 2] for (text, text pair) rows; data flat, in row order."""

        model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": shapes})
        name: Literal["text"]
        datatype: Literal["BYTES"]
        shape: Annotated[list[int], Field(min_length=1, max_length=2)]
        parameters: dict[str, Any] | None = None
        data: Annotated[
            list[str], WithJsonSchema({"type": "array", "items": text, "minItems": 1, "maxItems": 2 * cfg.max_texts})
        ]

    class InferRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        id: str | None = None
        parameters: dict[str, Any] | None = None
        inputs: Annotated[list[TextTensor], Field(min_length=1, max_length=1)]
        outputs: list[RequestedOutput] | None = None

    return InferRequest


def one_line(error: ValidationError) -> str:
    """The first problem pydantic found, as `where: what`."""
    first = error.errors()[0]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "the body"
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def parse_infer(payload, model: type[BaseModel], cfg: ServeConfig) -> tuple[Query, list[str], str | None]:
    """(the texts as a query, the outputs to answer, the request's id) of a v2 inference request."""
    if not isinstance(payload, dict):
        raise BadRequest(422, 'the body must be a JSON object such as {"inputs": [{"name": "text", ...}]}')
    try:
        request = model.model_validate(payload)
    except ValidationError as e:
        raise BadRequest(422, one_line(e)) from None
    tensor = request.inputs[0]
    shape = tensor.shape
    if shape[0] < 1 or (len(shape) == 2 and shape[1] not in (1, 2)):
        raise BadRequest(
            422, f"inputs[0].shape {shape}: give [n] or [n, 1] for n texts, [n, 2] for n (text, text pair) rows"
        )
    rows, cols = shape[0], shape[1] if len(shape) == 2 else 1
    if rows > cfg.max_texts:
        raise BadRequest(413, f"inputs[0] has {rows} texts; at most {cfg.max_texts} per request (--max-texts)")
    if len(tensor.data) != rows * cols:
        raise BadRequest(422, f"inputs[0].data has {len(tensor.data)} items but its shape {shape} holds {rows * cols}")
    texts = _texts(tensor.data[::cols], "inputs[0].data", cfg)
    pairs = _texts(tensor.data[1::cols], "inputs[0].data (text pairs)", cfg) if cols == 2 else None
    wanted = [o.name for o in request.outputs] if request.outputs else list(OUTPUTS)
    return Query(texts, pairs, None), list(dict.fromkeys(wanted)), request.id


def model_metadata(name: str, runtime: ClassifierRuntime) -> dict:
    n = len(runtime.labels)
    return {
        "name": name,
        "platform": f"domainlm-{runtime.kind}",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1, 2] if runtime.pair_column else [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, n]},
            {"name": "chosen", "datatype": "BOOL", "shape": [-1, n]},
        ],
        "parameters": {"labels": runtime.labels, "multilabel": runtime.multilabel},
    }


def infer_response(
    name: str, runtime: ClassifierRuntime, probs: np.ndarray, wanted: list[str], request_id: str | None
) -> dict:
    n, width = probs.shape
    chosen = [set(row) for row in runtime.choose(probs)]
    tensors = {
        "label": {
            "datatype": "BYTES",
            "shape": [n],
            "data": [",".join(runtime.labels[j] for j in sorted(row)) for row in chosen],
        },
        "probabilities": {"datatype": "FP32", "shape": [n, width], "data": probs.astype(float).ravel().tolist()},
        "chosen": {"datatype": "BOOL", "shape": [n, width], "data": [j in row for row in chosen for j in range(width)]},
    }
    answer: dict = {"model_name": name}
    if request_id is not None:
        answer["id"] = request_id
    answer["outputs"] = [{"name": k, **tensors[k]} for k in wanted]
    return answer
