"""Raw files -> a stream of Documents.

Formats: .txt (documents separated by blank lines), .jsonl (one document per line), .md, .pdf (text layer),
.docx, and any of them gzip-compressed (`.txt.gz`). Text files are decoded as UTF-8 or GB18030 (a superset of
GBK), or UTF-16/32 when they start with a byte-order mark, detected per file. A long pdf/docx/md file (a book)
becomes several documents (sections.py). Every error names the file and, where it applies, the line.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from domainlm.data import sections
from domainlm.errors import DomainLMError

TEXT_SUFFIXES = {".txt", ".text", ".jsonl", ".md", ".markdown"}
BINARY_SUFFIXES = {".pdf", ".docx"}
SUFFIXES = TEXT_SUFFIXES | BINARY_SUFFIXES
SNIFF_BYTES = 1 << 20


@dataclass
class Document:
    text: str
    source: str
    line: int = 0  # 1-based line where the document starts; 0 where lines mean nothing (pdf, docx)
    split: str = ""  # for a book format (pdf, docx, md): the rule that cut the file into documents (sections.py)


@dataclass
class ReadOptions:
    text_field: str = "text"
    encoding: str = "auto"  # auto | utf-8 | gb18030
    skip_bad_lines: bool = False
    split_books: bool = True  # cut long pdf/docx/md files into documents (sections.py)


def format_of(path: Path) -> str:
    """The format suffix of a file, looking through a trailing .gz."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def discover(inputs: list[str]) -> list[Path]:
    """Expand files and folders into a sorted list of readable files; unreadable inputs are errors."""
    if not inputs:
        raise DomainLMError("no input given: name files or folders of documents")
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and format_of(p) in SUFFIXES)
            if not found:
                raise DomainLMError(
                    f"folder {path} holds no readable files (looked for {', '.join(sorted(SUFFIXES))}, optionally .gz)"
                )
            files.extend(found)
        elif path.is_file():
            if format_of(path) not in SUFFIXES:
                raise DomainLMError(
                    f"{path}: unsupported file type {format_of(path) or '(none)'}; "
                    f"expected one of {', '.join(sorted(SUFFIXES))}, optionally .gz"
                )
            files.append(path)
        else:
            raise DomainLMError(f"input {path} does not exist")
    return files


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _read_head(path: Path) -> bytes:
    try:
        with _open_bytes(path) as f:
            return f.read(SNIFF_BYTES)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DomainLMError(f"{path}: cannot be read: {e}") from None


def detect_encoding(path: Path, head: bytes, forced: str = "auto") -> str:
    """UTF-8 (with or without BOM), UTF-16/32 with a BOM (what Windows Notepad writes as "Unicode"), or
    GB18030; a binary file or an undecodable one is an error."""
    if forced == "auto":
        for bom, encoding in (
            (codecs.BOM_UTF32_LE, "utf-32"),
            (codecs.BOM_UTF32_BE, "utf-32"),
            (codecs.BOM_UTF16_LE, "utf-16"),
            (codecs.BOM_UTF16_BE, "utf-16"),
        ):
            if head.startswith(bom):  # the codec reads the BOM and the byte order from it
                return encoding
    nul = head.find(b"\x00")
    if nul >= 0:
        raise DomainLMError(f"{path}: looks like a binary file (NUL byte at offset {nul}), not text")
    if forced != "auto":
        return forced
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    errors = {}
    for encoding in ("utf-8", "gb18030"):
        try:
            # final=False: the sniffed head may end inside a multi-byte character
            codecs.getincrementaldecoder(encoding)().decode(head, final=False)
            return encoding
        except UnicodeDecodeError as e:
            errors[encoding] = e
    e = errors["utf-8"]
    line = head[: e.start].count(b"\n") + 1
    raise DomainLMError(
        f"{path}:{line}: undecodable bytes at offset {e.start} (neither UTF-8 nor GB18030); "
        "convert the file to UTF-8 or pass --encoding"
    )


def _text_lines(path: Path, options: ReadOptions) -> Iterator[tuple[int, str]]:
    encoding = detect_encoding(path, _read_head(path), options.encoding)
    lineno = 0
    try:
        with _open_bytes(path) as raw, io.TextIOWrapper(raw, encoding=encoding, newline=None) as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 - lineno is read after the loop on error
                yield lineno, line
    except UnicodeDecodeError as e:
        raise DomainLMError(
            f"{path}:{lineno + 1}: undecodable bytes as {encoding} ({e.reason}); "
            "convert the file to one encoding or pass --encoding"
        ) from None
    except (OSError, EOFError) as e:
        raise DomainLMError(f"{path}:{lineno + 1}: read failed: {e}") from None


def read_txt(path: Path, options: ReadOptions) -> Iterator[Document]:
    """Blank lines separate documents; lines inside a document are kept (sentence breaks for Chinese)."""
    buf: list[str] = []
    start = 0
    for lineno, line in _text_lines(path, options):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line.rstrip("\n"))
        elif buf:
            yield Document("\n".join(buf), str(path), start)
            buf = []
    if buf:
        yield Document("\n".join(buf), str(path), start)


def read_jsonl(path: Path, options: ReadOptions, counters: Counter) -> Iterator[Document]:
    field = options.text_field
    for lineno, line in _text_lines(path, options):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            if field not in record:
                raise ValueError(f"no field {field!r} (fields: {', '.join(map(str, record)) or 'none'})")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"field {field!r} is {type(text).__name__}, not a string")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            if options.skip_bad_lines:
                counters["bad_lines_skipped"] += 1
                continue
            raise DomainLMError(
                f"{path}:{lineno}: bad JSONL line: {e} (pass --skip-bad-lines to skip and count such lines)"
            ) from None
        yield Document(text, str(path), lineno)


_MD_RULES = [
    (re.compile(r"^```.*?^```[^\n]*$", re.S | re.M), ""),  # fenced code
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), ""),  # images
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),  # links keep their text
    (re.compile(r"<[^>\n]+>"), ""),  # inline html
    (re.compile(r"^\s{0,3}#{1,6}\s*", re.M), ""),  # heading marks
    (re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.M), ""),  # list markers
    (re.compile(r"^\s*>\s?", re.M), ""),  # block quotes
    (re.compile(r"^\s*\|?\s*:?-{3,}.*$", re.M), ""),  # table rules
    (re.compile(r"\|"), " "),
    (re.compile(r"(\*\*|__|\*|`)"), ""),
]


def markdown_to_text(md: str) -> str:
    md = re.sub(r"\A---\n.*?\n---\n", "", md, flags=re.S)  # front matter
    for pattern, repl in _MD_RULES:
        md = pattern.sub(repl, md)
    return md


_MD_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+\S")
_MD_FENCE = re.compile(r"^\s{0,3}(```|~~~)")


def read_md(path: Path, options: ReadOptions) -> Iterator[Document]:
    """Cut at `#` headings (the top two levels present) when the file is long (sections.py)."""
    lines = [line.rstrip("\n") for _, line in _text_lines(path, options)]
    levels, fenced = {}, False
    for i, line in enumerate(lines):
        if _MD_FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _MD_HEADING.match(line)):
            levels[i] = len(m.group(1))
    parts, rule = sections.split_text(lines, levels if options.split_books else None, whole=not options.split_books)
    for part in parts:
        yield Document(markdown_to_text(part.text + "\n"), str(path), part.line, rule)


def _binary(path: Path) -> io.BytesIO:
    with _open_bytes(path) as f:
        return io.BytesIO(f.read())


def read_pdf(path: Path, options: ReadOptions) -> Iterator[Document]:
    """Text layer per page, repeated headers/footers and page numbers removed; a long PDF is cut into
    documents at its bookmarks, else its headings, else page groups (sections.py)."""
    import pypdf

    from domainlm.data.clean import reflow_lines, strip_page_furniture

    try:
        reader = pypdf.PdfReader(_binary(path))
        if reader.is_encrypted:
            reader.decrypt("")
        pages = [page.extract_text() or "" for page in reader.pages]
        outline = sections.pdf_outline(reader)
    except Exception as e:  # pypdf raises many types for damaged files
        raise DomainLMError(f"{path}: not a readable PDF: {e}") from None
    if not any(p.strip() for p in pages):
        raise DomainLMError(
            f"{path}: the PDF has no text layer ({len(pages)} pages, scanned images?); run OCR on it first"
        )
    pages = [reflow_lines(p) for p in strip_page_furniture(pages)]
    parts, rule = sections.split_pages(pages, outline, whole=not options.split_books)
    for part in parts:
        yield Document(part.text, str(path), 0, rule)


def read_docx(path: Path, options: ReadOptions) -> Iterator[Document]:
    import docx
    from docx.table import Table

    try:
        document = docx.Document(_binary(path))
    except Exception as e:  # python-docx raises zip and xml errors for damaged files
        raise DomainLMError(f"{path}: not a readable .docx file: {e}") from None
    lines, levels = [], {}
    for block in document.iter_inner_content():  # paragraphs and tables in reading order
        if isinstance(block, Table):
            lines += [" ".join(cell.text for cell in row.cells) for row in block.rows]
            continue
        style = block.style.name if block.style is not None else ""
        if style.startswith("Heading ") and style[8:].isdigit():  # "Title" names the whole file: no cut
            levels[len(lines)] = int(style[8:])
        lines.append(block.text)
    parts, rule = sections.split_text(lines, levels if options.split_books else None, whole=not options.split_books)
    for part in parts:
        yield Document(part.text, str(path), 0, rule)


def read_file(path: Path, options: ReadOptions, counters: Counter) -> Iterator[Document]:
    fmt = format_of(path)
    if fmt == ".jsonl":
        yield from read_jsonl(path, options, counters)
    elif fmt in (".txt", ".text"):
        yield from read_txt(path, options)
    elif fmt in (".md", ".markdown"):
        yield from read_md(path, options)
    elif fmt == ".pdf":
        yield from read_pdf(path, options)
    elif fmt == ".docx":
        yield from read_docx(path, options)
    else:  # discover() filters these out; a direct caller gets the same message
        raise DomainLMError(f"{path}: unsupported file type {fmt or '(none)'}")
