"""What every classifier runtime shares (classify.runtime opens them): where a model's files are, the device and
autocast choice, the interface (`ClassifierRuntime`), and the batching of token models (`Runtime`): tokenize all
texts in one call, cut batches from the texts sorted by length (so that a batch pads little, classify.batching),
run the model batch by batch, put the probabilities back in input order."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

from domainlm.classify.batching import encode_texts, length_batches, pad
from domainlm.classify.config import MAX_SEQ_LEN
from domainlm.classify.metrics import best_k, choose, thresholds_of
from domainlm.classify.runtime_options import RuntimeOptions
from domainlm.errors import DomainLMError

EXPORT_META = "export.json"
LABELS_FILE = "domainlm_labels.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
DEVICES = ("auto", "cpu", "cuda")
# padded tokens per inference batch: long texts run in fewer rows per batch than short ones, so that memory stays
# bounded whatever --batch-size; at this size the encoder's matrix products already run at the CPU's peak
TOKEN_BUDGET = 8192
# on a GPU a batch of short texts is too small to fill the chip: up to 512 rows and 64k tokens per batch (a 12 x 768
# encoder's bf16 activations for 64k tokens take about 1.5 GB in inference)
GPU_ROWS, GPU_TOKEN_BUDGET = 512, 65536
CPU_ROWS = 64
# a model that pads (ONNX, non-BERT PyTorch) cuts its batches where padded tokens + this much per call are least:
# the fixed cost of one call, in tokens' worth of work (measured in bench/serve_bench.py's offline part)
CALL_TOKENS = 8


def is_export_dir(path: str | Path) -> bool:
    """A folder written by `domainlm export` (it holds export.json)."""
    return (Path(path) / EXPORT_META).is_file()


def classifier_dir(path: str | Path) -> str:
    """A `finetune` output folder holds the classifier in model/; a classifier folder is itself."""
    p = Path(path)
    return str(p / "model") if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file() else str(p)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_device(device: str) -> str:
    """'auto': a CUDA GPU when PyTorch sees one, else the CPU; 'cuda' where there is none is an error."""
    import torch

    if device not in DEVICES:
        raise DomainLMError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DomainLMError("--device cuda: PyTorch sees no CUDA GPU on this machine; use --device cpu (or auto)")
    return device


def autocast_dtype(precision: str):
    """The autocast dtype of a resolved precision (classify.runtime_options.torch_precision), None for fp32."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def compute_dtype(precision: str):
    """The dtype a resolved precision computes in: its autocast dtype, else fp32 (what encoder.frozen packs at)."""
    import torch

    return autocast_dtype(precision) or torch.float32


class ClassifierRuntime:
    """Every model kind: `labels`, `multilabel` (`task`), `thresholds`, `options` (device, precision, threads,
    max_seq_len as resolved at load), `text_column`, `pair_column`, `kind`, and `predict(texts, pairs) ->
    probabilities [n, labels]` (the one method a kind must provide); `choose` and `decide` turn probabilities into
    answers the same way for all."""

    kind = "?"
    tokenizer = None  # token models have one; the server batches their tokens itself
    options = RuntimeOptions(device="cpu", precision="fp32")

    def __init__(self, meta: dict, max_seq_len: int = 0):
        self.meta = meta
        self.labels: list[str] = list(meta["labels"])
        self.multilabel: bool = bool(meta.get("multilabel"))
        self.thresholds = thresholds_of(len(self.labels), meta.get("thresholds"))
        self.max_seq_len = max_seq_len or int(meta.get("max_seq_len") or MAX_SEQ_LEN)
        self.text_column: str = meta.get("text_column") or "text"
        self.pair_column: str | None = meta.get("pair_column")

    # the options are the one record of how the runtime runs; these read and set them
    @property
    def max_seq_len(self) -> int:
        return self.options.max_seq_len

    @max_seq_len.setter
    def max_seq_len(self, value: int) -> None:
        self.options = self.options.replace(max_seq_len=int(value))

    @property
    def device(self) -> str:
        return self.options.device

    @device.setter
    def device(self, value: str) -> None:
        self.options = self.options.replace(device=value)

    @property
    def activation_name(self) -> str:
        """What turns the model's logits into its scores (the `function_to_apply` of HF's pipelines)."""
        return "sigmoid" if self.multilabel else "softmax"

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    def predict(
        self,
        texts: list[str],
        pairs: list[str] | None = None,
        batch_size: int = 0,
        max_seq_len: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        raise NotImplementedError

    def choose(self, probs: np.ndarray) -> list[list[int]]:
        return choose(probs, self.multilabel, self.thresholds)

    def decide(self, probs: np.ndarray, top_k: int, digits: int = 6) -> list[dict]:
        """Per text: the chosen label(s) with their scores, and the top k."""
        answers = []
        for p, chosen, best in zip(probs, self.choose(probs), best_k(probs, top_k)):
            answers.append(
                {
                    "labels": [self.labels[j] for j in chosen],
                    "scores": {self.labels[j]: round(float(p[j]), digits) for j in chosen},
                    "top_k": [{"label": self.labels[j], "score": round(float(p[j]), digits)} for j in best],
                }
            )
        return answers

    def activation(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32)
        if self.multilabel:
            return 1.0 / (1.0 + np.exp(-logits))
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


class Plan(NamedTuple):
    """Model batches of encoded texts: `same[i]` the row whose probabilities text i takes (itself, or the first of
    its repeats), `rows` the rows of each batch, `feeds` each batch as the model takes it, `tokens` each batch's
    padded tokens (rows x longest)."""

    same: np.ndarray
    rows: list[np.ndarray]
    feeds: list[dict]
    tokens: list[int]


class Runtime(ClassifierRuntime):
    """A token model: tokenizer, `encode`, `pad`, and `probs_batch` (what subclasses provide: a padded batch of
    numpy arrays -> probabilities)."""

    packed = False  # batches are packed token streams (no padding cost): see TorchRuntime
    call_tokens = CALL_TOKENS

    def __init__(self, tokenizer, meta: dict, max_seq_len: int = 0):
        super().__init__(meta, max_seq_len)
        self.tokenizer = tokenizer
        self.pad_id = (getattr(tokenizer, "pad_token_id", None) or 0) if tokenizer is not None else 0

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: list[str], pairs: list[str] | None = None, max_seq_len: int | None = None) -> list[dict]:
        return encode_texts(self.tokenizer, texts, pairs, max_seq_len or self.max_seq_len)

    def pad(self, features: list[dict]) -> dict[str, np.ndarray]:
        return pad(features, self.pad_id)

    def feed(self, features: list[dict]) -> dict:
        """A model batch of encoded texts: padded (what ONNX and CPU models take) unless a subclass packs."""
        return self.pad(features)

    def probs_batches(self, feeds: list[dict]) -> list[np.ndarray]:
        """Probabilities of several model batches (a GPU runtime queues them all before it waits for one)."""
        return [self.probs_batch(f) for f in feeds]

    def batch_limits(self, batch_size: int = 0) -> tuple[int, int]:
        """(rows, tokens) per model batch: --batch-size (0: 64 on a CPU, 512 on a GPU) and the token budget."""
        gpu = getattr(self, "device", "cpu") == "cuda"
        return batch_size or (GPU_ROWS if gpu else CPU_ROWS), GPU_TOKEN_BUDGET if gpu else TOKEN_BUDGET

    def plan(self, features: list[dict], batch_size: int = 0, token_budget: int = 0) -> Plan:
        """The model batches of encoded texts (the one batching rule of predict, evaluate and serve): a text that
        repeats runs once; batches of at most `batch_size` rows and `token_budget` padded tokens are cut from the
        texts sorted by length (`length_batches`), each made into what the model takes (`feed`)."""
        rows_cap, budget = self.batch_limits(batch_size)
        batch_size, token_budget = rows_cap, token_budget or budget
        # a text that repeats (common in real files) runs once: its rows share the first one's probabilities
        first: dict[tuple, int] = {}
        same = np.asarray(
            [
                first.setdefault((tuple(f["input_ids"]), tuple(f.get("token_type_ids", ()))), i)
                for i, f in enumerate(features)
            ],
            dtype=np.int64,
        )
        unique = np.flatnonzero(same == np.arange(len(features)))
        batches = length_batches(
            [len(features[i]["input_ids"]) for i in unique],
            batch_size,
            token_budget,
            0 if self.packed else self.call_tokens,
        )
        groups = [unique[idx] for idx in batches]
        tokens = [len(rows) * max(len(features[j]["input_ids"]) for j in rows) for rows in groups]
        return Plan(same, groups, [self.feed([features[j] for j in rows]) for rows in groups], tokens)

    def run(self, plan: Plan) -> np.ndarray:
        """Probabilities [texts, labels] of a plan's texts, in their order."""
        out = np.empty((len(plan.same), len(self.labels)), dtype=np.float32)
        for rows, probs in zip(plan.rows, self.probs_batches(plan.feeds)):
            out[rows] = probs
        return out[plan.same]

    def probs_features(
        self, features: list[dict], batch_size: int = 0, token_budget: int = 0, progress: bool = False
    ) -> np.ndarray:
        """Probabilities of encoded texts, in their order, batch by batch as `plan` cuts them."""
        plan = self.plan(features, batch_size, token_budget)
        if progress and sys.stderr.isatty() and self.device == "cpu":  # a GPU gets every batch queued at once
            from tqdm import tqdm

            out = np.empty((len(plan.same), len(self.labels)), dtype=np.float32)
            for rows, feed in zip(tqdm(plan.rows, desc="predict", file=sys.stderr), plan.feeds):
                out[rows] = self.probs_batch(feed)
            return out[plan.same]
        return self.run(plan)

    def predict(
        self,
        texts: list[str],
        pairs: list[str] | None = None,
        batch_size: int = 0,
        max_seq_len: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.probs_features(self.encode(texts, pairs, max_seq_len), batch_size, progress=progress)
