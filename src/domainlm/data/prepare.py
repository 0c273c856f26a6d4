"""`domainlm prepare` (raw documents -> corpus store + stats) and `domainlm inspect`.

Reading and duplicate decisions run in this process, in input order; cleaning, sentence splitting,
segmentation, tokenization and MinHash run in a pool of worker processes with a bounded number of chunks in
flight, so memory stays flat. The store is written into a hidden sibling folder and renamed into place when
complete: an interrupted run never leaves a store that a later stage could take for a good one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from domainlm import __version__, outputs
from domainlm import config as cfglib
from domainlm.config import option, reuse
from domainlm.data import shards
from domainlm.data.clean import Deduplicator
from domainlm.data.readers import SUFFIXES, Document, ReadOptions, discover, format_of, read_file
from domainlm.data.store import FILES, Corpus, CorpusWriter, find_imports, read_megatron, read_paddlenlp
from domainlm.data.store import FORMAT as STORE_FORMAT
from domainlm.data.tokenize import (
    DocumentEncoder,
    EncodedDocument,
    EncodeOptions,
    corpus_forbidden_ids,
    encode_chunk,
    init_worker,
    vocab_hash,
)
from domainlm.errors import DomainLMError
from domainlm.interop.tokenizer import load_fast_tokenizer
from domainlm.options import RunOptions


@dataclass(kw_only=True)
class PrepareConfig(RunOptions):
    input: list[str] = option(
        [],
        "files or folders of raw documents (txt, jsonl, md, pdf, docx, .gz; "
        "or a PaddleNLP *_ids.npy / Megatron .bin corpus to import)",
        positional=True,
    )
    out: str = reuse(RunOptions, "out", dataclasses.MISSING, "output folder for the corpus store")
    tokenizer: str = option(help="Hugging Face fast tokenizer: a name or a path")
    language: Literal["auto", "zh", "en"] = option("auto", "document language; auto detects per document")
    segment: bool = option(False, "Chinese word segmentation for whole-word masking")
    segmenter: Literal["rjieba", "jieba"] = option("rjieba", "word segmenter (rjieba is ~25x faster)")
    user_dict: str | None = option(None, "user dictionary of domain terms for the segmenter (jieba format)")
    text_field: str = option("text", "JSONL field holding the document text")
    encoding: Literal["auto", "utf-8", "gb18030"] = option("auto", "text file encoding (GBK is read as gb18030)")
    skip_bad_lines: bool = option(False, "skip and count malformed JSONL lines instead of failing")
    split_books: bool = option(
        True,
        "cut long pdf/docx/md files into documents at their outline (PDF bookmarks), "
        "headings or page groups; the rule used per file is in the stats",
    )
    normalize: Literal["NFC", "NFKC", "none"] = option("NFC", "Unicode normalisation form")
    min_doc_chars: int = option(10, "drop documents shorter than this after cleaning", low=0)
    max_sentence_tokens: int = option(510, "cut longer sentences into pieces of this many tokens", low=8)
    near_dup_threshold: float = option(0.8, "MinHash Jaccard threshold for near duplicates (0: off)", low=0, high=1)
    workers: int = option(-1, "worker processes (-1: one per core, 0: in this process)", low=-1)
    overwrite: bool = reuse(RunOptions, "overwrite", False, "replace an existing, different corpus in --out")
    shard: str | None = option(
        None,
        "I/N: prepare only shard I of N (whole input files, the same share on every machine "
        "given the same inputs), to be joined by `domainlm merge`",
    )

    def check(self) -> None:
        if not self.input:
            raise DomainLMError("no input given: name files or folders of documents")
        if self.shard is not None:
            shards.parse(self.shard)


def _is_import(path: str) -> bool:
    return path.endswith("_ids.npy") or path.endswith(".bin")


def _split_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(corpora to import, raw document inputs). A folder may hold PaddleNLP / Megatron corpora, raw
    documents, or both."""
    imports, raw = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and (pairs := find_imports(path)):
            imports += pairs
            if any(p.is_file() and format_of(p) in SUFFIXES for p in path.rglob("*")):
                raw.append(item)
        elif _is_import(item):
            imports.append(path)
        else:
            raw.append(item)
    return imports, raw


def _fingerprint(cfg: PrepareConfig, files: list[Path], vocab: str) -> str:
    """What the corpus depends on: inputs (path, size, mtime), vocabulary and the options that change output."""
    ignore = {"out", "workers", "overwrite", "shard"}  # a shard's own fingerprint adds it (shards.store_fingerprint)
    options = {k: v for k, v in asdict(cfg).items() if k not in ignore}
    inputs = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([options, inputs, vocab, __version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def shard_options(cfg: PrepareConfig) -> dict:
    """The options that shape a corpus, as shards of one corpus must share them (their inputs are checked apart)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("input", "out", "workers", "overwrite", "shard")}


def _documents(
    files: list[Path],
    options: ReadOptions,
    counters: Counter,
    numbers: list[int] | None = None,
    read: deque | None = None,
) -> Iterator[Document]:
    """The documents of `files` in order; with `read`, each one's input file number (`numbers`) is appended to it."""
    for k, path in enumerate(files):
        counters["files"] += 1
        first = True
        for doc in read_file(path, options, counters):
            counters["documents_read"] += 1
            if doc.split:  # a book format: which rule cut it into documents
                counters[f"split_documents:{doc.split}"] += 1
                counters[f"split_files:{doc.split}"] += first
            first = False
            if read is not None:
                read.append(numbers[k])
            yield doc


def _chunks(docs: Iterator[Document], chunk_chars: int = 1 << 17) -> Iterator[list[Document]]:
    buf, size = [], 0
    for doc in docs:
        buf.append(doc)
        size += len(doc.text)
        if size >= chunk_chars:
            yield buf
            buf, size = [], 0
    if buf:
        yield buf


def _encode_all(
    chunks: Iterator[list[Document]], options: EncodeOptions, workers: int
) -> Iterator[tuple[list[Document], list[EncodedDocument | None]]]:
    """Results in input order, at most 2 chunks per worker in flight (reading never runs far ahead)."""
    if workers == 0:
        encoder = DocumentEncoder(options)
        for chunk in chunks:
            yield chunk, [encoder.encode(d) for d in chunk]
        return
    # spawn, not fork: the parent has loaded a Rust tokenizer whose thread pool does not survive a fork.
    # Workers start with Ctrl-C ignored (an ignored signal stays ignored in the child): the main process alone
    # handles it, stops the pool and removes the partial store, and the user sees one line, not a traceback
    # per worker. Its handler also remembers the Ctrl-C, so that the next chunk stops the run even where the
    # KeyboardInterrupt was lost (Python prints and drops one raised inside a finalizer or a callback).
    seen: list[int] = []

    def remembering(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous, changed = signal.signal(signal.SIGINT, signal.SIG_IGN), True
    except ValueError:  # not the main thread: signals are not ours to change
        previous, changed = None, False
    try:
        pool = mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(options,))
        if changed:
            signal.signal(signal.SIGINT, remembering)
        with pool:
            pending: deque = deque()
            for chunk in chunks:
                pending.append((chunk, pool.apply_async(encode_chunk, (chunk,))))
                if len(pending) >= 2 * workers:
                    yield _next_result(pending, seen)
            while pending:
                yield _next_result(pending, seen)
    finally:
        if changed:
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def _next_result(pending: deque, interrupted: list) -> tuple[list[Document], list[EncodedDocument | None]]:
    if interrupted:
        raise KeyboardInterrupt
    chunk, result = pending.popleft()
    return chunk, result.get()


def _continuation_table(tokenizer) -> np.ndarray:
    """True for `##` continuation entries: word starts of imported corpora that have no word flags."""
    table = np.zeros(len(tokenizer), dtype=bool)
    for token, i in tokenizer.get_vocab().items():
        if token.startswith("##") and i < len(table):
            table[i] = True
    return table


def _import(
    paths: list[Path], writer: CorpusWriter, tokenizer, counters: Counter, ledger=None, numbers: list[int] | None = None
) -> None:
    continuation = _continuation_table(tokenizer)
    for k, path in enumerate(paths):
        counters["files"] += 1
        reader = read_paddlenlp(path) if path.name.endswith("_ids.npy") else read_megatron(path)
        for ids, lengths in reader:
            counters["documents_read"] += 1
            if ids.size and ids.max() >= len(continuation):
                raise DomainLMError(
                    f"{path}: token id {int(ids.max())} is outside the vocabulary of --tokenizer "
                    f"({len(continuation)} entries): the corpus was made with another tokenizer"
                )
            starts = ~continuation[ids]
            starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
            try:
                writer.add(ids, lengths, starts)
            except DomainLMError as e:
                raise DomainLMError(f"{path}: {e}") from None
            if ledger is not None:
                ledger.add(numbers[k], "imported")


# a store's own entries; cache/ is written by pretrain (the sample index), a manifest by prepare itself
STORE_ENTRIES = (*FILES, "stats.json", "config.yaml", "tokenizer", "cache", shards.FOLDER)


def _store_meta(out: Path) -> dict | None:
    """meta.json of a domainlm corpus store in `out`, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == STORE_FORMAT else None


def _corpus_stats(corpus: Corpus, counters: Counter, seconds: float, n_bytes: int) -> dict:
    lengths = corpus.sentence_lengths()
    doc_sentences = np.diff(np.asarray(corpus.document_offsets))
    doc_tokens = np.diff(np.asarray(corpus.sentence_offsets)[np.asarray(corpus.document_offsets)])
    stats = {
        "documents": corpus.n_documents,
        "sentences": corpus.n_sentences,
        "tokens": corpus.n_tokens,
        "tokens_per_sentence": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
        "tokens_per_document": round(float(doc_tokens.mean()), 2) if len(doc_tokens) else 0.0,
        "sentences_per_document": round(float(doc_sentences.mean()), 2) if len(doc_sentences) else 0.0,
        "sentence_tokens_p50_p95_max": [int(np.percentile(lengths, q)) for q in (50, 95)] + [int(lengths.max())]
        if len(lengths)
        else [0, 0, 0],
        "single_sentence_documents": int((doc_sentences == 1).sum()),
        "files": counters["files"],
        "documents_read": counters["documents_read"],
        "dropped_empty": counters["dropped_empty"],
        "dropped_short": counters["dropped_short"],
        "duplicates_exact": counters["duplicates_exact"],
        "duplicates_near": counters["duplicates_near"],
        "bad_lines_skipped": counters["bad_lines_skipped"],
        "sentences_cut": counters["sentences_cut"],
        "languages": {k[len("lang_") :]: v for k, v in counters.items() if k.startswith("lang_")},
        # pdf/docx/md files per rule that cut them into documents (data/sections.py), and the documents read
        "document_split": {
            k.split(":", 1)[1]: {"files": v, "documents": counters[f"split_documents:{k.split(':', 1)[1]}"]}
            for k, v in sorted(counters.items())
            if k.startswith("split_files:")
        },
        "seconds": round(seconds, 2),
        "mb_per_second": round(n_bytes / 1e6 / max(seconds, 1e-9), 2),
        "tokens_per_second": round(corpus.n_tokens / max(seconds, 1e-9), 1),
    }
    return stats


def _workers(requested: int) -> int:
    """-1: one per core; more than the cores is capped (each worker holds a tokenizer and a chunk in memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested < 0:
        return cores
    if requested > cores:
        print(f"--workers {requested} is more than the {cores} cores available; using {cores}", file=sys.stderr)
        return cores
    return requested


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Run the prepare stage; returns the stats (also in <out>/stats.json). The store is built beside --out and
    swapped into place when complete; the same inputs and options again leave it as it is."""
    workers = _workers(cfg.workers)
    inputs = {f"input {item}": item for item in cfg.input}
    with outputs.run_folder(
        cfg.out,
        "prepare",
        patterns=STORE_ENTRIES,
        replace=True,
        overwrite=cfg.overwrite,
        resume=True,
        inputs=inputs,
        owned=("cache",),
        legacy=lambda o: _store_meta(o) is not None,
    ) as out:
        return _prepare(cfg, out, workers, progress)


def _prepare(cfg: PrepareConfig, out: outputs.RunFolder, workers: int, progress: bool) -> dict:
    from tqdm import tqdm

    tokenizer = load_fast_tokenizer(cfg.tokenizer)
    imports, raw = _split_inputs(cfg.input)
    for p in imports:
        if not p.is_file():
            raise DomainLMError(f"input {p} does not exist")
    # a folder input may hold this very store (prepare docs/ --out docs/corpus): its files are not documents
    target = out.out
    partial = out.path
    files = [f for f in (discover(raw) if raw else []) if not (outputs.inside(f, target) or outputs.inside(f, partial))]
    vocab = vocab_hash(tokenizer)
    inputs_fingerprint = fingerprint = _fingerprint(cfg, files + imports, vocab)
    shard = plan = None
    if cfg.shard is not None:  # this machine's share: whole files, the same on every machine
        shard = shards.parse(cfg.shard)
        plan = shards.plan(imports, files, shard)
        imports, files, fingerprint = plan.imports, plan.files, shards.store_fingerprint(fingerprint, shard)
    if out.earlier is not None:
        meta = _store_meta(target)
        if out.earlier == "finished" and meta is not None and meta.get("fingerprint") == fingerprint:
            print(f"{target} is up to date (same inputs and options); nothing to do", file=sys.stderr)
            return json.loads((target / "stats.json").read_text(encoding="utf-8"))
        if not cfg.overwrite:
            out.refuse_earlier("a corpus made from other inputs or options")
    started = time.perf_counter()
    counters: Counter = Counter()
    out.begin()
    writer = CorpusWriter(partial, len(tokenizer), forbidden_ids=corpus_forbidden_ids(tokenizer))
    for name in FILES:
        out.record(name)
    with out.writing("tokenizer"):
        tokenizer.save_pretrained(out.record("tokenizer"))
    total_bytes = sum(p.stat().st_size for p in files + imports)
    n_bytes = 0
    bar = None
    ledger = None
    if plan is not None:
        ledger = shards.LedgerWriter(
            out.file(shards.FOLDER), len(tokenizer), EncodeOptions.num_perm, cfg.near_dup_threshold > 0
        )
    try:
        _import(imports, writer, tokenizer, counters, ledger, plan and plan.import_numbers)
        encode_options = EncodeOptions(
            tokenizer_file=str(partial / "tokenizer" / "tokenizer.json"),
            language=cfg.language,
            segment=cfg.segment,
            segmenter=cfg.segmenter,
            user_dict=cfg.user_dict,
            normalize=cfg.normalize,
            max_sentence_tokens=cfg.max_sentence_tokens,
            near_dup_threshold=cfg.near_dup_threshold,
        )
        dedup = Deduplicator(cfg.near_dup_threshold, encode_options.num_perm)
        read_options = ReadOptions(cfg.text_field, cfg.encoding, cfg.skip_bad_lines, cfg.split_books)
        read: deque = deque()  # the input file number of each document read and not yet decided (shards)
        chunks = _chunks(_documents(files, read_options, counters, plan and plan.file_numbers, read if plan else None))
        bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="prepare",
            disable=not progress,
            file=sys.stderr,
            smoothing=0.1,
        )
        with out.writing():
            for docs, encoded in _encode_all(chunks, encode_options, workers):
                for doc, enc in zip(docs, encoded):
                    n = len(doc.text.encode("utf-8"))
                    n_bytes += n
                    bar.update(n)
                    number = read.popleft() if ledger is not None else 0
                    if enc is None:
                        counters["dropped_empty"] += 1
                    elif enc.n_chars < cfg.min_doc_chars:
                        counters["dropped_short"] += 1
                    elif (dup := dedup.check(enc.key, enc.signature)) is not None:
                        counters[f"duplicates_{dup}"] += 1
                        if ledger is not None:
                            ledger.add(number, dup, enc)
                    else:
                        counters["sentences_cut"] += enc.n_cut
                        counters[f"lang_{enc.language}"] += 1
                        writer.add(enc.ids, enc.lengths, enc.word_starts)
                        if ledger is not None:
                            ledger.add(number, "kept", enc)
        bar.close()
        if writer.n_documents == 0 and shard is None:  # a shard may keep none: the merge decides
            raise DomainLMError(
                f"no documents left from {', '.join(cfg.input)} "
                f"(read {counters['documents_read']}, empty {counters['dropped_empty']}, "
                f"too short {counters['dropped_short']}, duplicates "
                f"{counters['duplicates_exact'] + counters['duplicates_near']})"
            )
        word_source = f"segmenter:{cfg.segmenter}" if cfg.segment else "tokenizer"
        with out.writing():
            writer.close(
                {
                    "tokenizer": cfg.tokenizer,
                    "vocab_hash": vocab,
                    "word_starts": word_source,
                    "fingerprint": fingerprint,
                    "domainlm_version": __version__,
                    **({"shard": {"index": shard[0], "count": shard[1]}} if shard else {}),
                }
            )
            if ledger is not None:
                ledger.close(
                    {
                        "index": shard[0],
                        "count": shard[1],
                        "files": plan.total,
                        "listing": plan.listing,
                        "inputs_fingerprint": inputs_fingerprint,
                        "options": shard_options(cfg),
                        "taken": plan.import_numbers + plan.file_numbers,
                        "tokenizer": cfg.tokenizer,
                        "vocab_hash": vocab,
                        "word_starts": word_source,
                    }
                )
        stats = _corpus_stats(Corpus(partial), counters, time.perf_counter() - started, n_bytes or total_bytes)
        out.write_json("stats.json", stats)
        out.write_text("config.yaml", cfglib.dump(cfg))
    except BaseException:
        if bar is not None:
            bar.close()  # its last state before the error message, not after it
        raise
    return stats


def format_stats(stats: dict) -> str:
    width = max(len(k) for k in stats)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in stats.items())
