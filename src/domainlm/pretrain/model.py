"""Load an encoder with MLM (+ SOP) heads, loudly; the pretraining loss with MLM logits at masked positions only.

The vocabulary projection is the largest matrix of a small encoder (40k x 384 for ERNIE 3.0 micro); computing
it for the ~15% of positions that carry a label instead of all of them is the biggest single saving.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from domainlm.encoder.packed import encode_packed, first_tokens
from domainlm.errors import DomainLMError


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
        # [n_masked, vocab] in fp32 for the loss, and for the accuracy: argmax over bf16 rows is 3x slower on a CPU
        logits = self.mlm_head(masked_hidden).float()
        mlm_loss = F.cross_entropy(logits, targets)
        metrics = {"mlm_loss": mlm_loss.detach(), "mlm_acc": (logits.argmax(-1) == targets).float().mean()}
        loss = mlm_loss
        if self.sop:
            sop_logits = self.sop_head(pooled).float()
            sop_loss = F.cross_entropy(sop_logits, sop_labels)
            loss = loss + sop_loss
            metrics["sop_loss"] = sop_loss.detach()
            metrics["sop_acc"] = (sop_logits.argmax(-1) == sop_labels).float().mean()
        metrics["loss"] = loss.detach()
        return loss, metrics

