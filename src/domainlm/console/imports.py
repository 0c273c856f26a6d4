"""Bringing one's own models and corpora into the console: a folder on the server (inside --home or one of
--import-roots) or an uploaded archive, checked as the CLI checks a `--model` / `--tokenizer` / `--corpus`.

A model becomes a record of "my models" in HOME/models/NAME (copied: the user's folder is only read):
- a classifier (a `domainlm finetune` model/ folder with domainlm_labels.json, or a Hugging Face sequence classifier):
  kind `classifier`, to try, serve, export and compare (it can still be fine-tuned further);
- a Hugging Face folder (config.json + weights): kind `base`, its config and tokenizer read once here;
- a PaddleNLP folder: converted (the code of `domainlm convert`), kind `base`;
- a folder with a vocabulary only (vocab.txt / tokenizer.json, no config.json): kind `tokenizer`, offered for
  `prepare` only.
A corpus store (meta.json from `domainlm prepare`) or a data file becomes a dataset in HOME/datasets/.
"""

from __future__ import annotations

import secrets
import shutil
import tarfile
import zipfile
from pathlib import Path

from domainlm.console.catalog import folder_size
from domainlm.console.db import Dataset, Model
from domainlm.console.security import PathError, inside, safe_filename
from domainlm.errors import DomainLMError

ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar")


class Missing(DomainLMError):
    """A server path that does not exist (the API answers 404)."""


def allowed(home: Path, roots: list[str], value: str) -> Path:
    """A server path inside home or one of the import roots (symlinks followed), else PathError."""
    value = (value or "").strip()
    if not value:
        raise DomainLMError("give the folder's path on the server")
    if "\x00" in value:  # no such file can exist
        raise Missing(f"{value!r} does not exist (a path cannot hold a NUL character)")
    # a relative path is relative to home; an absolute one may lie in any allowed root
    for root in [home, *([Path(r) for r in roots] if Path(value).is_absolute() else [])]:
        try:
            return inside(root, value)
        except PathError:
            continue
    where = ", ".join([str(home.resolve()), *[str(Path(r).resolve()) for r in roots]])
    raise PathError(
        f"{value} is outside the folders the console may read ({where}); start the console with "
        "--import-roots FOLDER to allow another one"
    )


def _target(home: Path, sub: str, name: str) -> Path:
    """HOME/SUB/NAME, or NAME with a random prefix when that exists (messages then still name the folder)."""
    plain = home / sub / safe_filename(name)
    return plain if not plain.exists() else home / sub / f"{secrets.token_hex(3)}-{safe_filename(name)}"


def inspect_model(path: Path) -> str:
    """The kind of model folder, or a DomainLMError that says what is missing."""
    from domainlm.interop.paddle import has_hf_weights, is_paddle_folder

    if not path.is_dir():
        raise DomainLMError(f"{path.name} is not a folder: give the folder that holds config.json and the weights")
    if is_paddle_folder(path):
        return "paddle"
    if (path / "config.json").is_file():
        if not has_hf_weights(path):
            raise DomainLMError(f"{path.name} holds a config.json but no weights (*.safetensors or pytorch_model.bin)")
        return "classifier" if is_classifier(path) else "hf"
    if (path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file():
        return "vocab"
    raise DomainLMError(
        f"{path.name} holds no model: neither config.json with weights (Hugging Face), nor "
        "model_state.pdparams (PaddleNLP), nor a vocabulary (vocab.txt / tokenizer.json)"
    )


def is_classifier(path: Path) -> bool:
    """A fine-tuned classifier: the label file `domainlm finetune` saves beside the weights, or a config whose
    architecture is a sequence classifier."""
    import json

    from domainlm.classify.runtime_base import LABELS_FILE

    if (path / LABELS_FILE).is_file():
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _check_hf(folder: Path, kind: str) -> None:
    """What a job would load first: the config (not for a vocabulary) and a fast tokenizer."""
    from domainlm.interop.models import load_config
    from domainlm.interop.tokenizer import load_fast_tokenizer

    if kind != "vocab":
        load_config(str(folder))
    has_vocab = any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"))
    if has_vocab or kind == "vocab":
        load_fast_tokenizer(str(folder), log=lambda *a, **k: None, flag="model")


def add_model(s, home: Path, source: Path, name: str, copy: bool = True) -> Model:
    """Check `source`, put the model into HOME/models (converted if PaddleNLP), and record it."""
    from domainlm.interop.paddle import convert

    kind = inspect_model(source)
    name = (name or source.name).strip()[:200] or "model"
    target = _target(home, "models", name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == "paddle":
            convert(source, target, log=lambda *a, **k: None)
        elif copy:
            shutil.copytree(source, target, symlinks=False)
        else:
            source.rename(target)
        _check_hf(target, kind)
    except Exception as e:
        shutil.rmtree(target, ignore_errors=True)
        if isinstance(e, DomainLMError):
            raise
        raise DomainLMError(f"{source.name}: {type(e).__name__}: {e}") from None
    if kind == "classifier":  # what Try and serve open, checked now; one that does not open is still an encoder
        from domainlm.classify.runtime import load

        try:
            load(str(target))
        except Exception:  # noqa: BLE001 - any reason: kept as a base model to fine-tune from
            kind = "hf"
    record = Model(
        name=name,
        kind={"vocab": "tokenizer", "classifier": "classifier"}.get(kind, "base"),
        path=str(target.relative_to(home)),
        job_id=None,
        step=None,
        metrics={},
        size_bytes=folder_size(target),
    )
    s.add(record)
    return record


def register_model(s, home: Path, roots: list[str], value: str, name: str = "") -> Model:
    path = allowed(home, roots, value)
    if not path.exists():
        raise Missing(f"{value} does not exist")
    return add_model(s, home, path, name)


def unpack(archive: Path, filename: str, into: Path) -> Path:
    """Extract an uploaded .zip / .tar(.gz) into `into` (no absolute paths, no '..', no links); returns the
    folder that holds the model (the archive's single top folder, if it has one)."""
    lower = filename.lower()
    if not lower.endswith(ARCHIVES):
        raise DomainLMError(f"{filename}: upload a .zip or .tar.gz of the model folder")
    into.mkdir(parents=True)
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    target = (into / info.filename).resolve()
                    if info.filename.startswith("/") or (
                        target != into.resolve() and into.resolve() not in target.parents
                    ):
                        raise DomainLMError(f"{filename}: entry {info.filename} would land outside the folder")
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                for member in t.getmembers():
                    if not (member.isfile() or member.isdir()):
                        raise DomainLMError(
                            f"{filename}: entry {member.name} is a link or device; only files are accepted"
                        )
                    target = (into / member.name).resolve()
                    if member.name.startswith("/") or (
                        target != into.resolve() and into.resolve() not in target.parents
                    ):
                        raise DomainLMError(f"{filename}: entry {member.name} would land outside the folder")
                t.extractall(into)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise DomainLMError(f"{filename}: not a readable archive ({e})") from None
    entries = [p for p in into.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else into


def upload_model(s, home: Path, tmp: Path, filename: str, name: str = "") -> Model:
    work = home / "models" / f".unpack-{secrets.token_hex(4)}"
    try:
        folder = unpack(tmp, filename, work)
        stem = safe_filename(filename)
        for suffix in ARCHIVES:
            stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
        return add_model(s, home, folder, name or (folder.name if folder != work else stem), copy=False)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def register_dataset(s, home: Path, roots: list[str], value: str, fields: dict) -> Dataset:
    """A corpus store or data file on the server: inside home it is used in place, from an import root copied in."""
    from domainlm.console import datasets

    path = allowed(home, roots, value)
    if not path.exists():
        raise Missing(f"{value} does not exist")
    home_root = home.resolve()
    if path == home_root or home_root in path.parents:
        return datasets.register_existing(s, home, str(path), fields)
    if path.is_dir() and not (path / "meta.json").is_file():
        raise DomainLMError(f"{path.name} is a folder but not a corpus store from `domainlm prepare` (no meta.json)")
    target = _target(home, "datasets", fields.get("name") or path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(path, target) if path.is_dir() else shutil.copy2(path, target)
    try:
        return datasets.register_existing(s, home, str(target), {**fields, "name": fields.get("name") or path.name})
    except DomainLMError:
        shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        raise
