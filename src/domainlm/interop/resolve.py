"""What a `--model` / `--tokenizer` value names: a local folder, an output folder of `finetune`, a PaddleNLP
name, or a Hugging Face hub name. A value that looks like a path and does not exist fails at once with
"no such folder" instead of going to the hub (where it would retry the network for half a minute)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from domainlm.errors import DomainLMError
from domainlm.interop.names import hub_name, hub_offline


def looks_local(value: str) -> bool:
    """A path rather than a hub id (`org/name` or `name`): absolute, relative with ./ ../ ~, a backslash,
    more than one slash, a trailing slash, or a first component that is a folder here."""
    if not value:
        return False
    if value.startswith((".", "~", "/")) or "\\" in value or value.endswith("/") or value.count("/") > 1:
        return True
    return "/" in value and Path(value.split("/", 1)[0]).is_dir()


def _no_such_folder(value: str, flag: str) -> DomainLMError:
    path = Path(value).expanduser()
    hint = ""
    parent = path.parent if str(path.parent) else Path(".")
    if parent.is_dir():
        siblings = [p.name for p in parent.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(path.name, siblings, n=1)
        if close:
            hint = f"; did you mean {parent / close[0]}?"
    elif str(parent) not in ("", "."):
        hint = f" (its parent {parent} does not exist either)"
    offline = (
        " (HF_HUB_OFFLINE is set, so it is not looked up on the hub)"
        if hub_offline() and not looks_local(value)
        else ""
    )
    return DomainLMError(f"{flag} {value}: no such folder{offline}{hint}")


def resolve_source(value: str, flag: str = "--model", log=print) -> str:
    """The path or hub id to load for a `--model` / `--tokenizer` value; fails at once for a missing local
    folder, maps PaddleNLP names to their Hugging Face conversions."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise DomainLMError(f"{flag} {value} is a file; pass the folder that holds it")
    mapped = hub_name(value)
    if mapped is not None:
        log(f"{flag} {value} is a PaddleNLP model name; using its Hugging Face conversion {mapped}")
        return mapped
    if looks_local(value):
        raise _no_such_folder(value, flag)
    return value


def hub_error(value: str, flag: str, error: Exception) -> DomainLMError:
    """The message for a name that could not be loaded from the hub (or its cache)."""
    # the whole message on one line: its advice ("You need sentencepiece ...") is often on the last line
    whole = " ".join(str(error).split()) or type(error).__name__
    original = next((k for k, v in _paddle_names().items() if v == value), None)
    if original is not None and hub_offline():
        return DomainLMError(
            f"{flag} {original}: its Hugging Face conversion {value} is not in the local cache and the hub is "
            "offline (HF_HUB_OFFLINE). Where a hub is reachable run "
            f"`huggingface-cli download {value} --local-dir DIR` and pass {flag} DIR"
        )
    if hub_offline():
        return DomainLMError(
            f"{flag} {value}: no such folder, and not in the local Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    return DomainLMError(f"{flag} {value} could not be loaded: {whole}")


def _paddle_names() -> dict[str, str]:
    from domainlm.interop.names import PADDLE_TO_HF

    return PADDLE_TO_HF


def _has_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() or (folder / "model.onnx").is_file()


def resolve_model_dir(value: str) -> str:
    """The folder to load for `evaluate` / `predict`: the `finetune` output folder (-> its `model/`), the
    `model/` folder itself, or any HF folder or hub name."""
    path = Path(value).expanduser()
    if not path.exists():
        return resolve_source(value, "--model")
    if not path.is_dir():
        raise DomainLMError(f"--model {value} is a file; pass the folder that holds the model")
    if _has_model(path):
        return str(path)
    if _has_model(path / "model"):
        return str(path / "model")
    runs = sorted(p for p in path.iterdir() if p.is_dir() and _has_model(p / "model"))
    if runs:
        names = ", ".join(p.name for p in runs[:6])
        raise DomainLMError(
            f"--model {value} holds {len(runs)} fine-tuned runs ({names}); pass one of them, e.g. --model {runs[0]}"
        )
    raise DomainLMError(f"--model {value} holds no model (no config.json in it or in {os.path.join(value, 'model')})")
