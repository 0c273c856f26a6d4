"""A sequence classifier from any encoder (HF name/path or a `pretrain` snapshot), full or LoRA (peft)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from domainlm.encoder.attention import Layout, scatter_padded
from domainlm.encoder.frozen import FrozenEncoder
from domainlm.encoder.packed import encode_batch, supports_packing
from domainlm.errors import DomainLMError
from domainlm.outputs import Writer

# attention projections of BERT-family encoders (BERT, ERNIE, RoBERTa name them alike)
LORA_TARGETS = ["query", "key", "value"]


# classifiers whose head reads the pooled [CLS] state only, with the BERT module layout (embeddings, encoder.layer[i]
# .attention.self.query/key/value, .attention.output, .intermediate, .output, pooler, dropout, classifier)
CLS_ONLY = ("BertForSequenceClassification", "ErnieForSequenceClassification")


def _cls_only_ready(hf: nn.Module) -> bool:
    config = getattr(hf, "config", None)
    return (
        type(hf).__name__ in CLS_ONLY
        and config is not None
        and not config.is_decoder
        and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
        and not getattr(config, "chunk_size_feed_forward", 0)
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        # sharded (FSDP) layers gather their weights in their own forward: calling their parts directly would not
        and not any("FSDP" in type(m).__name__ or "FullySharded" in type(m).__name__ for m in hf.modules())
        and type(next(hf.parameters())).__name__ != "DTensor"
    )


def classifier_logits(hf: nn.Module, input_ids, attention_mask, token_type_ids=None):
    """The model's logits, with the last layer computed for the [CLS] position only.

    The head reads nothing but the last layer's [CLS] state, so the other positions of that layer (its query and
    output projections, and its feed-forward block: 5/6 of its work) are never used. Skipping them gives the same
    logits and gradients (dropout aside, drawn for fewer positions) at a fraction of the cost: the last layer's
    per-token work is its [CLS] attention over the other positions alone (_cls_attention), almost 1/4 less work for a
    4-layer encoder, almost 1/2 for 2 layers. Other models run their own forward.
    """
    if not _cls_only_ready(hf):
        given = {"attention_mask": attention_mask, "token_type_ids": token_type_ids}  # some models take no token types
        return hf(input_ids=input_ids, **{k: v for k, v in given.items() if v is not None}).logits
    from transformers.masking_utils import create_bidirectional_mask

    encoder = hf.base_model
    hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)
    *layers, last = encoder.encoder.layer
    for layer in layers:
        hidden = layer(hidden, mask)
    context = last.attention.output(_cls_attention(last.attention.self, hidden, mask), hidden[:, :1])
    cls = last.output(last.intermediate(context), context)
    return hf.classifier(hf.dropout(encoder.pooler(cls)))


def _cls_attention(attention: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Self-attention output [batch, 1, width] of the [CLS] query over all positions, with no key or value
    projection of the other positions.

    For one query q (per head) the scores are q . (Wk h_j + bk) = (Wk^T q) . h_j + q . bk, and the key bias term
    is the same for every j (softmax ignores it); the context is sum_j p_j (Wv h_j + bv) = Wv (sum_j p_j h_j)
    + bv sum_j p_j. Projecting the one query back (Wk^T q) and the one mixed state forward (Wv ...) replaces two
    [length x width x width] projections with [length x width] products per head: the same attention, with the
    last layer's per-token work reduced to nothing but those products.
    """
    batch, _, width = hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    query = attention.query(hidden[:, :1]).view(batch, heads, size)
    key_weight = attention.key.weight.view(heads, size, width)
    scores = torch.einsum("bhd,bld->bhl", torch.einsum("bhs,hsd->bhd", query, key_weight), hidden)
    if attention.key.bias is not None:  # no effect on the softmax, kept so that every weight has its (zero) gradient
        scores = scores + (query * attention.key.bias.view(heads, size)).sum(-1, keepdim=True)
    scores = scores * attention.scaling
    if mask is not None:  # [batch, 1, query, key]: the [CLS] query's row; bool (sdpa: True attends) or additive (eager)
        row = mask[:, :, 0]
        scores = (
            scores.masked_fill(~row, torch.finfo(scores.dtype).min)
            if row.dtype == torch.bool
            else scores + row.to(scores.dtype)
        )
    probs = F.dropout(torch.softmax(scores, dim=-1), attention.dropout.p, attention.training)
    mixed = torch.einsum("bhl,bld->bhd", probs, hidden)
    context = torch.einsum("bhd,hsd->bhs", mixed, attention.value.weight.view(heads, size, width))
    if attention.value.bias is not None:  # dropout leaves sum_j p_j != 1: the bias is weighted by it
        context = context + attention.value.bias.view(heads, size) * probs.sum(-1, keepdim=True)
    return context.reshape(batch, 1, heads * size)


def packing_ready(hf: nn.Module) -> bool:
    """Whether `packed_logits` runs this classifier: a BERT/ERNIE head on the pooled [CLS] state of an encoder that
    `encoder.packed` runs."""
    return _cls_only_ready(hf) and supports_packing(hf.base_model)


def packed_forward(
    hf: nn.Module, batch: dict, frozen: FrozenEncoder | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's [CLS] states and the logits of a packed batch (`encoder.packed.pack`): the layers below the
    last run on the stream of real tokens, the last one for each sample's [CLS] query alone (as in
    classifier_logits), over the sample's own rows scattered into a [samples, longest] buffer. No linear layer
    touches a padded position, so a batch of texts of any lengths costs what its real tokens cost: on a CPU a
    batch of mixed lengths ran slower per text than the texts one at a time, padded. `frozen`: the layers below the
    last packed for CPU inference (`encoder.frozen.freeze`)."""
    encoder = hf.base_model
    *_, last = encoder.encoder.layer
    layout = Layout(batch["cu_seqlens"], batch["max_len"], batch["seq_index"], batch["position_ids"])
    hidden = encode_batch(encoder, batch, depth=len(encoder.encoder.layer) - 1, frozen=frozen)
    padded = scatter_padded(hidden, layout)
    context = last.attention.output(_cls_attention(last.attention.self, padded, layout.key_mask()), padded[:, :1])
    cls = last.output(last.intermediate(context), context)
    return cls[:, 0], hf.classifier(hf.dropout(encoder.pooler(cls)))


def packed_logits(hf: nn.Module, batch: dict, frozen: FrozenEncoder | None = None) -> torch.Tensor:
    return packed_forward(hf, batch, frozen)[1]


class Classifier(nn.Module):
    """forward(**batch) -> (loss, metrics), the contract of the shared training loop. A batch is padded
    (`input_ids`, `attention_mask`, ...) or packed (`cu_seqlens`, ...: see batching.collate)."""

    def __init__(self, hf_model: nn.Module, multilabel: bool):
        super().__init__()
        self.hf, self.multilabel = hf_model, multilabel
        self.frozen: FrozenEncoder | None = None  # set while `inference_layers` evaluates

    def logits(self, input_ids, attention_mask, token_type_ids=None):
        return classifier_logits(self.hf, input_ids, attention_mask, token_type_ids)

    def batch_logits(self, batch: dict) -> torch.Tensor:
        if "cu_seqlens" in batch:
            return packed_logits(self.hf, batch, None if self.training else self.frozen)
        return self.logits(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def forward(self, labels, **batch):
        logits = self.batch_logits(batch).float()
        if self.multilabel:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float())
            acc = ((logits > 0) == labels.bool()).all(dim=-1).float().mean()
        else:
            loss = F.cross_entropy(logits, labels)
            acc = (logits.argmax(-1) == labels).float().mean()
        metrics = {"loss": loss.detach(), "acc": acc}
        if not self.training:  # evaluation: per-row scores, which the shared evaluator gathers across processes
            metrics["scores"] = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=-1)
        return loss, metrics


@contextlib.contextmanager
def inference_layers(classifier: Classifier, dtype: torch.dtype | None):
    """While in this block, the classifier evaluates with its encoder's layers packed for CPU inference at `dtype`
    (encoder.frozen, as the runtime of `predict`, `evaluate` and `serve` runs them), so that the scores fine-tuning
    reports for dev and test are the ones `predict` gives for the same weights. None (a GPU, fp16, sharded
    weights), or a model that is not packed: the modules run."""
    from domainlm.encoder.frozen import freeze

    ready = dtype is not None and packing_ready(classifier.hf)
    classifier.frozen = freeze(classifier.hf.base_model, dtype) if ready else None
    try:
        yield
    finally:
        classifier.frozen = None


def enable_checkpointing(hf: nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant: works with frozen inputs, as under
    LoRA, and replays dropout exactly). transformers 5 renamed the switch; both names are taken."""
    if not getattr(hf, "supports_gradient_checkpointing", False):
        raise DomainLMError(f"--gradient-checkpointing: {type(hf).__name__} does not support it")
    enable = getattr(hf, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_classifier(
    name_or_path: str,
    labels: list[str],
    multilabel: bool,
    method: str,
    lora_rank: int,
    lora_alpha: int,
    log=print,
    work_dir: str | Path | None = None,
):
    """The encoder with a new classification head (interop.models.load_weights); LoRA adapters on it for
    method "lora". work_dir: where a PaddleNLP folder is converted (the run's --out)."""
    from transformers import AutoModelForSequenceClassification

    from domainlm.interop.models import load_weights

    model = load_weights(
        name_or_path,
        AutoModelForSequenceClassification,
        work_dir=work_dir,
        log=log,
        new_heads_notice=False,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)},
        problem_type="multi_label_classification" if multilabel else "single_label_classification",
        ignore_mismatched_sizes=True,
    )
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=0.1,
            target_modules=LORA_TARGETS,
        )
        model = get_peft_model(model, config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"LoRA rank {lora_rank}: {trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)")
    return model


def save_classifier(
    model,
    tokenizer,
    out: Writer | Path,
    labels: list[str],
    multilabel: bool,
    thresholds=None,
    settings: dict | None = None,
) -> Path:
    """<out>/model: a plain HF classifier (LoRA merged in); <out>/adapter: the LoRA adapter alone, each staged and
    swapped into place. Beside the weights, domainlm_labels.json: the labels, the thresholds, and `settings`
    (FinetuneConfig.inference_settings: task, max_seq_len, text/pair columns), the defaults of every command that
    loads it (classify.runtime). `out`: a run's Writer, or a plain folder."""
    import copy

    from domainlm.files import write_json
    from domainlm.outputs import Plain

    out = out if isinstance(out, Writer) else Plain(out)
    if hasattr(model, "merge_and_unload"):
        with out.staged("adapter") as folder:
            model.save_pretrained(folder)
        model = copy.deepcopy(model).merge_and_unload()
    meta = {"labels": labels, "multilabel": multilabel, **(settings or {})}
    if thresholds is not None:
        meta["thresholds"] = [float(t) for t in thresholds]
    with out.staged("model") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json(folder / "domainlm_labels.json", meta)
    return out.root() / "model"


def load_trained(path: str):
    """A classifier written by `finetune` (or any HF sequence classifier): model, tokenizer, labels, multilabel,
    thresholds."""
    from transformers import AutoModelForSequenceClassification

    from domainlm.interop.models import load_config, weights_errors
    from domainlm.interop.paddle import is_paddle_folder
    from domainlm.interop.resolve import resolve_model_dir
    from domainlm.interop.tokenizer import load_fast_tokenizer

    path = resolve_model_dir(path)
    if is_paddle_folder(path):
        raise DomainLMError(
            f"{path} is a PaddleNLP folder; convert it first (domainlm convert {path} --out DIR) and pass DIR"
        )
    config = load_config(path)
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise DomainLMError(
            f"{path} is not a sequence classifier (architectures: {archs or 'none'}); "
            "fine-tune one with `domainlm finetune`"
        )
    meta_path = Path(path) / "domainlm_labels.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    else:
        meta = {
            "labels": [config.id2label[i] for i in range(config.num_labels)],
            "multilabel": config.problem_type == "multi_label_classification",
        }
    with weights_errors(path):
        model = AutoModelForSequenceClassification.from_pretrained(path)
    model.eval()
    return model, load_fast_tokenizer(path, flag="--model"), meta
