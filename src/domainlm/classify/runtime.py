"""The one classifier runtime: `load(folder)` opens any classifier `predict`, `evaluate`, `serve`, `export`, the
sweep and the console take, behind one interface (`ClassifierRuntime`):
- a PyTorch classifier (a plain HF folder, a `finetune` output, LoRA merged), on the CPU or a CUDA GPU;
- an ONNX export run by ONNX Runtime (fp32 or int8);
- the linear floor (classify.linear);
- a fold ensemble (ensemble.json: member folders of any of these kinds, their probabilities averaged).
Each kind is one entry of `KINDS` (a test of the folder and a constructor).

What inference needs travels with the model (`domainlm_labels.json` beside the weights, `linear.json`, an export's
copy): the label set, the task, the multi-label thresholds, the text/pair columns and the max_seq_len it was trained
at. The latter is the default length; a flag overrides it, capped (with a notice naming both) at the model's positions.

Token models (`Runtime`): tokenize all texts in one call, cut batches from the texts sorted by length (so that
a batch pads little, classify.batching), run the model batch by batch, put the probabilities back in input order.
`decide` turns probabilities into labels: the argmax (multi-class) or every label at or above its threshold saved
with the model (multi-label), and the k best.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from domainlm import checks
from domainlm.classify import linear
from domainlm.classify.batching import encode_texts, length_batches, pad
from domainlm.classify.config import MAX_SEQ_LEN
from domainlm.classify.ensemble_file import is_ensemble, read_ensemble
from domainlm.classify.metrics import best_k, choose, thresholds_of
from domainlm.errors import DomainLMError

__all__ = ["ClassifierRuntime", "EnsembleRuntime", "LinearRuntime", "OnnxRuntime", "Runtime", "TokenEnsembleRuntime",
           "TorchRuntime", "best_k", "choose", "load", "thresholds_of"]

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


def autocast_dtype(precision: str, device: str, bf16_supported: bool):
    """The autocast dtype of a PyTorch classifier, or None for fp32: bf16 on a GPU that has it when precision is
    auto or bf16 (fp16 on one that lacks it when bf16 is asked for), fp16 when asked for; fp32 on the CPU."""
    import torch

    if precision in ("bf16", "fp16") and device != "cuda":
        raise DomainLMError(f"--precision {precision} runs on a GPU only (--device cuda); on the CPU use fp32 or auto")
    if device != "cuda" or precision == "fp32":
        return None
    if precision == "fp16" or (precision == "bf16" and not bf16_supported):
        return torch.float16
    return torch.bfloat16 if bf16_supported else None


class ClassifierRuntime:
    """Every model kind: `labels`, `multilabel` (`task`), `thresholds`, `max_seq_len`, `text_column`, `pair_column`,
    `kind`, and `predict(texts, pairs) -> probabilities [n, labels]` (the one method a kind must provide);
    `choose` and `decide` turn probabilities into answers the same way for all."""

    kind = "?"
    tokenizer = None  # token models have one; the server batches their tokens itself

    def __init__(self, meta: dict, max_seq_len: int = 0):
        self.meta = meta
        self.labels: list[str] = list(meta["labels"])
        self.multilabel: bool = bool(meta.get("multilabel"))
        self.thresholds = thresholds_of(len(self.labels), meta.get("thresholds"))
        self.max_seq_len: int = max_seq_len or int(meta.get("max_seq_len") or MAX_SEQ_LEN)
        self.text_column: str = meta.get("text_column") or "text"
        self.pair_column: str | None = meta.get("pair_column")

    @property
    def task(self) -> str:
        return "multilabel" if self.multilabel else "multiclass"

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 0,
                max_seq_len: int | None = None, progress: bool = False) -> np.ndarray:
        raise NotImplementedError

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


class Runtime(ClassifierRuntime):
    """A token model: tokenizer, `encode`, `pad`, and `probs_batch` (what subclasses provide: a padded batch of
    numpy arrays -> probabilities)."""

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

    def probs_features(self, features: list[dict], batch_size: int = 0, token_budget: int = 0,
                       progress: bool = False) -> np.ndarray:
        """Probabilities of encoded texts, in their order; batches of at most `batch_size` rows and `token_budget`
        padded tokens are cut from the texts sorted by length."""
        rows_cap, budget = self.batch_limits(batch_size)
        batch_size, token_budget = rows_cap, token_budget or budget
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
        groups = [unique[idx] for idx in batches]
        for rows, probs in zip(groups, self.probs_batches([self.feed([features[j] for j in rows]) for rows in groups])):
            out[rows] = probs
        return out[same]

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 0,
                max_seq_len: int | None = None, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.probs_features(self.encode(texts, pairs, max_seq_len), batch_size, progress=progress)


class TorchRuntime(Runtime):
    """A PyTorch classifier (a classifier folder or a `finetune` output; LoRA is merged in there) in inference mode,
    on `device` ('cpu' or 'cuda'; on a GPU under bf16/fp16 autocast as `precision` says). The last layer runs for
    the [CLS] position only (classify.model.classifier_logits), and a batch with no padding runs attention with no
    mask."""

    kind = "pytorch-fp32"

    def __init__(self, path: str, threads: int = 0, max_seq_len: int = 0, device: str = "cpu", precision: str = "auto"):
        import torch

        from domainlm.classify.model import load_trained

        if precision == "int8":
            raise DomainLMError(f"{path} is a PyTorch classifier; int8 needs an export: domainlm export {path} --out DIR "
                                "--quantize int8")
        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.autocast = autocast_dtype(precision, device, device == "cuda" and torch.cuda.is_bf16_supported())
        self.model, tokenizer, meta = load_trained(classifier_dir(path))
        if device != "cpu":
            self.model.to(device)
        if self.autocast is not None:
            self.kind = f"pytorch-{'bf16' if self.autocast == torch.bfloat16 else 'fp16'}"
        self.config = self.model.config
        self.input_names = [k for k in INPUT_NAMES if k in tokenizer.model_input_names]
        from domainlm.classify.model import packing_ready

        self.packed = device == "cuda" and packing_ready(self.model)
        super().__init__(tokenizer, meta, max_seq_len)

    def feed(self, features: list[dict]) -> dict:
        """On a GPU, BERT/ERNIE classifiers take one packed stream of the batch's real tokens (variable-length
        flash attention, no padded position); elsewhere the padded batch."""
        if not self.packed:
            return self.pad(features)
        from domainlm.encoder.packed import pack

        return pack([{k: np.asarray(v) for k, v in f.items() if k != "attention_mask"} for f in features])

    def logits(self, batch: dict):
        """Logits on the device, not yet waited for."""
        import torch

        from domainlm.classify.model import classifier_logits, packed_logits

        cast = (torch.autocast("cuda", dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext())
        with torch.inference_mode(), cast:
            if "cu_seqlens" in batch:
                moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                         for k, v in batch.items()}
                return packed_logits(self.model, moved)
            feed = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items() if k in self.input_names}
            return classifier_logits(self.model, **feed)

    def probs_batch(self, batch: dict) -> np.ndarray:
        return self.activation(self.logits(batch).float().cpu().numpy())

    def probs_batches(self, feeds: list[dict]) -> list[np.ndarray]:
        """Every batch is queued on the device before the first result is copied back: one wait, not one per batch,
        so the host prepares the next batch while the GPU runs the last."""
        import torch

        if self.device == "cpu" or not feeds:
            return super().probs_batches(feeds)
        logits = [self.logits(f) for f in feeds]
        host = torch.cat([x.float() for x in logits]).cpu().numpy()
        return np.split(self.activation(host), np.cumsum([len(x) for x in logits])[:-1])


class OnnxRuntime(Runtime):
    """An export folder: model.onnx (fp32) and, if quantized, model.int8.onnx, run by ONNX Runtime (on a CUDA GPU
    when `device` is 'cuda' and ONNX Runtime has its CUDA provider, else on the CPU)."""

    def __init__(self, path: str, precision: str = "auto", threads: int = 0, max_seq_len: int | None = None,
                 device: str = "cpu"):
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
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                print("ONNX Runtime here has no CUDA provider (install onnxruntime-gpu); running the export on the CPU",
                      file=sys.stderr)
        self.session = ort.InferenceSession(str(self.file), options, providers=providers)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        width = self.session.get_outputs()[0].shape[-1]
        # what the model-vs-options checks read off a transformers config: positions, type, outputs
        self.config = SimpleNamespace(max_position_embeddings=info.get("max_position_embeddings"),
                                      model_type=info.get("model_type", ""),
                                      num_labels=width if isinstance(width, int) else len(meta["labels"]))
        # the export's length (the model's own, or --max-seq-len of export) unless one is given
        super().__init__(AutoTokenizer.from_pretrained(str(folder)),
                         {**meta, "max_seq_len": info.get("max_seq_len") or meta.get("max_seq_len")}, max_seq_len or 0)

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: batch[k] if k in batch else np.zeros_like(batch["input_ids"]) for k in self.input_names}
        return self.activation(self.session.run(None, feed)[0])


class LinearRuntime(ClassifierRuntime):
    """The linear floor (classify.linear): character n-grams of the text (and its pair), no tokens, on the CPU."""

    kind = "linear"

    def __init__(self, model: linear.LinearModel):
        self.model = model
        super().__init__({**model.settings, "labels": model.labels, "multilabel": model.multilabel,
                          "thresholds": model.thresholds})

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64,
                max_seq_len: int | None = None, progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.model.text_scores(linear.joined(texts, pairs))


def open_ensemble(path: str, open_member: Callable[[str], ClassifierRuntime]) -> ClassifierRuntime:
    """A fold ensemble (`finetune --folds`, or its export): its members opened, their label maps checked."""
    meta = read_ensemble(path)
    members = [open_member(str(Path(path) / m)) for m in meta["members"]]
    for name, member in zip(meta["members"], members):
        if member.labels != meta["labels"] or member.multilabel != bool(meta.get("multilabel")):
            raise DomainLMError(f"{Path(path) / name}: its labels ({', '.join(member.labels)}) differ from the "
                                f"ensemble's ({', '.join(meta['labels'])})")
    tokenizers = [m.tokenizer for m in members]
    shared = all(t is not None for t in tokenizers) and all(t.get_vocab() == tokenizers[0].get_vocab() for t in tokenizers)
    return (TokenEnsembleRuntime if shared else EnsembleRuntime)(meta, members)


class EnsembleRuntime(ClassifierRuntime):
    """The mean of its members' probabilities, each member encoding the texts for itself."""

    def __init__(self, meta: dict, members: list[ClassifierRuntime]):
        self.members = members
        first = members[0]
        self.kind = f"ensemble of {len(members)} {first.kind}"
        self.config = getattr(first, "config", None)
        settings = {k: first.meta.get(k) for k in ("max_seq_len", "text_column", "pair_column")}
        ClassifierRuntime.__init__(self, {**settings, **meta}, first.max_seq_len)

    def predict(self, texts: list[str], pairs: list[str] | None = None, batch_size: int = 64,
                max_seq_len: int | None = None, progress: bool = False) -> np.ndarray:
        n = max_seq_len or self.max_seq_len
        return np.mean([m.predict(texts, pairs, batch_size, n, progress) for m in self.members], axis=0)


class TokenEnsembleRuntime(EnsembleRuntime, Runtime):
    """Members that share a tokenizer (those of one run): also a token model, so that the server encodes a batch
    once and each member scores it."""

    def __init__(self, meta: dict, members: list[ClassifierRuntime]):
        EnsembleRuntime.__init__(self, meta, members)
        self.tokenizer = members[0].tokenizer
        self.pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.mean([m.probs_batch(batch) for m in self.members], axis=0)


class Kind(NamedTuple):
    """One model kind `load` opens: `test(folder)` says whether a folder holds one, `open(folder, precision, device,
    threads, max_seq_len)` opens it. The first kind whose test passes wins."""

    name: str
    test: Callable[[str], bool]
    open: Callable[[str, str, str, int, int], ClassifierRuntime]


def _open_linear(folder: str, precision: str, device: str, threads: int, max_seq_len: int) -> ClassifierRuntime:
    return LinearRuntime(linear.load(folder))  # scikit-learn weights: the CPU, no tokens, no length


def _open_onnx(folder: str, precision: str, device: str, threads: int, max_seq_len: int) -> ClassifierRuntime:
    return OnnxRuntime(folder, precision, threads, max_seq_len, device)


def _open_ensemble(folder: str, precision: str, device: str, threads: int, max_seq_len: int) -> ClassifierRuntime:
    return open_ensemble(folder, lambda member: load(member, precision, device, threads, max_seq_len))


def _open_torch(folder: str, precision: str, device: str, threads: int, max_seq_len: int) -> ClassifierRuntime:
    return TorchRuntime(folder, threads, max_seq_len, device, precision)


KINDS: list[Kind] = [
    Kind("ensemble", is_ensemble, _open_ensemble),
    Kind("linear", linear.is_linear, _open_linear),
    Kind("onnx", is_export_dir, _open_onnx),
    Kind("pytorch", lambda folder: True, _open_torch),  # anything else: an HF classifier folder or finetune output
]


def load(folder: str, precision: str = "auto", device: str = "auto", threads: int = 0,
         max_seq_len: int = 0) -> ClassifierRuntime:
    """The classifier in `folder`, whatever its kind (the first of KINDS that recognises it; a missing folder is
    reported by the last, naming --model and the nearest name), with its label map checked against its outputs. max_seq_len 0: the length saved with the model (else MAX_SEQ_LEN, within its
    positions); a larger one than the model takes is capped at its positions, with a notice naming both."""
    where = resolve_device(device)
    kind = next(k for k in KINDS if k.test(folder))
    runtime = kind.open(folder, precision, where, threads, max_seq_len)
    checks.label_map(runtime.labels, runtime, folder)
    config = getattr(runtime, "config", None)
    if config is not None:  # a token model: its positions cap the length
        limit = checks.position_limit(config)
        if max_seq_len:
            runtime.max_seq_len = checks.max_seq_len(config, max_seq_len, folder, cap=True)
        elif limit is not None:
            runtime.max_seq_len = min(runtime.max_seq_len, limit)
    return runtime
