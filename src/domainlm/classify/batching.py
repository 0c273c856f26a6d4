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


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's global batches (row indices): shuffle, sort pools of 50 batches by length, cut into
    batches, shuffle the batches. Deterministic per (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    chunks = []
    for i in range(0, len(order), pool):
        part = order[i : i + pool]
        part = part[np.argsort(lengths[part], kind="stable")]
        chunks += [part[j : j + batch_size] for j in range(0, len(part), batch_size)]
    return [chunks[k] for k in rng.permutation(len(chunks))]


def steps_per_epoch(n: int, global_batch: int, micro_batches: int) -> int:
    """Global batches per epoch that train_batches uses (a last batch with fewer rows than micro batches
    per step is skipped)."""
    full, rest = divmod(n, global_batch)
    return full + (rest >= micro_batches)


def train_batches(features: list[dict], targets: np.ndarray, batch_size: int, pad_id: int, seed: int,
                  rank: int = 0, world: int = 1, accumulation: int = 1) -> Iterator[dict]:
    """Endless epochs of global batches of `batch_size` rows, this process's micro batches of each.

    A global batch is cut into world x accumulation contiguous micro batches and process r takes micro
    batches r x accumulation ... (r + 1) x accumulation - 1, so that 2 processes and 1 process with 2 micro
    batches per step train on exactly the same micro batches.
    """
    lengths = np.asarray([len(f["input_ids"]) for f in features])
    parts = world * accumulation
    epoch = 0
    while True:
        for rows in epoch_batches(lengths, batch_size, seed, epoch):
            if len(rows) < parts:
                continue
            for idx in np.array_split(rows, parts)[rank * accumulation : (rank + 1) * accumulation]:
                yield collate([features[i] for i in idx], targets[idx], pad_id)
        epoch += 1
