"""Tokenized examples -> padded batches. Training batches group similar lengths so padding stays small; inference
batches are cut from the examples sorted by length (`length_batches`) and their rows put back in input order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from domainlm.classify.data import Dataset
from domainlm.spans import cheapest_spans

INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def encode_texts(tokenizer, texts: list[str], pairs: list[str] | None, max_seq_len: int) -> list[dict]:
    """One call of the fast tokenizer for all texts (it tokenizes them in parallel), one dict of lists per text."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_seq_len)
    keys = [k for k in INPUT_KEYS if k in enc]
    columns = [enc[k] for k in keys]
    return [dict(zip(keys, row)) for row in zip(*columns)]


def encode(tokenizer, data: Dataset, max_seq_len: int) -> list[dict]:
    return encode_texts(tokenizer, *data.columns(), max_seq_len)


def pad(items: Sequence[dict], pad_id: int) -> dict[str, np.ndarray]:
    """int64 arrays [rows, longest row], padded on the right: the one padding of training and inference."""
    width = max(len(x["input_ids"]) for x in items)
    batch = {}
    for key, fill in (("input_ids", pad_id), ("token_type_ids", 0), ("attention_mask", 0)):
        if key in items[0]:
            out = np.full((len(items), width), fill, dtype=np.int64)
            for i, x in enumerate(items):
                out[i, : len(x[key])] = x[key]
            batch[key] = out
    return batch


def collate(items: list[dict], targets: np.ndarray | None, pad_id: int, packed: bool = False) -> dict:
    """`pad` as torch tensors, or with `packed` one token stream of the rows (`encoder.packed.pack`), with the
    targets as "labels"."""
    import torch  # here, so that inference on ONNX Runtime does not load torch

    if packed:
        from domainlm.encoder.packed import pack

        batch = pack(items)
    else:
        batch = {k: torch.from_numpy(v) for k, v in pad(items, pad_id).items()}
    if targets is not None:
        batch["labels"] = torch.from_numpy(np.asarray(targets))
    return batch


def length_batches(
    lengths: Sequence[int], batch_size: int, token_budget: int = 0, call_tokens: int = 0
) -> list[np.ndarray]:
    """Row indices sorted by length (stable), cut into batches of at most `batch_size` rows and, with a token budget,
    of at most `token_budget` padded tokens (rows x longest row), so that short texts run in larger batches.

    With `call_tokens` (the fixed cost of one model call, in padded tokens) the cuts are those of least total cost,
    padded tokens + `call_tokens` per batch (`_cheapest_cuts`): for a model that pads, a batch of mixed lengths
    costs its longest row times its rows, and a few texts of very different lengths ran slower in one batch than
    one at a time. Without it (a packed model: padding costs nothing) batches are as full as the limits allow."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    if call_tokens:
        return [order[a:b] for a, b in _cheapest_cuts(lengths[order], batch_size, token_budget, call_tokens)]
    batches, start = [], 0
    while start < len(order):
        end = min(start + batch_size, len(order))
        if token_budget:  # sorted ascending: the last row of a batch is its longest
            while end - start > 1 and (end - start) * lengths[order[end - 1]] > token_budget:
                end -= 1
        batches.append(order[start:end])
        start = end
    return batches


def _cheapest_cuts(
    sorted_lengths: np.ndarray, batch_size: int, token_budget: int, call_tokens: int
) -> list[tuple[int, int]]:
    """[start, end) spans of ascending lengths minimising sum(rows x longest + call_tokens) within the limits."""

    def cost(rows: np.ndarray, longest: np.ndarray) -> np.ndarray:
        padded = rows * longest
        total = (padded + call_tokens).astype(float)
        if token_budget:
            total[(padded > token_budget) & (rows > 1)] = np.inf
        return total

    return cheapest_spans(sorted_lengths, cost, batch_size)


def eval_batches(
    features: list[dict], batch_size: int, pad_id: int, targets: np.ndarray | None = None, packed: bool = False
) -> Iterator[dict]:
    """In order (predictions line up with the input)."""
    for i in range(0, len(features), batch_size):
        yield collate(
            features[i : i + batch_size], None if targets is None else targets[i : i + batch_size], pad_id, packed
        )


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


def train_batches(
    features: list[dict],
    targets: np.ndarray,
    batch_size: int,
    pad_id: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    accumulation: int = 1,
    packed: bool = False,
) -> Iterator[dict]:
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
                yield collate([features[i] for i in idx], targets[idx], pad_id, packed)
        epoch += 1
