"""The lock of an output folder: one run at a time per --out.

claim(out)      an exclusive lock on <parent>/.<name>.lock, owned by this process alone (a POSIX record lock), so a
                killed run never blocks its own resume; a second run on the same --out stops at once, naming the
                holder's PID. Re-entrant within a process; under torchrun / accelerate launch only global rank 0
                takes it.
release(out)    gives one claim back; the last one removes the lock file.
release_all()   every lock this process holds (the CLI calls it when a command ends).

outputs.run_folder takes and gives back the lock of every command's --out; nothing else needs to call these.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from domainlm import files
from domainlm.errors import DomainLMError

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
                    raise DomainLMError(
                        f"{flag} {out} is still locked, though the run that took it (PID {holder}) has "
                        "ended; try again in a few seconds"
                    ) from None
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
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:  # a full disk: not even the lock's few bytes fit
        os.close(fd)
        path.unlink(missing_ok=True)
        raise DomainLMError(files.failure_line(out, files.io_failure(e), flag)) from None
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
