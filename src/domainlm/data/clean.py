"""Cleaning: Unicode normalisation, whitespace and control characters, PDF page furniture, duplicates."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter

import numpy as np

from domainlm.data.cjk import CJK_CLASS as _CJK

# Zero-width characters and the BOM carry no text but split tokens and defeat duplicate detection.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_SPACES = re.compile(r"[ \t\u00a0\u3000\u2000-\u200a\u202f\u205f]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def normalize_text(text: str, form: str = "NFC") -> str:
    """Normalise Unicode, drop control and invisible characters, one space at most, no blank lines.

    The default NFC keeps full-width punctuation (，。？) as is: Chinese vocabularies hold those forms.
    """
    if form != "none":
        text = unicodedata.normalize(form, text)
    text = text.translate(_INVISIBLE).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text.replace("\t", " "))
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


_PAGE_NUMBER = re.compile(
    r"^(?:[-–—\s]*\d{1,4}[-–—\s]*|page\s*\d+(?:\s*(?:of|/)\s*\d+)?"
    r"|第\s*\d+\s*页(?:\s*[，,/]?\s*共\s*\d+\s*页)?"
    r"|\d+\s*/\s*\d+|[ivxlcdm]{1,6})$",
    re.I,
)


def _shape(line: str) -> str:
    """A header line with its page number blanked, so 'Manual - 3' and 'Manual - 4' compare equal."""
    return re.sub(r"\d+", "#", line.strip().lower())


def strip_page_furniture(pages: list[str], edge: int = 2, min_share: float = 0.5) -> list[str]:
    """Remove page numbers and headers/footers that repeat across pages from the first/last `edge` lines."""
    split = [[ln for ln in p.split("\n") if ln.strip()] for p in pages]
    # On a short page the edges would reach into the body; look at most at its outer thirds.
    edges = [min(edge, len(lines) // 3) for lines in split]
    counts: Counter[str] = Counter()
    for lines, k in zip(split, edges):
        if k:
            counts.update({_shape(ln) for ln in lines[:k] + lines[-k:]})
    threshold = max(2, int(min_share * len(pages) + 0.5))
    repeated = {shape for shape, n in counts.items() if n >= threshold}
    cleaned = []
    for lines, k in zip(split, edges):
        keep = []
        for i, line in enumerate(lines):
            at_edge = i < k or i >= len(lines) - k
            if at_edge and (_shape(line) in repeated or _PAGE_NUMBER.match(line.strip())):
                continue
            keep.append(line)
        cleaned.append("\n".join(keep))
    return cleaned


_TERMINAL = tuple("。！？!?；;：:…”’」』）)】》.")


def reflow_lines(page: str) -> str:
    """Join PDF lines that a layout wrapped mid-sentence; keep breaks after terminal punctuation.

    Chinese sentence rules treat a newline as a sentence end, so unjoined PDF wraps would cut sentences.
    """
    lines = [ln.strip() for ln in page.split("\n") if ln.strip()]
    if not lines:
        return ""
    full = sorted(len(ln) for ln in lines)[len(lines) // 2]  # median width ~ a full line
    out = [lines[0]]
    for line in lines[1:]:
        prev = out[-1]
        wrapped = not prev.endswith(_TERMINAL) and len(prev) >= 0.8 * full
        if wrapped:
            if prev.endswith("-") and prev[-2:-1].isalpha():
                out[-1] = prev[:-1] + line
            elif re.search(rf"[{_CJK}]$", prev) or re.match(rf"[{_CJK}]", line):
                out[-1] = prev + line
            else:
                out[-1] = prev + " " + line
        else:
            out.append(line)
    return "\n".join(out)


# ---- duplicates -------------------------------------------------------------------------------------------


def exact_key(text: str) -> bytes:
    """Whitespace-insensitive digest: the same text re-wrapped is still the same document."""
    return hashlib.blake2b("".join(text.split()).encode("utf-8"), digest_size=16).digest()


_rng = np.random.default_rng(1)
_A = _rng.integers(1, 1 << 63, size=256, dtype=np.uint64) | np.uint64(1)  # odd multipliers
_B = _rng.integers(0, 1 << 63, size=256, dtype=np.uint64)


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """32-bit hashes of character n-grams, computed as one rolling polynomial over code points. Repeats are
    kept: a minimum over them is the same, and deduplicating them cost more than it saved."""
    codes = np.frombuffer("".join(text.split()).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < ngram:
        codes = np.concatenate([codes, np.zeros(ngram - len(codes), dtype=np.uint64)])
    n = len(codes) - ngram + 1
    h = np.zeros(n, dtype=np.uint64)
    for k in range(ngram):  # uint64 arithmetic wraps: a hash mod 2**64
        h = h * np.uint64(0x100000001B3) + codes[k : k + n]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    return h >> np.uint64(32)


def minhash_signature(text: str, num_perm: int, ngram: int = 5, block: int = 4096) -> np.ndarray:
    """MinHash of character n-grams (language-agnostic: Chinese needs no segmentation).

    Vectorised: datasketch's `update_batch` hashes each shingle with sha1 in Python, which cost more than
    tokenization here. Permutations are multiply-shift hashes (high 32 bits of a*h + b mod 2**64, a odd), a
    universal family that needs no modulo; datasketch's LSH index takes the resulting values.
    """
    if num_perm > len(_A):
        raise ValueError(f"num_perm must be <= {len(_A)}")
    a, b = _A[:num_perm], _B[:num_perm]
    hashes = shingle_hashes(text, ngram)
    signature = np.full(num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
    for i in range(0, len(hashes), block):  # blocks bound memory to block x num_perm
        h = hashes[i : i + block, None]
        np.minimum(signature, ((h * a + b) >> np.uint64(32)).min(axis=0), out=signature)
    return signature


class Deduplicator:
    """Exact duplicates by digest; near duplicates by MinHash LSH at a Jaccard threshold (0 disables)."""

    def __init__(self, threshold: float, num_perm: int):
        self.seen: set[bytes] = set()
        self.num_perm = num_perm
        self.lsh = None
        if threshold > 0:
            from datasketch import MinHashLSH

            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.n = 0

    def check(self, key: bytes, signature: np.ndarray | None) -> str | None:
        """Return 'exact' or 'near' for a duplicate, else None and remember the document."""
        if key in self.seen:
            return "exact"
        if self.lsh is not None and signature is not None:
            from datasketch import LeanMinHash

            # LeanMinHash holds the values only; MinHash(hashvalues=...) would rebuild its permutations per document
            m = LeanMinHash(seed=1, hashvalues=signature, scheme="affine32")
            if self.lsh.query(m):
                return "near"
            self.lsh.insert(str(self.n), m)
        self.seen.add(key)
        self.n += 1
        return None
