"""The teacher's side: its label map (read without loading it), the unlabelled texts, and its outputs computed once,
batched, and cached in --out keyed by a hash of the teacher's files and the texts."""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from domainlm.errors import DomainLMError
from domainlm.outputs import Writer

CACHE = "teacher_cache"


def model_labels(path: str) -> tuple[list[str], bool]:
    """The labels and task of any classifier folder, from its label file (a fold ensemble, an export, a finetune
    output or its model/, a linear floor); the model itself is not loaded."""
    from domainlm.classify.runtime import LABELS_FILE, classifier_dir

    folder = Path(path)
    if not folder.exists():
        raise DomainLMError(f"--teacher {path} does not exist")
    for candidate in (
        folder / "ensemble.json",
        folder / LABELS_FILE,
        Path(classifier_dir(folder)) / LABELS_FILE,
        folder / "linear.json",
    ):
        if candidate.is_file():
            meta = json.loads(candidate.read_text(encoding="utf-8"))
            if "labels" in meta:
                return list(meta["labels"]), bool(meta.get("multilabel"))
    raise DomainLMError(
        f"--teacher {path} is not a classifier folder (no label map found); give a `domainlm finetune` output"
    )


def _fingerprint(path: str) -> list:
    """Every file of the teacher (sizes and modification times): a retrained or replaced teacher is a new key."""
    root = Path(path).resolve()
    return [str(root)] + [
        (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and CACHE not in p.parts
    ]


def cache_key(
    teacher: str, parts: dict[str, tuple[list[str], list[str] | None]], max_seq_len: int, hidden: bool = False
) -> str:
    h = hashlib.sha256(json.dumps(_fingerprint(teacher)).encode())
    h.update(f"{max_seq_len} {hidden}".encode())
    for name, (texts, pairs) in parts.items():
        h.update(json.dumps([name, texts, pairs], ensure_ascii=False).encode())
    return h.hexdigest()[:20]


def read_cache(folder: Path, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """The cached outputs under `key`, verified: the .json parses, names the .npz's SHA-256, and the .npz holds
    numeric arrays only (read without pickles). Anything else is a damaged cache: None, with a notice."""
    arrays, meta_file = folder / f"{key}.npz", folder / f"{key}.json"
    if not arrays.is_file() and not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        data = arrays.read_bytes()
        if not isinstance(meta, dict) or meta.get("sha256") != hashlib.sha256(data).hexdigest():
            raise ValueError("its checksum does not match")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            probs = {k: z[k] for k in z.files}
        if not all(np.issubdtype(v.dtype, np.floating) and np.isfinite(v).all() for v in probs.values()):
            raise ValueError("it holds arrays that are not finite numbers")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        print(
            f"notice: the teacher cache {arrays} is damaged ({str(e).splitlines()[0][:120]}); computing the "
            "teacher's outputs again",
            file=sys.stderr,
        )
        return None
    return probs, meta


def teacher_outputs(
    teacher: str,
    parts: dict[str, tuple[list[str], list[str] | None]],
    out: Writer,
    max_seq_len: int,
    batch_size: int,
    load,
    speed_part: str,
    hidden: bool = False,
) -> tuple[dict[str, np.ndarray], dict]:
    """The teacher's probabilities for each named set of texts (and with `hidden` its last [CLS] states, as
    "hidden-<name>"), from the cache in `out`/teacher_cache when its key matches and it verifies (the teacher is
    then not loaded), else computed in one batched pass each and cached. Also its speed on `speed_part`."""
    key = cache_key(teacher, parts, max_seq_len, hidden)
    cache = out.sub(CACHE)
    cached = read_cache(cache.root(), key)
    if cached is not None:
        print(f"teacher outputs: reused {cache.root() / f'{key}.npz'}", file=sys.stderr)
        return cached
    runtime = load(teacher)
    from domainlm.classify.runtime import TorchRuntime

    if hidden and not isinstance(runtime, TorchRuntime):
        raise DomainLMError(
            f"--hidden-weight needs a PyTorch teacher (a `finetune` output); {teacher} is "
            f"{runtime.kind}, whose hidden states are not at hand"
        )
    probs, meta = (
        {},
        {
            "teacher": str(Path(teacher).resolve()),
            "kind": runtime.kind,
            "max_seq_len": max_seq_len,
            "rows": {k: len(v[0]) for k, v in parts.items()},
        },
    )
    if parts.get(speed_part, ([],))[0]:  # a first call pays for lazy set-up: not part of the timed pass
        runtime.predict(
            parts[speed_part][0][:8],
            None if parts[speed_part][1] is None else parts[speed_part][1][:8],
            batch_size,
            max_seq_len,
        )
    for name, (texts, pairs) in parts.items():
        started = time.perf_counter()
        probs[name] = (
            runtime.predict(texts, pairs, batch_size, max_seq_len)
            if texts
            else np.zeros((0, len(runtime.labels)), np.float32)
        )
        if name == speed_part and texts:
            meta["texts_per_s"] = len(texts) / max(time.perf_counter() - started, 1e-9)
        if hidden:
            probs[f"hidden-{name}"] = cls_states(runtime, texts, pairs, batch_size, max_seq_len)
    buffer = io.BytesIO()
    np.savez(buffer, **probs)
    data = buffer.getvalue()
    cache.write_bytes(f"{key}.npz", data)  # complete or absent: a run killed here leaves no half cache
    cache.write_json(f"{key}.json", {**meta, "sha256": hashlib.sha256(data).hexdigest()})
    print(f"teacher outputs: computed and cached in {cache.root() / f'{key}.npz'}", file=sys.stderr)
    return probs, meta


def cls_states(runtime, texts: list[str], pairs: list[str] | None, batch_size: int, max_seq_len: int) -> np.ndarray:
    """The last layer's [CLS] state of a PyTorch classifier's encoder for each text, in input order."""
    import torch

    from domainlm.classify.batching import length_batches

    width = runtime.model.config.hidden_size
    states = np.zeros((len(texts), width), dtype=np.float32)
    if not texts:
        return states
    features = runtime.encode(texts, pairs, max_seq_len)
    for idx in length_batches([len(f["input_ids"]) for f in features], batch_size):
        batch = runtime.pad([features[i] for i in idx])
        feed = {k: torch.from_numpy(v).to(runtime.device) for k, v in batch.items() if k in runtime.input_names}
        with torch.inference_mode(), runtime.autocasting():  # the precision its probabilities ran at
            states[idx] = runtime.model.base_model(**feed).last_hidden_state[:, 0].float().cpu().numpy()
    return states


def unlabeled_texts(cfg) -> list[str]:
    """--unlabeled (a .txt file, one text per line, or a data file's --text-column) or --corpus (its documents)."""
    if cfg.unlabeled:
        from domainlm.files import input_file, read_text_input

        path = input_file(cfg.unlabeled, "--unlabeled")
        if path.suffix.lower() == ".txt":
            texts = [line.strip() for line in read_text_input(path, "--unlabeled").splitlines() if line.strip()]
        else:
            from domainlm.classify.data import Columns, read_examples

            data = read_examples(
                str(path),
                Columns(cfg.text_column),
                False,
                require_labels=False,
                skip_bad=True,
                skip_flag=None,
                flag="--unlabeled",
            )
            texts = [ex.text for ex in data.examples]
        if not texts:
            raise DomainLMError(f"--unlabeled {path} holds no text")
    elif cfg.corpus:
        texts = corpus_texts(cfg.corpus, cfg.max_unlabeled)
    else:
        return []
    return texts[: cfg.max_unlabeled] if cfg.max_unlabeled else texts


_ASCII_EDGE = re.compile(r"[A-Za-z0-9]")


def corpus_texts(path: str, limit: int = 0) -> list[str]:
    """A corpus store's documents as text, decoded with the store's tokenizer (words joined without spaces, except
    between two Latin-script words)."""
    from domainlm.data.inspect import decode_with_words
    from domainlm.data.store import Corpus
    from domainlm.interop.tokenizer import load_fast_tokenizer

    corpus = Corpus(path)
    local = Path(path) / "tokenizer"
    tokenizer = load_fast_tokenizer(str(local) if local.is_dir() else corpus.meta["tokenizer"], flag="--corpus")
    texts = []
    for doc in range(corpus.n_documents):
        sentences = corpus.document_sentences(doc)
        ids, starts = corpus.span(sentences.start, sentences.stop)
        words = decode_with_words(tokenizer, ids, starts, sep="\x00").split("\x00")
        text = ""
        for w in words:
            text += " " + w if text and _ASCII_EDGE.match(text[-1]) and _ASCII_EDGE.match(w[:1]) else w
        if text.strip():
            texts.append(text.strip())
        if limit and len(texts) >= limit:
            break
    if not texts:
        raise DomainLMError(f"--corpus {path} holds no documents")
    return texts
