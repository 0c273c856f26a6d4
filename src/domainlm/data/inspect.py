"""`domainlm inspect CORPUS`: a prepared corpus's format and statistics, and sample sentences decoded with their
word boundaries shown (how masking will see the words)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from domainlm.data.prepare import format_stats
from domainlm.data.store import Corpus
from domainlm.errors import DomainLMError
from domainlm.interop.tokenizer import load_fast_tokenizer


def decode_with_words(tokenizer, ids: np.ndarray, starts: np.ndarray, sep: str = "|") -> str:
    """A sentence as text with word boundaries shown, e.g. 我们|在|北京大学|学习."""
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    words, current = [], []
    for token, start in zip(tokens, starts):
        if start and current:
            words.append(current)
            current = []
        current.append(token)
    if current:
        words.append(current)
    return sep.join(tokenizer.convert_tokens_to_string(w).replace(" ", "") for w in words)


def inspect(path: str, samples: int = 5, tokenizer: str | None = None, seed: int = 0) -> str:
    if samples < 0:
        raise DomainLMError(f"--samples {samples}: give the number of sentences to decode, 0 or more")
    corpus = Corpus(path)
    stats_path = Path(path) / "stats.json"
    stats = json.loads(stats_path.read_text(encoding="utf-8")) if stats_path.is_file() else corpus.meta
    lines = [
        f"corpus {path} (format v{corpus.meta['version']}, {corpus.meta['dtype']}, "
        f"word starts from {corpus.meta.get('word_starts')})",
        format_stats(stats),
    ]
    local = Path(path) / "tokenizer"
    tok = load_fast_tokenizer(tokenizer or (str(local) if local.is_dir() else corpus.meta["tokenizer"]))
    if samples:
        corpus.check_ids(len(tok), "the tokenizer's vocabulary")
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(corpus.n_sentences, size=min(samples, corpus.n_sentences), replace=False))
    lines.append(f"\n{len(picks)} sample sentences (| marks word boundaries):")
    for i in picks:
        ids, starts = corpus.span(int(i), int(i) + 1)
        lines.append(f"[{i}] {decode_with_words(tok, ids, starts)}")
    return "\n".join(lines)
