"""Several corpora in one pretraining run, drawn by weight (Megatron-LM's data blending, without its random choice).

    --corpus general:0.3 --corpus domain:0.7        (YAML: corpus: [general:0.3, domain:0.7], or a list of
                                                    {path: ..., weight: ...})

Each corpus keeps everything a single corpus has: its own split, its own sample index (cached in its own store) and its
own epoch order. What the blend adds is which corpus the g-th sample of the run comes from, and which of that corpus's
samples it is. The weights, made whole numbers W_1..W_K (0.3 and 0.7 become 3 and 7), define one period of
P = W_1 + ... + W_K samples in which corpus k has exactly W_k, spread evenly: its j-th sample sits at (j + 1/2) / W_k of
the period (smooth weighted round robin; ties go to the corpus named first). Sample g is in period g // P at place
g % P, so any sample is found in constant time from g alone: a resumed run (or a restarted worker) draws exactly the
samples, in exactly the order, an uninterrupted one draws, and the shares hold to within one sample in every period,
not only on average. A corpus's k-th sample is the k-th of its own order, as if it were trained alone; only its
masking draws from the run's sample number, so that two corpora never share masking numbers.

One corpus given alone (with or without a weight) runs as before, byte for byte.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from domainlm.errors import DomainLMError

MAX_PERIOD = 1 << 20


@dataclass
class CorpusSpec:
    path: str
    weight: float
    name: str = ""


def _spec(item, where: str) -> CorpusSpec:
    if isinstance(item, dict):
        unknown = set(item) - {"path", "weight"}
        if "path" not in item or unknown:
            raise DomainLMError(
                f"{where}: a corpus given as a mapping has `path` and an optional `weight`, got {item!r}"
            )
        path, weight = str(item["path"]), item.get("weight", 1.0)
    elif isinstance(item, str):
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not Path(item).is_dir():  # PATH:WEIGHT (a folder whose name ends in :N is a folder)
            with contextlib.suppress(ValueError):
                path, weight = head, float(tail)
    else:
        raise DomainLMError(f"{where}: expected a corpus folder, PATH:WEIGHT or {{path, weight}}, got {item!r}")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        raise DomainLMError(f"{where}: the weight of {path} must be a positive number, got {weight!r}")
    return CorpusSpec(path, float(weight))


def specs(value, where: str = "--corpus") -> list[CorpusSpec]:
    """The corpora of --corpus: one folder (as always), PATH:WEIGHT, or a list of them; named by their folders."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise DomainLMError(f"{where}: no corpus given")
    out = [_spec(item, where) for item in items]
    seen: dict[str, str] = {}
    for spec in out:
        key = os.path.normpath(os.path.abspath(spec.path))  # text only: a check of options touches no file
        if key in seen:
            raise DomainLMError(f"{where}: {spec.path} is given twice; give each corpus once, with its weight")
        seen[key] = spec.path
        base = Path(key).name or "corpus"
        names = {s.name for s in out if s.name}
        spec.name = (
            base
            if base not in names
            else next(f"{base}-{i}" for i in range(2, len(out) + 2) if f"{base}-{i}" not in names)
        )
    return out


def inputs(value) -> dict[str, str]:
    """The run folder's inputs: the corpus folders, by the flag that names them."""
    chosen = specs(value)
    return {"--corpus": chosen[0].path} if len(chosen) == 1 else {f"--corpus {s.path}": s.path for s in chosen}


def several(value) -> bool:
    return isinstance(value, list) and len(value) > 1


def paths(value) -> list[str]:
    return [s.path for s in specs(value)]


def whole_weights(weights: list[float]) -> list[int]:
    """Weights as the smallest whole numbers in the same ratio (each given to 6 significant digits)."""
    fractions = [Fraction(f"{w:.6g}") for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    whole = [int(f * scale) for f in fractions]
    common = math.gcd(*whole)
    whole = [w // common for w in whole]
    if sum(whole) > MAX_PERIOD:  # weights like 0.123457 and 0.876543: proportions to one in a million
        total = sum(weights)
        whole = [max(1, round(w / total * MAX_PERIOD)) for w in weights]
        common = math.gcd(*whole)
        whole = [w // common for w in whole]
    return whole


class Blend:
    """Which corpus the g-th sample of a run comes from, and which of that corpus's samples it is."""

    def __init__(self, weights: list[float]):
        self.whole = whole_weights(weights)
        self.period = sum(self.whole)
        keys = np.concatenate([(2 * np.arange(w) + 1) / (2 * w) for w in self.whole])
        corpus = np.concatenate([np.full(w, k) for k, w in enumerate(self.whole)])
        rank = np.concatenate([np.arange(w) for w in self.whole])
        order = np.lexsort((corpus, keys))
        self.corpus = corpus[order].astype(np.int64)  # place in the period -> corpus
        self.rank = rank[order].astype(np.int64)  # place in the period -> its number among that corpus's places

    def locate(self, g: int) -> tuple[int, int]:
        period, place = divmod(int(g), self.period)
        k = int(self.corpus[place])
        return k, period * self.whole[k] + int(self.rank[place])

    def counts(self, n: int) -> list[int]:
        """Samples of each corpus among the first n."""
        period, place = divmod(int(n), self.period)
        head = np.bincount(self.corpus[:place], minlength=len(self.whole))
        return [period * w + int(h) for w, h in zip(self.whole, head)]


class BlendedDataset(torch.utils.data.Dataset):
    """Sample g of a run: the corpus and its own sample number from the blend; the item says which corpus (`source`)."""

    def __init__(self, members: dict[int, object], weights: dict[int, float]):
        self.sources = sorted(members)
        self.members = members
        self.blend = Blend([weights[k] for k in self.sources])

    def __len__(self) -> int:
        return sum(len(self.members[k]) for k in self.sources)

    def __getitem__(self, g: int) -> dict:
        i, j = self.blend.locate(g)
        k = self.sources[i]
        item = self.members[k].item(j, key=g)
        item["source"] = np.int64(k)
        return item


class Mixture:
    """The run's corpora: their specs, per split the blended dataset, and what was drawn from each."""

    def __init__(
        self, corpora: list[CorpusSpec], per_corpus: list[dict], reports: list[dict], splits: list, max_tokens: int
    ):
        self.corpora, self.per_corpus, self.reports, self.splits = corpora, per_corpus, reports, splits
        self.max_tokens = max_tokens  # text tokens of a sample (special tokens aside)
        total = sum(c.weight for c in corpora)
        self.shares = [c.weight / total for c in corpora]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.corpora]

    def datasets(self) -> dict[str, BlendedDataset]:
        out = {}
        for split in ("train", "valid", "test"):
            members = {k: ds[split] for k, ds in enumerate(self.per_corpus) if split in ds}
            if members:
                out[split] = BlendedDataset(members, {k: self.corpora[k].weight for k in members})
        return out

    def data_report(self) -> dict:
        """data.json's account of the corpora: each one's split and samples, its weight and share."""
        return {
            "corpora": {
                c.name: {
                    "path": c.path,
                    "weight": c.weight,
                    "share": round(s, 6),
                    "splits": {k: v.pop("documents") for k, v in r.items()},
                    "split": split.summary(),
                    "samples": r,
                }
                for c, s, r, split in zip(self.corpora, self.shares, self.reports, self.splits)
            },
            "period": Blend([c.weight for c in self.corpora]).whole,
        }

    def train_report(self) -> dict:
        return {c.name: r["train"] for c, r in zip(self.corpora, self.reports)}

    def seen(self, consumed: int) -> dict:
        """Per corpus: its weight and share, and the training samples and tokens (each sample's text tokens, as the
        sample index counts them) the first `consumed` samples of the run drew from it."""
        counts = Blend([c.weight for c in self.corpora]).counts(consumed)
        return {
            c.name: {
                "weight": c.weight,
                "share": round(s, 6),
                "samples": n,
                "tokens": tokens_drawn(self.per_corpus[k]["train"], n, self.max_tokens),
            }
            for k, (c, s, n) in enumerate(zip(self.corpora, self.shares, counts))
        }


def tokens_drawn(dataset, count: int, max_tokens: int, chunk: int = 1 << 20) -> int:
    """Text tokens in a training dataset's first `count` samples (its epochs' orders, each sample cut at max_tokens)."""
    from domainlm.pretrain.samples import cached_epoch_order

    n = len(dataset.samples)
    offsets = dataset.corpus.sentence_offsets
    total = 0
    for start in range(0, count, chunk):
        numbers = np.arange(start, min(count, start + chunk))
        for epoch in np.unique(numbers // n).tolist():
            mine = numbers[numbers // n == epoch] % n
            order = cached_epoch_order(dataset.corpus.path / "cache", n, dataset.seed, epoch)
            picked = np.asarray(dataset.samples)[np.asarray(order)[mine]]
            lengths = np.asarray(offsets)[picked[:, 1]] - np.asarray(offsets)[picked[:, 0]]
            total += int(np.minimum(lengths, max_tokens).sum())
    return total


def build(cfg, corpora: list, one_corpus) -> Mixture:
    """Each corpus's split, sample index and datasets (`one_corpus(corpus) -> (datasets, reports, split)`, as a single
    corpus has them), joined into a Mixture."""
    chosen = specs(cfg.corpus)
    per_corpus, reports, splits = [], [], []
    for spec, corpus in zip(chosen, corpora):
        try:
            datasets, report, split = one_corpus(corpus)
        except DomainLMError as e:
            raise DomainLMError(f"--corpus {spec.path}: {e}") from None
        if "train" not in datasets:
            raise DomainLMError(f"--corpus {spec.path}: no training samples")
        per_corpus.append(datasets)
        reports.append(report)
        splits.append(split)
    mixture = Mixture(chosen, per_corpus, reports, splits, cfg.max_seq_len - (3 if cfg.binary_head else 2))
    if int(os.environ.get("RANK", "0")) == 0:
        shares = ", ".join(f"{c.name} {s:.1%}" for c, s in zip(chosen, mixture.shares))
        print(
            f"corpora: {shares} of the samples (blended in periods of {Blend([c.weight for c in chosen]).period})",
            file=sys.stderr,
        )
    return mixture
