"""Samples -> model inputs: SOP pairs, special tokens, masking; packing and padding collators; resumable batch order."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from domainlm.data.store import Corpus
from domainlm.encoder.packed import pack
from domainlm.pretrain.masking import MaskingOptions, mask_tokens
from domainlm.pretrain.samples import cached_epoch_order

SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def truncate_pair(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """Trim the longer segment first, then both evenly, until the pair fits."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return len_a, len_b
    d = min(excess, abs(len_a - len_b))
    if len_a > len_b:
        len_a -= d
    else:
        len_b -= d
    excess -= d
    return len_a - (excess + 1) // 2, len_b - excess // 2


class PretrainDataset(torch.utils.data.Dataset):
    """Item g is global sample number g: epoch g // N, position g % N in that epoch's permutation.

    Training indexes it with an ever-growing counter (the data position saved in checkpoints); validation
    and test with 0..N-1 and shuffle=False, so they always see the same samples with the same masks.
    A memory-mapped index (and epoch permutation) is shared by every worker and rank: it pickles as its path.
    """

    def __init__(
        self,
        corpus: Corpus,
        samples: np.ndarray,
        split: str,
        max_seq_len: int,
        sop: bool,
        masking: MaskingOptions,
        special_ids: dict[str, int],
        vocab_size: int,
        seed: int,
        shuffle: bool,
    ):
        self.corpus, self.samples, self.split = corpus, samples, split
        self.max_seq_len, self.sop, self.masking = max_seq_len, sop, masking
        self.cls, self.sep, self.mask = special_ids["cls"], special_ids["sep"], special_ids["mask"]
        self.vocab_size, self.seed, self.shuffle = vocab_size, seed, shuffle
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _sample_index(self, g: int) -> int:
        n = len(self.samples)
        if not self.shuffle:
            return g % n
        epoch = g // n
        if self._order is None or self._order[0] != epoch:
            self._order = None  # drop the previous epoch's before making the next
            self._order = (epoch, cached_epoch_order(self.corpus.path / "cache", n, self.seed, epoch))
        return int(self._order[1][g % n])

    def __getstate__(self):
        state = {**self.__dict__, "_order": None}
        name = self.samples.filename if isinstance(self.samples, np.memmap) else None
        if name and np.load(name, mmap_mode="r").shape == self.samples.shape:  # the whole file, not a slice
            state["samples"] = str(name)  # reopened, not copied, in a spawned worker
        return state

    def __setstate__(self, state):
        if isinstance(state["samples"], str):
            state["samples"] = np.load(state["samples"], mmap_mode="r", allow_pickle=False)
        self.__dict__.update(state)

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        return self.item(g)

    def item(self, g: int, key: int | None = None) -> dict[str, np.ndarray]:
        """Sample number g; `key` numbers its masking draws (g itself, unless a blend of corpora gives the run's
        sample number, see mixture.py)."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], g if key is None else key])
        first, end = (int(x) for x in self.samples[self._sample_index(g)])
        if self.sop:
            budget = self.max_seq_len - 3
            cut = int(rng.integers(first + 1, end)) if end - first > 1 else end
            ids_a, words_a = self.corpus.span(first, cut)
            ids_b, words_b = self.corpus.span(cut, end)
            la, lb = truncate_pair(len(ids_a), len(ids_b), budget)
            ids_a, words_a, ids_b, words_b = ids_a[:la], words_a[:la], ids_b[:lb], words_b[:lb]
            swapped = bool(rng.random() < 0.5)
            if swapped:
                ids_a, words_a, ids_b, words_b = ids_b, words_b, ids_a, words_a
            ids = np.concatenate([[self.cls], ids_a, [self.sep], ids_b, [self.sep]])
            words = np.concatenate([[False], words_a, [False], words_b, [False]])
            types = np.concatenate([np.zeros(len(ids_a) + 2, np.int64), np.ones(len(ids_b) + 1, np.int64)])
        else:
            budget = self.max_seq_len - 2
            ids_a, words_a = self.corpus.span(first, end)
            ids = np.concatenate([[self.cls], ids_a[:budget], [self.sep]])
            words = np.concatenate([[False], words_a[:budget], [False]])
            types = np.zeros(len(ids), np.int64)
        special = np.zeros(len(ids), dtype=bool)
        special[[0, len(ids) - 1]] = True
        if self.sop:
            special[len(ids_a) + 1] = True
        input_ids, labels = mask_tokens(ids, words, special, self.masking, self.vocab_size, self.mask, rng)
        item = {"input_ids": input_ids, "token_type_ids": types, "labels": labels}
        if self.sop:
            item["sop_labels"] = np.int64(swapped)
        return item


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample in the batch (samples are packed, so there is little to pad)."""
    width = max(len(x["input_ids"]) for x in items)
    n = len(items)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    labels = np.full((n, width), -100, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    for i, x in enumerate(items):
        k = len(x["input_ids"])
        input_ids[i, :k], types[i, :k], labels[i, :k], attention[i, :k] = (
            x["input_ids"],
            x["token_type_ids"],
            x["labels"],
            1,
        )
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(types),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
    }
    if "sop_labels" in items[0]:
        batch["sop_labels"] = torch.tensor([int(x["sop_labels"]) for x in items], dtype=torch.int64)
    if (
        "source" in items[0]
    ):  # several corpora: each sample's, and each masked token's (row-major, as the model takes them)
        sources = np.array([int(x["source"]) for x in items], dtype=np.int64)
        batch["sources"] = torch.from_numpy(sources)
        batch["mlm_sources"] = torch.from_numpy(sources[np.nonzero(labels != -100)[0]])
    return batch


def collate_packed(items: list[dict]) -> dict:
    """One token stream per micro batch (see `encoder.packed`): no padded position, and the MLM targets given
    as stream positions, so that the model gathers them without a data-dependent shape on the device. The samples
    are ordered by length (the loss is a mean, so order does not change it), so that the CPU attention pads spans of
    like lengths (`Layout.spans`)."""
    items = sorted(items, key=lambda x: len(x["input_ids"]))
    batch = pack(items)
    labels = np.concatenate([x["labels"] for x in items])
    where = np.flatnonzero(labels != -100)
    batch["mlm_positions"] = torch.from_numpy(where)
    batch["mlm_labels"] = torch.from_numpy(labels[where])
    if "sop_labels" in items[0]:
        batch["sop_labels"] = torch.tensor([int(x["sop_labels"]) for x in items], dtype=torch.int64)
    if "source" in items[0]:  # several corpora: each sample's, and each masked token's
        sources = np.array([int(x["source"]) for x in items], dtype=np.int64)
        batch["sources"] = torch.from_numpy(sources)
        batch["mlm_sources"] = torch.from_numpy(np.repeat(sources, [len(x["labels"]) for x in items])[where])
    return batch


class StepBatchSampler(torch.utils.data.Sampler):
    """Global sample numbers for this rank, micro batch by micro batch, from a saved data position.

    Each optimizer step consumes global_batch consecutive numbers; rank r takes its contiguous share and
    splits it into micro batches. The global batch contents thus do not depend on the number of processes.
    """

    def __init__(self, start: int, global_batch: int, micro_batch: int, rank: int, world_size: int):
        self.start, self.global_batch, self.micro_batch = start, global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.per_rank = global_batch // world_size

    def __iter__(self) -> Iterator[list[int]]:
        base = self.start
        while True:
            mine = base + self.rank * self.per_rank
            for m in range(0, self.per_rank, self.micro_batch):
                yield list(range(mine + m, mine + m + self.micro_batch))
            base += self.global_batch

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress reporting
        return 2**62
