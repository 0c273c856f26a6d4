"""The Hugging Face `config.json` of an export folder: the classifier's config with its label map (id2label,
label2id) and task (problem_type), so that transformers' and optimum's tooling load the folder as they load one of
their own exports (`ORTModelForSequenceClassification.from_pretrained(folder)`, `AutoConfig`, pipelines)."""

from __future__ import annotations

import copy
from pathlib import Path


def write_hf_config(out: Path, model, meta: dict) -> Path:
    """config.json in `out`: `model`'s config, its labels from `meta` (the label map the runtime uses)."""
    labels = [str(label) for label in meta["labels"]]
    config = copy.deepcopy(model.config)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "multi_label_classification" if meta.get("multilabel") else "single_label_classification"
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    return Path(out) / "config.json"
