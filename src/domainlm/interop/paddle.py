"""PaddleNLP ERNIE / BERT folders -> Hugging Face folders (safetensors, config, fast tokenizer).

A PaddleNLP folder holds `model_state.pdparams` (a pickled dict of numpy arrays; or `model.safetensors` with
the same names when saved with safe_serialization) and either `config.json`
(PaddleNLP >= 2.5) or `model_config.json` (older: the constructor arguments under `init_args`), plus
`tokenizer_config.json` naming `ErnieTokenizer` / `BertTokenizer` and `vocab.txt`.

Conversion maps parameter names onto the HF module tree, transposes Linear weights (Paddle stores them
[in, out], PyTorch [out, in]) and refuses unless every Paddle tensor is used and every HF weight is filled.
The weights file is read with an unpickler that admits numpy array reconstruction only: a .pdparams file
from the internet cannot run code here.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np

from domainlm import outputs
from domainlm.errors import DomainLMError

WEIGHTS = "model_state.pdparams"
WEIGHTS_INDEX = "model_state.pdparams.index.json"
LEGACY_CONFIG = "model_config.json"
HF_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")

# PaddleNLP's ERNIE builds its LayerNorms without an epsilon and its weight-init hook then sets every one to
# 1e-12, whatever the config says; its BERT uses config.layer_norm_eps (default 1e-12)
PADDLE_LAYER_NORM_EPS = 1e-12
# PaddleNLP's defaults for keys that older configs leave out (paddlenlp/transformers/ernie/configuration.py)
ERNIE_DEFAULTS = {
    "hidden_act": "gelu",
    "type_vocab_size": 2,
    "task_type_vocab_size": 3,
    "use_task_id": False,
    "pad_token_id": 0,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
}
BERT_DEFAULTS = {
    "hidden_act": "gelu",
    "type_vocab_size": 16,
    "pad_token_id": 0,
    "max_position_embeddings": 512,
    "initializer_range": 0.02,
}
HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "pad_token_id",
    "task_type_vocab_size",
    "use_task_id",
)


def has_hf_weights(path: Path) -> bool:
    return any(any(path.glob(g)) for g in HF_WEIGHT_GLOBS)


def is_paddle_folder(path: str | Path) -> bool:
    """A PaddleNLP model folder: a config.json written by PaddleNLP (it has `paddlenlp_version`), or Paddle
    weights / the older model_config.json without HF weights beside them."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        config = (
            json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").is_file() else {}
        )
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        config = {}
    if isinstance(config, dict) and "paddlenlp_version" in config:
        return True
    if has_hf_weights(path):
        return False
    return (path / WEIGHTS).is_file() or (path / WEIGHTS_INDEX).is_file() or (path / LEGACY_CONFIG).is_file()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DomainLMError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise DomainLMError(f"{path}: expected a JSON object")
    return value


# ---- config ---------------------------------------------------------------------------------------------


def _flatten_legacy(config: dict) -> dict:
    """`model_config.json`: {"init_args": [{...base model args..., "init_class": "ErnieModel"}],
    "init_class": "ErnieForSequenceClassification", "num_classes": 2} or a flat dict with "init_class"."""
    flat: dict = {}
    outer_class = config.get("init_class")
    args = config.get("init_args")
    if isinstance(args, list) and args and isinstance(args[0], dict):
        flat.update(_flatten_legacy(args[0]))
    flat.update({k: v for k, v in config.items() if k not in ("init_args", "init_class")})
    flat["architecture"] = outer_class or flat.get("architecture")
    flat.setdefault(
        "base_class",
        (args[0].get("init_class") if isinstance(args, list) and args and isinstance(args[0], dict) else None)
        or outer_class,
    )
    return flat


def read_paddle_config(folder: str | Path) -> dict:
    """The model's arguments as a flat dict with `model_type` ("ernie" | "bert") and `architecture`."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        source = folder / "config.json"
        flat = _read_json(source)
        archs = flat.get("architectures") or []
        flat["architecture"] = archs[0] if archs else None
    elif (folder / LEGACY_CONFIG).is_file():
        source = folder / LEGACY_CONFIG
        flat = _flatten_legacy(_read_json(source))
    else:
        raise DomainLMError(f"{folder}: a PaddleNLP folder needs config.json or {LEGACY_CONFIG}; neither is there")
    names = " ".join(str(flat.get(k) or "") for k in ("model_type", "architecture", "base_class")).lower()
    model_type = "ernie" if "ernie" in names else "bert" if "bert" in names else None
    if model_type is None:
        raise DomainLMError(
            f"{source}: model type {flat.get('model_type') or flat.get('architecture') or 'unknown'} is not supported; "
            "domainlm converts PaddleNLP ERNIE and BERT models"
        )
    flat["model_type"] = model_type
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if k not in flat
    ]
    if missing:
        raise DomainLMError(f"{source}: missing {', '.join(missing)}")
    if flat.get("pool_act", "tanh") != "tanh":
        raise DomainLMError(f"{source}: pool_act {flat['pool_act']!r} has no Hugging Face equivalent (tanh only)")
    flat["_source"] = str(source)
    return flat


def hf_config(folder: str | Path, num_labels: int | None = None):
    """The Hugging Face ErnieConfig / BertConfig equivalent of a PaddleNLP folder's config."""
    from transformers import BertConfig, ErnieConfig

    flat = read_paddle_config(folder)
    defaults = ERNIE_DEFAULTS if flat["model_type"] == "ernie" else BERT_DEFAULTS
    kwargs = {**defaults, **{k: flat[k] for k in HF_KEYS if k in flat}}
    kwargs["layer_norm_eps"] = (
        PADDLE_LAYER_NORM_EPS if flat["model_type"] == "ernie" else flat.get("layer_norm_eps", PADDLE_LAYER_NORM_EPS)
    )
    names = flat.get("id2label")
    labels = (
        num_labels
        or flat.get("num_labels")
        or flat.get("num_classes")
        or (len(names) if isinstance(names, dict) else None)
    )
    if labels:
        kwargs["num_labels"] = int(labels)
        if isinstance(names, dict) and len(names) == int(labels):  # the classes' names, when PaddleNLP kept them
            kwargs["id2label"] = {int(k): str(v) for k, v in names.items()}
    if flat["model_type"] == "ernie":
        return ErnieConfig(**kwargs)
    kwargs.pop("task_type_vocab_size", None)
    kwargs.pop("use_task_id", None)
    return BertConfig(**kwargs)


# ---- weights --------------------------------------------------------------------------------------------


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits what `paddle.save` writes for a state dict: dicts, strings, tuples and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "tuple"),  # paddle.save reduces a Tensor to tuple(((name, ndarray),))
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # pickle protocol 2 (older Paddle) writes array bytes as encode(str, "latin1")
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array part; refusing to load it")


def load_pdparams(path: str | Path) -> dict[str, np.ndarray]:
    """A `.pdparams` state dict as name -> numpy array, without running any code from the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            state = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DomainLMError(f"{path}: not loaded: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DomainLMError(f"{path}: not a readable .pdparams file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise DomainLMError(f"{path}: expected a dict of parameters, found {type(state).__name__}")
    big = state.pop("UnpackBigParamInfor@@", None) or {}
    state.pop("StructuredToParameterName@@", None)  # metadata, not a tensor
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]
        if not isinstance(value, np.ndarray):
            raise DomainLMError(f"{path}: entry {key!r} is {type(value).__name__}, not an array")
        out[str(key)] = value
    for key, info in big.items():  # paddle.save splits arrays over 4 GB into slices
        parts = [out.pop(s) for s in info["slices"]]
        out[key] = np.concatenate([p.ravel() for p in parts]).reshape(info["OriginShape"])
    return out


def load_paddle_weights(folder: Path) -> dict[str, np.ndarray]:
    if (folder / WEIGHTS).is_file():
        return load_pdparams(folder / WEIGHTS)
    if (folder / WEIGHTS_INDEX).is_file():
        index = _read_json(folder / WEIGHTS_INDEX).get("weight_map", {})
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(index.values())):
            state.update(load_pdparams(folder / shard))
        return state
    # PaddleNLP's safe_serialization: the same names and [in, out] layout as .pdparams, in safetensors files
    shards = sorted(folder.glob("model*.safetensors"))
    if shards:
        from safetensors.numpy import load_file

        state = {}
        for shard in shards:
            try:
                state.update(load_file(str(shard)))
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise DomainLMError(f"{shard}: not a readable safetensors file ({e})") from None
        return state
    raise DomainLMError(f"{folder}: no {WEIGHTS} or model.safetensors (the PaddleNLP weights) in the folder")


# (pattern on the Paddle name without the model prefix, HF name, Linear weight to transpose)
_BODY_RULES = [
    (r"embeddings\.layer_norm\.(weight|bias)", r"embeddings.LayerNorm.\1", False),
    (r"embeddings\.(word|position|token_type|task_type)_embeddings\.weight", r"embeddings.\1_embeddings.weight", False),
    (r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"encoder.layer.\1.attention.self.query.\2", True),
    (r"encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"encoder.layer.\1.attention.self.key.\2", True),
    (r"encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"encoder.layer.\1.attention.self.value.\2", True),
    (
        r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
        r"encoder.layer.\1.attention.output.dense.\2",
        True,
    ),
    (r"encoder\.layers\.(\d+)\.norm1\.(weight|bias)", r"encoder.layer.\1.attention.output.LayerNorm.\2", False),
    (r"encoder\.layers\.(\d+)\.linear1\.(weight|bias)", r"encoder.layer.\1.intermediate.dense.\2", True),
    (r"encoder\.layers\.(\d+)\.linear2\.(weight|bias)", r"encoder.layer.\1.output.dense.\2", True),
    (r"encoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"encoder.layer.\1.output.LayerNorm.\2", False),
    (r"pooler\.dense\.(weight|bias)", r"pooler.dense.\1", True),
]
_HEAD_RULES = [
    (r"cls\.predictions\.transform\.(weight|bias)", r"cls.predictions.transform.dense.\1", True),
    (r"cls\.predictions\.layer_norm\.(weight|bias)", r"cls.predictions.transform.LayerNorm.\1", False),
    # the decoder is [vocab, hidden] in both (PaddleNLP >= 2.5: a TransposedLinear; older: decoder_weight)
    (r"cls\.predictions\.decoder(?:_weight|\.weight)", r"cls.predictions.decoder.weight", False),
    (r"cls\.predictions\.decoder(?:_bias|\.bias)", r"cls.predictions.bias", False),  # one tensor, two names
    (r"cls\.seq_relationship\.(weight|bias)", r"cls.seq_relationship.\1", True),
    (r"classifier\.(weight|bias)", r"classifier.\1", True),
]


def map_names(state: dict[str, np.ndarray], prefix: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Paddle names -> HF names (Linear weights transposed); returns the mapped dict and the unused names."""
    mapped, unused = {}, []
    for name, array in state.items():
        body = name[len(prefix) + 1 :] if name.startswith(prefix + ".") else name
        for rules, hf_prefix, text in ((_BODY_RULES, prefix + ".", body), (_HEAD_RULES, "", name)):
            hit = next(((p, r, t) for p, r, t in rules if re.fullmatch(p, text)), None)
            if hit is not None:
                pattern, repl, transpose = hit
                new = hf_prefix + re.sub(pattern, repl, text)
                array = array.T if transpose and array.ndim == 2 and new.endswith("weight") else array
                if new in mapped and not np.array_equal(mapped[new], array):
                    raise DomainLMError(
                        f"two different Paddle tensors map to {new}; the file is not a model domainlm knows"
                    )
                mapped[new] = array
                break
        else:
            unused.append(name)
    return mapped, unused


def _to_tensor(array: np.ndarray, like):
    import torch

    if array.dtype == np.uint16 and like.is_floating_point():  # Paddle hands bfloat16 to numpy as raw uint16
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(like.dtype)


def build_hf_model(folder: str | Path):
    """The HF model holding a PaddleNLP folder's weights; refuses, naming them, on any unused or unfilled one."""
    import torch
    import transformers

    folder = Path(folder)
    state = load_paddle_weights(folder)
    flat = read_paddle_config(folder)
    prefix = flat["model_type"]  # PaddleNLP and HF both call the base model `ernie` / `bert`
    mapped, unused = map_names(state, prefix)
    if unused:
        raise DomainLMError(
            f"{folder}: {len(unused)} Paddle tensors have no Hugging Face counterpart "
            f"({', '.join(sorted(unused)[:8])}); refusing a partial conversion"
        )
    family = "Ernie" if prefix == "ernie" else "Bert"
    has = lambda p: any(k.startswith(p) for k in mapped)  # noqa: E731
    if has("classifier."):
        head, num_labels = "ForSequenceClassification", mapped["classifier.weight"].shape[0]
    elif has("cls.seq_relationship."):
        head, num_labels = "ForPreTraining", None
    elif has("cls.predictions."):
        head, num_labels = "ForMaskedLM", None
    else:
        head, num_labels = "Model", None
    if head == "Model":  # a bare HF base model names its weights without the `ernie.` / `bert.` prefix
        mapped = {k[len(prefix) + 1 :]: v for k, v in mapped.items()}
    config = hf_config(folder, num_labels)
    word = f"{prefix}.embeddings.word_embeddings.weight"
    decoder = mapped.get("cls.predictions.decoder.weight")
    if decoder is not None and word in mapped and not np.array_equal(decoder, mapped[word]):
        config.tie_word_embeddings = False  # a separately trained output matrix: keep it separate
    elif has("cls.predictions.") and word in mapped:
        mapped["cls.predictions.decoder.weight"] = mapped[word]  # shared with the embeddings in both frameworks
    if "cls.predictions.bias" in mapped:
        mapped["cls.predictions.decoder.bias"] = mapped["cls.predictions.bias"]
    cls = getattr(transformers, family + head)
    with torch.device("meta"):  # names and shapes only: no time spent on random initialisation
        expected = cls(config).state_dict()
    unfilled = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    if unfilled or extra:
        what = (
            [f"{len(unfilled)} {cls.__name__} weights not in the Paddle file ({', '.join(unfilled[:8])})"]
            if unfilled
            else []
        )
        what += [f"{len(extra)} tensors the model does not have ({', '.join(extra[:8])})"] if extra else []
        raise DomainLMError(f"{folder}: {'; '.join(what)}; refusing a partial conversion")
    wrong = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(mapped[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise DomainLMError(f"{folder}: shapes do not match the config: {', '.join(wrong[:6])}")
    model, info = cls.from_pretrained(
        None,
        config=config,
        state_dict={k: _to_tensor(mapped[k], v) for k, v in expected.items()},
        output_loading_info=True,
    )
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise DomainLMError(
            f"{folder}: transformers did not take every weight ({problems or info['error_msgs']}); "
            "refusing a partial conversion"
        )
    model.eval()
    return model, {
        "paddle_tensors": len(state),
        "hf_weights": len(expected),
        "architecture": cls.__name__,
        "config_source": Path(flat["_source"]).name,
        "task_id": flat.get("task_id", 0),
    }


def source_fingerprint(folder: Path) -> str:
    """Changes when the Paddle weights or config change: a cached conversion is then redone."""
    parts = []
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        stat = (folder / name).stat()
        parts.append((name, stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps([str(folder.resolve()), parts]).encode()).hexdigest()[:16]


CONVERT_OUTPUTS = (
    "config.json",
    "model.safetensors",
    "conversion.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _earlier_conversion(out: Path) -> bool:
    """A conversion written before manifests: its conversion.json is convert's report (not just a file of that name)."""
    try:
        report = json.loads((out / "conversion.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"source", "source_fingerprint", "architecture"} <= set(report)


def convert(src: str | Path, out: str | Path, overwrite: bool = False, log=print) -> dict:
    """Write the HF equivalent of a PaddleNLP folder into `out` (built beside it, renamed into place)."""
    from domainlm.interop.tokenizer import load_fast_tokenizer

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DomainLMError(f"{src}: no such folder")
    if not is_paddle_folder(src):
        raise DomainLMError(
            f"{src} is not a PaddleNLP model folder (no {WEIGHTS} or {LEGACY_CONFIG}, "
            "or it already holds Hugging Face weights)"
        )
    if outputs.inside(out, src):
        raise DomainLMError(f"--out {out} is inside the PaddleNLP folder; choose a folder outside it")
    with outputs.run_folder(
        out,
        "convert",
        patterns=CONVERT_OUTPUTS,
        overwrite=overwrite,
        replace=True,
        models={"PADDLE_DIR": str(src)},
        legacy=_earlier_conversion,
    ) as target:
        model, report = build_hf_model(src)
        tokenizer = load_fast_tokenizer(str(src), log=log) if (src / "vocab.txt").is_file() else None
        if tokenizer is None:
            print(
                f"warning: {src} has no vocab.txt, so {out} gets no tokenizer: copy the model's vocab.txt (or "
                "tokenizer files) into it before using it",
                file=sys.stderr,
            )
        if report["task_id"]:
            log(
                f"note: the Paddle config sets task_id {report['task_id']}; Hugging Face ERNIE uses task type 0 "
                "unless task_type_ids are passed"
            )
        target.begin()  # the old folder stays until the new one is complete and in place
        with target.writing():
            model.save_pretrained(target.root())
            if tokenizer is not None:
                tokenizer.save_pretrained(target.root())
        report = {
            **report,
            "source": str(src.resolve()),
            "source_fingerprint": source_fingerprint(src),
            "tokenizer": tokenizer is not None,
        }
        target.write_json("conversion.json", report)
    log(
        f"converted {src} ({report['config_source']}, {report['paddle_tensors']} Paddle tensors) -> {out} "
        f"({report['architecture']}, {report['hf_weights']} weights{', fast tokenizer' if tokenizer else ''})"
    )
    return report


def converted_copy(src: str | Path, work_dir, log=print) -> str:
    """The HF conversion of a PaddleNLP folder, cached in `work_dir/converted-model` (redone when the source
    changes; `work_dir`: a folder, or a run's Writer, which records the entry). The user's folder is only read."""
    src = Path(src)
    target = (
        work_dir.record("converted-model")
        if isinstance(work_dir, outputs.Writer)
        else Path(work_dir) / "converted-model"
    )
    marker = target / "conversion.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")).get("source_fingerprint") == source_fingerprint(src):
                log(f"model: {src} is a PaddleNLP folder; using its conversion in {target}")
                return str(target)
        except (OSError, json.JSONDecodeError):
            pass
    log(
        f"model: {src} is a PaddleNLP folder; converting it to Hugging Face format in {target} "
        f"(once; `domainlm convert {src} --out DIR` makes a reusable copy)"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(src, target, overwrite=True, log=log)
    return str(target)
