"""The CJK ideograph ranges, defined once for every module.

They are the ranges BERT's normaliser in the `tokenizers` library (`handle_chinese_chars`) surrounds with
spaces, so that each such character is a word of its own; the fast path, sentence splitting and PDF reflow all
use this one table. Note U+2B820..U+2B91F (the start of Extension E) is not among them: the library starts
that range at U+2B920, and the tokenizer is the reference (tests check every code point against it).
"""

from __future__ import annotations

CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x3400, 0x4DBF),  # Extension A
    (0x4E00, 0x9FFF),  # Unified Ideographs
    (0xF900, 0xFAFF),  # Compatibility Ideographs
    (0x20000, 0x2A6DF),  # Extension B
    (0x2A700, 0x2B73F),  # Extension C
    (0x2B740, 0x2B81F),  # Extension D
    (0x2B920, 0x2CEAF),  # Extension E as the tokenizers library has it (not from U+2B820)
    (0x2F800, 0x2FA1F),  # Compatibility Ideographs Supplement
)

# The ranges as the inside of a regular-expression character class: f"[{CJK_CLASS}]".
CJK_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in CJK_RANGES)


def is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in CJK_RANGES)
