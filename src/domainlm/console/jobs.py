"""From form or API values to a job: the CLI's own validation, paths kept inside --home, data checked with the
CLI's readers, then a job folder holding job.yaml (the resolved config) that `domainlm COMMAND --config` runs."""

from __future__ import annotations

import csv
import dataclasses
import re
import threading
import typing
from pathlib import Path
from typing import Any

from domainlm import config as cfglib
from domainlm.console import preflight, settings, sweepjob
from domainlm.console.db import Dataset, Job, Model
from domainlm.console.security import PathError, inside

EMAIL = re.compile(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$")


def form_values(command: str, form: dict[str, Any]) -> dict[str, Any]:
    """A browser form's strings as option values: unticked boxes are false, empty optional fields are unset."""
    values: dict[str, Any] = {}
    for name, spec in settings.field_specs(command).items():
        if spec.widget == "checkbox":
            values[name] = name in form and form[name] not in ("", "false", "off")
            continue
        raw = form.get(name)
        if isinstance(raw, list):  # several datasets chosen
            raw = [v for v in raw if v]
            if raw:
                values[name] = raw
            continue
        raw = (raw or "").strip()
        if raw == "":
            if spec.optional:
                values[name] = None
            continue
        values[name] = raw
    return values


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "job"


def head_rows(src: Path, dst: Path, n: int) -> None:
    """The first n rows of a CSV / TSV / JSONL file (a dev file's share the vendor consoles also use)."""
    if src.suffix.lower() == ".jsonl":
        lines = []
        with open(src, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
                    if len(lines) == n:
                        break
        dst.write_text("".join(lines), encoding="utf-8")
        return
    delimiter = "\t" if src.suffix.lower() == ".tsv" else ","
    with open(src, encoding="utf-8-sig", newline="") as f, open(dst, "w", encoding="utf-8", newline="") as out:
        reader, writer = csv.reader(f, delimiter=delimiter), csv.writer(out, delimiter=delimiter)
        for i, row in enumerate(reader):
            writer.writerow(row)
            if i == n:  # the header and n rows
                break


class JobFactory:
    def __init__(self, home: Path, base_models: list[str], email: bool = True):
        self.home, self.base_models, self.email = home, base_models, email
        self._local = threading.local()  # requests build jobs in several threads at once

    @property
    def shown(self) -> dict[str, str]:
        """Folder -> name of my models met in this thread's build, to name them so in its messages."""
        if not hasattr(self._local, "shown"):
            self._local.shown = {}
        return self._local.shown

    def _model(self, s, value: Any, errors: dict, name: str) -> tuple[str | None, Model | None]:
        """A listed base model, "model:ID" (one of my models), or a model folder inside home."""
        text = str(value)
        if text in self.base_models:
            return text, None
        if text.startswith("model:") and text[6:].isdigit():
            model = s.get(Model, int(text[6:]))
            if model is None:
                errors[name] = f"my model {text[6:]} does not exist"
                return None, None
            self.shown[str(self.home / model.path)] = model.name
            return str(self.home / model.path), model
        try:
            path = inside(self.home, text)
        except PathError:
            errors[name] = (
                f"{text}: choose a listed base model, one of my models, or a folder inside the console's home"
            )
            return None, None
        rel = str(path.relative_to(self.home.resolve()))
        model = s.query(Model).filter(Model.path == rel).first()
        if model is not None:
            self.shown[str(path)] = model.name
        return str(path), model

    def build(
        self, s, command: str, values: dict[str, Any], name: str = "", description: str = "", notify: dict | None = None
    ) -> tuple[Job | None, dict[str, str]]:
        self._local.shown = {}
        job, errors = self._build(s, command, values, name, description, notify)
        return job, {k: named(v, self.shown, self.home) for k, v in errors.items()}

    def _build(
        self, s, command: str, values: dict[str, Any], name: str = "", description: str = "", notify: dict | None = None
    ) -> tuple[Job | None, dict[str, str]]:
        types = settings.job_types()
        if command not in types:
            return None, {"command": f"unknown job type {command!r} (one of {', '.join(types)})"}
        cls = types[command]
        errors: dict[str, str] = {}
        values = {**settings.CONSOLE_DEFAULTS.get(command, {}), **values}
        for key in list(values):
            if key in settings.CONTROLLED:
                errors[key] = f"--{key} is set by the console"
        base_model = None
        hints = typing.get_type_hints(cls)
        for key, value in list(values.items()):
            if value is None or key in errors or key not in hints:
                continue
            if key in settings.MODEL_FIELDS:
                values[key], found = self._model(s, value, errors, key)
                base_model = found if key in ("model", "student") else base_model  # what the job starts from
            elif key in settings.PATH_FIELDS:
                items = value if isinstance(value, list) else [value]
                try:
                    resolved = [str(inside(self.home, str(v))) for v in items]
                except PathError as e:
                    errors[key] = str(e)
                    continue
                values[key] = resolved if isinstance(value, list) else resolved[0]
        values["out"] = str(self.home / "jobs" / "pending")  # replaced by the job's own folder below
        cfg, problems = cfglib.check_values(cls, {k: v for k, v in values.items() if k not in errors})
        for key, message in problems.items():  # a path refused above explains more than "a value is required"
            errors.setdefault(_field_of(key, message, hints), message)
        notify = {k: (v or "").strip() for k, v in (notify or {}).items() if (v or "").strip()}
        if notify.get("webhook") and not re.match(r"^https?://[^\s]+$", notify["webhook"]):
            errors["notify_webhook"] = "the webhook must be an http:// or https:// URL"
        if notify.get("email") and not EMAIL.match(notify["email"]):
            errors["notify_email"] = "not an e-mail address"
        elif notify.get("email") and not self.email:  # accepted and never sent would be worse than refused
            errors["notify_email"] = (
                "e-mail notifications are off: start the console with --smtp-host (or use a webhook)"
            )
        sweep = self._preflight(s, cls, command, cfg, values, errors)
        if errors or cfg is None:
            return None, errors
        default_name = f"{command} {Path(str(getattr(cfg, 'model', '') or getattr(cfg, 'student', ''))).name}".strip()
        if base_model is not None:  # its name as the user knows it ("export model" would say nothing)
            default_name = f"{command} {base_model.name}"
        job = Job(
            name=(name or "").strip()[:200] or default_name,
            description=(description or "").strip(),
            command=command,
            notify=notify,
            base_model_id=base_model.id if base_model else None,
        )
        s.add(job)
        s.flush()
        job.folder = f"jobs/{job.id:04d}-{slug(job.name)}"
        folder = self.home / job.folder
        folder.mkdir(parents=True, exist_ok=True)
        cfg.out = str(folder / settings.OUT_SUBFOLDER.get(command, ""))
        if command == "finetune" and cfg.dev and cfg.valid_max_rows:  # the dev file's first rows, as the validation set
            dev = folder / ("dev" + Path(cfg.dev).suffix.lower())
            head_rows(Path(cfg.dev), dev, cfg.valid_max_rows)
            cfg.dev = str(dev)
        if command == "sweep":  # `domainlm sweep job.yaml` reads the sweep's own config
            sweep.out = cfg.out
            cfglib.write(sweep, folder, "job.yaml")
            from domainlm.sweep.command import plan

            job.config = {**cfglib.to_dict(cfg), "cells": len(plan(sweep))}
        else:
            cfglib.write(cfg, folder, "job.yaml")
            job.config = cfglib.to_dict(cfg)
        return job, {}

    def _preflight(self, s, cls, command: str, cfg, values: dict, errors: dict):
        """The command's start-up checks now, also when other fields are wrong: every error in one answer.
        Returns a sweep's SweepConfig."""
        # check what the valid fields allow (a bad epochs must not hide a bad max seq len); a config's own check()
        # stops at its first problem, so set that field aside and check again to find the next one
        hints = typing.get_type_hints(cls)
        for _ in range(6):
            if cfg is not None:
                break
            cfg, more = cfglib.check_values(cls, {k: v for k, v in values.items() if k not in errors})
            new = {_field_of(k, m, hints): m for k, m in more.items()}
            new = {k: m for k, m in new.items() if k not in errors and k in values}
            if not new:
                break
            errors.update(new)
        if cfg is None:
            return None
        if command == "finetune":
            preflight.finetune(cfg, errors, self.home)
        elif command == "pretrain":
            preflight.pretrain(cfg, errors, self.home)
        elif command == "sweep":
            return sweepjob.check(self, s, cfg, errors)
        elif command == "distill":
            preflight.distill(cfg, errors, self.home)
        elif command == "export" and not (Path(cfg.model) / "config.json").is_file():
            errors.setdefault(
                "model",
                f"{Path(cfg.model).name} is not a fine-tuned transformer classifier (no config.json): "
                "choose a classifier of my models",
            )
        return None


GENERIC = {"model", "final", "export", "adapter"}  # folder names that say nothing about which model


def named(message: str, shown: dict[str, str], home: Path) -> str:
    """A message with my models named as the user named them, not by their folders: `<home>/models/demo-base_folder_`
    and `demo-base_folder_` become `demo-base (folder)`; other paths inside home lose the home prefix."""
    for path, name in sorted(shown.items(), key=lambda item: -len(item[0])):
        message = message.replace(path, name)
        base = Path(path).name
        if base in GENERIC:
            message = re.sub(rf"\bmodel {re.escape(base)}\b", f"model {name}", message)
        else:
            message = re.sub(rf"(?<![\w/.-]){re.escape(base)}(?![\w/.-])", name, message)
    return message.replace(str(home.resolve()) + "/", "").replace(str(home) + "/", "")


def _field_of(key: str, message: str, fields) -> str:
    """A cross-field check's message that names no flag ("no input given") goes under the field it mentions."""
    if key != "_config":
        return key
    for name in fields:
        if name not in settings.CONTROLLED and re.search(rf"\b{name.replace('_', '[ _]')}\b", message):
            return name
    return key


def clone_values(job: Job) -> dict[str, Any]:
    """A job's options as form values, for "clone": paths back to home-relative ones, lists as text."""
    home_prefix = str(Path(job.config.get("out", "")).parent.parent) + "/"
    out: dict[str, Any] = {}
    for key, value in job.config.items():
        if key in settings.CONTROLLED:
            continue
        if isinstance(value, str) and value.startswith(home_prefix):
            value = value[len(home_prefix) :]
        elif isinstance(value, list) and key not in settings.MULTI_FIELDS:
            value = ",".join(map(str, value))
        out[key] = value
    if job.base_model_id:
        out["model"] = f"model:{job.base_model_id}"
    return out


def dataset_choices(s, kinds: tuple[str, ...]) -> list[Dataset]:
    return [d for d in s.query(Dataset).order_by(Dataset.id.desc()) if d.kind in kinds]


def defaults(command: str) -> dict[str, Any]:
    cls = settings.job_types()[command]
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = ",".join(map(str, f.default_factory()))  # type: ignore[misc]
    return {**out, **settings.CONSOLE_DEFAULTS.get(command, {})}  # the form shows what a job will get
