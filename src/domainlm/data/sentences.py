"""Sentence splitting: rules for Chinese, a real splitter (pysbd) for English, language detected per document."""

from __future__ import annotations

import re
from functools import lru_cache

from domainlm.data.cjk import CJK_CLASS

# A run of terminators, then any closing quotes/brackets that belong to the same sentence.
_ZH_END = re.compile(r"([。！？!?；;…]+[”’」』）)\]】》〉\"']*)")
_CJK_CHAR = re.compile(f"[{CJK_CLASS}]")
_LATIN_CHAR = re.compile(r"[A-Za-z]")


def detect_language(text: str, sample: int = 2000) -> str:
    """'zh' when CJK characters make up at least a fifth of the letters in the first `sample` characters."""
    head = text[:sample]
    cjk = len(_CJK_CHAR.findall(head))
    latin = len(_LATIN_CHAR.findall(head))
    return "zh" if cjk and cjk * 5 >= cjk + latin else "en"


def split_zh(text: str) -> list[str]:
    """Newlines and 。！？；… end sentences; closing quotes and brackets stay with their sentence."""
    out = []
    for line in text.split("\n"):
        for piece in _ZH_END.sub("\\1\n", line).split("\n"):
            piece = piece.strip()
            if piece:
                out.append(piece)
    return out


@lru_cache(maxsize=1)
def _english_segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def split_en(text: str) -> list[str]:
    """pysbd handles abbreviations, decimals and initials; a line break alone does not end an English sentence."""
    segmenter = _english_segmenter()
    out = []
    for paragraph in re.split(r"\n(?=\s*\n)", text):  # cleaned text has no blank lines: one paragraph
        joined = " ".join(paragraph.split())
        if joined:
            out.extend(s.strip() for s in segmenter.segment(joined) if s.strip())
    return out


def split_sentences(text: str, language: str) -> list[str]:
    return split_zh(text) if language == "zh" else split_en(text)
