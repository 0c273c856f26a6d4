"""Load an encoder with MLM (+ SOP) heads, loudly; the pretraining loss with MLM logits at masked positions only.

The vocabulary projection is the largest matrix of a small encoder (40k x 384 for ERNIE 3.0 micro); computing
it for the ~15% of positions that carry a label instead of all of them is the biggest single saving.
"""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from domainlm.encoder.packed import encode_packed, first_tokens
from domainlm.errors import DomainLMError

HEAD_PREFIXES = ("cls.", "lm_head.")


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")) or any(path.glob("*.safetensors.index.json"))


@contextlib.contextmanager
def weights_errors(source: str):
    """Loading a model's weights: a damaged file, or a pickle that PyTorch's safe loading refuses, as one line
    naming the folder (domainlm never loads a pickle with code in it)."""
    try:
        yield
    except pickle.UnpicklingError as e:
        first = str(e).split(".")[0]
        raise DomainLMError(
            f"{source}: its pytorch_model.bin holds more than tensors, and PyTorch's safe loading refused it ({first}); "
            "domainlm does not run code from a weights file: save the model as safetensors where you trust it"
        ) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise DomainLMError(f"{source}: a .safetensors file is damaged or truncated ({' '.join(str(e).split())}); "
                            "copy or download it again") from None


def load_config(name_or_path: str):
    """A model's config by name or path (a PaddleNLP folder's config is mapped, not converted); a missing or
    unreadable one is a user error naming it."""
    from transformers import AutoConfig

    from domainlm.interop.names import hub_kwargs
    from domainlm.interop.paddle import hf_config, is_paddle_folder
    from domainlm.interop.resolve import hub_error, resolve_source

    source = resolve_source(name_or_path, "--model", log=lambda *_: None)
    if is_paddle_folder(source):
        return hf_config(source)
    try:
        return AutoConfig.from_pretrained(source, **hub_kwargs())
    except (OSError, ValueError) as e:
        if not Path(source).is_dir():
            raise hub_error(source, "--model", e) from None
        raise DomainLMError(f"model {name_or_path!r} could not be loaded: {str(e).splitlines()[0]}") from None


def loadable(name_or_path: str, work_dir: str | Path | None, log=print) -> str:
    """The path or hub id that transformers can load: PaddleNLP names are mapped, PaddleNLP folders are
    converted into `work_dir` (the run's --out), never in place."""
    from domainlm.interop.paddle import converted_copy, is_paddle_folder
    from domainlm.interop.resolve import resolve_source

    source = resolve_source(name_or_path, "--model", log=log)
    if is_paddle_folder(source):
        if work_dir is None:
            raise DomainLMError(f"{name_or_path} is a PaddleNLP folder; convert it first: "
                                f"domainlm convert {name_or_path} --out DIR")
        return converted_copy(source, work_dir, log=log)
    return source


def load_pretraining_model(name_or_path: str, from_scratch: bool, log=print, work_dir: str | Path | None = None):
    """An `AutoModelForPreTraining` (BERT/ERNIE: MLM + 2-way head; RoBERTa: MLM only).

    Missing head weights are reported and initialised; missing encoder weights are an error unless
    from_scratch, so that a mistyped name never trains from random weights unnoticed.
    """
    from transformers import AutoModelForPreTraining

    config = load_config(name_or_path)
    local = Path(name_or_path)
    if from_scratch or (local.is_dir() and not has_weights(local) and not _is_paddle(local)):
        if not from_scratch:
            raise DomainLMError(
                f"{name_or_path} holds a config but no weights; pass --from-scratch to train from random weights"
            )
        log(f"model: {config.model_type} from config {name_or_path}, random weights (--from-scratch)")
        return AutoModelForPreTraining.from_config(config)
    name_or_path = loadable(name_or_path, work_dir, log=log)
    with weights_errors(name_or_path):
        model, info = AutoModelForPreTraining.from_pretrained(name_or_path, output_loading_info=True)
    missing = list(info.get("missing_keys", []))
    heads = sorted({k for k in missing if k.startswith(HEAD_PREFIXES)})
    encoder = [k for k in missing if not k.startswith(HEAD_PREFIXES)]
    if encoder:
        raise DomainLMError(
            f"{name_or_path}: {len(encoder)} encoder weights are missing from the checkpoint "
            f"(e.g. {', '.join(encoder[:3])}); it does not match {type(model).__name__}. "
            "Pass --from-scratch to train from random weights on purpose"
        )
    if heads:
        log(f"model: {name_or_path} has no pretraining head weights for {', '.join(sorted({h.rsplit('.', 1)[0] for h in heads}))}; "
            "they are newly initialised")
    return model


def _is_paddle(path: Path) -> bool:
    from domainlm.interop.paddle import is_paddle_folder

    return is_paddle_folder(path)


class PretrainingModel(nn.Module):
    """Wraps the HF model so that DDP/FSDP see one forward; returns the loss and metrics as tensors."""

    def __init__(self, hf_model: nn.Module, sop: bool):
        super().__init__()
        self.hf = hf_model
        if hasattr(hf_model, "cls"):  # BERT / ERNIE: cls.predictions (transform + decoder), cls.seq_relationship
            self.mlm_head = hf_model.cls.predictions
            self.sop_head = getattr(hf_model.cls, "seq_relationship", None)
        elif hasattr(hf_model, "lm_head"):  # RoBERTa family
            self.mlm_head, self.sop_head = hf_model.lm_head, None
        else:
            raise DomainLMError(f"{type(hf_model).__name__} has no MLM head that domainlm knows")
        if sop and self.sop_head is None:
            raise DomainLMError(
                f"{type(hf_model).__name__} has no sentence-order head; pass --no-binary-head to train MLM only"
            )
        self.sop = sop

    def forward(self, sop_labels=None, **batch):
        """A packed batch (`cu_seqlens`, `mlm_positions`, ...: see dataset.collate_packed) runs the unpadded
        encoder; a padded one (`attention_mask`, `labels`) the model's own HF forward."""
        encoder = self.hf.base_model
        if "cu_seqlens" in batch:
            hidden = encode_packed(encoder, batch["input_ids"], batch["token_type_ids"], batch["position_ids"],
                                   batch["seq_index"], batch["cu_seqlens"], batch["max_len"])
            masked_hidden, targets = hidden.index_select(0, batch["mlm_positions"]), batch["mlm_labels"]
            pooled = encoder.pooler(first_tokens(hidden, batch["cu_seqlens"])[:, None]) if self.sop else None
        else:
            out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          token_type_ids=batch["token_type_ids"])
            masked = batch["labels"] != -100
            masked_hidden, targets = out.last_hidden_state[masked], batch["labels"][masked]
            pooled = out.pooler_output
        logits = self.mlm_head(masked_hidden)  # [n_masked, vocab]
        mlm_loss = F.cross_entropy(logits.float(), targets)
        metrics = {"mlm_loss": mlm_loss.detach(), "mlm_acc": (logits.argmax(-1) == targets).float().mean()}
        loss = mlm_loss
        if self.sop:
            sop_logits = self.sop_head(pooled)
            sop_loss = F.cross_entropy(sop_logits.float(), sop_labels)
            loss = loss + sop_loss
            metrics["sop_loss"] = sop_loss.detach()
            metrics["sop_acc"] = (sop_logits.argmax(-1) == sop_labels).float().mean()
        metrics["loss"] = loss.detach()
        return loss, metrics

