"""Output folders: one run at a time per folder, and nothing of the user's deleted by mistake.

claim(out)         an exclusive lock on <parent>/.<name>.lock (flock: released by the OS when the process ends,
                   so a killed run never leaves a stale lock, at most its empty file); a second run on the same
                   --out stops at once, naming the holder's PID. Under torchrun / accelerate launch only global
                   rank 0 takes it. release(out) / release_all() give it back and remove the file.
folder(out)        --out must be a folder (or not exist yet), never an existing file.
check_earlier_run  an earlier run in --out: refused unless --overwrite, or when it is another command's.
clear_known(out)   remove only the files and folders a command itself writes, never anything else.
remove_tree(p, r)  shutil.rmtree, only for a path that lies inside the run folder r.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from domainlm.errors import DomainLMError

_HELD: dict[Path, list[int]] = {}  # lock path -> [descriptor, claims], held until release or process end


def _lock_path(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}.lock"


def claim(out: str | Path, flag: str = "--out") -> None:
    """Take the exclusive lock of the output folder `out` for this process (re-entrant within a process)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # the other ranks of a distributed run write nothing of their own
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented)
        return
    path = _lock_path(Path(out))
    if path in _HELD:
        _HELD[path][1] += 1
        return
    for _ in range(10):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DomainLMError(f"{flag} {out}: cannot create its lock file {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DomainLMError(
                f"{flag} {out} is in use by another domainlm run (PID {holder}); wait for it to finish or choose "
                f"another {flag}"
            ) from None
        try:  # the holder we waited on may have removed the file as we opened it: lock the one on disk
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise DomainLMError(f"{flag} {out}: its lock file {path} keeps changing; is another run starting?")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[path] = [fd, 1]


def release(out: str | Path) -> None:
    """Give back one claim of `out`; the last one removes the lock file and unlocks."""
    _release(_lock_path(Path(out)))


def _release(path: Path, all_claims: bool = False) -> None:
    held = _HELD.get(path)
    if held is None:
        return
    held[1] = 0 if all_claims else held[1] - 1
    if held[1] <= 0:
        del _HELD[path]
        path.unlink(missing_ok=True)  # while still locked: a waiting run then finds a new file (see claim)
        os.close(held[0])


def release_all() -> None:
    """Drop every lock this process holds (the CLI calls this when a command ends)."""
    for path in list(_HELD):
        _release(path, all_claims=True)


def folder(out: str | Path, flag: str = "--out") -> Path:
    """`out` as a folder path: an existing file there is an error naming it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DomainLMError(f"{flag} {path} is an existing file; {flag} names a folder: choose another path")
    return path


def inside(path: str | Path, root: str | Path) -> bool:
    """True if `path` is `root` or lies under it (symbolic links resolved)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return p == r or r in p.parents


def remove_tree(path: str | Path, root: str | Path) -> None:
    """Remove `path` (a folder or file), refusing anything that does not lie inside `root`."""
    p = Path(path)
    if not inside(p, root) or Path(p).resolve() == Path(root).resolve():
        raise DomainLMError(f"refusing to remove {p}: it does not lie inside {root}")
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def known_entries(out: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Entries directly in `out` whose names match one of a command's own output patterns."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns))


def clear_known(out: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Remove a command's own earlier outputs from `out` (and nothing else); returns what was removed."""
    found = known_entries(out, patterns)
    for p in found:
        remove_tree(p, out)
    return found


# What each command writes into its --out, so a rerun clears exactly these and nothing of the user's.
FINETUNE_OUTPUTS = ("config.yaml", "model", "adapter", "metrics.json", "report.md", "report.html", "log.jsonl",
                    "tensorboard", "*_predictions.jsonl", "*_bad_cases.jsonl", "*_confusion.png", "curve_*.png",
                    "step-*", "seed-*", "fold-*", "summary.json", "summary.md", "linear.npz", "linear.json", "floor",
                    "oof.jsonl", "ensemble.json", "blend.json")
EVALUATE_OUTPUTS = ("config.yaml", "metrics.json", "report.md", "eval_predictions.jsonl", "eval_bad_cases.jsonl",
                    "eval_confusion.png")


def _config_keys(out: Path) -> set[str] | None:
    import yaml

    try:
        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return set(config) if isinstance(config, dict) else None


def check_earlier_run(out: Path, command: str, patterns: tuple[str, ...], marker: str,
                      overwrite: bool | None = None) -> list[Path]:
    """Before a run writes into `out`: the entries an earlier run of `command` left there (cleared later, when
    every check has passed, with clear_known). Refuses a folder whose entries belong to another command (its
    config.yaml lacks the option `marker`), and, when the command has --overwrite (`overwrite` not None), an
    earlier run unless it is given."""
    if int(os.environ.get("RANK", "0")) != 0:
        return []  # rank 0 decides (the others would see the files it has just started writing)
    earlier = known_entries(folder(out), patterns)
    if not earlier:
        return []
    keys = _config_keys(out)
    names = ", ".join(p.name for p in earlier[:4])
    if keys is None or marker not in keys:
        raise DomainLMError(
            f"--out {out} holds {names}, not from `domainlm {command}`; {command} would overwrite them: "
            "choose another --out"
        )
    if overwrite is False:
        finished = any(p.name in ("metrics.json", "summary.json") for p in earlier)
        raise DomainLMError(
            f"--out {out} holds an earlier {'finished' if finished else 'interrupted'} {command} run ({names}); "
            f"pass --overwrite to replace it (its files are removed first, nothing else), or choose another --out"
        )
    return earlier
