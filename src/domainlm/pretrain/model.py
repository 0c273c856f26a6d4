"""Load an encoder with MLM (+ SOP) heads, loudly; the pretraining loss with MLM logits at masked positions only.

The vocabulary projection is the largest matrix of a small encoder (40k x 384 for ERNIE 3.0 micro); computing
it for the ~15% of positions that carry a label instead of all of them is the biggest single saving.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from domainlm.encoder.packed import encode_batch, first_tokens
from domainlm.errors import DomainLMError


class PretrainingModel(nn.Module):
    """Wraps the HF model so that DDP/FSDP see one forward; returns the loss and metrics as tensors."""

    def __init__(self, hf_model: nn.Module, sop: bool, sources: list[str] | None = None):
        super().__init__()
        self.hf = hf_model
        self.sources = sources or []  # several corpora: their names, for a loss per corpus
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

    def forward(self, sop_labels=None, sources=None, mlm_sources=None, **batch):
        """A packed batch (`cu_seqlens`, `mlm_positions`, ...: see dataset.collate_packed) runs the unpadded
        encoder; a padded one (`attention_mask`, `labels`) the model's own HF forward."""
        encoder = self.hf.base_model
        if "cu_seqlens" in batch:
            hidden = encode_batch(encoder, batch)
            masked_hidden, targets = hidden.index_select(0, batch["mlm_positions"]), batch["mlm_labels"]
            pooled = encoder.pooler(first_tokens(hidden, batch["cu_seqlens"])[:, None]) if self.sop else None
        else:
            out = encoder(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            )
            masked = batch["labels"] != -100
            masked_hidden, targets = out.last_hidden_state[masked], batch["labels"][masked]
            pooled = out.pooler_output
        # [n_masked, vocab] in fp32 for the loss, and for the accuracy: argmax over bf16 rows is 3x slower on a CPU
        logits = self.mlm_head(masked_hidden).float()
        if self.sources and mlm_sources is not None:
            per_token = F.cross_entropy(logits, targets, reduction="none")
            mlm_loss = per_token.mean()
        else:
            mlm_loss = F.cross_entropy(logits, targets)
        hits = logits.argmax(-1) == targets
        metrics = {"mlm_loss": mlm_loss.detach(), "mlm_acc": hits.float().mean()}
        loss = mlm_loss
        if self.sop:
            sop_logits = self.sop_head(pooled).float()
            if self.sources and sources is not None:
                per_sample = F.cross_entropy(sop_logits, sop_labels, reduction="none")
                sop_loss = per_sample.mean()
            else:
                sop_loss = F.cross_entropy(sop_logits, sop_labels)
            loss = loss + sop_loss
            metrics["sop_loss"] = sop_loss.detach()
            metrics["sop_acc"] = (sop_logits.argmax(-1) == sop_labels).float().mean()
        metrics["loss"] = loss.detach()
        if self.sources and mlm_sources is not None:
            metrics.update(_by_source("mlm_loss", per_token.detach(), mlm_sources, self.sources))
            metrics.update(_by_source("mlm_acc", hits.float(), mlm_sources, self.sources))
            if self.sop and sources is not None:
                metrics.update(_by_source("sop_loss", per_sample.detach(), sources, self.sources))
        return loss, metrics


def _by_source(name: str, values, sources, names: list[str]) -> dict:
    """`name/<corpus>` of each corpus as a sum and a count (`#sum`, `#count`): the training loop and the evaluator
    report their ratio over all the batches they average, the mean over that corpus's tokens or samples."""
    k = len(names)
    sums = values.new_zeros(k).index_add_(0, sources, values)
    counts = torch.bincount(sources, minlength=k).to(values.dtype)
    out = {}
    for i, corpus in enumerate(names):
        out[f"{name}/{corpus}#sum"], out[f"{name}/{corpus}#count"] = sums[i], counts[i]
    return out
