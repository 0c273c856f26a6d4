"""Full-state checkpoints (resume) and standalone snapshots (plain HF models), one folder per step.

checkpoints/step-000100/
    model/                 HF weights + config (save_pretrained)
    optimizer.pt scheduler.pt
    rng-<rank>.pt          python, numpy, torch (and CUDA) generator states of each process
    state.json             step, consumed samples, global batch, model fingerprint; written last
A checkpoint is written into a hidden temporary folder and renamed when complete; older ones are removed
only after that, so a failed write (a full disk) never costs the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from domainlm.errors import DomainLMError

STEP_PREFIX = "step-"


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
    d = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, folder: Path, hf_model, optimizer, scheduler, state: TrainState, keep_last: int) -> Path:
    """All ranks call this (each saves its RNG); the main process writes the rest and renames into place."""
    final = folder / step_name(state.step)
    tmp = folder / f".{step_name(state.step)}.tmp"
    try:
        if accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            hf_model.save_pretrained(tmp / "model", safe_serialization=True)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            _prune(folder, keep_last)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = find_latest(folder, quiet=True)
        raise DomainLMError(
            f"could not write checkpoint {final}: {e}; "
            f"the last good checkpoint is kept ({last if last else 'none yet'})"
        ) from None
    accelerator.wait_for_everyone()
    return final


def _prune(folder: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None if it is complete."""
    state = path / "state.json"
    if not state.is_file():
        return "no state.json (interrupted while writing?)"
    try:
        json.loads(state.read_text())
    except json.JSONDecodeError:
        return "state.json is damaged"
    for name in ("optimizer.pt", "scheduler.pt", "rng-0.pt", "model/config.json"):
        if not (path / name).is_file():
            return f"{name} is missing"
    if not any((path / "model").glob("*.safetensors")):
        return "model weights are missing"
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


def resolve_resume(resume: str | None, folder: Path) -> Path | None:
    """`--resume auto` takes the newest good checkpoint under <out>/checkpoints (none: start fresh);
    `--resume PATH` takes exactly that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(folder)
    path = Path(resume)
    problem = _problem(path) if path.is_dir() else "no such folder"
    if problem:
        raise DomainLMError(f"cannot resume from {path}: {problem}")
    return path


def load_checkpoint(accelerator, path: Path, optimizer, scheduler, expected: TrainState) -> TrainState:
    state = TrainState(**json.loads((path / "state.json").read_text()))
    if state.global_batch_size != expected.global_batch_size:
        raise DomainLMError(
            f"{path} was trained with global batch {state.global_batch_size}; this run has "
            f"{expected.global_batch_size}: resuming would change the data order and the schedule"
        )
    if state.model_fingerprint != expected.model_fingerprint:
        raise DomainLMError(f"{path} holds a different model architecture than --model; resume with the same model")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    rng_file = path / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():  # a different world size: fall back to rank 0's generators
        rng_file = path / "rng-0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def save_snapshot(folder: Path, hf_model, tokenizer) -> Path:
    """A plain HF model folder: `AutoModel.from_pretrained` loads it whatever it is renamed to,
    because config.json carries `model_type` and `architectures`."""
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    hf_model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder
