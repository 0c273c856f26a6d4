"""`domainlm export MODEL --out DIR --format onnx [--quantize int8] [--data labelled.csv]`.

classifier -> model.onnx (dynamic batch and sequence axes) -> optional fusion by ONNX Runtime's transformer
optimizer -> verification against PyTorch on several batch sizes and lengths (an error above --tolerance) ->
optional model.int8.onnx (dynamic quantization) -> tokenizer, labels (+ multi-label thresholds), export.json.

Exporter: the TorchScript-based one (`dynamo=False`). On this stack the dynamo exporter also gives dynamic axes
and equal outputs, but takes ~15x longer, and the TorchScript graph is the one ONNX Runtime's transformer
optimizer recognises (its attention fusion matches eager attention as traced). Whatever the exporter, the
verification below is what vouches for the axes: it runs shapes other than the traced one.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from domainlm import checks, outputs
from domainlm import config as cfglib
from domainlm.classify.config import MAX_SEQ_LEN
from domainlm.classify.runtime import (
    EXPORT_META,
    INPUT_NAMES,
    LABELS_FILE,
    OnnxRuntime,
    classifier_dir,
    is_export_dir,
)
from domainlm.errors import DomainLMError
from domainlm.files import input_file
from domainlm.serve.config import ExportConfig
from domainlm.serve.hf_config import write_hf_config

# (batch size, tokens) checked at export time; the trace itself uses (2, 8), so every other shape proves the
# axes are dynamic, and rows of different lengths inside a batch check the padding mask.
VERIFY_SHAPES = ((1, 2), (1, 9), (2, 8), (3, 17), (5, 5), (8, 40), (16, 0))  # 0: the longest allowed


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(path: str):
    from transformers.utils import logging as hf_logging

    from domainlm.classify.model import load_trained

    hf_logging.set_verbosity_error()
    model, tokenizer, meta = load_trained(classifier_dir(path))
    # eager attention traces into the MatMul/Softmax pattern that ONNX Runtime fuses into one Attention op
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model.eval(), tokenizer, meta


def _input_names(model, tokenizer) -> list[str]:
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return [k for k in INPUT_NAMES if k in tokenizer.model_input_names and k in accepted]


def export_onnx(model, input_names: list[str], path: Path, opset: int) -> None:
    import warnings

    import torch

    from domainlm.classify.model import classifier_logits

    class Logits(torch.nn.Module):  # positional inputs in a fixed order -> one output
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            # the last layer for the [CLS] position only, as in PyTorch (classify.model.classifier_logits)
            return classifier_logits(self.inner, **dict(zip(input_names, inputs)))

    wrapper = Logits(model).eval()
    # the second row is padded: a trace without padding would leave the attention mask out of the graph
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in input_names)
    if "attention_mask" in input_names:
        example[input_names.index("attention_mask")][1, 5:] = 0
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python conditions; the verification decides
        torch.onnx.export(
            wrapper,
            example,
            str(path),
            input_names=input_names,
            output_names=["logits"],
            dynamic_axes={**axes, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    model.eval()  # export restores the wrapper's mode, which would switch the model's dropout back on


def optimize_graph(src: Path, dst: Path, config) -> dict:
    """Fuse attention, LayerNorm and GELU (ONNX Runtime's transformer optimizer). Returns the fused op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads = getattr(config, "num_attention_heads", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    optimized = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    optimized.save_model_to_file(str(dst))
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic quantization: int8 weights, activations quantized per batch at run time; no calibration data.
    7-bit weight range (reduce_range): without VNNI (AVX2 CPUs) the u8 x s8 kernels can saturate their 16-bit
    sums, which flipped borderline answers in our tests; the reduced range avoids that."""
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice to pre-process is for static quantization
    quantize_dynamic(
        str(src),
        str(dst),
        weight_type=QuantType.QInt8,
        reduce_range=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def sample_batches(tokenizer, input_names: list[str], max_len: int, type_vocab: int, seed: int = 0) -> list[dict]:
    """Random token ids in the shapes above, each row with its own length (padding inside the batch)."""
    rng = np.random.default_rng(seed)
    vocab = len(tokenizer)
    cls_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else 1
    sep_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else 2
    pad_id = tokenizer.pad_token_id or 0
    batches = []
    for batch_size, length in VERIFY_SHAPES:
        length = length or max_len
        ids = rng.integers(0, vocab, size=(batch_size, length))
        mask = np.ones((batch_size, length), dtype=np.int64)
        types = np.zeros((batch_size, length), dtype=np.int64)
        for row in range(batch_size):
            used = length if row == 0 else int(rng.integers(2, length + 1))
            ids[row, 0], ids[row, used - 1] = cls_id, sep_id
            ids[row, used:], mask[row, used:] = pad_id, 0
            if type_vocab > 1 and used > 3 and row % 2:  # a text pair: the second segment has type 1
                types[row, used // 2 : used] = 1
        full = {"input_ids": ids.astype(np.int64), "attention_mask": mask, "token_type_ids": types}
        batches.append({k: full[k] for k in input_names})
    return batches


def compare(runtime: OnnxRuntime, model, batches: list[dict], multilabel: bool) -> tuple[float, float]:
    """(max |ORT - PyTorch| probability, share of rows with the same best label) over the sample batches."""
    import torch

    worst, same, rows = 0.0, 0, 0
    for batch in batches:
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float()
        ref = (torch.sigmoid(logits) if multilabel else torch.softmax(logits, -1)).numpy()
        got = runtime.probs_batch(batch)
        if got.shape != ref.shape:
            raise DomainLMError(
                f"ONNX output shape {got.shape} != PyTorch {ref.shape} for a batch of "
                f"{batch['input_ids'].shape}: the axes are not dynamic"
            )
        worst = max(worst, float(np.abs(got - ref).max()))
        same += int((got.argmax(-1) == ref.argmax(-1)).sum())
        rows += len(ref)
    return worst, same / rows


def read_data(cfg: ExportConfig, meta: dict):
    """--data, read and checked against the model's labels before any export work (columns: the options', else the
    ones the model was trained on)."""
    from types import SimpleNamespace

    from domainlm.classify.data import Columns, check_labels, read_examples

    saved = SimpleNamespace(text_column=meta.get("text_column") or "text", pair_column=meta.get("pair_column"))
    data = read_examples(cfg.data, Columns.of(cfg, saved), bool(meta.get("multilabel")), flag="--data")
    check_labels(data, list(meta["labels"]))
    return data


def data_metrics(cfg: ExportConfig, runtimes: dict[str, OnnxRuntime], data) -> dict:
    """Accuracy / F1 of each exported model on --data, and the change int8 brings."""
    from domainlm.classify.report import score

    any_rt = next(iter(runtimes.values()))
    texts = [ex.text for ex in data.examples]
    pairs = [ex.text_pair or "" for ex in data.examples] if cfg.pair_column or any_rt.pair_column else None
    keys = ("f1_micro", "f1_macro", "exact_match") if any_rt.multilabel else ("accuracy", "f1_macro")
    result: dict = {"data": cfg.data, "rows": len(data)}
    for name, rt in runtimes.items():
        probs = rt.predict(texts, pairs, cfg.batch_size)
        metrics = score(probs, data, rt.labels, rt.multilabel, 2, rt.thresholds if rt.multilabel else None)
        result[name] = {k: round(float(metrics[k]), 6) for k in keys if k in metrics}
    if "int8" in result:
        result["int8_change_points"] = {
            k: round(100 * (result["int8"][k] - result["fp32"][k]), 3) for k in result["fp32"]
        }
    return result


def export_ensemble(cfg: ExportConfig) -> dict:
    """A fold ensemble: each member exported (and verified) into --out/<member>, and an ensemble.json listing them,
    so that the export folder is again an ensemble that predict, evaluate and serve take."""
    from domainlm.classify.ensemble_file import read_ensemble, write_ensemble

    meta = read_ensemble(cfg.model)  # its members are folders inside it, never paths elsewhere
    with outputs.run_folder(
        cfg.out, "export", replace=True, overwrite=cfg.overwrite, models={"--model": cfg.model}, legacy=is_export_dir
    ) as out:
        members = {
            member: _prepared(dataclasses.replace(cfg, model=str(Path(cfg.model) / member)))
            for member in meta["members"]
        }
        out.begin()
        infos = {}
        for member, prepared in members.items():
            _log(f"member {member}")
            infos[member] = _export_into(out.sub(member), *prepared)
        extra = {k: v for k, v in meta.items() if k not in ("kind", "members", "labels", "multilabel", "thresholds")}
        write_ensemble(
            out,
            list(meta["members"]),
            meta["labels"],
            bool(meta.get("multilabel")),
            meta.get("thresholds"),
            **extra,
            source=str(Path(cfg.model).resolve()),
        )
        out.write_text("config.yaml", cfglib.dump(cfg))
    return {"members": infos}


def _prepared(cfg: ExportConfig) -> tuple:
    """Everything checked and loaded before anything is written: the classifier, its tokenizer and labels, --data."""
    model_dir = classifier_dir(cfg.model)
    if not Path(model_dir).is_dir():
        raise DomainLMError(f"model folder {cfg.model} does not exist")
    if is_export_dir(cfg.model):
        raise DomainLMError(f"{cfg.model} is already an export; give the PyTorch classifier it came from")
    if cfg.data:
        input_file(cfg.data, "--data")
    model, tokenizer, meta = _load(model_dir)
    checks.label_map(list(meta.get("labels") or []), model, model_dir)  # else every served request would fail
    data = read_data(cfg, meta) if cfg.data else None
    # the length the classifier was trained at (else MAX_SEQ_LEN) unless --max-seq-len says otherwise, within
    # the model's positions: what predict and serve use by default
    max_len = checks.max_seq_len(
        model.config, cfg.max_seq_len or meta.get("max_seq_len") or MAX_SEQ_LEN, model_dir, cap=True
    )
    if tokenizer.model_max_length and tokenizer.model_max_length < 10**6:
        max_len = min(max_len, tokenizer.model_max_length)
    cfg = dataclasses.replace(cfg, max_seq_len=max_len)  # what config.yaml records, and --data is checked at
    return cfg, model_dir, model, tokenizer, meta, data


def export(cfg: ExportConfig) -> dict:
    from domainlm.classify.ensemble_file import is_ensemble

    if is_ensemble(cfg.model) and not is_export_dir(cfg.model):
        return export_ensemble(cfg)
    with outputs.run_folder(
        cfg.out,
        "export",
        replace=True,
        overwrite=cfg.overwrite,
        models={"--model": classifier_dir(cfg.model)},
        legacy=is_export_dir,
    ) as out:
        prepared = _prepared(cfg)
        out.begin()  # written beside --out, swapped into place once verified: a failed export leaves no half folder
        info = _export_into(out, *prepared)
        out.write_text("config.yaml", cfglib.dump(prepared[0]))
    return info


def _export_into(out, cfg: ExportConfig, model_dir: str, model, tokenizer, meta: dict, data) -> dict:
    """The ONNX export of one classifier into `out` (a Writer), verified against PyTorch (and int8 too)."""
    import onnxruntime
    import torch

    started = time.perf_counter()
    input_names = _input_names(model, tokenizer)
    max_len = cfg.max_seq_len
    folder = out.root()
    fp32, raw = out.file("model.onnx"), out.file("model.raw.onnx")
    _log(f"exporting {model_dir} to ONNX (opset {cfg.opset}, inputs {', '.join(input_names)})")
    with out.writing():
        export_onnx(model, input_names, raw if cfg.optimize else fp32, cfg.opset)
    fused: dict = {}
    if cfg.optimize:
        with out.writing():
            fused = optimize_graph(raw, fp32, model.config)
        raw.unlink()
        _log("fused: " + (", ".join(f"{k} {v}" for k, v in fused.items()) or "nothing"))
    with out.writing():
        tokenizer.save_pretrained(folder)
        write_hf_config(folder, model, meta)  # config.json with the label map: optimum and transformers load the folder
    out.write_json(LABELS_FILE, meta)
    info = {
        "format": "onnx",
        "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
        "opset": cfg.opset,
        "optimized": fused,
        "inputs": input_names,
        "dynamic_axes": {"batch": 0, "sequence": 1},
        "max_seq_len": max_len,
        "max_position_embeddings": getattr(model.config, "max_position_embeddings", None),
        "model_type": getattr(model.config, "model_type", ""),
        "source": str(Path(model_dir).resolve()),
        "files": {"fp32": "model.onnx"},
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    out.write_json(EXPORT_META, info)  # the runtime reads it; rewritten whole below
    batches = sample_batches(tokenizer, input_names, max_len, getattr(model.config, "type_vocab_size", 1))
    multilabel = bool(meta.get("multilabel"))
    runtimes = {"fp32": OnnxRuntime(str(folder), "fp32")}
    diff, agree = compare(runtimes["fp32"], model, batches, multilabel)
    shapes = [list(b["input_ids"].shape) for b in batches]
    info["verification"] = {"shapes": shapes, "fp32_max_abs_diff": diff, "tolerance": cfg.tolerance}
    _log(
        f"verified fp32 on batch x length {', '.join(f'{b}x{n}' for b, n in shapes)}: "
        f"max |ORT - PyTorch| probability {diff:.2e} (tolerance {cfg.tolerance:g})"
    )
    if diff > cfg.tolerance or not np.isfinite(diff):
        raise DomainLMError(
            f"ONNX Runtime and PyTorch disagree: max probability difference {diff:.3g} > --tolerance "
            f"{cfg.tolerance:g}; the export is not usable (try --no-optimize or another --opset)"
        )
    if cfg.quantize == "int8":
        with out.writing():
            quantize_int8(fp32, out.file("model.int8.onnx"))
        info["files"]["int8"] = "model.int8.onnx"
        info["quantization"] = "dynamic int8 (onnxruntime quantize_dynamic, QInt8 weights, reduce_range)"
        out.write_json(EXPORT_META, info)
        runtimes["int8"] = OnnxRuntime(str(folder), "int8")
        diff8, agree8 = compare(runtimes["int8"], model, batches, multilabel)
        info["verification"].update(
            int8_max_abs_diff=diff8, int8_same_best_label=agree8, int8_tolerance=cfg.int8_tolerance
        )
        _log(
            f"int8: max |ORT int8 - PyTorch| probability {diff8:.2e} (tolerance {cfg.int8_tolerance:g}), "
            f"same best label on {100 * agree8:.1f}% of the sample rows"
        )
        if diff8 > cfg.int8_tolerance or not np.isfinite(diff8):
            raise DomainLMError(
                f"the int8 model is too far from PyTorch: max probability difference {diff8:.3g} > "
                f"--int8-tolerance {cfg.int8_tolerance:g}"
            )
    sizes = {name: round((folder / f).stat().st_size / 2**20, 3) for name, f in info["files"].items()}
    info["size_mb"] = sizes
    _log(
        "size: "
        + ", ".join(f"{k} {v:.1f} MiB" for k, v in sizes.items())
        + (f" ({sizes['fp32'] / sizes['int8']:.1f}x smaller)" if "int8" in sizes else "")
    )
    if data is not None:
        info["data_metrics"] = data_metrics(cfg, runtimes, data)
        _log(f"on {cfg.data}: " + json.dumps({k: v for k, v in info["data_metrics"].items() if k not in ("data",)}))
    info["seconds"] = round(time.perf_counter() - started, 2)
    out.write_json(EXPORT_META, info)
    return info
