"""ensemble.json, the file that makes a folder a fold ensemble: its member folders (relative to it), the label map
and the multi-label thresholds. Written by `finetune --folds` and `export`, read by the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from domainlm.errors import DomainLMError
from domainlm.outputs import Writer, inside

ENSEMBLE_FILE = "ensemble.json"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble(
    folder: Writer | Path,
    members: list[str],
    labels: list[str],
    multilabel: bool,
    thresholds: np.ndarray | None = None,
    **extra,
) -> None:
    from domainlm.outputs import Plain

    meta = {
        "kind": "mean of member probabilities",
        "members": members,
        "labels": labels,
        "multilabel": multilabel,
        **extra,
    }
    if thresholds is not None:
        meta["thresholds"] = [float(t) for t in thresholds]
    (folder if isinstance(folder, Writer) else Plain(folder)).write_json(ENSEMBLE_FILE, meta)


def read_ensemble(path: str | Path) -> dict:
    where = Path(path) / ENSEMBLE_FILE
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
        members, labels = meta["members"], meta["labels"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DomainLMError(f"{where}: not a readable ensemble file ({e})") from None
    if not isinstance(members, list) or not members or not isinstance(labels, list) or not labels:
        raise DomainLMError(f"{where}: lists no members or no labels")
    # a member is a folder inside the ensemble's: a name written in a file never leads elsewhere
    outside = [
        str(m)
        for m in members
        if not isinstance(m, str)
        or not m
        or Path(m).is_absolute()
        or ".." in Path(m).parts
        or not inside(Path(path) / m, path, strict=True)
    ]
    if outside:
        raise DomainLMError(
            f"{where}: member {outside[0]!r} is not a folder inside {path}; an ensemble's members "
            "are its own sub-folders"
        )
    missing = [m for m in members if not (Path(path) / m).exists()]
    if missing:
        raise DomainLMError(f"{where}: member folder(s) {', '.join(missing)} do not exist")
    return meta
