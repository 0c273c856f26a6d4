"""Output folders: one run at a time per folder, and nothing of the user's deleted by mistake.

run_folder(out, command, ...)   the one step every command that writes an --out enters (see RunFolder): lock,
                    recognise an earlier run by its manifest, check, clear only what the manifest lists, write
                    (files atomically, folders staged), record each entry as it is written, release.
                    The lock is `locks.claim`; what each command may write is its own (`patterns`, beside the
                    command: FINETUNE_OUTPUTS in classify.command, ...).
folder(out)         --out must be a folder (or not exist yet), never an existing file.
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
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from domainlm import files
from domainlm.errors import DomainLMError
from domainlm.locks import claim, release

MANIFEST = ".domainlm-out.json"  # {"command": ..., "complete": bool, "entries": [names written]}
PREVIOUS = ".domainlm-previous"  # an earlier run's entries, moved aside while --overwrite replaces them

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
    """Before any work: the folder that will hold `out` (and its staging folder, see stage), and `out` itself
    where it exists, can be written; checked by writing, as permissions, read-only mounts, ACLs and the immutable
    attribute all count."""
    base = Path(out).absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise DomainLMError(f"{flag} {out}: {base} is a file, not a folder")
    for where in (base, Path(out)) if Path(out).is_dir() else (base,):
        try:
            with open(where / f".domainlm-write-test-{os.getpid()}", "wb") as probe:
                os.unlink(probe.name)
        except OSError as e:
            raise DomainLMError(
                f"{flag} {out}: cannot write in {where} ({e.strerror}); choose a writable folder"
            ) from None


def protect(out: str | Path, inputs=(), flag: str = "--out") -> None:
    """A command that replaces its whole --out folder: never the working folder, an input or a folder holding
    one (or the folder above them)."""
    out = Path(out)
    if inside(Path.cwd(), out):
        raise DomainLMError(
            f"{flag} {out} is (or holds) the working folder, which would be replaced: "
            f"choose a new folder, e.g. {flag} {out / 'out'}"
        )
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


# ---- the manifest: what a command wrote into its --out -----------------------------------------------------


def read_manifest(out: Path) -> dict | None:
    try:
        value = json.loads((Path(out) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(value, dict) and isinstance(value.get("command"), str)):
        return None
    entries = value.get("entries")
    value["entries"] = [e for e in entries if _plain_name(e)] if isinstance(entries, list) else []
    return value


def _plain_name(name) -> bool:
    """An entry of a manifest is a name directly in its folder: never a path that leads elsewhere."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", MANIFEST, PREVIOUS)
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _write_manifest(folder: Path, command: str, complete: bool, entries: Iterable[str]) -> None:
    files.write_json(folder / MANIFEST, {"command": command, "complete": complete, "entries": sorted(set(entries))})


# ---- the run folder --------------------------------------------------------------------------------------------


def _relative(relative: str | Path, flag: str) -> Path:
    relative = Path(relative)
    if relative.is_absolute() or not relative.parts or ".." in relative.parts or not _plain_name(relative.parts[0]):
        raise RuntimeError(f"{relative}: not a path inside {flag}")
    return relative


class Writer:
    """Writing into a folder: every file atomically, every folder a library writes staged and swapped into place,
    an I/O failure as one line. Subclasses say where a relative path lands (record)."""

    flag = "--out"
    main = True

    def record(self, relative: str | Path) -> Path:
        raise NotImplementedError

    def sub(self, relative: str | Path) -> Writer:
        """The same writer for a folder inside this one (a seed's or a fold's run)."""
        return Subfolder(self, Path(relative)) if str(relative) not in ("", ".") else self

    def shown(self, path: Path) -> Path:
        """How messages name `path` (a command that replaces its folder writes into a staging folder)."""
        return path

    def file(self, relative: str | Path) -> Path:
        """The path of a file or folder a library writes (recorded, its parent folders made)."""
        path = self.record(relative)
        if self.main:
            with files.writing(self.shown(path), self.flag):
                path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_text(self, relative: str | Path, text: str | bytes) -> Path:
        path = self.record(relative)
        if self.main:
            with files.writing(self.shown(path), self.flag):
                files.atomic_write(path, text)
        return path

    def write_json(self, relative: str | Path, obj) -> Path:
        return self.write_text(relative, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    write_bytes = write_text  # atomic_write takes both

    @contextlib.contextmanager
    def staged(self, relative: str | Path):
        """A folder a library writes (a model, a checkpoint): written beside its place, swapped in when complete;
        an I/O failure is one line and leaves no half folder."""
        target = self.record(relative)
        if not self.main:
            yield target
            return
        partial = target.parent / f".{target.name}.partial"
        with files.writing(self.shown(target), self.flag, cleanup=partial), stage(target) as work:
            yield work

    def writing(self, relative: str | Path = "."):
        """A block that writes into the folder by other means: an I/O failure in it is one line naming the path."""
        return files.writing(self.shown(self.root() if str(relative) == "." else self.record(relative)), self.flag)

    def root(self) -> Path:
        """The folder itself (for a subfolder: recorded)."""
        raise NotImplementedError


class Subfolder(Writer):
    def __init__(self, parent: Writer, prefix: Path):
        self.parent, self.prefix, self.flag, self.main = parent, prefix, parent.flag, parent.main

    def record(self, relative: str | Path) -> Path:
        relative = Path(relative)
        return self.parent.record(self.prefix if str(relative) == "." else self.prefix / relative)

    def root(self) -> Path:
        return self.parent.record(self.prefix)

    def shown(self, path: Path) -> Path:
        return self.parent.shown(path)

    @property
    def path(self) -> Path:
        return self.root()


class Plain(Writer):
    """A Writer for a folder that is not a command's --out (tests, benchmarks, a library call): no manifest."""

    def __init__(self, path: str | Path, flag: str = "--out"):
        self.path, self.flag = Path(path), flag

    def record(self, relative: str | Path) -> Path:
        return self.path if str(relative) == "." else self.path / _relative(relative, self.flag)

    def root(self) -> Path:
        return self.path


class RunFolder(Writer):
    """One command's --out while it runs. Made by run_folder; the command then

        begin(cfg)            after every check: the earlier run's entries (--overwrite) are moved aside, the manifest
                              is started and the resolved config written as config.yaml
        write_text / write_json / file(name) / staged(name)
                              every entry is recorded in the manifest before it is written, so a crash or a rerun
                              never meets an output the manifest does not know
        (leaving the block)   the manifest is marked complete and the earlier entries are deleted; on an error the
                              new entries are removed and the earlier ones put back: the last good output stays.

    A command that replaces its folder whole (`replace=True`: prepare, convert, extend-vocab, export) writes into a
    staging folder beside --out that is swapped into place at the end. Only the main process of a distributed run
    writes here; on the others every method is a no-op that still returns the paths.
    """

    def __init__(
        self,
        out: Path,
        command: str,
        *,
        patterns: tuple[str, ...],
        replace: bool,
        overwrite: bool | None,
        resume: bool,
        keep: tuple[str, ...],
        flag: str,
        main: bool,
        owned: tuple[str, ...] = (),
        inputs: Iterable[str] = (),
    ):
        self.out, self.command, self.patterns, self.replace = out, command, patterns, replace
        self.overwrite, self.resume, self.keep, self.flag, self.main = overwrite, resume, keep, flag, main
        self.owned, self.inputs = owned, list(inputs)
        self.path = out.parent / f".{out.name}.partial" if replace else out
        self.earlier: str | None = None  # "finished" or "interrupted": an earlier run of this command is here
        self.earlier_entries: list[str] = []
        self._entries: set[str] = set()
        self._begun = False
        self._previous: Path | None = None  # the earlier entries, moved aside until this run is complete

    # ---- before any work
    def refuse_earlier(self, what: str = "") -> None:
        """An earlier run is here and nothing says to replace or continue it: the one line that says what to do."""
        resume = " (or --resume auto to continue it)" if self.command == "pretrain" else ""
        raise DomainLMError(
            f"{self.flag} {self.out} holds an earlier {self.earlier} `domainlm {self.command}` run"
            f"{f' ({what})' if what else ''}; pass --overwrite to replace it{resume} (only its own files are "
            f"removed), or choose another {self.flag}"
        )

    def begin(self, cfg=None) -> RunFolder:
        """Every check has passed: from here on this run owns --out."""
        if self._begun:
            return self
        self._begun = True
        if not self.main:
            return self
        if self.replace:
            if self.path.exists() or self.path.is_symlink():  # left by an interrupted run (this process holds the lock)
                remove_tree(self.path, self.out.parent)
            with files.writing(self.out, self.flag):
                self.path.mkdir(parents=True)
        else:
            with files.writing(self.out, self.flag):
                self.out.mkdir(parents=True, exist_ok=True)
                self._set_aside()
                if self.resume and self.earlier is not None:  # continued: what the earlier run wrote is this run's
                    self._entries |= set(self.earlier_entries)
                _write_manifest(self.out, self.command, False, self._entries)
        if cfg is not None:
            import dataclasses

            self.write_text("config.yaml", files.yaml_text(dataclasses.asdict(cfg)))
        return self

    def _set_aside(self) -> None:
        """--overwrite: the earlier run's entries go into PREVIOUS (a rename, no copy) until this run completes."""
        doomed = [] if self.resume else [n for n in self.earlier_entries if n not in self.keep]
        if not doomed:
            return
        self._previous = self.out / PREVIOUS
        self._previous.mkdir()
        old = read_manifest(self.out)
        if old is not None:
            files.write_json(self._previous / MANIFEST, old)
        for name in doomed:
            if (self.out / name).exists() or (self.out / name).is_symlink():
                (self.out / name).rename(self._previous / name)
        self._entries |= {n for n in self.earlier_entries if n in self.keep}

    # ---- writing (see Writer)
    def record(self, relative: str | Path) -> Path:
        """`relative`'s first part is an entry of this run (recorded now, before anything is written there)."""
        if not self._begun:
            raise RuntimeError(f"{self.command}: RunFolder.begin() must come before writing into {self.flag}")
        relative = _relative(relative, self.flag)
        name = relative.parts[0]
        if self.main and name not in self._entries:
            self._entries.add(name)
            with files.writing(self.out, self.flag):
                _write_manifest(self.path, self.command, False, self._entries)
        return self.path / relative

    def root(self) -> Path:
        return self.path

    def shown(self, path: Path) -> Path:
        if self.replace and (path == self.path or self.path in path.parents):
            return self.out / path.relative_to(self.path)
        return path

    # ---- the end
    def _complete(self) -> None:
        if not self.main or not self._begun:
            return
        with files.writing(self.out, self.flag):
            found = {p.name for p in self.path.iterdir()} - {MANIFEST, PREVIOUS} if self.path.is_dir() else set()
            self._entries = (
                found if self.replace else (self._entries & found) | {n for n in found if _matches(n, self.patterns)}
            )
            _write_manifest(self.path, self.command, True, self._entries)
            if self.replace:
                swap(self.path, self.out)  # the old folder is removed only once the new one is in place
        if self._previous is not None:
            remove_tree(self._previous, self.out)

    def _abandon(self) -> None:
        """An error: this run's entries go, the earlier run's come back."""
        if not self.main or not self._begun:
            return
        if self.replace:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        if self._previous is None:
            return  # nothing was replaced; what this run wrote stays listed as an interrupted run
        for name in self._entries - set(self.keep):
            with contextlib.suppress(DomainLMError, OSError):
                remove_tree(self.out / name, self.out)
        restore_previous(self.out)


def restore_previous(out: Path) -> bool:
    """Put back an earlier run's entries that an --overwrite moved aside and never finished replacing (what that
    interrupted run had written, as its manifest lists it, goes first)."""
    previous = out / PREVIOUS
    if not previous.is_dir():
        return False
    interrupted = read_manifest(out)
    for name in (interrupted or {}).get("entries", []):
        if (out / name).exists() or (out / name).is_symlink():
            remove_tree(out / name, out)
    for item in previous.iterdir():
        if item.name == MANIFEST:
            continue
        target = out / item.name
        if target.exists() or target.is_symlink():
            remove_tree(target, out)
        item.rename(target)
    if (previous / MANIFEST).is_file():
        os.replace(previous / MANIFEST, out / MANIFEST)
    shutil.rmtree(previous, ignore_errors=True)
    return True


@contextlib.contextmanager
def run_folder(
    out: str | Path,
    command: str,
    *,
    patterns: tuple[str, ...] = ("*",),
    overwrite: bool | None = None,
    resume: bool = False,
    replace: bool = False,
    inputs: dict[str, str | None] | None = None,
    models: dict[str, str | None] | None = None,
    keep: tuple[str, ...] = (),
    owned: tuple[str, ...] = (),
    legacy: Callable[[Path], bool] | None = None,
    flag: str = "--out",
):
    """Enter `command`'s output folder `out` (see RunFolder); yields the RunFolder.

    patterns   the names the command writes directly in `out`: a file of the user's under one of them is refused
               (in-place commands; a command that replaces its folder whole refuses anything not its own)
    overwrite  the command's --overwrite (None: it has none; an earlier run of its own is then replaced)
    resume     an earlier run of the command is continued, not refused (pretrain --resume, sweep, demo, prepare)
    inputs     {flag: path} files and folders the command reads: never replaced, nor inside what --out replaces
    models     {flag: path} folders it reads that are a whole (a model, a teacher, a corpus store): inputs, and
               `out` may not lie inside one
    keep       entries an --overwrite keeps (distill's teacher cache)
    owned      entries another command writes into this one's output later (pretrain's sample index in a corpus store)
    legacy     for a folder written before manifests: True if it is this command's output (its own names only)
    """
    out = folder(out, flag)
    main = int(os.environ.get("RANK", "0")) == 0
    inputs = {**(inputs or {}), **(models or {})}
    run = RunFolder(
        out,
        command,
        patterns=patterns,
        replace=replace,
        overwrite=overwrite,
        resume=resume,
        keep=keep,
        flag=flag,
        main=main,
        owned=owned,
        inputs=[p for p in inputs.values() if p],
    )
    if main:
        _check_inputs(out, inputs, models or {}, replace, flag)
        writable(out, flag)
    claim(out, flag)
    try:
        if main:
            if restore_previous(out):
                print(
                    f"{flag} {out}: an interrupted --overwrite had moved the earlier run aside; it is back",
                    file=sys.stderr,
                )
            _recognise(run, legacy)
        try:
            yield run
        except BaseException:
            run._abandon()
            raise
        run._complete()
    finally:
        release(out)


def _check_inputs(
    out: Path, inputs: dict[str, str | None], models: dict[str, str | None], replace: bool, flag: str
) -> None:
    if replace:
        protect(out, [p for p in inputs.values() if p], flag)
    for name, path in models.items():
        if path and Path(path).exists() and inside(out, path):
            raise DomainLMError(f"{flag} {out} lies inside {name} {path}: choose a folder of its own")


def _recognise(run: RunFolder, legacy: Callable[[Path], bool] | None) -> None:
    """What is in --out: nothing, an earlier run of this command (by its manifest; before manifests, by `legacy`
    and only under the command's names), or files that are not this command's."""
    out = run.out
    present = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, PREVIOUS)) if out.is_dir() else []
    if not present:
        return
    manifest = read_manifest(out)
    if manifest is not None and manifest["command"] != run.command and set(manifest["entries"]) & set(present):
        raise DomainLMError(
            f"{run.flag} {out} holds the output of `domainlm {manifest['command']}`; "
            f"{run.command} writes a folder of its own: choose another {run.flag}"
        )
    if manifest is not None and manifest["command"] == run.command:
        own = (
            set(manifest["entries"]) | set(run.owned)
            if manifest.get("complete")
            else set(manifest["entries"]) | {n for n in present if _matches(n, run.patterns)}
        )
        run.earlier = "finished" if manifest.get("complete") else "interrupted"
    elif manifest is None and legacy is not None and legacy(out):
        own, run.earlier = {n for n in present if _matches(n, run.patterns)}, "finished"
    else:
        own = set()
    run.earlier_entries = sorted(n for n in own if n in present)
    mine = present if run.replace else [n for n in present if _matches(n, run.patterns)]
    foreign = [n for n in mine if n not in own]
    if foreign:
        whole = (
            f"; {run.command} replaces the whole folder, with or without --overwrite"
            if run.replace
            else f"; {run.command} would overwrite them"
        )
        raise DomainLMError(
            f"{run.flag} {out} holds {', '.join(foreign[:4])}, not from `domainlm {run.command}`{whole}: "
            f"move them or choose another {run.flag}"
        )
    if run.earlier is None:
        return
    for name in [] if run.resume else run.earlier_entries:
        for item in [Path.cwd(), *run.inputs]:
            if inside(item, out / name):
                what = "the working folder" if item == Path.cwd() else f"the input {item}"
                raise DomainLMError(
                    f"{run.flag} {out}: {out / name} holds {what}, which {run.command} would replace; "
                    f"choose another {run.flag}"
                )
    if run.resume or run.overwrite is None:
        if run.overwrite is None and not run.resume:
            run.overwrite = True  # a command with no --overwrite replaces its own earlier output
        return
    if not run.overwrite:
        run.refuse_earlier(", ".join(run.earlier_entries[:4]))


def config_with(key: str) -> Callable[[Path], bool]:
    """For a folder written before manifests: its config.yaml holds `key` (one command's option)."""

    def legacy(out: Path) -> bool:
        import yaml

        try:
            config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):
            return False
        return isinstance(config, dict) and key in config

    return legacy
