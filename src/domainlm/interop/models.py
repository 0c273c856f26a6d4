"""Models as users have them, loaded one way: an HF name or folder, a PaddleNLP folder (converted once into the
run's folder), a config-only folder (random weights on request). Every command that loads weights to train them
(pretrain's MLM + SOP heads, finetune's and distill's classifier head) goes through load_weights.

    load_config(model)          the model's config (a PaddleNLP config is mapped), or one line naming the model
    peek_config(model)          the same without the network: None for a hub name not in the local cache
    load_weights(model, cls)    config -> weights present? -> converted if PaddleNLP -> loaded (a damaged file or an
                                unsafe pickle is one line) -> every encoder weight found (a missing one is an error;
                                the missing head is new, and said so where the caller asks)
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

from domainlm.errors import DomainLMError

# weights of the task heads: missing ones are initialised (a base model has no classifier; a snapshot may lack SOP)
HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "score.", "pooler.")


def has_weights(path: Path) -> bool:
    return (
        any(path.glob("*.safetensors"))
        or any(path.glob("pytorch_model*.bin"))
        or any(path.glob("*.safetensors.index.json"))
    )


@contextlib.contextmanager
def weights_errors(source: str):
    """Loading a model's weights: a damaged file, or a pickle that PyTorch's safe loading refuses, as one line
    naming the folder (domainlm never loads a pickle with code in it)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        first = str(e).split(".")[0]
        raise DomainLMError(
            f"{source}: its pytorch_model.bin holds more than tensors, "
            f"and PyTorch's safe loading refused it ({first}); "
            "domainlm does not run code from a weights file: save the model as safetensors where you trust it"
        ) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise DomainLMError(
            f"{source}: a .safetensors file is damaged or truncated ({' '.join(str(e).split())}); "
            "copy or download it again"
        ) from None


def load_config(name_or_path: str, flag: str = "--model"):
    """A model's config by name or path (a PaddleNLP folder's config is mapped, not converted); a missing or
    unreadable one is a user error naming it."""
    from transformers import AutoConfig

    from domainlm.interop.names import hub_kwargs
    from domainlm.interop.paddle import hf_config, is_paddle_folder
    from domainlm.interop.resolve import hub_error, resolve_source

    source = resolve_source(name_or_path, flag, log=lambda *_: None)
    if is_paddle_folder(source):
        return hf_config(source)
    try:
        return AutoConfig.from_pretrained(source, **hub_kwargs())
    except (OSError, ValueError) as e:
        if not Path(source).is_dir():
            raise hub_error(source, flag, e) from None
        raise DomainLMError(f"model {name_or_path!r} could not be loaded: {str(e).splitlines()[0]}") from None


def peek_config(name_or_path: str, flag: str = "--model"):
    """load_config for checks that must not wait on the network (the console's): None for a hub name that is not
    in the local cache (the job itself will fetch it). A broken config.json is an error naming it."""
    from huggingface_hub import try_to_load_from_cache

    from domainlm.interop.resolve import resolve_source

    source = resolve_source(name_or_path, flag, log=lambda *a, **k: None)
    if not Path(source).is_dir() and not isinstance(try_to_load_from_cache(source, "config.json"), str):
        return None
    try:
        return load_config(name_or_path, flag)
    except DomainLMError:
        raise
    except Exception as e:  # noqa: BLE001 - a config.json that transformers cannot read
        raise DomainLMError(f"{name_or_path}: the model's config could not be read ({type(e).__name__}: {e})") from None


def loadable(name_or_path: str, work_dir: str | Path | None, log=print, flag: str = "--model") -> str:
    """The path or hub id that transformers can load: PaddleNLP names are mapped, PaddleNLP folders are
    converted into `work_dir` (the run's --out), never in place."""
    from domainlm.interop.paddle import converted_copy, is_paddle_folder
    from domainlm.interop.resolve import resolve_source

    source = resolve_source(name_or_path, flag, log=log)
    if is_paddle_folder(source):
        if work_dir is None:
            raise DomainLMError(
                f"{name_or_path} is a PaddleNLP folder; convert it first: domainlm convert {name_or_path} --out DIR"
            )
        return converted_copy(source, work_dir, log=log)
    return source


def weights_missing(name_or_path: str) -> bool:
    """A local folder holding a config and no weights (a PaddleNLP folder has weights of its own format)."""
    from domainlm.interop.paddle import is_paddle_folder

    local = Path(name_or_path)
    return local.is_dir() and not has_weights(local) and not is_paddle_folder(local)


def load_weights(
    name_or_path: str,
    auto_class,
    *,
    from_scratch: bool = False,
    work_dir: str | Path | None = None,
    log=print,
    flag: str = "--model",
    new_heads_notice: bool = True,
    **kwargs,
):
    """An `auto_class` model (AutoModelForPreTraining, AutoModelForSequenceClassification, ...) of `name_or_path`,
    with `kwargs` for from_pretrained / from_config. Missing encoder weights are an error unless `from_scratch`, so
    that a mistyped name never trains from random weights unnoticed; missing head weights are initialised (and
    said so, with `new_heads_notice`)."""
    config = load_config(name_or_path, flag)
    if from_scratch:
        log(f"model: {config.model_type} from config {name_or_path}, random weights (--from-scratch)")
        for key, value in kwargs.items():
            setattr(config, key, value)
        return auto_class.from_config(config)
    if weights_missing(name_or_path):
        scratch = (
            "; pass --from-scratch to train from random weights"
            if auto_class.__name__.endswith("PreTraining")
            else "; fine-tuning needs a trained encoder"
        )
        raise DomainLMError(f"{name_or_path} holds a config but no weights{scratch}")
    source = loadable(name_or_path, work_dir, log=log, flag=flag)
    with weights_errors(source):
        model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    missing = list(info.get("missing_keys", []))
    encoder = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if encoder:
        raise DomainLMError(
            f"{source}: {len(encoder)} encoder weights are missing from the checkpoint "
            f"(e.g. {', '.join(encoder[:3])}); "
            f"it is not a trained encoder of {type(model).__name__}. Pass --from-scratch to train from random weights "
            "on purpose"
            if auto_class.__name__.endswith("PreTraining")
            else f"{source}: {len(encoder)} encoder weights are missing (e.g. {', '.join(encoder[:3])}); "
            "it is not a trained encoder"
        )
    heads = sorted({k.rsplit(".", 1)[0] for k in missing if k.startswith(HEAD_PREFIXES)})
    if heads and new_heads_notice:
        log(f"model: {source} has no pretraining head weights for {', '.join(heads)}; they are newly initialised")
    return model
