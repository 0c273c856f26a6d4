"""`pretrain`'s start-up memory does not grow with the corpus: the store is memory-mapped and read where a sample
needs it (a process holds the mapped pages it touches), so a corpus ten times larger costs the process no more
memory before its first step; what does grow is a few bytes a document (the split's document ranges) and, on the
first run, the sample index it builds and caches. Also: the store's largest token id, kept in meta.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    writer.close(
        {
            "tokenizer": "synthetic",
            "vocab_hash": vocab_hash(tokenizer),
            "word_starts": "random",
            "fingerprint": f"synthetic-{n_sentences}-{seed}",
        }
    )
    if old:
        meta = json.loads((folder / "meta.json").read_text())
        del meta["max_token_id"]
        (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def start(store: str, model: str, out) -> subprocess.Popen:
    """`pretrain --max-steps 3` in one process (no DataLoader worker), as a user would type it; a fifth of the
    documents held out, so that what reads the held-out documents' offsets shows."""
    cmd = [
        sys.executable,
        "-m",
        "domainlm.cli",
        "pretrain",
        "--corpus",
        store,
        "--model",
        model,
        "--out",
        str(out),
        "--max-steps",
        "3",
        "--logging-freq",
        "1",
        "--max-seq-len",
        "64",
        "--num-workers",
        "0",
        "--no-tensorboard",
        "--eval-iters",
        "1",
        "--test-iters",
        "1",
        "--precision",
        "fp32",
        "--split",
        "80,10,10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def memory_mib(proc: subprocess.Popen) -> tuple[float, float]:
    """(resident memory at the first training step, peak resident memory of the whole run) of a process, in MiB;
    mapped file pages it touched count in both."""
    at_step, output = 0.0, []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("[train] step 1 ") and not at_step:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            at_step = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS:")) / 1024
    _, code, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(code)
    assert proc.returncode == 0 and at_step, "".join(output[-40:])
    return at_step, usage.ru_maxrss / 1024


def test_start_up_memory_does_not_grow_with_the_corpus(tmp_path, tiny_model, tokenizer):
    """A store of 2M sentences (64M tokens: 200 MB on disk) against one of 200k, `pretrain` run twice on each (the
    first builds the sample index and caches it, the second reads it): the same peak memory within 5%, and at the
    second run's first step the same resident memory within 3%. Mapping tokens.bin whole at start-up (to check its
    ids) made them 16% and 30% more; reading the held-out documents' sentence offsets through the map 4% more at
    the first step. The stores are old ones (no largest id in meta.json), so that the check of
    their ids reads all of tokens.bin. (The first run's index build adds about 12 bytes a sentence for a while: the
    sentence offsets it reads and the index it writes.)"""

    def twice(i: int, store: str) -> tuple[float, float]:
        cold = memory_mib(start(store, tiny_model, tmp_path / f"cold-{i}"))
        return cold[1], memory_mib(start(store, tiny_model, tmp_path / f"warm-{i}"))[0]

    try:
        stores = [write_store(tmp_path / f"store-{n}", n, tokenizer, old=True) for n in (200_000, 2_000_000)]
        with ThreadPoolExecutor(2) as pool:  # the two stores side by side
            (small_peak, small_step), (large_peak, large_step) = pool.map(twice, range(2), stores)
    finally:
        for folder in tmp_path.glob("store-*"):
            shutil.rmtree(folder)
    assert large_peak / small_peak < 1.05, (
        f"peak memory {small_peak:.0f} MiB with 200k sentences, {large_peak:.0f} with 2M"
    )
    assert large_step / small_step < 1.03, (
        f"memory at the first step {small_step:.0f} MiB with 200k sentences, {large_step:.0f} with 2M"
    )


def test_the_largest_id_is_kept_in_meta_and_an_old_store_is_scanned(tmp_path, tokenizer, monkeypatch):
    corpus = Corpus(write_store(tmp_path / "new", 5000, tokenizer))
    top = int(np.asarray(corpus.tokens).max())
    assert corpus.meta["max_token_id"] == corpus.max_token_id() == top
    old = Corpus(write_store(tmp_path / "old", 5000, tokenizer, old=True))
    monkeypatch.setattr(store_module, "SCAN_TOKENS", 1000)  # many reads, the last one short
    assert "max_token_id" not in old.meta and old.n_tokens % 1000 and old.max_token_id() == top
    old.check_ids(top + 1, "the vocabulary of --model m")
    picks = [0, 7, 4999, 5000, 123]
    assert old.read_sentence_offsets(picks).tolist() == np.asarray(old.sentence_offsets)[picks].tolist()
    for c in (corpus, old):
        with pytest.raises(
            DomainLMError,
            match=rf"^{c.path}: token id {top} is beyond the vocabulary of --model m "
            rf"\({top} entries\); prepare the corpus with the model's tokenizer$",
        ):
            c.check_ids(top, "the vocabulary of --model m")
