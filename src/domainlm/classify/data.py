"""Labelled data for classification: CSV / TSV / JSONL rows, label maps, validation split, k-fold.

A row has a text (and optional text pair), one label (multi-class) or several (multi-label: a JSON list, or a
string split on a delimiter), and an optional group (per-group accuracy). Errors name the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from domainlm.errors import DomainLMError
from domainlm.files import decode_text, read_text_input


@dataclass
class Example:
    text: str
    labels: list[str]
    text_pair: str | None = None
    group: str | None = None
    line: int = 0


@dataclass
class Columns:
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    group: str | None = None
    label_delimiter: str = ","

    @classmethod
    def of(cls, cfg, model=None) -> Columns:
        """The columns a command's options name (text_column, pair_column, label_column, group_column,
        label_delimiter; the last three where it has them); a loaded classifier (`model`) fills the text and pair
        columns the options leave unset with the ones it was trained on."""
        text = getattr(cfg, "text_column", None) or (model.text_column if model is not None else "text")
        pair = getattr(cfg, "pair_column", None) or (model.pair_column if model is not None else None)
        return cls(
            text,
            pair,
            getattr(cfg, "label_column", "label"),
            getattr(cfg, "group_column", None),
            getattr(cfg, "label_delimiter", ","),
        )


@dataclass
class Dataset:
    path: str
    examples: list[Example] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line, problem) of each skipped row

    def __len__(self) -> int:
        return len(self.examples)

    def columns(self) -> tuple[list[str], list[str | None] | None]:
        """The texts, and the text pairs (None when no row has one)."""
        pairs = [ex.text_pair for ex in self.examples]
        return [ex.text for ex in self.examples], pairs if any(p is not None for p in pairs) else None


def _rows(path: Path, flag: str | None = None, bad: list | None = None):
    """(line number, dict) for CSV, TSV and JSONL files (UTF-8, else GB18030). `bad`: a list that collects
    (line, problem) of JSONL lines that are not a JSON object, which are then skipped instead of stopping the read."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise DomainLMError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .tsv or .jsonl")
    text = read_text_input(path, flag)
    if suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else "expected a JSON object"
            except json.JSONDecodeError as e:
                problem = f"not valid JSON ({e.msg})"
            if problem and bad is None:
                raise DomainLMError(f"{path}:{lineno}: {problem}")
            if problem:
                bad.append((lineno, problem))
                continue
            yield lineno, row
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        for row in reader:
            yield reader.line_num, row


def _labels(value, delimiter: str) -> list[str]:
    """A cell's labels: a JSON list, or a string split on the delimiter. Parsed alike for both tasks, so that
    a multi-label file given to a multi-class task is caught rather than read as one compound label."""
    if isinstance(value, list):
        return [str(v).strip() for v in value if str(v).strip()]
    if value is None:
        return []
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
            if isinstance(parsed, list):
                return [str(v).strip() for v in parsed if str(v).strip()]
        except json.JSONDecodeError:
            pass
    return [t.strip() for t in text.split(delimiter) if t.strip()]


def row_problem(row: dict, columns: Columns, require_labels: bool) -> str | None:
    """What makes a row unreadable before its values are looked at: a missing field, cells beyond the header,
    a label that is neither a string nor a list of strings."""
    if None in row:  # csv.DictReader files the cells beyond the header under None
        return f"more cells than the header has columns ({len(row[None])} extra: {str(row[None])[:60]})"
    if row.get(columns.text) is None:
        return f"no {columns.text!r} field"
    value = row.get(columns.label) if require_labels else None
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, (dict, list)) for v in items):
        return f"label is not a string or a list of strings ({json.dumps(value, ensure_ascii=False)[:60]})"
    return None


def read_examples(
    path: str,
    columns: Columns,
    multilabel: bool,
    require_labels: bool = True,
    skip_bad: bool = False,
    skip_flag: str | None = "--skip-bad-rows",
    flag: str | None = None,
) -> Dataset:
    """`skip_flag`: the flag the calling command accepts to skip bad rows (named in errors), or None; `flag`: the
    option that names the file (in the errors about the file itself)."""
    p = Path(path)
    data = Dataset(str(p))
    checked = False
    unreadable: list[tuple[int, str]] = []
    for lineno, row in _rows(p, flag, unreadable if skip_bad else None):
        for line, problem in unreadable:  # lines before this one that were not a JSON object
            data.skipped[problem.split(" (")[0]] += 1
            data.bad_rows.append((line, problem.split(" (")[0]))
        unreadable.clear()
        if not checked:
            wanted = [c for c in (columns.text, columns.text_pair, columns.group) if c]
            if require_labels:
                wanted.append(columns.label)
            missing = [c for c in wanted if c not in row]
            if missing:
                raise DomainLMError(
                    f"{p}:{lineno}: missing column(s) {', '.join(missing)} "
                    f"(found: {', '.join(map(str, row)) or 'none'}); "
                    "set --text-column / --label-column / --pair-column / --group-column"
                )
            checked = True
        text = str(row.get(columns.text) or "").strip()
        problem = row_problem(row, columns, require_labels)
        labels = _labels(row.get(columns.label), columns.label_delimiter) if require_labels and not problem else []
        if problem is None and not text:
            problem = "empty text"
        elif problem is None and require_labels and not labels:
            problem = "no label"
        elif require_labels and not multilabel and len(labels) > 1:
            problem = (
                f"several labels {labels} in a multiclass task (use --task multilabel, or --label-delimiter "
                "if the delimiter is part of a label)"
            )
        if problem:
            if skip_bad:
                data.skipped[problem.split(" (")[0]] += 1
                data.bad_rows.append((lineno, problem.split(" (")[0]))
                continue
            hint = f" (pass {skip_flag} to skip and count such rows)" if skip_flag else ""
            raise DomainLMError(f"{p}:{lineno}: {problem}{hint}")
        pair = str(row.get(columns.text_pair) or "") if columns.text_pair else None
        group = str(row.get(columns.group) or "") if columns.group else None
        data.examples.append(Example(text, labels, pair, group, lineno))
    for line, problem in unreadable:  # after the last readable row
        data.skipped[problem.split(" (")[0]] += 1
        data.bad_rows.append((line, problem.split(" (")[0]))
    if data.skipped:
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(data.skipped.items()))
        print(
            f"{p}: skipped {sum(data.skipped.values())} bad rows ({counts}); {len(data.examples)} rows used",
            file=sys.stderr,
        )
    if not data.examples:
        raise DomainLMError(f"{p}: no usable rows")
    return data


def read_stdin_lines(stream) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of stdin: bytes are read as UTF-8 (with or without BOM), else
    GB18030 (GBK). Empty or blank-only input, or bytes in neither encoding, is an error."""
    raw = stream.read()
    text = raw if isinstance(raw, str) else decode_text(raw, "<stdin>")
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise DomainLMError("<stdin> holds no text: give one text per line (or --input FILE)")
    return lines


def keep_line_order(data: Dataset, lines: list[str]) -> list[str]:
    """predict's output for stdin: one line per input line, a blank input line answered by an empty result, so
    that output line N always answers input line N (a notice says which lines were blank)."""
    by_line = {ex.line: line for ex, line in zip(data.examples, lines)}
    blank = [i for i in range(1, max(by_line, default=0) + 1) if i not in by_line]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (", ..." if len(blank) > 10 else "")
        print(
            f"<stdin>: {len(blank)} blank line(s) ({shown}) answered with no labels, so that each output line "
            "answers the input line of the same number",
            file=sys.stderr,
        )
    empty = json.dumps({"text": "", "labels": [], "scores": {}}) + "\n"
    return [by_line.get(i, empty) for i in range(1, max(by_line, default=0) + 1)]


def check_predict_paths(input_path: str, out: str, overwrite: bool = False) -> None:
    """predict's --out must be a new file (or, with --overwrite, an existing one): never --input itself, never a
    folder."""
    if out == "-":
        return
    o = Path(out)
    if o.is_dir():
        raise DomainLMError(f"--out {o} is a folder; predict writes one JSONL file: name a file")
    if not o.absolute().parent.is_dir():  # checked before predicting, not after
        raise DomainLMError(
            f"--out {o}: the folder {o.parent} does not exist; create it or name a file in an existing one"
        )
    if input_path != "-" and o.exists() and o.resolve() == Path(input_path).resolve():
        raise DomainLMError(f"--out {o} is --input: it would overwrite the data being classified; name another file")
    if o.exists() and not overwrite:
        raise DomainLMError(f"--out {o} exists; pass --overwrite to replace it, or name a new file")


def label_list(train: Dataset, given: list[str] | None = None) -> list[str]:
    """The label set: given explicitly, or every label seen in training, sorted."""
    seen = sorted({label for ex in train.examples for label in ex.labels})
    if given:
        unknown = [label for label in seen if label not in given]
        if unknown:
            raise DomainLMError(f"{train.path}: labels {unknown} are not in the given label list")
        return list(given)
    return seen


def check_labels(data: Dataset, labels: list[str]) -> None:
    known = set(labels)
    for ex in data.examples:
        unknown = [label for label in ex.labels if label not in known]
        if unknown:
            raise DomainLMError(
                f"{data.path}:{ex.line}: label(s) {unknown} never seen in training (known: {', '.join(labels)})"
            )


def targets(data: Dataset, labels: list[str], multilabel: bool) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    if multilabel:
        y = np.zeros((len(data), len(labels)), dtype=np.float32)
        for i, ex in enumerate(data.examples):
            y[i, [index[label] for label in ex.labels]] = 1.0
        return y
    return np.asarray([index[ex.labels[0]] for ex in data.examples], dtype=np.int64)


def _strata(data: Dataset) -> np.ndarray:
    """Stratify on the (first) label; multi-label rows stratify on their first label too."""
    return np.asarray([ex.labels[0] for ex in data.examples])


def split_validation(data: Dataset, ratio: float, cap: int, seed: int) -> tuple[Dataset, Dataset]:
    """A stratified share of train as validation (ratio in [0.01, 0.5], at most `cap` rows if cap). Fails if a class
    would be left without a training example."""
    if not 0.01 <= ratio <= 0.5:
        raise DomainLMError(f"--valid-ratio {ratio} is out of range [0.01, 0.5]")
    from sklearn.model_selection import train_test_split

    n_valid = max(1, round(ratio * len(data)))
    if cap:  # 0: no cap
        n_valid = min(cap, n_valid)
    strata = _strata(data)
    counts = Counter(strata.tolist())
    indices = np.arange(len(data))
    try:
        stratify = strata if min(counts.values()) >= 2 and n_valid >= len(counts) else None
        train_idx, valid_idx = train_test_split(indices, test_size=n_valid, random_state=seed, stratify=stratify)
    except ValueError as e:
        raise DomainLMError(f"{data.path}: cannot split {n_valid} validation rows from {len(data)}: {e}") from None
    train_labels = {label for i in train_idx for label in data.examples[i].labels}
    lost = sorted({label for ex in data.examples for label in ex.labels} - train_labels)
    if lost:
        raise DomainLMError(
            f"{data.path}: the validation split leaves no training example for {lost}; "
            "add examples, lower --valid-ratio, or give a --dev file"
        )
    pick = lambda idx: Dataset(data.path, [data.examples[i] for i in sorted(idx)])  # noqa: E731
    return pick(train_idx), pick(valid_idx)


def fold_indices(data: Dataset, k: int, seed: int) -> list[np.ndarray]:
    """The held-out row indices of each of k folds (stratified when every class has k rows): every row is held
    out by exactly one fold."""
    from sklearn.model_selection import KFold, StratifiedKFold

    strata = _strata(data)
    counts = Counter(strata.tolist())
    stratified = min(counts.values()) >= k
    if not stratified:
        few = ", ".join(f"{label} ({n})" for label, n in sorted(counts.items()) if n < k)
        print(
            f"warning: {data.path}: fewer rows than --folds {k} for {few}: folds are not stratified and some hold "
            "none of those classes",
            file=sys.stderr,
        )
    splitter = (
        StratifiedKFold(k, shuffle=True, random_state=seed) if stratified else KFold(k, shuffle=True, random_state=seed)
    )
    return [test_idx for _, test_idx in splitter.split(np.zeros(len(data)), strata if stratified else None)]


def kfold(data: Dataset, k: int, seed: int) -> list[tuple[Dataset, Dataset]]:
    folds = []
    for test_idx in fold_indices(data, k, seed):
        held = set(test_idx.tolist())
        folds.append(
            (
                Dataset(data.path, [ex for i, ex in enumerate(data.examples) if i not in held]),
                Dataset(data.path, [data.examples[i] for i in test_idx]),
            )
        )
    return folds


def ordered_labels(labels: list[str]) -> list[str]:
    """An ordinal scale's order when none is given: numeric labels by value (sorted text would put 10 before 2)."""
    try:
        return sorted(labels, key=float)
    except ValueError:
        raise DomainLMError(
            f"--ordinal: the labels ({', '.join(labels)}) are not numbers; give their order with --labels"
        ) from None


# ---- the task: the one reader of a classification task's files ----------------------------------------------------


@dataclass
class Task:
    """The task data, read (and checked) once and passed on: training rows, the --dev and --test rows, labels."""

    train: Dataset
    dev: Dataset | None
    test: Dataset | None
    labels: list[str]

    def split(self, rows: Dataset, cfg, seed: int) -> tuple[Dataset, Dataset]:
        """(rows to fit, rows to validate on): --dev when given, else a share of `rows` held out."""
        if self.dev is not None:
            return rows, self.dev
        return split_validation(rows, cfg.valid_ratio, getattr(cfg, "valid_max_rows", 0), seed)

    def n_valid(self, cfg) -> int:
        """Rows validation picks the best epoch on."""
        if self.dev is not None:
            return len(self.dev)
        n = max(1, round(cfg.valid_ratio * len(self.train)))
        cap = getattr(cfg, "valid_max_rows", 0)
        return min(cap, n) if cap else n


def task_problems(cfg, known: list[str] | None = None, known_from: str = "") -> tuple[Task | None, dict[str, str]]:
    """Read a task as `finetune`, `distill`, the sweep and the console read it: --train, --dev and --test with the
    command's columns, the label set (given by --labels, ordered for --ordinal, or `known`: a teacher's labels,
    named by `known_from`), every file's labels checked against it. Every problem, by the option it is about."""
    errors: dict[str, str] = {}
    read: dict[str, Dataset] = {}
    columns = Columns.of(cfg)
    multilabel = getattr(cfg, "task", "multiclass") == "multilabel"
    for key in ("train", "dev", "test"):
        path = getattr(cfg, key, None)
        if path:
            try:
                read[key] = read_examples(
                    path, columns, multilabel, skip_bad=getattr(cfg, "skip_bad_rows", False), flag=f"--{key}"
                )
            except DomainLMError as e:
                errors[key] = str(e)
    labels = None
    if "train" in read:
        try:
            labels = _task_labels(cfg, read["train"], multilabel, known, known_from)
        except DomainLMError as e:
            errors.setdefault("train" if known else "labels", str(e))
    for key in ("dev", "test"):
        if labels and key in read:
            try:
                check_labels(read[key], labels)
            except DomainLMError as e:
                errors.setdefault(key, str(e))
    if errors:
        return None, errors
    return Task(read["train"], read.get("dev"), read.get("test"), labels), {}


def _task_labels(cfg, train: Dataset, multilabel: bool, known: list[str] | None, known_from: str) -> list[str]:
    if known is not None:
        unknown = sorted({label for ex in train.examples for label in ex.labels} - set(known))
        if unknown:
            raise DomainLMError(
                f"{known_from} predicts {', '.join(known)}; --train {train.path} has labels {unknown} it "
                "does not know: use a model trained on these labels"
            )
        return list(known)
    given = getattr(cfg, "labels", None) or None
    labels = label_list(train, given)
    if getattr(cfg, "ordinal", False) and not given:
        labels = ordered_labels(labels)
    if len(labels) < 2 and not multilabel:
        raise DomainLMError(f"{train.path}: only one label ({labels}); a classifier needs at least two")
    return labels


def read_task(cfg, known: list[str] | None = None, known_from: str = "") -> Task:
    """task_problems for a command: the first problem is the error."""
    task, errors = task_problems(cfg, known, known_from)
    if errors:
        raise DomainLMError(next(iter(errors.values())))
    return task
