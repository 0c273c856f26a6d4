"""Writing files so that a reader never meets half of one, and a failed write is one line, not a traceback.

atomic_write(path, data)   the data lands under a hidden name beside `path`, is flushed to disk, and is renamed over
                           `path`: `path` is the old file or the new one, never a mix
write_json(path, obj)      the same for JSON (UTF-8, indented)
writing(path, flag)        a block that writes `path` (a file or a folder, by any library): an I/O failure in it
                           (a full disk, a read-only or immutable folder, a quota) becomes one DomainLMError naming
                           the path and the space free there, whichever library raised it (OSError, safetensors'
                           SafetensorError, torch's "file write failed" RuntimeError)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from domainlm.errors import DomainLMError

# what the libraries that write our files say when the disk, not the data, is the problem (torch's serializer says
# "file write failed", "iostream error" or "unexpected pos" of its zip writer; safetensors "IoError")
_IO_WORDS = (
    "no space left",
    "os error 28",
    "disk quota",
    "file write failed",
    "read-only file system",
    "permission denied",
    "operation not permitted",
    "input/output error",
    "ioerror",
    "iostream error",
    "unexpected pos",
)
_FULL_WORDS = ("no space left", "os error 28", "file write failed", "iostream error", "unexpected pos")
_ERRNO_WORDS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the folder cannot be changed (read-only or immutable)",
    errno.EIO: "an input/output error",
}


def free_mb(path: str | Path) -> float | None:
    """MB free on the file system holding `path` (or the nearest folder above it that exists)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free / 1e6
    except OSError:
        return None


def io_failure(e: BaseException) -> str | None:
    """What went wrong, in words, if `e` is a failure to write (not a bug): else None."""
    if isinstance(e, OSError):
        return _ERRNO_WORDS.get(e.errno, e.strerror or str(e))
    text = str(e).lower()
    if type(e).__name__ in ("SafetensorError", "RuntimeError") and any(w in text for w in _IO_WORDS):
        if any(w in text for w in _FULL_WORDS):
            return "the disk is full"
        return next(w for w in _IO_WORDS if w in text)
    return None


def failure_line(path: str | Path, what: str, flag: str | None = None) -> str:
    free = free_mb(path)
    where = f"{flag} {path}" if flag else str(path)
    room = f" ({free:,.1f} MB free there)" if free is not None else ""
    return f"{where}: could not write: {what}{room}"


@contextlib.contextmanager
def writing(path: str | Path, flag: str | None = None, cleanup: str | Path | None = None):
    """Run a block that writes `path`; an I/O failure becomes one DomainLMError (`cleanup`, a temporary file or
    folder of the block, is removed first)."""
    try:
        yield
    except DomainLMError:
        raise
    except Exception as e:
        what = io_failure(e)
        if what is None:
            raise
        if cleanup is not None:
            _remove_quietly(Path(cleanup))
        raise DomainLMError(failure_line(path, what, flag)) from None


def _remove_quietly(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def atomic_write(path: str | Path, data: str | bytes, flag: str | None = None) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path, flag, cleanup=tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj, flag: str | None = None) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", flag)


def write_if_changed(path: str | Path, text: str, flag: str | None = None) -> Path:
    """atomic_write, but an unchanged file is left alone (its modification time too), so that what depends on it
    (a corpus's fingerprint) sees it as up to date."""
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    return atomic_write(path, text, flag)


# ---- reading inputs ----------------------------------------------------------------------------------------------


def input_file(path: str | Path, flag: str | None = None) -> Path:
    """An input that must be a regular file: one line naming it (and the flag) when it is missing, a folder or
    something else (a device, a pipe), so that nothing that exists reads as "does not exist"."""
    p = Path(path)
    name = f"{flag} {p}" if flag else str(p)
    if p.is_dir():
        raise DomainLMError(f"{name} is a folder; it must name a file")
    if not p.exists():
        raise DomainLMError(f"{name} does not exist")
    if not p.is_file():
        raise DomainLMError(f"{name} is not a regular file")
    return p


def read_text_input(path: str | Path, flag: str | None = None) -> str:
    """A text input file, decoded by decode_text; the file is named (with its flag) in every error."""
    return decode_text(input_file(path, flag).read_bytes(), f"{flag} {path}" if flag else str(path))


def decode_text(raw: bytes, where: str) -> str:
    """Bytes of text as UTF-8 (with or without BOM), else GB18030 (which reads GBK and GB2312): bytes in neither (a
    binary file, another encoding) are one line naming `where` and the line of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        first = e
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError:
        line = raw[: first.start].count(b"\n") + 1
        raise DomainLMError(
            f"{where}:{line}: not text (neither UTF-8 nor GB18030); give a text file in UTF-8"
        ) from None


def yaml_text(values: dict) -> str:
    """A config's values as the YAML that --config reads back (in field order, Unicode as it is)."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
