"""Full-state checkpoints (resume) and standalone snapshots (plain HF models), one folder per step.

checkpoints/step-000100/
    model.safetensors optimizer.bin scheduler.bin random_states_<rank>.pkl
                           Accelerate's state API (`save_state`): with FSDP, sharded model and optimizer
                           state in the engine's own layout; everything loads with weights_only=True
    state.json             step, consumed samples, global batch, model fingerprint
    manifest.json          size and sha256 of every file above; written last
A checkpoint is written into a hidden temporary folder, every file fsynced, the manifest written and fsynced,
then the folder renamed into place. It counts as complete only when the manifest matches the files, so a
truncated or half-deleted checkpoint (a crash, a full disk, kill -9) is skipped with a warning in favour of the
previous one. Older checkpoints are removed only after the new one is in place, and only folders checked to
lie inside the checkpoints folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from domainlm import outputs
from domainlm.errors import DomainLMError

STEP_PREFIX = "step-"
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    global_batch_size: int = 0
    model_fingerprint: str = ""


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def model_fingerprint(config) -> str:
    """Architecture identity: the config minus fields that do not change the weights' meaning."""
    d = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    for p in files:  # the data must be on disk before the manifest that vouches for it
        _fsync(p)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path, folder: Path) -> None:
    """Delete a checkpoint folder: only one inside `folder`, renamed out of sight first so that an
    interruption never leaves a half-deleted step-N folder."""
    if not outputs.inside(path, folder, strict=True):
        raise DomainLMError(f"refusing to delete {path}: it is not inside {folder}")
    trash = path.with_name(f".{path.name}.deleting")
    if trash.exists():  # left by an interrupted removal
        shutil.rmtree(trash)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(accelerator, folder: Path, state: TrainState, keep_last: int) -> Path:
    """All ranks call this (FSDP shards and per-rank RNG states are written by every process). A failed write (a full
    disk: OSError, torch's "file write failed", safetensors' IoError) is one line naming the space left; the
    temporary folder goes and the last good checkpoint stays."""
    from domainlm import files

    final = folder / step_name(state.step)
    tmp = folder / f".{step_name(state.step)}.tmp"
    failed = None
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by an interrupted save; inside `folder` by construction
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as e:
        if files.io_failure(e) is None:
            raise
        failed = e
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process and failed is None:
            files.write_json(tmp / "state.json", asdict(state))
            _write_manifest(tmp)
            outputs.swap(tmp, final)  # an existing step folder is removed only once the new one is in place
            _fsync(folder)  # the rename itself
            _prune(folder, keep_last)
    except Exception as e:
        if files.io_failure(e) is None:
            raise
        failed = e
    if failed is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last = find_latest(folder, quiet=True)
        raise DomainLMError(
            f"{files.failure_line(final, files.io_failure(failed) or str(failed))} (checkpoint at step {state.step}; "
            f"the last good checkpoint is kept: {last if last else 'none yet'})"
        ) from None
    accelerator.wait_for_everyone()
    return final


def _prune(folder: Path, keep_last: int) -> None:
    for left in folder.glob(f".{STEP_PREFIX}*.deleting"):  # an interrupted removal
        if outputs.inside(left, folder, strict=True) and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
    if keep_last <= 0:
        return
    done = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for old in done[:-keep_last]:
        if old.is_symlink() or not outputs.inside(
            old, folder, strict=True
        ):  # a link to somewhere else is not ours to delete
            print(f"warning: not removing {old}: it is not a checkpoint folder inside {folder}", file=sys.stderr)
            continue
        _remove(old, folder)


def _problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if every file matches its manifest."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (interrupted while writing?)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    if "state.json" not in files:
        return "state.json is missing"
    for name, entry in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != entry["size"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {entry['size']} (truncated?)"
        if _sha256(p) != entry["sha256"]:
            return f"{name} does not match its checksum (damaged)"
    return None


def find_latest(folder: Path, quiet: bool = False) -> Path | None:
    """Newest complete checkpoint; damaged ones are skipped with a warning, never deleted."""
    if not folder.is_dir():
        return None
    for path in sorted((p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir()), reverse=True):
        problem = _problem(path)
        if problem is None:
            return path
        if not quiet:
            print(f"warning: skipping checkpoint {path}: {problem}", file=sys.stderr)
    return None


def resolve_resume(resume: str | None, folder: Path, quiet: bool = False) -> Path | None:
    """`--resume auto` takes the newest good checkpoint under <out>/checkpoints (none: start fresh);
    `--resume PATH` takes exactly that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(folder, quiet)
    path = Path(resume)
    problem = _problem(path) if path.is_dir() else "no such folder"
    if problem:
        raise DomainLMError(f"cannot resume from {path}: {problem}")
    return path


def load_checkpoint(accelerator, path: Path, expected: TrainState) -> TrainState:
    """Model, optimizer, scheduler and RNG states through `accelerator.load_state` (weights_only loading)."""
    state = TrainState(**json.loads((path / "state.json").read_text()))
    if state.global_batch_size != expected.global_batch_size:
        raise DomainLMError(
            f"{path} was trained with global batch {state.global_batch_size}; this run has "
            f"{expected.global_batch_size}: resuming would change the data order and the schedule"
        )
    if state.model_fingerprint != expected.model_fingerprint:
        raise DomainLMError(f"{path} holds a different model architecture than --model; resume with the same model")
    with _accelerate_notes() as notes:
        accelerator.load_state(str(path))
    if any("Could not load random states" in n for n in notes):
        print(
            f"warning: {path}: random_states_{accelerator.process_index}.pkl could not be loaded; resuming without "
            "it, so dropout and masking draw other numbers than an uninterrupted run would",
            file=sys.stderr,
        )
    return state


@contextlib.contextmanager
def _accelerate_notes():
    """The messages accelerate's checkpointing logs at INFO level (it says there, and only there, that it skipped
    the RNG states), caught instead of printed."""
    import logging

    logger = logging.getLogger("accelerate.checkpointing")
    notes: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: notes.append(record.getMessage())
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield notes
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def check_shared(accelerator, folder: Path, flag: str = "--out", wait: float = 10.0) -> None:
    """Under several processes, every one must see what the main process writes in `folder`: checkpoints are written
    once, by rank 0, and every rank reads its own part of them to resume. Rank 0 writes a probe file; a rank that does
    not see it within `wait` seconds (a network file system may show a new file late) makes every rank stop with the
    same one line."""
    if accelerator.num_processes == 1:
        return
    import secrets
    import socket
    import time

    from accelerate.utils import broadcast_object_list, gather_object

    from domainlm import files

    token = [secrets.token_hex(8) if accelerator.is_main_process else None]
    if accelerator.is_main_process:
        with files.writing(folder, flag):
            files.atomic_write(folder / f".domainlm-shared-{token[0]}", token[0])
    broadcast_object_list(token)  # after the write: the others look once it is there
    probe = folder / f".domainlm-shared-{token[0]}"
    give_up = time.monotonic() + wait
    while not (seen := probe.is_file()) and time.monotonic() < give_up:
        time.sleep(0.2)
    views = gather_object([(seen, socket.gethostname())])
    if accelerator.is_main_process:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, (ok, host) in enumerate(views) if not ok]
    if blind:
        ranks = ", ".join(f"rank {r} (on {h})" for r, h in blind[:4])
        raise DomainLMError(
            f"{flag} {folder}: {ranks} does not see the files rank 0 (on {views[0][1]}) writes there: "
            f"with several machines {flag} must be a folder every node shares (a network or cluster file "
            "system), as checkpoints are written once, by rank 0, and read by every rank to resume"
        )


def save_snapshot(accelerator, folder: Path, model, hf_of, tokenizer, save=None) -> Path:
    """A plain HF model folder with the full weights, gathered from shards under FSDP. All ranks call this;
    the main process writes. `AutoModel.from_pretrained` loads it whatever it is renamed to, because
    config.json carries `model_type` and `architectures`.

    hf_of(unwrapped) -> the HF model inside; the full state dict's keys are those of the wrapper, so the
    HF model's own keys are the ones under its attribute name.
    """
    full = accelerator.get_state_dict(model)  # every rank takes part in the gather
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        hf = hf_of(unwrapped)
        prefix = (
            next(name for name, module in unwrapped.named_modules() if module is hf) + "."
        )  # "_orig_mod.hf." compiled
        weights = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        tmp = folder.parent / f".{folder.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        from domainlm import files

        with files.writing(folder, cleanup=tmp):
            if save is not None:
                save(hf, tmp, weights)
            else:
                hf.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            outputs.swap(tmp, folder)
    accelerator.wait_for_everyone()
    return folder
