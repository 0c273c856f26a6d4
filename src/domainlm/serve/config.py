"""`domainlm export` and `domainlm serve` options (free of heavy imports, so that `--help` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from domainlm.classify.config import DEVICE_HELP
from domainlm.config import option
from domainlm.options import InferencePrecision


@dataclass(kw_only=True)
class ExportConfig:
    model: str = option(
        help="classifier to export: a `domainlm finetune` output (or its model/ folder), or an HF "
        "sequence classifier folder (also given as the first argument)"
    )
    out: str = option(help="export folder: model.onnx (+ model.int8.onnx), tokenizer, labels, export.json")
    overwrite: bool = option(False, "replace an earlier export in --out (it is kept until the new one is verified)")
    format: Literal["onnx"] = option("onnx", "export format")
    quantize: Literal["none", "int8"] = option("none", "also write a dynamically quantized int8 model (ONNX Runtime)")
    data: str | None = option(
        None, "labelled .csv/.tsv/.jsonl: accuracy and F1 of fp32 and int8, stored in export.json"
    )
    text_column: str | None = option(None, "column with the text (--data; default: the model's, else text)")
    pair_column: str | None = option(None, "column with a second text (--data; default: the model's, if any)")
    label_column: str = option("label", "column with the label(s) (--data)")
    label_delimiter: str = option(",", "separator of several labels in one cell (--data)")
    opset: int = option(17, "ONNX opset", low=14, high=20)
    optimize: bool = option(True, "fuse attention, LayerNorm and GELU with ONNX Runtime's transformer optimizer")
    tolerance: float = option(
        1e-4, "largest allowed |ONNX Runtime - PyTorch| probability difference (fp32)", low=0, low_open=True
    )
    int8_tolerance: float = option(
        0.1, "largest allowed probability difference of the int8 model", low=0, low_open=True
    )
    max_seq_len: int = option(
        0,
        "tokens per text when checking --data, and the default of predict/serve (0: the "
        "length the classifier was trained at)",
        low=0,
    )
    batch_size: int = option(32, "texts per batch when checking --data", low=1)


@dataclass(kw_only=True)
class ServeConfig(InferencePrecision):
    model: str = option(
        help="a classifier folder (`domainlm finetune` output) or an export folder (`domainlm "
        "export`); also given as the first argument"
    )
    host: str = option("127.0.0.1", "interface to listen on (0.0.0.0 for every interface)")
    port: int = option(8080, "TCP port (0: any free port, printed at start)", low=0, high=65535)
    name: str = option("", "the model's name in the KServe v2 routes (/v2/models/NAME; default: the folder's name)")
    token: str | None = option(
        None, "require `Authorization: Bearer TOKEN` on every route but the health probes (or set DOMAINLM_SERVE_TOKEN)"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", DEVICE_HELP)
    threads: int = option(0, "intra-op threads of the model (0: every core this process may use)", low=0)
    batching: bool = option(True, "gather concurrent requests into one batch (--no-batching: one request at a time)")
    max_batch: int = option(
        0,
        "texts per model batch (0: the runtime's, 64 on a CPU, 512 on a GPU); batches also "
        "stay within the runtime's token budget",
        low=0,
    )
    max_wait_ms: float = option(5.0, "how long the first request of a batch waits for others", low=0, high=1000)
    queue_size: int = option(256, "requests waiting for the model before new ones get 503", low=1)
    max_texts: int = option(64, "texts per request", low=1)
    max_chars: int = option(2000, "characters per text", low=1)
    max_body_bytes: int = option(
        0,
        "request body size (0: room for --max-texts texts and text pairs of --max-chars "
        "characters each, every one written as a JSON \\u escape)",
        low=0,
    )
    max_seq_len: int = option(0, "tokens per text (0: the length saved with the model)", low=0)
    top_k: int = option(3, "default number of best labels with scores in each answer", low=1)
    cors_origins: list[str] = option([], "origins allowed by CORS (default: none, CORS off)")

    def body_limit(self) -> int:
        """--max-body-bytes, or (0) the largest body whose texts are all within the limits: a valid request is never
        refused for its size."""
        if self.max_body_bytes:
            return self.max_body_bytes
        # texts and their pairs at --max-chars, each character escaped as \uXXXX\uXXXX (12 bytes), and room for
        # the JSON around them
        return 2 * self.max_texts * (12 * self.max_chars + 16) + 65536
