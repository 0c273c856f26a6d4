"""Output folders: one run at a time per folder, and nothing of the user's deleted by mistake.

claim(out)          an exclusive lock on <parent>/.<name>.lock, owned by this process alone (see claim), so a
                    killed run never blocks its own resume; a second run on the same --out stops at once, naming
                    the holder's PID. Under torchrun / accelerate launch only global rank 0 takes it.
folder(out)         --out must be a folder (or not exist yet), never an existing file.
check_earlier_run   every command with an --out, before it writes: refuses a folder holding files of the user's
                    (or another command's) under names the command writes, and, with --overwrite, an earlier run
                    of its own unless --overwrite is given. What a command wrote is told by MANIFEST, a marker file
                    it leaves in --out (mark / record), never guessed from names alone.
clear_known(out)    remove only the files and folders the command itself wrote there, never anything else.
inside(p, root)     the one "does this path lie in that folder" test (symbolic links resolved).
stage(target)       write a folder beside `target`, then swap it into place (the old one kept until the new one
                    is there): an interrupted run leaves the old folder whole.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import time
from pathlib import Path

from domainlm.errors import DomainLMError

MANIFEST = ".domainlm-out.json"  # {"command": ..., "complete": bool, "entries": [names written]}
_HELD: dict[Path, list[int]] = {}  # lock path -> [descriptor, claims], held until release or process end


def _lock_path(out: Path) -> Path:
    out = out.resolve()
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _try_lock(fd: int) -> bool:
    """POSIX record locks (lockf), not flock: a record lock belongs to the process that took it, is not
    inherited by fork (DataLoader workers, prepare's pool) and is released by the OS the moment that process
    ends. A flock belongs to the open file, which forked children share: a worker left over from a run
    killed with SIGKILL held it for seconds and a resume was refused, naming the dead run."""
    import fcntl

    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def claim(out: str | Path, flag: str = "--out") -> None:
    """Take the exclusive lock of the output folder `out` for this process (re-entrant within a process)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return  # the other ranks of a distributed run write nothing of their own
    try:
        import fcntl  # noqa: F401
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
        if not _try_lock(fd):
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            # a holder that is no longer alive is ending this instant: its lock goes with it
            if not (holder.isdigit() and not _alive(int(holder)) and (time.sleep(0.2) or _try_lock(fd))):
                os.close(fd)
                if holder.isdigit() and not _alive(int(holder)):
                    raise DomainLMError(f"{flag} {out} is still locked, though the run that took it (PID {holder}) has "
                                        "ended; try again in a few seconds") from None
                raise DomainLMError(
                    f"{flag} {out} is in use by another domainlm run ({f'PID {holder}' if holder else 'starting'}); "
                    f"wait for it to finish or choose another {flag}"
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
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
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


# ---- paths ----------------------------------------------------------------------------------------------

def folder(out: str | Path, flag: str = "--out") -> Path:
    """`out` as a folder path: an existing file there is an error naming it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise DomainLMError(f"{flag} {path} is an existing file; {flag} names a folder: choose another path")
    return path


def inside(path: str | Path, root: str | Path, strict: bool = False) -> bool:
    """True if `path` lies under `root` or is `root` itself (unless `strict`), symbolic links resolved."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return (p == r and not strict) or r in p.parents


def remove_tree(path: str | Path, root: str | Path) -> None:
    """Remove `path` (a folder or file), refusing anything that does not lie inside `root`."""
    p = Path(path)
    if not inside(p, root, strict=True):
        raise DomainLMError(f"refusing to remove {p}: it does not lie inside {root}")
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def writable(out: str | Path, flag: str = "--out") -> None:
    """Before any work: the folder that will hold `out` (and its staging folder, see stage) can be written;
    checked by writing, as permissions, read-only mounts and ACLs all count."""
    base = Path(out).absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise DomainLMError(f"{flag} {out}: {base} is a file, not a folder")
    try:
        with open(base / f".domainlm-write-test-{os.getpid()}", "wb") as probe:
            os.unlink(probe.name)
    except OSError as e:
        raise DomainLMError(f"{flag} {out}: cannot write in {base} ({e.strerror}); choose a writable folder") from None


def protect(out: str | Path, inputs=(), flag: str = "--out") -> None:
    """A command that replaces its whole --out folder: never the working folder, an input or a folder holding
    one (or the folder above them)."""
    out = Path(out)
    if inside(Path.cwd(), out):
        raise DomainLMError(f"{flag} {out} is (or holds) the working folder, which would be replaced: "
                            f"choose a new folder, e.g. {flag} {out / 'out'}")
    for item in inputs:
        if item and inside(item, out):
            raise DomainLMError(f"{flag} {out} holds the input {item}, which would be replaced: choose another {flag}")


# ---- stage, then swap into place ------------------------------------------------------------------------

def swap(partial: Path, target: Path) -> None:
    """Rename the finished `partial` to `target`; an old `target` is moved aside first and removed only once
    the new one is in place (restored if the rename fails)."""
    old = target.parent / f".{target.name}.old"
    if old.exists() or old.is_symlink():  # left by an interrupted swap: `target` is in place
        remove_tree(old, target.parent)
    moved = target.exists() or target.is_symlink()
    if moved:
        target.rename(old)
    try:
        partial.rename(target)
    except BaseException:
        if moved:
            old.rename(target)
        raise
    if moved:
        remove_tree(old, target.parent)


@contextlib.contextmanager
def stage(target: str | Path):
    """Yields an empty folder beside `target` to write into; on success it replaces `target` (swap), on any
    error it is removed and `target` is left as it was."""
    target = Path(target)
    partial = target.parent / f".{target.name}.partial"
    if partial.exists():  # left by an interrupted run (the caller holds the lock of `target`)
        remove_tree(partial, target.parent)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap(partial, target)


# ---- what a command wrote -------------------------------------------------------------------------------

def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def known_entries(out: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Entries directly in `out` whose names match one of a command's own output patterns."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name != MANIFEST and _matches(p.name, patterns))


def read_manifest(out: Path) -> dict | None:
    try:
        value = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and isinstance(value.get("command"), str) else None


def mark(out: Path, command: str) -> None:
    """Before a command writes into `out`: from now on the entries under its names there are its own."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"command": command, "complete": False}) + "\n", encoding="utf-8")


def record(out: Path, command: str, patterns: tuple[str, ...] = ("*",)) -> None:
    """When a command has finished: the entries it wrote into `out`, by name."""
    entries = [p.name for p in known_entries(out, patterns)]
    (out / MANIFEST).write_text(json.dumps({"command": command, "complete": True, "entries": entries}, indent=1) + "\n",
                                encoding="utf-8")


def _config_keys(out: Path) -> set[str] | None:
    import yaml

    try:
        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return set(config) if isinstance(config, dict) else None


def own_entries(out: Path, command: str, patterns: tuple[str, ...], marker=None) -> set[str]:
    """Names in `out` that `command` wrote: those its manifest lists (all under its names, if the run was
    interrupted); for a folder from before manifests, those under its names when config.yaml holds the key
    `marker` (or `marker(out)` is true)."""
    manifest = read_manifest(out)
    names = {p.name for p in known_entries(out, patterns)}
    if manifest is not None:
        if manifest["command"] != command:
            return set()
        return names if not manifest.get("complete") else names & set(manifest.get("entries") or [])
    if callable(marker):
        return names if marker(out) else set()
    keys = _config_keys(out) if marker else None
    return names if keys is not None and marker in keys else set()


def check_earlier_run(out: Path, command: str, patterns: tuple[str, ...], marker=None,
                      overwrite: bool | None = None, inputs=()) -> list[Path]:
    """Before a run writes into `out`: the entries an earlier run of `command` left there (cleared later, when
    every check has passed, with clear_known). Refuses entries under the command's names that it did not write
    (the user's, or another command's), and, when the command has --overwrite (`overwrite` not None), an earlier
    run unless it is given. `inputs`: paths the run reads, never removed."""
    if int(os.environ.get("RANK", "0")) != 0:
        return []  # rank 0 decides (the others would see the files it has just started writing)
    earlier = known_entries(folder(out), patterns)
    if not earlier:
        return []
    own = own_entries(out, command, patterns, marker)
    foreign = [p.name for p in earlier if p.name not in own]
    if foreign:
        raise DomainLMError(
            f"--out {out} holds {', '.join(foreign[:4])}, not from `domainlm {command}`; {command} would overwrite "
            "them: move them or choose another --out"
        )
    names = ", ".join(p.name for p in earlier[:4])
    if overwrite is False:
        finished = (read_manifest(out) or {}).get("complete") or any(p.name in ("metrics.json", "summary.json")
                                                                     for p in earlier)
        raise DomainLMError(
            f"--out {out} holds an earlier {'finished' if finished else 'interrupted'} {command} run ({names}); "
            f"pass --overwrite to replace it (its files are removed first, nothing else), or choose another --out"
        )
    for p in earlier:
        for item in [Path.cwd(), *inputs]:
            if item and inside(item, p):
                raise DomainLMError(f"--out {out}: {p} holds {item}, which {command} reads; choose another --out")
    return earlier


def check_replace(out: str | Path, command: str, overwrite: bool, inputs=(), legacy=None) -> bool:
    """A command that replaces its whole --out (stage): True if `out` holds an earlier output of `command`
    (replaced only with --overwrite). Anything else in it (the user's files, another command's) is refused,
    with or without --overwrite; so are the working folder, a folder holding an input, an unwritable place.
    `legacy(out)`: True for an output written before manifests."""
    out = folder(out)
    protect(out, inputs)
    writable(out)
    entries = {p.name for p in out.iterdir()} - {MANIFEST} if out.is_dir() else set()
    if not entries:
        return False
    manifest = read_manifest(out)
    if manifest is not None:
        own = (set(manifest.get("entries") or []) if manifest.get("complete") else entries) \
            if manifest["command"] == command else set()
    else:
        own = entries if legacy is not None and legacy(out) else set()
    foreign = sorted(entries - own)
    if foreign:
        raise DomainLMError(f"--out {out} holds {', '.join(foreign[:4])}, not from `domainlm {command}`; {command} "
                            "replaces the whole folder, with or without --overwrite: move them or choose another --out")
    if not overwrite:
        raise DomainLMError(f"--out {out} is not empty: it holds an earlier `domainlm {command}` output; "
                            "pass --overwrite to replace it, or choose another --out")
    return True


def clear_known(out: Path, patterns: tuple[str, ...], command: str | None = None) -> list[Path]:
    """Remove a command's own earlier outputs from `out` (and nothing else); returns what was removed. With
    `command`, marks `out` as that command's from now on (mark)."""
    found = known_entries(out, patterns)
    for p in found:
        remove_tree(p, out)
    if command is not None:
        mark(out, command)
    return found


# What each command writes into its --out, so a rerun clears exactly these and nothing of the user's.
FINETUNE_OUTPUTS = ("config.yaml", "model", "adapter", "metrics.json", "report.md", "report.html", "log.jsonl",
                    "tensorboard", "*_predictions.jsonl", "*_bad_cases.jsonl", "*_confusion.png", "curve_*.png",
                    "step-*", "seed-*", "fold-*", "summary.json", "summary.md", "linear.npz", "linear.json", "floor",
                    "converted-model")
EVALUATE_OUTPUTS = ("config.yaml", "metrics.json", "report.md", "eval_predictions.jsonl", "eval_bad_cases.jsonl",
                    "eval_confusion.png")
# checkpoints/ is not among them: pretrain never replaces it, it resumes from it (--resume) or refuses
PRETRAIN_OUTPUTS = ("config.yaml", "data.json", "results.json", "log.jsonl", "tensorboard", "step-*", "final",
                    "converted-model")
REPORT_OUTPUTS = ("report.md", "report.html", "curve_*.png")
SWEEP_OUTPUTS = ("config.yaml", "cells", "pretrain", "floor", "table.md", "table.csv", "results.json", "report.md",
                 "report.html", "failures.json", "summary.json", "*.png")
DEMO_OUTPUTS = ("data", "tiny-config", "corpus-*", "base-model", "domain-pretrain", "sweep")
