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

Token models (`Runtime`, in classify.runtime_base with the interface): batches of like lengths, answers in input order.
`decide` turns probabilities into labels: the argmax (multi-class) or every label at or above its threshold saved
with the model (multi-label), and the k best.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from domainlm import checks
from domainlm.classify import linear
from domainlm.classify.ensemble_file import is_ensemble, read_ensemble
from domainlm.classify.metrics import best_k, choose, thresholds_of
from domainlm.classify.runtime_base import (
    CPU_ROWS,
    DEVICES,
    EXPORT_META,
    GPU_ROWS,
    GPU_TOKEN_BUDGET,
    INPUT_NAMES,
    LABELS_FILE,
    TOKEN_BUDGET,
    ClassifierRuntime,
    Plan,
    Runtime,
    autocast_dtype,
    available_cores,
    classifier_dir,
    compute_dtype,
    is_export_dir,
    resolve_device,
)
from domainlm.classify.runtime_options import RuntimeOptions, torch_precision
from domainlm.errors import DomainLMError
from domainlm.precision import announce

__all__ = [
    "CPU_ROWS",
    "DEVICES",
    "EXPORT_META",
    "GPU_ROWS",
    "GPU_TOKEN_BUDGET",
    "INPUT_NAMES",
    "LABELS_FILE",
    "TOKEN_BUDGET",
    "ClassifierRuntime",
    "EnsembleRuntime",
    "LinearRuntime",
    "OnnxRuntime",
    "Plan",
    "Runtime",
    "RuntimeOptions",
    "TokenEnsembleRuntime",
    "TorchRuntime",
    "autocast_dtype",
    "available_cores",
    "best_k",
    "choose",
    "classifier_dir",
    "compute_dtype",
    "is_export_dir",
    "load",
    "open_runtime",
    "resolve_device",
    "thresholds_of",
]


class TorchRuntime(Runtime):
    """A PyTorch classifier (a classifier folder or a `finetune` output; LoRA is merged in there) in inference mode,
    on `device` ('cpu' or 'cuda'), under bf16/fp16 autocast as `precision` resolves (`torch_precision`: auto is bf16
    where the CPU or GPU has it natively). The last layer runs for the [CLS] position only
    (classify.model.classifier_logits / packed_forward); on a CPU the layers below it run with their weights packed
    once for oneDNN (encoder.frozen)."""

    kind = "pytorch-fp32"

    def __init__(self, path: str, threads: int = 0, max_seq_len: int = 0, device: str = "cpu", precision: str = "auto"):
        import torch

        from domainlm.classify.model import load_trained

        if precision == "int8":
            raise DomainLMError(
                f"{path} is a PyTorch classifier; int8 needs an export: domainlm export {path} --out DIR "
                "--quantize int8"
            )
        if threads:
            torch.set_num_threads(threads)
        resolved, why = torch_precision(precision, device)
        announce(resolved, why)  # once per process, as training says it
        self.autocast = autocast_dtype(resolved)
        self.options = RuntimeOptions(device, resolved, torch.get_num_threads(), max_seq_len)
        self.model, tokenizer, meta = load_trained(classifier_dir(path))
        if device != "cpu":
            self.model.to(device)
        if self.autocast is not None:
            self.kind = f"pytorch-{resolved}"
        self.config = self.model.config
        self.input_names = [k for k in INPUT_NAMES if k in tokenizer.model_input_names]
        from domainlm.classify.model import packing_ready

        self.packed = packing_ready(self.model)
        self.frozen = self._freeze() if self.packed and device == "cpu" else None
        super().__init__(tokenizer, meta, max_seq_len)

    def _freeze(self):
        """The encoder's layers packed for CPU inference at the runtime's precision (encoder.frozen), or None."""
        from domainlm.encoder.frozen import freeze

        return freeze(self.model.base_model, compute_dtype(self.options.precision))

    def feed(self, features: list[dict]) -> dict:
        """BERT/ERNIE classifiers take one packed stream of the batch's real tokens (no linear layer sees a padded
        position; on a GPU, variable-length flash attention); other models the padded batch."""
        if not self.packed:
            return self.pad(features)
        from domainlm.encoder.packed import pack

        return pack([{k: np.asarray(v) for k, v in f.items() if k != "attention_mask"} for f in features])

    def autocasting(self):
        """The autocast of the runtime's precision (bf16 / fp16), or none for fp32."""
        import torch

        return contextlib.nullcontext() if self.autocast is None else torch.autocast(self.device, dtype=self.autocast)

    def logits(self, batch: dict):
        """Logits on the device, not yet waited for."""
        import torch

        from domainlm.classify.model import classifier_logits, packed_logits

        with torch.inference_mode(), self.autocasting():
            if "cu_seqlens" in batch:
                moved = {
                    k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                }
                return packed_logits(self.model, moved, self.frozen)
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

    def __init__(
        self, path: str, precision: str = "auto", threads: int = 0, max_seq_len: int | None = None, device: str = "cpu"
    ):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(path)
        try:
            info = json.loads((folder / EXPORT_META).read_text(encoding="utf-8"))
            meta = json.loads((folder / LABELS_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DomainLMError(
                f"{folder} is not a complete export folder ({e}); run `domainlm export` again"
            ) from None
        files = info.get("files", {})
        if precision == "auto":
            precision = "int8" if "int8" in files else "fp32"
        if precision not in files:
            hint = "; export with --quantize int8" if precision == "int8" else ""
            raise DomainLMError(f"{folder} has no {precision} model (it has: {', '.join(files) or 'none'}){hint}")
        self.kind, self.info, self.file = f"onnx-{precision}", info, folder / files[precision]
        threads = threads or available_cores()
        options = ort.SessionOptions()
        # Threads set on purpose: all cores (or --threads) inside one operator, one operator at a time. The
        # defaults can spin extra inter-op threads that fight the intra-op ones on a small CPU.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                print(
                    "ONNX Runtime here has no CUDA provider (install onnxruntime-gpu); running the export on the CPU",
                    file=sys.stderr,
                )
        self.session = ort.InferenceSession(str(self.file), options, providers=providers)
        self.options = RuntimeOptions(
            "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu", precision, threads
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        width = self.session.get_outputs()[0].shape[-1]
        # what the model-vs-options checks read off a transformers config: positions, type, outputs
        self.config = SimpleNamespace(
            max_position_embeddings=info.get("max_position_embeddings"),
            model_type=info.get("model_type", ""),
            num_labels=width if isinstance(width, int) else len(meta["labels"]),
        )
        # the export's length (the model's own, or --max-seq-len of export) unless one is given
        super().__init__(
            AutoTokenizer.from_pretrained(str(folder)),
            {**meta, "max_seq_len": info.get("max_seq_len") or meta.get("max_seq_len")},
            max_seq_len or 0,
        )

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: batch[k] if k in batch else np.zeros_like(batch["input_ids"]) for k in self.input_names}
        return self.activation(self.session.run(None, feed)[0])


class LinearRuntime(ClassifierRuntime):
    """The linear floor (classify.linear): character n-grams of the text (and its pair), no tokens, on the CPU."""

    kind = "linear"

    def __init__(self, model: linear.LinearModel):
        self.model = model
        self.options = RuntimeOptions("cpu", "fp32", 1)  # character n-grams: no tokens, no length
        super().__init__(
            {**model.settings, "labels": model.labels, "multilabel": model.multilabel, "thresholds": model.thresholds}
        )

    def predict(
        self,
        texts: list[str],
        pairs: list[str] | None = None,
        batch_size: int = 64,
        max_seq_len: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self.model.text_scores(linear.joined(texts, pairs))


def open_ensemble(path: str, open_member: Callable[[str], ClassifierRuntime]) -> ClassifierRuntime:
    """A fold ensemble (`finetune --folds`, or its export): its members opened, their label maps checked."""
    meta = read_ensemble(path)
    members = [open_member(str(Path(path) / m)) for m in meta["members"]]
    for name, member in zip(meta["members"], members):
        if member.labels != meta["labels"] or member.multilabel != bool(meta.get("multilabel")):
            raise DomainLMError(
                f"{Path(path) / name}: its labels ({', '.join(member.labels)}) differ from the "
                f"ensemble's ({', '.join(meta['labels'])})"
            )
    tokenizers = [m.tokenizer for m in members]
    shared = all(t is not None for t in tokenizers) and all(
        t.get_vocab() == tokenizers[0].get_vocab() for t in tokenizers
    )
    return (TokenEnsembleRuntime if shared else EnsembleRuntime)(meta, members)


class EnsembleRuntime(ClassifierRuntime):
    """The mean of its members' probabilities, each member encoding the texts for itself."""

    def __init__(self, meta: dict, members: list[ClassifierRuntime]):
        self.members = members
        first = members[0]
        self.kind = f"ensemble of {len(members)} {first.kind}"
        self.config = getattr(first, "config", None)
        settings = {k: first.meta.get(k) for k in ("max_seq_len", "text_column", "pair_column")}
        self.options = first.options
        ClassifierRuntime.__init__(self, {**settings, **meta}, first.max_seq_len)

    def predict(
        self,
        texts: list[str],
        pairs: list[str] | None = None,
        batch_size: int = 64,
        max_seq_len: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        n = max_seq_len or self.max_seq_len
        return np.mean([m.predict(texts, pairs, batch_size, n, progress) for m in self.members], axis=0)


class TokenEnsembleRuntime(EnsembleRuntime, Runtime):
    """Members that share a tokenizer (those of one run): also a token model, so that the server encodes a batch
    once and each member scores it: packed where every member runs packed batches (PyTorch BERT/ERNIE members),
    padded otherwise."""

    def __init__(self, meta: dict, members: list[ClassifierRuntime]):
        EnsembleRuntime.__init__(self, meta, members)
        self.tokenizer = members[0].tokenizer
        self.pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        self.packed = all(getattr(m, "packed", False) for m in members)

    def feed(self, features: list[dict]) -> dict:
        return self.members[0].feed(features) if self.packed else self.pad(features)

    def probs_batch(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.mean([m.probs_batch(batch) for m in self.members], axis=0)


class Kind(NamedTuple):
    """One model kind `load` opens: `test(folder)` says whether a folder holds one, `open(folder, options)` opens it
    (options with the device already resolved). The first kind whose test passes wins."""

    name: str
    test: Callable[[str], bool]
    open: Callable[[str, RuntimeOptions], ClassifierRuntime]


def _open_linear(folder: str, o: RuntimeOptions) -> ClassifierRuntime:
    return LinearRuntime(linear.load(folder))  # scikit-learn weights: the CPU, no tokens, no length


def _open_onnx(folder: str, o: RuntimeOptions) -> ClassifierRuntime:
    return OnnxRuntime(folder, o.precision, o.threads, o.max_seq_len, o.device)


def _open_ensemble(folder: str, o: RuntimeOptions) -> ClassifierRuntime:
    return open_ensemble(folder, lambda member: open_runtime(member, o))


def _open_torch(folder: str, o: RuntimeOptions) -> ClassifierRuntime:
    return TorchRuntime(folder, o.threads, o.max_seq_len, o.device, o.precision)


KINDS: list[Kind] = [
    Kind("ensemble", is_ensemble, _open_ensemble),
    Kind("linear", linear.is_linear, _open_linear),
    Kind("onnx", is_export_dir, _open_onnx),
    Kind("pytorch", lambda folder: True, _open_torch),  # anything else: an HF classifier folder or finetune output
]


def load(
    folder: str, precision: str = "auto", device: str = "auto", threads: int = 0, max_seq_len: int = 0
) -> ClassifierRuntime:
    """`open_runtime` with the options given one by one."""
    return open_runtime(folder, RuntimeOptions(device, precision, threads, max_seq_len))


def open_runtime(folder: str, options: RuntimeOptions) -> ClassifierRuntime:
    """The classifier in `folder`, whatever its kind (the first of KINDS that recognises it; a missing folder is
    reported by the last, naming --model and the nearest name), with its label map checked against its outputs and
    its options resolved (`runtime.options`: the device, precision, threads and length it runs with).
    max_seq_len 0: the length saved with the model (else MAX_SEQ_LEN, within its positions); a larger one than the
    model takes is capped at its positions, with a notice naming both."""
    options = options.replace(device=resolve_device(options.device))
    kind = next(k for k in KINDS if k.test(folder))
    runtime = kind.open(folder, options)
    checks.label_map(runtime.labels, runtime, folder)
    config = getattr(runtime, "config", None)
    if config is not None:  # a token model: its positions cap the length
        limit = checks.position_limit(config)
        if options.max_seq_len:
            runtime.max_seq_len = checks.max_seq_len(config, options.max_seq_len, folder, cap=True)
        elif limit is not None:
            runtime.max_seq_len = min(runtime.max_seq_len, limit)
    return runtime
