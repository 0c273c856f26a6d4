"""`domainlm console` options, the job types it runs, and how their create forms are laid out.

Job options are the CLI's own typed configs: the form is generated from the dataclass fields (type, default,
range, help) and validated by the same code as the command line. Only the layout lives here.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from domainlm.config import _unwrap_optional, option

# Offered in the create form next to "my models"; HF names resolve through the local cache or a mirror.
DEFAULT_BASE_MODELS = [
    "nghuyong/ernie-3.0-nano-zh",
    "nghuyong/ernie-3.0-micro-zh",
    "nghuyong/ernie-3.0-mini-zh",
    "nghuyong/ernie-3.0-medium-zh",
    "nghuyong/ernie-3.0-base-zh",
    "nghuyong/ernie-3.0-xbase-zh",
]


@dataclass(kw_only=True)
class ConsoleConfig:
    home: str = option(help="folder for the console's database, uploaded datasets and job folders")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 lets other machines connect)")
    port: int = option(8000, "port (0: any free port)", low=0, high=65535)
    token: str | None = option(None, "access token (default: generated at first start, kept in HOME/.console-token)")
    max_concurrent: int = option(
        1,
        "CPU-only jobs running at the same time (a GPU job starts when its GPUs are free); the rest wait in the queue",
        low=1,
    )
    database: str | None = option(None, "SQLAlchemy database URL (default: SQLite file HOME/console.db)")
    base_models: list[str] = option(DEFAULT_BASE_MODELS, "models offered in the create form: HF names or local folders")
    import_roots: list[str] = option(
        [],
        "folders on the server whose models and corpora may be registered from the "
        "pages (copied into --home); --home itself always may",
    )
    max_upload_mb: float = option(
        500.0, "largest accepted upload in MB (checked while streaming)", low=0, low_open=True
    )
    cancel_grace: float = option(10.0, "seconds between SIGTERM and SIGKILL when a job is cancelled", low=0)
    webhook_secret: str | None = option(
        None, "HMAC-SHA256 key of webhook signatures (default: generated, HOME/.webhook-secret)"
    )
    smtp_host: str | None = option(None, "SMTP server for e-mail notifications (default: e-mail off)")
    smtp_port: int = option(25, "SMTP port", low=1, high=65535)
    smtp_user: str | None = option(None, "SMTP login (password from the DOMAINLM_SMTP_PASSWORD variable)")
    smtp_starttls: bool = option(False, "upgrade the SMTP connection with STARTTLS")
    smtp_from: str = option("domainlm@localhost", "sender address of notification e-mails")


def job_types() -> dict[str, type]:
    from domainlm.classify.config import FinetuneConfig
    from domainlm.console.sweepjob import SweepJobConfig
    from domainlm.data.prepare import PrepareConfig
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.serve.config import ExportConfig

    types = {
        "finetune": FinetuneConfig,
        "pretrain": PretrainConfig,
        "prepare": PrepareConfig,
        "sweep": SweepJobConfig,
        "export": ExportConfig,
    }
    try:  # `domainlm distill`, where this version has it
        from domainlm.distill.config import DistillConfig

        types["distill"] = DistillConfig
    except ImportError:
        pass
    return types


TITLES = {
    "finetune": "Classification fine-tuning",
    "pretrain": "Domain pretraining (MLM + SOP)",
    "prepare": "Prepare a corpus (documents -> token store)",
    "sweep": "Sweep: base models x snapshots x seeds",
    "export": "Export (ONNX, int8)",
    "distill": "Distil a teacher into a student",
}

# The CLI has scenario presets for fine-tuning; pretraining's are the console's (they only fill the form).
PRETRAIN_PRESETS = {
    "small-corpus": {
        "max_steps": 1000,
        "batch_size": 16,
        "learning_rate": 5e-5,
        "min_lr": 5e-6,
        "warmup_ratio": 0.06,
        "max_seq_len": 256,
        "eval_steps": 100,
        "checkpoint_steps": 200,
        "save_steps": 250,
    },
    "large-corpus": {
        "max_steps": 20000,
        "batch_size": 32,
        "learning_rate": 1e-4,
        "min_lr": 1e-5,
        "warmup_ratio": 0.01,
        "max_seq_len": 512,
        "lr_decay": "cosine",
        "eval_steps": 500,
        "checkpoint_steps": 1000,
        "save_steps": 5000,
    },
}

# `out` inside the job folder (which also holds job.yaml and job.log); `prepare` wants a folder of its own.
OUT_SUBFOLDER = {"prepare": "corpus", "export": "export"}
# Fields the console sets itself (never shown or accepted).
CONTROLLED = {"out", "resume", "overwrite"}
# Fields naming files or folders; all must resolve inside --home (the model also may be a listed base model).
PATH_FIELDS = {"train", "dev", "test", "corpus", "input", "user_dict", "data", "unlabeled"}
MODEL_FIELDS = {"model", "tokenizer", "teacher", "student"}
CHOICES = {"lora_rank": "LORA_RANKS"}  # the sweep's lora_rank too
# The console's own defaults where a shared training machine wants another one than the CLI: validation as
# training consoles do it (a split or a dev file, at most 100 rows kept), so that evaluation stays cheap.
CONSOLE_DEFAULTS: dict[str, dict[str, Any]] = {"finetune": {"valid_max_rows": 100}}

# Sections in the order users know from training consoles; fields not listed go under "Advanced".
LAYOUT: dict[str, list[tuple[str, list[str]]]] = {
    "finetune": [
        ("Method", ["method", "lora_rank", "lora_alpha", "floor"]),
        ("Model", ["model"]),
        (
            "Hyperparameters",
            [
                "preset",
                "epochs",
                "batch_size",
                "global_batch_size",
                "learning_rate",
                "max_seq_len",
                "warmup_ratio",
                "lr_decay",
                "weight_decay",
                "early_stopping_patience",
                "metric",
                "seeds",
            ],
        ),
        ("Data", ["train", "task", "text_column", "label_column", "pair_column", "test"]),
        ("Validation", ["valid_ratio", "valid_max_rows", "dev"]),
    ],
    "pretrain": [
        ("Model", ["model", "from_scratch"]),
        (
            "Hyperparameters",
            [
                "max_steps",
                "batch_size",
                "global_batch_size",
                "learning_rate",
                "min_lr",
                "warmup_ratio",
                "lr_decay",
                "max_seq_len",
                "masked_lm_prob",
                "save_steps",
                "eval_steps",
                "checkpoint_steps",
            ],
        ),
        ("Data", ["corpus", "split"]),
    ],
    "prepare": [
        ("Data", ["input", "tokenizer", "language", "segment"]),
    ],
    "sweep": [
        ("Models", ["base_models", "pretrain_jobs"]),
        ("Seeds and table", ["seeds", "metrics", "floor"]),
        ("Data", ["train", "test", "dev", "task", "text_column", "label_column"]),
        (
            "Fine-tuning of every cell",
            ["method", "lora_rank", "epochs", "batch_size", "learning_rate", "max_seq_len", "valid_ratio"],
        ),
    ],
    "export": [
        ("Model", ["model", "quantize"]),
        ("Accuracy check", ["data", "text_column", "label_column", "max_seq_len"]),
    ],
    "distill": [
        ("Models", ["teacher", "student"]),
        ("Data", ["train", "unlabeled", "corpus", "max_unlabeled", "test", "dev"]),
        ("Distillation", ["temperature", "alpha", "hidden_weight", "plain"]),
        ("Hyperparameters", ["epochs", "batch_size", "learning_rate", "max_seq_len", "seeds"]),
    ],
}
# multi-select fields: my models and listed base models / finished pretraining jobs
MULTI_FIELDS = {"input": "datasets", "base_models": "models", "pretrain_jobs": "jobs"}


@dataclass
class FieldSpec:
    """What a form needs to draw one config field."""

    name: str
    widget: str  # text | number | select | checkbox | model | dataset | datasets
    help: str
    default: Any
    required: bool
    choices: list[Any] = dataclasses.field(default_factory=list)
    range: str = ""
    optional: bool = False


def _range_text(meta: dict) -> str:
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return ""
    left = ("(" if meta.get("low_open") else "[") + ("-inf" if low is None else f"{low:g}")
    return f"{left}, {'inf' if high is None else f'{high:g}'}]"


def field_specs(command: str) -> dict[str, FieldSpec]:
    cls = job_types()[command]
    hints = typing.get_type_hints(cls)
    specs = {}
    for f in dataclasses.fields(cls):
        if f.name in CONTROLLED:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        if tp is dict or (get_origin(tp) is list and get_args(tp) == (dict,)):
            continue
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None if f.default is dataclasses.MISSING else f.default
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        choices: list[Any] = []
        if f.name in MODEL_FIELDS:
            widget = "model"
        elif f.name in MULTI_FIELDS:
            widget = MULTI_FIELDS[f.name]
        elif f.name in PATH_FIELDS:
            widget = "dataset"
        elif f.name in CHOICES:
            from domainlm.classify import config as classify_config

            widget, choices = "select", list(getattr(classify_config, CHOICES[f.name]))
        elif get_origin(tp) is Literal:
            widget, choices = "select", list(get_args(tp))
        elif tp is bool:
            widget = "checkbox"
        elif tp in (int, float):
            widget = "number"
        else:
            widget = "text"
        default = CONSOLE_DEFAULTS.get(command, {}).get(f.name, default)
        if isinstance(default, list):
            default = ",".join(map(str, default))
        specs[f.name] = FieldSpec(
            f.name, widget, f.metadata.get("help", ""), default, required, choices, _range_text(f.metadata), optional
        )
    return specs


def sections(command: str) -> list[tuple[str, list[FieldSpec]]]:
    specs = field_specs(command)
    placed = [name for _, names in LAYOUT[command] for name in names]
    out = [(title, [specs[n] for n in names if n in specs]) for title, names in LAYOUT[command]]
    rest = [s for n, s in specs.items() if n not in placed]
    if rest:
        out.append(("Advanced", rest))
    return out


def presets(command: str) -> dict[str, dict]:
    if command == "finetune":
        from domainlm.classify.config import PRESETS

        return PRESETS
    return PRETRAIN_PRESETS if command == "pretrain" else {}
