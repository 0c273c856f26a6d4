"""One book, many documents: where a long PDF, docx or Markdown file is cut into documents.

Pretraining needs documents: sentence-order pairs come from inside one, and the train/valid/test split is by
documents, so a handbook read as one document leaves nothing to validate on. The rules, first that applies:

    outline       PDF bookmarks (the outline's top two levels), cut at the bookmarked page, at the title
                  where the page's text holds it
    headings      docx Heading/Title styles, Markdown `#` headings (the top two levels present)
    heading-text  lines that look like headings: 第X章 / 第X节 / 第X条, Chapter N / Part N / Section N, 1.2 Title
    page-groups   PDF pages in groups of PAGES_PER_DOCUMENT
    whole         one document (a short file, or nothing to cut at)

`prepare --no-split-books` keeps every file whole. Files shorter than LONG_CHARS stay whole unless they have an
outline, and a section shorter than
MIN_SECTION_CHARS (a heading followed at once by a sub-heading) joins the next one. The rule used per file is
counted in the prepare stats (`document_split`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LONG_CHARS = 2000
MIN_SECTION_CHARS = 200
PAGES_PER_DOCUMENT = 5

_NUM = r"[0-9０-９一二三四五六七八九十百千零〇两]+"
_HEADING_TEXT = re.compile(
    rf"^(?:第\s*{_NUM}\s*[章节篇部编卷条]"
    r"|(?:chapter|part|section)\s+(?:\d+|[ivxlc]+)\b"
    r"|\d{1,2}(?:\.\d{1,2}){0,2}\.?[ \t\u3000]*[^\d\s.．、,，%％])",
    re.I,
)
_SENTENCE_END = tuple("。！？；!?;，,：:.")


@dataclass
class Section:
    text: str
    line: int = 0  # 1-based line where the section starts, 0 where lines mean nothing


def is_heading_text(line: str) -> bool:
    """A short line that reads as a chapter/section heading, not as a sentence."""
    line = line.strip()
    return 0 < len(line) <= 40 and not line.endswith(_SENTENCE_END) and bool(_HEADING_TEXT.match(line))


def _merge_short(sections: list[Section]) -> list[Section]:
    """Join sections too short to be documents with the one after them (the last with the one before)."""
    out: list[Section] = []
    carry: Section | None = None
    for s in sections:
        if carry is not None:
            s = Section(carry.text + "\n" + s.text, carry.line)
            carry = None
        if len(s.text.strip()) < MIN_SECTION_CHARS:
            carry = s
        else:
            out.append(s)
    if carry is not None:
        if out:
            out[-1] = Section(out[-1].text + "\n" + carry.text, out[-1].line)
        else:
            out.append(carry)
    return [s for s in out if s.text.strip()]


def cut(text: str, starts: list[int], line_of=None) -> list[Section]:
    """`text` cut at character positions `starts` (text before the first is a section of its own)."""
    bounds = sorted({0, *(p for p in starts if 0 < p < len(text))}) + [len(text)]
    return [Section(text[a:b].strip("\n"), line_of(a) if line_of else 0) for a, b in zip(bounds, bounds[1:])]


def split_lines(lines: list[str], marked: list[int], first_line: int = 1) -> list[Section]:
    """Lines cut before each marked line index."""
    text = "\n".join(lines)
    offsets = [0]
    for line in lines[:-1]:
        offsets.append(offsets[-1] + len(line) + 1)
    starts = [offsets[i] for i in marked]

    def line_of(pos: int) -> int:
        import bisect

        return first_line + bisect.bisect_right(offsets, pos) - 1

    return cut(text, starts, line_of)


def by_heading_text(lines: list[str], first_line: int = 1) -> list[Section] | None:
    """Sections at heading-like lines, or None when fewer than two headings are found."""
    marked = [i for i, line in enumerate(lines) if is_heading_text(line)]
    if len(marked) < 2:
        return None
    return _merge_short(split_lines(lines, marked, first_line))


def top_levels(levels: list[int]) -> set[int]:
    """The two shallowest heading levels present (chapters and sections)."""
    present = sorted(set(levels))
    return set(present[:2])


def split_text(
    lines: list[str], heading_levels: dict[int, int] | None = None, first_line: int = 1, whole: bool = False
) -> tuple[list[Section], str]:
    """docx / Markdown / any text: at styled headings (line index -> level), else heading text, else whole."""
    text = "\n".join(lines)
    if whole or len(text) < LONG_CHARS:
        return [Section(text, first_line)], "whole"
    if heading_levels:
        keep = top_levels(list(heading_levels.values()))
        marked = sorted(i for i, level in heading_levels.items() if level in keep)
        if len(marked) >= 2:
            sections = _merge_short(split_lines(lines, marked, first_line))
            if len(sections) > 1:
                return sections, "headings"
    sections = by_heading_text(lines, first_line)
    if sections is not None and len(sections) > 1:
        return sections, "heading-text"
    return [Section(text, first_line)], "whole"


def split_pages(pages: list[str], outline: list[tuple[int, str]], whole: bool = False) -> tuple[list[Section], str]:
    """A PDF's cleaned page texts -> sections. `outline`: (page index, title) of its bookmarks."""
    offsets, pos = [], 0
    for page in pages:
        offsets.append(pos)
        pos += len(page) + 1
    text = "\n".join(pages)
    if whole:
        return [Section(text)], "whole"
    starts = set()
    for page, title in outline:
        if not 0 <= page < len(pages):
            continue
        found = pages[page].find(title.strip()) if title.strip() else -1
        starts.add(offsets[page] + max(found, 0))
    if len(starts) >= 2 or (len(starts) == 1 and min(starts) > 0):
        sections = _merge_short(cut(text, sorted(starts)))
        if len(sections) > 1:
            return sections, "outline"
    if len(text) < LONG_CHARS:
        return [Section(text)], "whole"
    lines = text.split("\n")
    sections = by_heading_text(lines, first_line=0)
    if sections is not None and len(sections) > 1:
        return [Section(s.text) for s in sections], "heading-text"
    if len(pages) > PAGES_PER_DOCUMENT:
        groups = ["\n".join(pages[i : i + PAGES_PER_DOCUMENT]) for i in range(0, len(pages), PAGES_PER_DOCUMENT)]
        return _merge_short([Section(g) for g in groups]), "page-groups"
    return [Section(text)], "whole"


def pdf_outline(reader, depth: int = 2) -> list[tuple[int, str]]:
    """(page index, title) of the bookmarks in the outline's top `depth` levels; a broken entry is skipped."""
    items: list[tuple[int, str]] = []

    def walk(nodes, level: int) -> None:
        for node in nodes:
            if isinstance(node, list):
                if level + 1 < depth:
                    walk(node, level + 1)
                continue
            try:
                page = reader.get_destination_page_number(node)
            except Exception:  # pypdf raises several types for destinations it cannot resolve
                continue
            if page is not None and page >= 0:
                items.append((page, str(getattr(node, "title", "") or "")))

    try:
        walk(reader.outline, 0)
    except Exception:  # a damaged outline is no outline: the other rules still apply
        return []
    return items
