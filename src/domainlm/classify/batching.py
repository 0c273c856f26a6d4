"""Tokenized examples -> padded batches. Training batches group similar lengths so padding stays small."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from domainlm.classify.data import Dataset


def encode(tokenizer, data: Dataset, max_seq_len: int) -> list[dict]:
    texts = [ex.text for ex in data.examples]
    pairs = [ex.text_pair for ex in data.examples]
    enc = tokenizer(texts, pairs if any(p is not None for p in pairs) else None, truncation=True, max_length=max_seq_len)
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(texts))]


def collate(items: list[dict], targets: np.ndarray | None, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x["input_ids"]) for x in items)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
        if key in items[0]:
            rows = [x[key] + [fill] * (width - len(x[key])) for x in items]
            batch[key] = torch.tensor(rows, dtype=torch.long)
    if targets is not None:
        batch["labels"] = torch.from_numpy(np.asarray(targets))
    return batch


def eval_batches(features: list[dict], batch_size: int, pad_id: int, targets: np.ndarray | None = None) -> Iterator[dict]:
    """In order (predictions line up with the input)."""
    for i in range(0, len(features), batch_size):
        yield collate(features[i : i + batch_size], None if targets is None else targets[i : i + batch_size], pad_id)


def train_batches(features: list[dict], targets: np.ndarray, batch_size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless epochs. Each epoch: shuffle, sort pools of 50 batches by length, cut into batches, shuffle
    the batches. Deterministic per (seed, epoch)."""
    lengths = np.asarray([len(f["input_ids"]) for f in features])
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(features))
        pool = batch_size * 50
        chunks = []
        for i in range(0, len(order), pool):
            part = order[i : i + pool]
            part = part[np.argsort(lengths[part], kind="stable")]
            chunks += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
        for k in rng.permutation(len(chunks)):
            idx = chunks[k]
            yield collate([features[i] for i in idx], targets[idx], pad_id)
        epoch += 1
