"""Does `pretrain` start-up cost grow with the corpus? Time to the first optimizer step and peak memory, on
synthetic corpus stores of 1M and 10M sentences (32 tokens a sentence, ~10 sentences a document: the 10M
store is 320M tokens in ~980k documents), with a tiny model so that the data side is what is measured.

For each store and each code tree (this one, and optionally a baseline checkout given by --baseline SRC),
`python -m domainlm.cli pretrain --max-steps 2 --logging-freq 1` runs as a user would type it; the bench
stops it at the first logged training step and reads the process's peak RSS (VmHWM) at that moment, plus
that of its DataLoader worker. "cold": the sample index cache is removed first; "warm": it is reused.
Also the sample index build alone, in this process (seconds, peak RSS growth).

    flock /tmp/bench.lock python bench/pretrain_scale_bench.py --baseline /work/main/src
    python bench/pretrain_scale_bench.py --sizes 100000 --no-baseline      # a quick look

Stores are written once (numpy, in the store format) under --work and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent / "src"
SENTENCE_TOKENS = (8, 57)  # uniform: mean 32
DOC_SENTENCES_MEAN = 10.2


def make_store(folder: Path, n_sentences: int, vocab_size: int, vocab_hash: str, seed: int = 0) -> Path:
    """A store of random tokens written straight in the store's format (numpy, chunk by chunk)."""
    from domainlm.data.store import FORMAT, VERSION, token_dtype

    if (folder / "meta.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    dtype = token_dtype(vocab_size)
    n_tokens, chunk, top = 0, 1_000_000, -1
    with (
        open(folder / "tokens.bin", "wb") as ft,
        open(folder / "words.bin", "wb") as fw,
        open(folder / "sentences.bin", "wb") as fs,
    ):
        fs.write(np.zeros(1, "<i8").tobytes())
        for lo in range(0, n_sentences, chunk):
            lengths = rng.integers(*SENTENCE_TOKENS, size=min(chunk, n_sentences - lo))
            k = int(lengths.sum())
            ids = rng.integers(5, vocab_size, size=k)
            top = max(top, int(ids.max()))
            ft.write(ids.astype(dtype.newbyteorder("<")).tobytes())
            fw.write((rng.random(k) < 0.6).astype(np.uint8).tobytes())
            fs.write((n_tokens + np.cumsum(lengths)).astype("<i8").tobytes())
            n_tokens += k
    sizes = rng.geometric(1 / DOC_SENTENCES_MEAN, size=n_sentences)  # more than enough documents
    ends = np.cumsum(sizes)
    ends = ends[ends < n_sentences]
    documents = np.concatenate([[0], ends, [n_sentences]]).astype("<i8")
    documents.tofile(folder / "documents.bin")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "n_documents": len(documents) - 1,
        "n_sentences": n_sentences,
        "n_tokens": n_tokens,
        "max_token_id": top,
        "tokenizer": "synthetic",
        "vocab_hash": vocab_hash,
        "word_starts": "random",
        "fingerprint": f"synthetic-{n_sentences}-{seed}",
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))
    return folder


def make_model(folder: Path, seq: int):
    """A 2-layer, 32-wide BERT and its WordPiece vocabulary (600 entries)."""
    from domainlm.data.tokenize import vocab_hash
    from domainlm.vocab import train_wordpiece

    if not (folder / "config.json").is_file():
        import torch
        from transformers import BertConfig, BertForPreTraining

        texts = [
            "酒店的服务非常好，房间干净整洁。早餐的品种很丰富！",
            "工程的进度计划需要按时完成。质量验收标准必须严格执行。",
            "The hotel was clean and quiet. The schedule slipped by 3.5 days.",
        ] * 20
        tok = train_wordpiece(texts, folder, vocab_size=600)
        torch.manual_seed(0)
        BertForPreTraining(
            BertConfig(
                vocab_size=len(tok),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=seq,
            )
        ).save_pretrained(folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return len(tok), vocab_hash(tok)


def _peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(x) for x in (task / "children").read_text().split()]
    return out


def run_to_first_step(src: Path, store: Path, model: Path, out: Path, seq: int, timeout: float) -> dict:
    """Start the CLI, wait for its first training step, read peak RSS, stop it."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "domainlm.cli",
        "pretrain",
        "--corpus",
        str(store),
        "--model",
        str(model),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--max-seq-len",
        str(seq),
        "--logging-freq",
        "1",
        "--checkpoint-steps",
        "0",
        "--no-tensorboard",
        "--precision",
        "auto",
        # the flag's old name: a baseline from before the renaming knows only it (this tree takes it as an alias)
        "--eval-freq",
        "0",
    ]
    started = time.perf_counter()
    # its own process group, so that stopping it also stops its DataLoader worker
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines, result = [], None
    worker_peak = 0
    for line in proc.stdout:
        lines.append(line)
        for child in _children(proc.pid):
            worker_peak = max(worker_peak, _peak_kib(child))
        if line.startswith("[train] step 1 "):
            result = {
                "seconds": time.perf_counter() - started,
                "peak_mib": _peak_kib(proc.pid) / 1024,
                "worker_peak_mib": worker_peak / 1024,
            }
            break
        if time.perf_counter() - started > timeout:
            break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group this bench started
    proc.wait()
    if result is None:
        raise SystemExit(f"{' '.join(cmd)} did not reach step 1:\n{''.join(lines[-30:])}")
    return result


def index_build(src: Path, store: Path, seq: int) -> dict:
    """Split and sample index of every split, built in a fresh process of one tree (cache removed first)."""
    code = f"""
import json, time
from domainlm.data.store import Corpus
from domainlm.pretrain import samples as S
def status(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on, not the imports'
before = status("VmRSS:")
t = time.perf_counter()
corpus = Corpus({str(store)!r})
ratios = S.parse_split("98,1,1")
if hasattr(S, "split_corpus"):
    parts = S.split_corpus(corpus, ratios, 1234, {seq - 3}, 2).ranges
else:  # the code before sentence ranges: document ids
    parts = S.split_documents(corpus.n_documents, ratios, 1234)
for name, part in parts.items():
    if len(part):
        S.cached_samples(corpus, name, part, {seq - 3}, 0.1 if name == "train" else 0.0, 2, 1234)
print(json.dumps({{"seconds": time.perf_counter() - t,
                   "rss_growth_mib": (status("VmHWM:") - before) / 1024}}))
"""
    shutil.rmtree(store / "cache", ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000", help="sentences per synthetic store")
    ap.add_argument("--work", default="/tmp/domainlm-scale-bench")
    ap.add_argument("--baseline", default="/work/main/src", help="src folder of the code to compare with")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--index-only", action="store_true", help="only the sample index build, not the command")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from domainlm.precision import describe_cpu

    print(describe_cpu(), flush=True)
    work = Path(args.work)
    vocab, vhash = make_model(work / "model", args.seq)
    sizes = [int(x) for x in args.sizes.split(",")]
    trees = {"domainlm": HERE} if args.no_baseline else {"baseline": Path(args.baseline), "domainlm": HERE}
    rows: dict[tuple[str, str, int], dict] = {}
    builds = {}
    for n in sizes:
        t = time.perf_counter()
        store = make_store(work / f"store-{n}", n, vocab, vhash)
        meta = json.loads((store / "meta.json").read_text())
        print(
            f"store {n:,} sentences: {meta['n_documents']:,} documents, {meta['n_tokens']:,} tokens "
            f"({time.perf_counter() - t:.0f} s to make or find)",
            flush=True,
        )
        for name, src in trees.items():
            builds[(name, n)] = index_build(src, store, args.seq)
            print(
                f"  {name:9s} sample index build: {builds[(name, n)]['seconds']:.2f} s, "
                f"peak RSS growth {builds[(name, n)]['rss_growth_mib']:.0f} MiB",
                flush=True,
            )
        for name, src in trees.items():
            for phase in () if args.index_only else ("cold", "warm"):
                if phase == "cold":
                    shutil.rmtree(store / "cache", ignore_errors=True)
                r = run_to_first_step(
                    src, store, work / "model", work / f"out-{name}-{phase}-{n}", args.seq, args.timeout
                )
                rows[(name, phase, n)] = r
                print(
                    f"  {name:9s} {phase}: first step after {r['seconds']:6.1f} s, peak RSS {r['peak_mib']:6.0f} MiB "
                    f"(+ worker {r['worker_peak_mib']:.0f} MiB)",
                    flush=True,
                )
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nratios {hi:,} / {lo:,} sentences (1.0 = flat):")
        for name in trees:
            a, b = builds[(name, lo)], builds[(name, hi)]
            print(
                f"  {name:9s} index build: time x{b['seconds'] / a['seconds']:.2f}, "
                f"peak RSS growth x{b['rss_growth_mib'] / max(a['rss_growth_mib'], 1):.2f}"
            )
            if args.index_only:
                continue
            for phase in ("cold", "warm"):
                a, b = rows[(name, phase, lo)], rows[(name, phase, hi)]
                print(
                    f"  {name:9s} {phase}: start-up time x{b['seconds'] / a['seconds']:.2f}, "
                    f"peak RSS x{b['peak_mib'] / a['peak_mib']:.2f}, "
                    f"worker peak RSS x{b['worker_peak_mib'] / max(a['worker_peak_mib'], 1):.2f}"
                )
    if "baseline" in trees and not args.index_only:
        print("\ndomainlm / baseline at each size (below 1.0: domainlm is cheaper):")
        for n in sizes:
            for phase in ("cold", "warm"):
                a, b = rows[("baseline", phase, n)], rows[("domainlm", phase, n)]
                print(
                    f"  {n:>11,} {phase}: time x{b['seconds'] / a['seconds']:.2f}, "
                    f"peak RSS x{b['peak_mib'] / a['peak_mib']:.2f}"
                )


if __name__ == "__main__":
    main()
