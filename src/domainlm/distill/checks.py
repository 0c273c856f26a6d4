"""What `distill` checks before the teacher runs, in one place: the command and the console call check().

check(cfg) -> (Found, {field: message})   the teacher's label map (read, not loaded) and task, the task's files read
                                          with finetune's reader against the teacher's labels, the student checked as
                                          finetune checks a model (positions, weights, tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domainlm.errors import DomainLMError


@dataclass
class Found:
    labels: list[str] | None = None
    task: object | None = None
    student: object | None = None  # classify.checks.Found of the student (its config and tokenizer)
    finetune: object | None = None  # the student's fine-tuning options (a FinetuneConfig)


def check(cfg, *, network: bool = True) -> tuple[Found, dict[str, str]]:
    from domainlm.classify import checks as student_checks
    from domainlm.classify.data import task_problems
    from domainlm.distill.config import student_config
    from domainlm.distill.teacher import model_labels

    found, errors = Found(), {}
    try:
        found.labels, teacher_multilabel = model_labels(cfg.teacher)
        if teacher_multilabel != (cfg.task == "multilabel"):
            errors["task"] = (
                f"--teacher {cfg.teacher} is a {'multilabel' if teacher_multilabel else 'multiclass'} "
                f"classifier but --task is {cfg.task}"
            )
    except DomainLMError as e:
        errors["teacher"] = str(e)
    if found.labels is not None:
        found.task, problems = task_problems(cfg, known=found.labels, known_from=f"--teacher {cfg.teacher}")
        for key, message in problems.items():
            errors.setdefault(key, message)
    found.finetune = student_config(cfg, Path(cfg.out))
    found.student, problems = student_checks.check(
        found.finetune, read_task=False, network=network, model_flag="--student"
    )
    for key, message in problems.items():
        errors.setdefault("student" if key == "model" else key, message)
    return found, errors
