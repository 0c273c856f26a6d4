"""The one prediction path of `predict`, `evaluate`, `serve` and the console, over every kind of model: a PyTorch
classifier (a plain HF folder, a `finetune` output, LoRA merged), an ONNX export run by ONNX Runtime (fp32 or int8),
and the linear floor (classify.linear).

`Runtime.predict`: tokenize all texts in one call, cut batches from the texts sorted by length (so that a batch pads
little, classify.batching), run the model batch by batch, put the probabilities back in input order. `decide` turns
probabilities into labels: the argmax (multi-class) or every label at or above its threshold saved with the model
(multi-label), and the k best. Subclasses only say how a padded batch of numpy arrays becomes probabilities.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from domainlm.classify.batching import encode_texts, length_batches, pad
from domainlm.errors import DomainLMError

EXPORT_META = "export.json"
LABELS_FILE = "domainlm_labels.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# padded tokens per inference batch: long texts run in fewer rows per batch than short ones, so that memory stays
# bounded whatever --batch-size; at this size the encoder's matrix products already run at the CPU's peak
TOKEN_BUDGET = 8192


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


def thresholds_of(n_labels: int, tuned) -> np.ndarray:
    """Multi-label decision thresholds: the ones tuned on the dev set and saved with the model, else 0.5."""
    return np.full(n_labels, 0.5) if tuned is None else np.asarray(tuned, dtype=float)


def choose(probs: np.ndarray, multilabel: bool, thresholds: np.ndarray | None = None) -> list[list[int]]:
    """The chosen label indices of each row: the argmax, or every label at or above its threshold."""
    if multilabel:
        over = probs >= thresholds_of(probs.shape[-1], thresholds)
        return [np.flatnonzero(row).tolist() for row in over]
    return [[int(j)] for j in probs.argmax(axis=-1)] if len(probs) else []


def best_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest probabilities of each row, best first (ties: the lower index first)."""
    return np.argsort(-probs, axis=-1, kind="stable")[:, :k]


class Runtime:
    """labels, multilabel, thresholds, tokenizer; `predict(texts) -> probabilities [n, labels]`."""

    kind = "?"

    def __init__(self, tokenizer, meta: dict, max_seq_len: int = 128):
        self.tokenizer, self.meta, self.max_seq_len = tokenizer, meta, max_seq_len
        self.labels: list[str] = list(meta["labels"])
        self.multilabel: bool = bool(meta.get("multilabel"))
        self.thresholds = thresholds_of(len(self.labels), meta.get("thresholds"))
        self.pad_id = (getattr(tokenizer, "pad_token_id", None) or 0) if tokenizer is not None else 0

    # -- what subclasses provide
    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    # -- shared
    def encode(self, texts: list[str], pairs: list[str] | None = None, max_seq_len: int | None = None) -> list[dict]:
        return encode_texts(self.tokenizer, texts, pairs, max_seq_len or self.max_seq_len)

    def pad(self, features: list[dict]) -> dict[str, np.ndarray]:
        return pad(features, self.pad_id)

    def probs_features(self, features: list[dict], batch_size: int = 64, token_budget: int = TOKEN_BUDGET,
                       progress: bool = False) -> np.ndarray:
        """Probabilities of encoded texts, in their order; batches of at most `batch_size` rows and `token_budget`
        padded tokens are cut from the texts sorted by length."""
        # a text that repeats (common in real files) runs once: its rows share the first one's probabilities
        first: dict[tuple, int] = {}
        same = np.asarray([first.setdefault((tuple(f["input_ids"]), tuple(f.get("token_type_ids", ()))), i)
                           for i, f in enumerate(features)], dtype=np.int64)
        unique = np.flatnonzero(same == np.arange(len(features)))
        out = np.empty((len(features), len(self.labels)), dtype=np.float32)
        batches = length_batches([len(features[i]["input_ids"]) for i in unique], batch_size, token_budget)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            batches = tqdm(batches, desc="predict", file=sys.stderr)
        for idx in batches:
            rows = unique[idx]
            out[rows] = self.probs_batch(self.pad([features[j] for j in rows]))
        return out[same]

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64,
                max_seq_len: int | None = None, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.probs_features(self.encode(texts, pairs, max_seq_len), batch_size, progress=progress)

    def choose(self, probs: np.ndarray) -> list[list[int]]:
        return choose(probs, self.multilabel, self.thresholds)

    def decide(self, probs: np.ndarray, top_k: int, digits: int = 6) -> list[dict]:
        """Per text: the chosen label(s) with their scores, and the top k."""
        answers = []
        for p, chosen, best in zip(probs, self.choose(probs), best_k(probs, top_k)):
            answers.append({"labels": [self.labels[j] for j in chosen],
                            "scores": {self.labels[j]: round(float(p[j]), digits) for j in chosen},
                            "top_k": [{"label": self.labels[j], "score": round(float(p[j]), digits)} for j in best]})
        return answers

    def activation(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32)
        if self.multilabel:
            return 1.0 / (1.0 + np.exp(-logits))
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)


class TorchRuntime(Runtime):
    """A PyTorch classifier (a classifier folder or a `finetune` output; LoRA is merged in there) in inference mode.
    The last layer runs for the [CLS] position only (classify.model.classifier_logits), and a batch with no padding
    runs attention with no mask."""

    kind = "pytorch-fp32"

    def __init__(self, path: str, threads: int = 0, max_seq_len: int = 128):
        import torch

        from domainlm.classify.model import load_trained

        if threads:
            torch.set_num_threads(threads)
        self.model, tokenizer, meta = load_trained(classifier_dir(path))
        self.config = self.model.config
        self.input_names = [k for k in INPUT_NAMES if k in tokenizer.model_input_names]
        super().__init__(tokenizer, meta, max_seq_len)

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        from domainlm.classify.model import classifier_logits

        feed = {k: torch.from_numpy(v) for k, v in batch.items() if k in self.input_names}
        with torch.inference_mode():
            logits = classifier_logits(self.model, **feed)
        return self.activation(logits.float().numpy())


class OnnxRuntime(Runtime):
    """An export folder: model.onnx (fp32) and, if quantized, model.int8.onnx, run by ONNX Runtime on the CPU."""

    def __init__(self, path: str, precision: str = "auto", threads: int = 0, max_seq_len: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(path)
        try:
            info = json.loads((folder / EXPORT_META).read_text(encoding="utf-8"))
            meta = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DomainLMError(f"{folder} is not a complete export folder ({e}); run `domainlm export` again") from None
        files = info.get("files", {})
        if precision == "auto":
            precision = "int8" if "int8" in files else "fp32"
        if precision not in files:
            hint = "; export with --quantize int8" if precision == "int8" else ""
            raise DomainLMError(f"{folder} has no {precision} model (it has: {', '.join(files) or 'none'}){hint}")
        self.kind, self.info, self.file = f"onnx-{precision}", info, folder / files[precision]
        options = ort.SessionOptions()
        # Threads set on purpose: all cores (or --threads) inside one operator, one operator at a time. The
        # defaults can spin extra inter-op threads that fight the intra-op ones on a small CPU.
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        width = self.session.get_outputs()[0].shape[-1]
        # what the model-vs-options checks read off a transformers config: positions, type, outputs
        self.config = SimpleNamespace(max_position_embeddings=info.get("max_position_embeddings"),
                                      model_type=info.get("model_type", ""),
                                      num_labels=width if isinstance(width, int) else len(meta["labels"]))
        super().__init__(AutoTokenizer.from_pretrained(str(folder)), meta, max_seq_len or info.get("max_seq_len", 128))

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: batch[k] if k in batch else np.zeros_like(batch["input_ids"]) for k in self.input_names}
        return self.activation(self.session.run(None, feed)[0])


def load_runtime(path: str, precision: str = "auto", threads: int = 0, max_seq_len: int = 0) -> Runtime:
    """An export folder runs on ONNX Runtime, a fold ensemble as the mean of its members; anything else is loaded
    as a PyTorch classifier."""
    if not Path(path).exists():
        raise DomainLMError(f"model folder {path} does not exist")
    from domainlm.classify.ensemble import EnsembleRuntime, is_ensemble

    if is_ensemble(path):  # a fold ensemble: its members, each loaded as below, averaged
        return EnsembleRuntime(path, lambda member: load_runtime(member, precision, threads, max_seq_len))
    if is_export_dir(path):
        return OnnxRuntime(path, precision, threads, max_seq_len or None)
    if precision == "int8":
        raise DomainLMError(f"{path} is a PyTorch classifier; int8 needs an export: domainlm export {path} --out DIR "
                            "--quantize int8")
    return TorchRuntime(path, threads, max_seq_len or 128)
