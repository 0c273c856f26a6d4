"""The student's objective: hard-label cross-entropy mixed by alpha with the teacher's temperature-scaled soft
targets (KL for one label per row, per-label sigmoid targets for several), scaled by T^2 so that the soft term's
gradients keep their size whatever the temperature (Hinton et al.); optionally plus the mean squared error between
the teacher's last [CLS] state and the student's, mapped to the teacher's width by a learned projection (trained with
the student, not saved with it)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from domainlm.classify.model import Classifier, packed_forward


def soften(probs: np.ndarray, temperature: float, multilabel: bool) -> np.ndarray:
    """The teacher's probabilities at temperature T: softmax(log p / T) (= softmax(logits / T)), or per label
    sigmoid(logit(p) / T)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12 if multilabel else 1.0)
    if multilabel:
        return (1 / (1 + np.exp(-np.log(p / (1 - p)) / temperature))).astype(np.float32)
    z = np.log(p) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def pack(hard: np.ndarray | None, soft: np.ndarray, multilabel: bool, hidden: np.ndarray | None = None) -> np.ndarray:
    """One float target row per training row: [hard label (-1: none) | soft targets | teacher [CLS] state] for one
    label per row, [hard labels (NaN: none) | ...] for several; unlabelled rows (beyond len(hard)) have no hard part."""
    n, labels = soft.shape
    width = labels if multilabel else 1
    states = 0 if hidden is None else hidden.shape[1]
    packed = np.full((n, width + labels + states), np.nan if multilabel else -1.0, dtype=np.float32)
    if hard is not None and len(hard):
        packed[: len(hard), :width] = np.asarray(hard, dtype=np.float32).reshape(len(hard), width)
    packed[:, width : width + labels] = soft
    if hidden is not None:
        packed[:, width + labels :] = hidden
    return packed


class DistillClassifier(Classifier):
    """A Classifier that, on packed targets (training), mixes the two losses; on plain targets (evaluation) it is the
    Classifier. With alpha = 1 the loss is the Classifier's cross-entropy, computed the same way."""

    def __init__(
        self,
        hf_model,
        multilabel: bool,
        n_labels: int,
        temperature: float,
        alpha: float,
        hidden_weight: float = 0.0,
        teacher_width: int = 0,
    ):
        super().__init__(hf_model, multilabel)
        self.n_labels, self.temperature, self.alpha = n_labels, temperature, alpha
        self.hidden_weight, self.teacher_width = hidden_weight, teacher_width if hidden_weight else 0
        if self.hidden_weight:
            self.projection = nn.Linear(hf_model.config.hidden_size, teacher_width)

    def forward(self, labels, **batch):
        """A padded or a packed batch (classify.batching.collate), as the Classifier takes."""
        width = self.n_labels if self.multilabel else 1
        if labels.ndim != 2 or labels.shape[-1] != width + self.n_labels + self.teacher_width:
            return super().forward(labels, **batch)
        states = None
        if self.hidden_weight and "cu_seqlens" in batch:  # the last layer's [CLS] state comes with the logits
            states, logits = (x.float() for x in packed_forward(self.hf, batch))
        elif self.hidden_weight:  # the full forward, for the last layer's [CLS] state
            given = {k: batch.get(k) for k in ("attention_mask", "token_type_ids")}
            out = self.hf(
                input_ids=batch["input_ids"],
                output_hidden_states=True,
                **{k: v for k, v in given.items() if v is not None},
            )
            logits, states = out.logits.float(), out.hidden_states[-1][:, 0].float()
        else:
            logits = self.batch_logits(batch).float()
        hard, soft = labels[:, :width], labels[:, width : width + self.n_labels].float()
        t = self.temperature
        if self.multilabel:
            has = ~torch.isnan(hard[:, 0])
            ce = F.binary_cross_entropy_with_logits(logits[has], hard[has].float()) if has.any() else logits.sum() * 0
            scaled = logits / t
            # per-label KL of Bernoulli(soft) to Bernoulli(sigmoid(scaled)): cross-entropy less the soft targets'
            # entropy
            entropy = -(soft * torch.log(soft.clamp_min(1e-12)) + (1 - soft) * torch.log((1 - soft).clamp_min(1e-12)))
            kl = (F.binary_cross_entropy_with_logits(scaled, soft, reduction="none") - entropy).mean()
            acc = ((logits > 0) == (soft > 0.5)).all(dim=-1).float().mean()
        else:
            hard = hard[:, 0]
            has = hard >= 0
            ce = F.cross_entropy(logits[has], hard[has].long()) if has.any() else logits.sum() * 0
            log_q = F.log_softmax(logits / t, dim=-1)
            kl = (soft * (torch.log(soft.clamp_min(1e-12)) - log_q)).sum(-1).mean()
            acc = (logits[has].argmax(-1) == hard[has].long()).float().mean() if has.any() else ce.detach() * 0
        loss = ce if self.alpha == 1 else self.alpha * ce + (1 - self.alpha) * kl * t * t
        metrics = {"loss": loss.detach(), "acc": acc, "kl": kl.detach(), "ce": ce.detach()}
        if states is not None:
            mse = F.mse_loss(self.projection(states), labels[:, width + self.n_labels :].float())
            loss = loss + self.hidden_weight * mse
            metrics.update(loss=loss.detach(), hidden_mse=mse.detach())
        return loss, metrics
