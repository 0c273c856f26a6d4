"""Datasets: uploaded (or already in --home) files checked with the CLI's readers before any job can use them."""

from __future__ import annotations

import secrets
import shutil
from collections import Counter
from pathlib import Path

from domainlm.console.catalog import folder_size
from domainlm.console.db import Dataset
from domainlm.console.security import inside, safe_filename
from domainlm.errors import DomainLMError

LABELLED = {".csv", ".tsv", ".jsonl"}
DOCUMENTS = {".txt", ".md", ".pdf", ".docx", ".gz", ".jsonl"}
MAX_BAD_ROWS_KEPT = 1000


def check(
    record: Dataset,
    path: Path,
    text_column: str = "text",
    label_column: str = "label",
    multilabel: bool = False,
    display: str | None = None,
) -> None:
    """Rows, labels, their distribution and bad rows (by line) from `read_examples`, as `finetune` reads them.
    A file that is not labelled data (a corpus of documents) is kept as documents for `prepare`."""
    from domainlm.classify.data import Columns, read_examples

    record.size_bytes = folder_size(path)
    record.columns = {"text": text_column, "label": label_column, "multilabel": multilabel}
    suffix = path.suffix.lower()
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise DomainLMError(f"{path.name} is a folder but not a corpus store from `domainlm prepare`")
        record.kind = "corpus"
        return
    if suffix not in LABELLED | DOCUMENTS:
        raise DomainLMError(
            f"{path.name}: unsupported file type {suffix or '(none)'}; use .csv, .tsv or .jsonl for "
            "labelled data, or .txt, .md, .pdf, .docx, .jsonl, .gz documents for a corpus"
        )
    if suffix not in LABELLED:
        record.kind = "documents"
        return
    try:
        data = read_examples(str(path), Columns(text_column, None, label_column), multilabel, skip_bad=True)
    except DomainLMError as e:
        if suffix == ".jsonl" and "missing column" in str(e):  # plain documents, one per line
            record.kind, record.error = "documents", str(e).replace(str(path), display or path.name)
            return
        raise DomainLMError(str(e).replace(str(path), display or path.name)) from None
    record.kind = "labelled"
    record.rows = len(data)
    record.distribution = dict(Counter(label for ex in data.examples for label in ex.labels).most_common())
    record.bad_rows = [[line, problem] for line, problem in data.bad_rows[:MAX_BAD_ROWS_KEPT]]


def add_upload(s, home: Path, tmp: Path, filename: str, fields: dict[str, str]) -> Dataset:
    """Move a checked upload to HOME/datasets/<random>-<safe name>; a file that fails its check is deleted."""
    name = safe_filename(filename)
    target = home / "datasets" / f"{secrets.token_hex(3)}-{name}"
    record = Dataset(name=(fields.get("name") or name)[:200], path=str(target.relative_to(home)), kind="")
    checked = tmp.with_name(tmp.name + Path(name).suffix.lower())
    tmp.rename(checked)  # the readers pick the format by suffix
    try:
        check(
            record,
            checked,
            fields.get("text_column") or "text",
            fields.get("label_column") or "label",
            fields.get("task") == "multilabel",
            display=name,
        )
    except DomainLMError:
        checked.unlink(missing_ok=True)
        raise
    shutil.move(str(checked), target)
    s.add(record)
    return record


def register_existing(s, home: Path, value: str, fields: dict[str, str]) -> Dataset:
    """A file or corpus folder already inside home (put there by hand, or by a `prepare` run)."""
    path = inside(home, value)
    if not path.exists():
        raise DomainLMError(f"{value} does not exist")
    rel = str(path.relative_to(home.resolve()))
    existing = s.query(Dataset).filter(Dataset.path == rel).first()
    if existing is not None:
        return existing
    record = Dataset(name=(fields.get("name") or path.name)[:200], path=rel, kind="")
    check(
        record,
        path,
        fields.get("text_column") or "text",
        fields.get("label_column") or "label",
        fields.get("task") == "multilabel",
    )
    s.add(record)
    return record


def preview(path: Path, rows: int = 10, width: int = 300) -> list[str]:
    """The first lines of a text file (labelled data, documents), for a look before a job uses it."""
    if not path.is_file() or path.suffix.lower() not in LABELLED | {".txt", ".md", ".jsonl"}:
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                out.append(line.rstrip("\n")[:width])
            if len(out) == rows:
                break
    return out


def delete(s, home: Path, record: Dataset) -> None:
    """A dataset's files and record; refused while a queued or running job reads it."""
    from domainlm.console.db import Job

    path = inside(home, record.path)
    if path == home.resolve() or path in (home.resolve() / "datasets", home.resolve() / "jobs"):
        raise DomainLMError(f"refusing to delete {record.path}")
    busy = [
        j.id for j in s.query(Job).filter(Job.status.in_(("queued", "running"))) if str(path) in str(j.config.values())
    ]
    if busy:
        raise DomainLMError(f"job(s) {', '.join(map(str, busy))} still use {record.name}; wait for them or cancel them")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    s.delete(record)
