"""Run logs: a JSONL file (the source of truth for reports), TensorBoard curves and a progress bar."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from domainlm.errors import DomainLMError


class RunLogger:
    def __init__(self, out: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = out / "log.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        # A resumed run drops what the interrupted one logged after its checkpoint (at the checkpoint's own step,
        # training and validation come before it, the test after); a fresh run starts over.
        kept = [
            r
            for r in read_log(self.path)
            if r["step"] < start_step or (r["step"] == start_step and r["split"] != "test")
        ]
        kept = kept if start_step else []
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.writelines(json.dumps(r) + "\n" for r in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not sys.stderr.isatty(),
        )

    def log(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: round(float(v), 6) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{split}/{k}", float(v), step)
        summary = " ".join(
            f"{k}={float(v):.4g}"
            for k, v in values.items()
            if k in ("loss", "mlm_acc", "sop_acc", "accuracy", "f1_micro", "lr", "tokens_per_s")
        )
        if self.bar is not None and self.bar.disable:
            print(f"[{split}] step {step} {summary}", file=sys.stderr, flush=True)
        elif self.bar is not None:
            self.bar.set_postfix_str(f"{split} {summary}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()


def read_log(path: Path, split: str | None = None) -> list[dict]:
    """The records of a log.jsonl. A torn last line (a run killed while writing it) is skipped with a warning;
    a damaged line elsewhere is an error naming it."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record or "split" not in record:
                raise ValueError("not a log record")
        except ValueError:
            if lineno == len(lines):
                print(
                    f"warning: {path}:{lineno}: incomplete last record ignored (the run was stopped while writing it)",
                    file=sys.stderr,
                )
                break
            raise DomainLMError(f"{path}:{lineno}: damaged log record {line[:40]!r}") from None
        rows.append(record)
    return [r for r in rows if split is None or r["split"] == split]
