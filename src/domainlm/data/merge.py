"""`domainlm merge STORE... --out STORE`: corpus stores joined into one (as Megatron-LM's merge_datasets joins its
indexed datasets: the index concatenated, the token files copied in bulk).

Two kinds of input:
  - the N shards of one `prepare --shard I/N` run, in any order. They are checked to be shards of the same input
    listing, vocabulary and options, all N of them once each; then their documents are put back in the order one
    `prepare` reads them, and every duplicate decision is taken again in that order by one Deduplicator, from the
    shards' ledgers (data/shards.py). tokens.bin, words.bin, sentences.bin, documents.bin and meta.json are then
    byte for byte those of one `prepare` over all the inputs, and stats.json holds the same counts; its timings
    (seconds, mb_per_second, tokens_per_second) are the merge's, and `merged_from` says how many stores it joined.
    Where the machines saw the inputs with other paths or modification times (copies, not one shared folder), the
    fingerprint in meta.json is made from the shards' instead (a single prepare would name its own inputs there).
  - stores prepared apart: concatenated in the order given, their statistics summed. Duplicates across them are not
    looked for: a store keeps MinHash signatures only when it is a shard.
Every store must hold the same vocabulary (its hash) and mark word starts the same way; the line that refuses one
names it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from domainlm import outputs
from domainlm.config import option, reuse
from domainlm.data import shards
from domainlm.data.clean import Deduplicator
from domainlm.data.store import Corpus, CorpusWriter
from domainlm.errors import DomainLMError
from domainlm.options import RunOptions

# counts a merge adds up from the stores' stats.json; the rest it counts again (shards) or recomputes from the store
SUMMED = ("files", "documents_read", "dropped_empty", "dropped_short", "bad_lines_skipped")
DECIDED = (
    "duplicates_exact",
    "duplicates_near",
    "sentences_cut",
)  # by the duplicate decisions (summed for plain stores)


@dataclass(kw_only=True)
class MergeConfig(RunOptions):
    stores: list[str] = option(
        [],
        "corpus stores: the shards of one `prepare --shard` run (their duplicates decided "
        "as one prepare would), or stores prepared apart (concatenated in this order)",
        positional=True,
    )
    out: str = reuse(RunOptions, "out", dataclasses.MISSING, "output folder for the merged corpus store")
    overwrite: bool = reuse(RunOptions, "overwrite", False, "replace an earlier merge in --out")

    def check(self) -> None:
        if not self.stores:
            raise DomainLMError("no store given: name the corpus stores to merge (domainlm merge STORE... --out STORE)")
        seen = set()
        for store in self.stores:
            key = os.path.normpath(os.path.abspath(store))  # text only: a check of options touches no file
            if key in seen:
                raise DomainLMError(f"store {store} is given twice: its documents would be merged twice")
            seen.add(key)


def merge(cfg: MergeConfig) -> dict:
    """Merge the stores into --out (built beside it and swapped into place); returns the stats (also in stats.json)."""
    from domainlm.data.prepare import STORE_ENTRIES

    with outputs.run_folder(
        cfg.out,
        "merge",
        patterns=STORE_ENTRIES,
        replace=True,
        overwrite=cfg.overwrite,
        models={f"store {s}": s for s in cfg.stores},
        owned=("cache",),
    ) as out:
        return _merge(cfg, out)


def _open(path: str) -> Corpus:
    try:
        return Corpus(path)
    except DomainLMError as e:
        raise DomainLMError(f"store {path}: {e}") from None


def _check_alike(stores: list[Corpus]) -> None:
    first = stores[0]
    for other in stores[1:]:
        if other.meta.get("vocab_hash") != first.meta.get("vocab_hash"):
            raise DomainLMError(
                f"store {other.path} was tokenized with another vocabulary ({other.meta.get('tokenizer')}, hash "
                f"{other.meta.get('vocab_hash')}) than store {first.path} ({first.meta.get('tokenizer')}, hash "
                f"{first.meta.get('vocab_hash')}): the stores of one corpus share one tokenizer"
            )
        if other.meta.get("word_starts") != first.meta.get("word_starts"):
            raise DomainLMError(
                f"store {other.path} marks word starts by {other.meta.get('word_starts')}, store {first.path} by "
                f"{first.meta.get('word_starts')} (prepare --segment): whole-word masking would differ between them"
            )
    sharded = [s for s in stores if "shard" in s.meta]
    if sharded and len(sharded) != len(stores):
        plain = next(s for s in stores if "shard" not in s.meta)
        raise DomainLMError(
            f"store {sharded[0].path} is a shard of a `prepare --shard` run and store {plain.path} is "
            "not: merge the shards of one run, or stores prepared apart, not both at once"
        )


def _ledgers(stores: list[Corpus]) -> list[shards.Ledger]:
    """The shards' ledgers, checked to be the N shards of one run, in shard order."""
    ledgers = [shards.Ledger(s) for s in stores]
    first = ledgers[0]
    by_index: dict[int, shards.Ledger] = {}
    for ledger in ledgers:
        path, info = ledger.store.path, ledger.info
        if ledger.count != first.count:
            raise DomainLMError(
                f"store {path} is shard {ledger.index} of {ledger.count}, store {first.store.path} "
                f"shard {first.index} of {first.count}: merge the shards of one `prepare --shard` run"
            )
        if ledger.index in by_index:
            raise DomainLMError(
                f"stores {by_index[ledger.index].store.path} and {path} are both shard {ledger.index} "
                f"of {ledger.count}: give each shard once"
            )
        by_index[ledger.index] = ledger
        if (info["listing"], info["files"]) != (first.info["listing"], first.info["files"]):
            raise DomainLMError(
                f"store {path} was prepared from another input listing ({info['files']} files) than "
                f"store {first.store.path} ({first.info['files']} files, or other names or sizes): "
                "every shard must be given the same inputs"
            )
        for key, value in first.info["options"].items():
            if info["options"].get(key) != value:
                flag = "--" + key.replace("_", "-")
                raise DomainLMError(
                    f"store {path} was prepared with {flag} {info['options'].get(key)!r}, store "
                    f"{first.store.path} with {flag} {value!r}: shards of one corpus share every option"
                )
    missing = [i for i in range(1, first.count + 1) if i not in by_index]
    if missing:
        raise DomainLMError(
            f"shard(s) {', '.join(map(str, missing))} of {first.count} missing (given: "
            f"{', '.join(map(str, sorted(by_index)))}): give every shard of the run"
        )
    return [by_index[i] for i in sorted(by_index)]


@dataclass
class _Piece:
    """Documents [first, end) of one store, in the merged order."""

    corpus: Corpus
    first: int
    end: int
    checked: bool  # the store's writer checked them (a dropped near duplicate was never written to a store)


def _replay(ledgers: list[shards.Ledger], counters: Counter) -> list[_Piece]:
    """Every duplicate decision taken again, in the order one prepare reads the documents."""
    options = ledgers[0].info["options"]
    dedup = Deduplicator(options["near_dup_threshold"], ledgers[0].info["num_perm"])
    files = np.concatenate([np.asarray(ledger.entries["file"]) for ledger in ledgers])
    owner = np.concatenate([np.full(len(ledger.entries), k) for k, ledger in enumerate(ledgers)])
    position = np.concatenate([np.arange(len(ledger.entries)) for ledger in ledgers])
    order = np.lexsort((position, files))  # a file lies in one shard: reading order is (file, place in its shard)
    fates = [np.asarray(ledger.entries["fate"]) for ledger in ledgers]
    in_store = [np.cumsum(np.isin(f, (shards.KEPT, shards.IMPORTED))) - 1 for f in fates]  # the document in the store
    in_dropped = [np.cumsum(f == shards.NEAR) - 1 for f in fates]
    languages = [np.asarray(ledger.entries["language"]) for ledger in ledgers]
    cuts = [np.asarray(ledger.entries["cut"]) for ledger in ledgers]
    keys = [np.asarray(ledger.keys) for ledger in ledgers]  # plain views of the mapped files: a row costs no memmap
    signatures = [None if ledger.signatures is None else np.asarray(ledger.signatures) for ledger in ledgers]
    pieces: list[_Piece] = []

    def take(corpus: Corpus, doc: int, checked: bool) -> None:
        last = pieces[-1] if pieces else None
        if last is not None and last.corpus is corpus and last.end == doc:
            last.end += 1
        else:
            pieces.append(_Piece(corpus, doc, doc + 1, checked))

    for k, i in zip(owner[order].tolist(), position[order].tolist()):
        ledger, fate = ledgers[k], int(fates[k][i])
        if fate == shards.IMPORTED:  # imported corpora are not deduplicated
            take(ledger.store, int(in_store[k][i]), True)
            continue
        dup = dedup.check(keys[k][i].tobytes(), None if signatures[k] is None else signatures[k][i])
        if dup is not None:
            counters[f"duplicates_{dup}"] += 1
            continue
        counters["sentences_cut"] += int(cuts[k][i])
        counters[f"lang_{ledger.info['languages'][int(languages[k][i])]}"] += 1
        if fate == shards.KEPT:
            take(ledger.store, int(in_store[k][i]), True)
        elif fate == shards.NEAR:  # dropped by its shard, kept by the run over all inputs
            take(ledger.dropped, int(in_dropped[k][i]), False)
        else:
            raise DomainLMError(
                f"{ledger.store.path}: document {i + 1} of its ledger was an exact duplicate in its shard "
                "but is not one over all the inputs; the shard is damaged, prepare it again"
            )
    return pieces


def _summed(stores: list[Corpus], names: tuple[str, ...], counters: Counter, sharded: bool) -> None:
    for store in stores:
        try:
            stats = json.loads((store.path / "stats.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DomainLMError(f"store {store.path}: its stats.json is missing or damaged ({e})") from None
        for name in names:
            counters[name] += int(stats.get(name, 0))
        for rule, seen in (stats.get("document_split") or {}).items():
            counters[f"split_files:{rule}"] += int(seen.get("files", 0))
            counters[f"split_documents:{rule}"] += int(seen.get("documents", 0))
        if not sharded:
            for language, n in (stats.get("languages") or {}).items():
                counters[f"lang_{language}"] += int(n)


def _fingerprint(stores: list[Corpus], ledgers: list[shards.Ledger] | None) -> str:
    if ledgers is not None:
        seen = sorted({ledger.info["inputs_fingerprint"] for ledger in ledgers})
        if len(seen) == 1:
            return seen[0]  # the fingerprint of one prepare over the same inputs
        print(
            "note: the shards saw the inputs with other paths or modification times (copies?): the merged store's "
            "fingerprint is made from theirs, not the one a single prepare would write",
            file=sys.stderr,
        )
    else:
        seen = [str(s.meta.get("fingerprint")) for s in stores]
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]


def _merge(cfg: MergeConfig, out: outputs.RunFolder) -> dict:
    from domainlm.data.prepare import _corpus_stats
    from domainlm.data.tokenize import corpus_forbidden_ids
    from domainlm.interop.tokenizer import load_fast_tokenizer

    started = time.perf_counter()
    stores = [_open(s) for s in cfg.stores]
    _check_alike(stores)
    sharded = "shard" in stores[0].meta
    ledgers = _ledgers(stores) if sharded else None
    if ledgers is not None:
        stores = [ledger.store for ledger in ledgers]
    first = stores[0]
    counters: Counter = Counter()
    _summed(stores, SUMMED if sharded else SUMMED + DECIDED, counters, sharded)
    if ledgers is not None:
        pieces = _replay(ledgers, counters)
    else:
        pieces = [_Piece(s, 0, s.n_documents, True) for s in stores]
    out.begin(cfg)
    tokenizer_folder = first.path / "tokenizer"
    with out.writing("tokenizer"):
        shutil.copytree(tokenizer_folder, out.record("tokenizer"))
    forbidden = ()  # documents a store's writer checked are copied as they are; the others are checked as prepare does
    if not all(piece.checked for piece in pieces):
        forbidden = corpus_forbidden_ids(load_fast_tokenizer(str(tokenizer_folder), log=lambda *a, **k: None))
    writer = CorpusWriter(out.path, int(first.meta["vocab_size"]), forbidden_ids=forbidden)
    n_bytes = sum(
        (s.path / name).stat().st_size
        for s in stores
        for name in ("tokens.bin", "words.bin", "sentences.bin", "documents.bin")
    )
    with out.writing():
        for piece in pieces:
            if piece.checked:
                writer.copy_documents(piece.corpus, piece.first, piece.end)
                continue
            for doc in range(piece.first, piece.end):
                sentences = piece.corpus.document_sentences(doc)
                ids, words = piece.corpus.span(sentences.start, sentences.stop)
                lengths = np.diff(np.asarray(piece.corpus.sentence_offsets[sentences.start : sentences.stop + 1]))
                writer.add(ids, lengths, words)
        writer.close(
            {
                "tokenizer": first.meta.get("tokenizer"),
                "vocab_hash": first.meta.get("vocab_hash"),
                "word_starts": first.meta.get("word_starts"),
                "fingerprint": _fingerprint(stores, ledgers),
                "domainlm_version": first.meta.get("domainlm_version"),
            }
        )
    if writer.n_documents == 0:
        raise DomainLMError(f"no documents left in {', '.join(cfg.stores)}")
    stats = _corpus_stats(Corpus(out.path), counters, time.perf_counter() - started, n_bytes)
    stats["merged_from"] = len(stores)
    out.write_json("stats.json", stats)
    return stats
