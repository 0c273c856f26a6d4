"""`pretrain`'s start-up memory does not grow with the corpus: the store is memory-mapped and read where a sample
needs it, so a corpus ten times larger costs the process no more memory before its first step (what does grow: the
split's document ranges and the sample index, a few bytes a document)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from domainlm.data import store as store_module
from domainlm.data.store import Corpus, CorpusWriter
from domainlm.data.tokenize import vocab_hash
from domainlm.errors import DomainLMError

SENTENCE_TOKENS = (8, 57)  # uniform: 32 on average
DOC_SENTENCES = 100


def write_store(folder, n_sentences: int, tokenizer, seed: int = 0, old: bool = False) -> str:
    """A store of random text tokens, `n_sentences` in documents of 100, written with CorpusWriter (a few seconds for
    2M sentences); `old`: without the largest id in meta.json, as stores were written before it was."""
    first = max(tokenizer.all_special_ids) + 1
    writer = CorpusWriter(folder, len(tokenizer))
    rng = np.random.default_rng(seed)
    for lo in range(0, n_sentences, 1 << 16):
        lengths = rng.integers(*SENTENCE_TOKENS, size=min(1 << 16, n_sentences - lo))
        ids = rng.integers(first, len(tokenizer), size=int(lengths.sum())).astype(np.int64)
        starts = rng.random(len(ids)) < 0.6
        cuts = np.cumsum(lengths)[DOC_SENTENCES - 1 :: DOC_SENTENCES]
        a = 0
        for d, b in enumerate(np.concatenate([cuts, [len(ids)]]) if cuts[-1] < len(ids) else cuts):
            sl = lengths[d * DOC_SENTENCES : (d + 1) * DOC_SENTENCES]
            writer.add(ids[a:b], sl, starts[a:b])
            a = b
    writer.close({"tokenizer": "synthetic", "vocab_hash": vocab_hash(tokenizer), "word_starts": "random",
                  "fingerprint": f"synthetic-{n_sentences}-{seed}"})
    if old:
        meta = json.loads((folder / "meta.json").read_text())
        del meta["max_token_id"]
        (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def start(store: str, model: str, out) -> subprocess.Popen:
    """`pretrain --max-steps 1` in one process (no DataLoader worker), as a user would type it."""
    cmd = [sys.executable, "-m", "domainlm.cli", "pretrain", "--corpus", store, "--model", model, "--out", str(out),
           "--max-steps", "1", "--max-seq-len", "64", "--num-workers", "0", "--no-tensorboard", "--eval-iters", "1",
           "--test-iters", "1", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def peak_rss_mib(proc: subprocess.Popen) -> float:
    """The peak resident memory of a finished process, in MiB (mapped file pages it touched count too)."""
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, output[-3000:]
    return usage.ru_maxrss / 1024


def test_start_up_memory_does_not_grow_with_the_corpus(tmp_path, tiny_model, tokenizer):
    """A store of 2M sentences (64M tokens: 200 MB on disk) against one of 200k: the same peak memory within 5%.
    Mapping tokens.bin whole at start-up (to check its ids) made it 16% more. The stores are old ones (no largest
    id in meta.json), so that the check of their ids reads all of tokens.bin."""
    try:
        stores = [write_store(tmp_path / f"store-{n}", n, tokenizer, old=True) for n in (200_000, 2_000_000)]
        runs = [start(store, tiny_model, tmp_path / f"out-{i}") for i, store in enumerate(stores)]  # side by side
        small, large = (peak_rss_mib(p) for p in runs)
    finally:
        for folder in tmp_path.glob("store-*"):
            shutil.rmtree(folder)
    assert large / small < 1.05, f"peak memory {small:.0f} MiB with 200k sentences, {large:.0f} MiB with 2M"


def test_the_largest_id_is_kept_in_meta_and_an_old_store_is_scanned(tmp_path, tokenizer, monkeypatch):
    corpus = Corpus(write_store(tmp_path / "new", 5000, tokenizer))
    top = int(np.asarray(corpus.tokens).max())
    assert corpus.meta["max_token_id"] == corpus.max_token_id() == top
    old = Corpus(write_store(tmp_path / "old", 5000, tokenizer, old=True))
    monkeypatch.setattr(store_module, "SCAN_TOKENS", 1000)  # many reads, the last one short
    assert "max_token_id" not in old.meta and old.n_tokens % 1000 and old.max_token_id() == top
    old.check_ids(top + 1, "the vocabulary of --model m")
    for c in (corpus, old):
        with pytest.raises(DomainLMError, match=rf"^{c.path}: token id {top} is beyond the vocabulary of --model m "
                                                rf"\({top} entries\); prepare the corpus with the model's tokenizer$"):
            c.check_ids(top, "the vocabulary of --model m")
