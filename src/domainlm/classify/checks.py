"""What `finetune` checks before it trains, in one place: the command, the sweep (each cell's options), distill (its
student) and the console (at job creation, every problem under its field) all call check().

check(cfg) -> (Found, {field: message})   the task's files read as finetune reads them (classify.data.task_problems),
                                          the model's config (positions against --max-seq-len, weights present), its
                                          tokenizer (against the model's vocabulary), the batch arithmetic. Found
                                          holds what was read, so that the command reads nothing twice.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from domainlm import checks
from domainlm.classify.data import Task, task_problems
from domainlm.errors import DomainLMError

# fewer validation rows than this: the epoch that early stopping keeps follows the noise (a notice says so)
FEW_VALID_ROWS = 5


@dataclass
class Found:
    task: Task | None = None
    config: object | None = None  # the encoder's config
    tokenizer: object | None = None


def check(
    cfg, *, read_task: bool = True, network: bool = True, processes: int = 1, model_flag: str = "--model"
) -> tuple[Found, dict[str, str]]:
    """Every problem of a fine-tuning config that shows before training, by field (`network`: False for checks
    that must not wait on a model hub: a hub name not in the local cache is then left to the run; `model_flag`: what
    the command calls the model, e.g. distill's --student)."""
    found, errors = Found(), {}
    if read_task:
        found.task, errors = task_problems(cfg)
    if cfg.method != "linear" and cfg.model:
        _model(cfg, found, errors, network, model_flag)
    try:
        checks.accumulation(cfg.global_batch_size, cfg.batch_size, processes)
    except DomainLMError as e:
        errors.setdefault("global_batch_size", str(e))
    preset = getattr(cfg, "preset", None)
    for name in set(errors) & set(getattr(cfg, "preset_fields", ())):  # a value the preset chose: say so
        errors[name] += f" (set by --preset {preset}; give --{name.replace('_', '-')} to override it)"
    return found, errors


def _model(cfg, found: Found, errors: dict, network: bool, flag: str) -> None:
    from domainlm.interop.models import load_config, peek_config, weights_missing
    from domainlm.interop.tokenizer import load_fast_tokenizer

    try:
        found.config = load_config(cfg.model, flag) if network else peek_config(cfg.model, flag)
    except DomainLMError as e:
        errors.setdefault("model", str(e))
        return
    if found.config is None:
        return  # a hub name the run will fetch
    try:
        checks.max_seq_len(found.config, cfg.max_seq_len, cfg.model)
    except DomainLMError as e:
        errors.setdefault("max_seq_len", str(e))
    if weights_missing(cfg.model):
        errors.setdefault("model", f"{cfg.model} holds a config but no weights; fine-tuning needs a trained encoder")
        return
    try:
        found.tokenizer = load_fast_tokenizer(cfg.model, flag=flag, log=lambda *a, **k: None)
        checks.tokenizer_fits(found.tokenizer, found.config, cfg.model)
    except DomainLMError as e:
        errors.setdefault("model", str(e))


def few_valid_rows(cfg, task: Task) -> None:
    """A notice when early stopping would pick the epoch on very few rows (the large-model preset's 1% of a small
    task is one row), naming the preset when it set the share."""
    n = task.n_valid(cfg)
    if task.dev is not None or n >= FEW_VALID_ROWS:
        return
    preset = f" (set by --preset {cfg.preset})" if "valid_ratio" in getattr(cfg, "preset_fields", ()) else ""
    print(
        f"notice: --valid-ratio {cfg.valid_ratio}{preset} holds out {n} of {len(task.train)} training rows for "
        f"validation; the best epoch picked on so few follows the noise: give --dev or a larger --valid-ratio",
        file=sys.stderr,
    )


# a share of [UNK] tokens above this in the training texts is said once (what is lost, and what to do): low for a
# vocabulary cut to other texts (the demo's), where it is the expected way to lose text; high for any other
UNKNOWN_SHARE = {"trimmed": 0.005, "any": 0.25}


def unknown_tokens(tokenizer, texts: list[str], flag: str = "--train", model_flag: str = "--model") -> float:
    """The share of [UNK] among the tokens of (up to 2,000 of) `texts`; above UNKNOWN_SHARE a notice says how many
    and what to do (a vocabulary cut to other texts, like the demo's, says so in its tokenizer config)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return 0.0
    ids = tokenizer(texts[:2000], add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    unknown = sum(x.count(unk) for x in ids)
    share = unknown / max(total, 1)
    trimmed = (getattr(tokenizer, "init_kwargs", {}) or {}).get("domainlm_vocabulary")
    if share > UNKNOWN_SHARE["trimmed" if isinstance(trimmed, dict) else "any"]:
        why = (
            (
                f"its vocabulary was cut to the texts it was made for ({trimmed.get('kept')} of "
                f"{trimmed.get('trimmed_from')}'s {trimmed.get('entries')} entries): start from a model with the full "
                "vocabulary, or add the missing characters with `domainlm extend-vocab`"
            )
            if isinstance(trimmed, dict)
            else "add the missing characters or words with `domainlm extend-vocab`"
        )
        print(
            f"notice: {unknown:,} of {total:,} tokens ({100 * share:.1f}%) of {flag} are [UNK] for the tokenizer of "
            f"{model_flag}; the model sees nothing of them: {why}",
            file=sys.stderr,
        )
    return share
