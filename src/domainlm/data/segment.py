"""Chinese word segmentation, as word-start positions, for whole-word masking."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from domainlm.errors import DomainLMError


def read_user_dict(path: str) -> list[str]:
    """jieba's user dictionary format: one `word [freq] [tag]` per line."""
    p = Path(path)
    if not p.is_file():
        raise DomainLMError(f"user dictionary {p} does not exist")
    words = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 1 and not parts[1].isdigit():
            raise DomainLMError(f"{p}:{lineno}: expected `word [frequency] [tag]`, got {line!r}")
        words.append(parts[0])
    return words


class Segmenter:
    """`word_starts(text)` marks the character positions where a word begins (length len(text) + 1)."""

    def __init__(self, backend: str = "rjieba", user_dict: str | None = None):
        self.backend = backend
        words = read_user_dict(user_dict) if user_dict else []
        if backend == "rjieba":
            import rjieba

            for w in words:
                rjieba.add_word(w, None, None)
            self._tokenize = rjieba.tokenize
        elif backend == "jieba":
            import logging

            import jieba

            jieba.setLogLevel(logging.WARNING)
            for w in words:
                jieba.add_word(w)
            self._tokenize = lambda text: jieba.tokenize(text)
        else:
            raise DomainLMError(f"--segmenter must be rjieba or jieba, got {backend!r}")

    def word_starts(self, text: str) -> np.ndarray:
        starts = np.zeros(len(text) + 1, dtype=bool)
        starts[[start for _, start, _ in self._tokenize(text)]] = True
        starts[len(text)] = True
        return starts
