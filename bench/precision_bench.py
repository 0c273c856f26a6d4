"""`domainlm pretrain`, whole commands, at several precisions: fp32, auto (bf16 where the device has native bf16:
a GPU, or a CPU with AVX512_BF16 or AMX), bf16, bf16 + `--compile`, and padded (`--no-unpad`) variants.

Each setting runs the real command in its own process (Accelerate fixes the precision once per process) on a
prepared corpus, from the same random weights (BERT-base shape by default), and reports the training tokens/s
of its logged windows after the first (all their tokens over all their training time; the first window holds
start-up and, with `--compile`, compilation) and the whole command's wall time. The baseline is fp32, the
precision a user gets on a device without native bf16. The header names the CPU's features and what auto is there.

    python bench/precision_bench.py --corpus runs/demo/corpus-news        # ~3 minutes on one H100
    python bench/precision_bench.py --corpus STORE --settings "bf16,bf16 padded" --seq 256 --batch-size 128
    # a CPU: auto (bf16 where native) against fp32, ERNIE micro's width and depth, settings in turns
    python bench/precision_bench.py --corpus runs/demo/corpus-news --settings fp32,auto --layers 4 --hidden 384 \
        --batch-size 16 --steps 40 --repeats 3
    # the demo's domain step on a CPU: short reviews, MLM only
    python bench/precision_bench.py --corpus runs/demo/corpus-reviews --settings fp32,auto --layers 4 --hidden 384 \
        --batch-size 32 --steps 40 --extra=--no-binary-head --repeats 3

With --repeats N the settings run in turns, N times, so that a shared machine's slow minutes fall on both; each
turn's ratio is printed, then the ratio of the medians and the median of the turns' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "fp32": ["--precision", "fp32"],
    "auto": ["--precision", "auto"],
    "bf16": ["--precision", "bf16"],
    "bf16 + compile": ["--precision", "bf16", "--compile"],
    "bf16 padded": ["--precision", "bf16", "--no-unpad"],
    "fp32 padded": ["--precision", "fp32", "--no-unpad"],
    "auto padded": ["--precision", "auto", "--no-unpad"],
}


def _run(args, work: Path, name: str, flags: list[str], log_every: int, turn: int) -> float | None:
    """One `pretrain` command; its training tokens/s over the logged windows after the first."""
    out = work / f"{name.replace(' ', '')}-{turn}"
    started = time.perf_counter()
    with open(work / f"{out.name}.log", "w") as log:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "domainlm.cli",
                "pretrain",
                "--corpus",
                args.corpus,
                "--out",
                str(out),
                "--model",
                str(work / "config"),
                "--from-scratch",
                "--max-seq-len",
                str(args.seq),
                "--batch-size",
                str(args.batch_size),
                "--max-steps",
                str(args.steps),
                "--logging-freq",
                str(log_every),
                "--eval-steps",
                str(10**9),
                "--checkpoint-steps",
                str(10**9),
                "--no-tensorboard",
                *flags,
            ],
            env=os.environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if not (out / "results.json").is_file():
        tail = (work / f"{out.name}.log").read_text(encoding="utf-8").splitlines()[-5:]
        print(f"{name}: failed:\n  " + "\n  ".join(tail))
        return None
    wall = time.perf_counter() - started
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    windows = [r for r in logs if r.get("split") == "train" and "tokens_per_s" in r][1:]
    # every setting trains on the same batches, window by window; later windows hold longer texts (slower per token),
    # so the rate is all their tokens over all their training time, not a median that could pick unlike windows
    tokens = sum(r["tokens"] for r in windows)
    rate = tokens / sum(r["tokens"] / r["tokens_per_s"] for r in windows)
    middle = statistics.median(r["tokens_per_s"] for r in windows)
    print(
        f"{name:16} {rate:>10,.0f} tokens/s over {len(windows)} windows (their median {middle:,.0f})   "
        f"whole command {wall:.0f} s"
    )
    return rate


def main() -> None:
    import torch
    from transformers import BertConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True, help="a `domainlm prepare` output folder")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument(
        "--settings",
        default=None,
        help=f"comma list of: {', '.join(SETTINGS)} (default: fp32,bf16,bf16 + compile on a GPU, fp32,auto on a CPU)",
    )
    parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (the demo uses 0)")
    parser.add_argument("--extra", default="", help="more `pretrain` flags for every setting, space-separated")
    parser.add_argument("--repeats", type=int, default=1, help="turns over the settings (medians are reported)")
    args = parser.parse_args()
    from domainlm.precision import cpu_bf16_feature, describe_cpu, resolve

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.settings = args.settings or ("fp32,bf16,bf16 + compile" if device == "cuda" else "fp32,auto")
    unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
    if unknown:
        sys.exit(f"--settings: {', '.join(unknown)} not among {', '.join(SETTINGS)}")
    print(describe_cpu())
    auto, why = resolve("auto", device)
    print(f"auto on this {device}: {auto} ({why})", flush=True)
    if device == "cpu" and not cpu_bf16_feature() and any(s.startswith("bf16") for s in args.settings.split(",")):
        print("note: this CPU has no native bf16; bf16 settings run emulated (slower than fp32)")
    work = Path(tempfile.mkdtemp(prefix="domainlm-precision-"))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(Path(args.corpus) / "tokenizer")))  # the store's own vocabulary
    BertConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=512,
        hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
    ).save_pretrained(work / "config")
    log_every = max(1, args.steps // 4)
    rates: dict[str, list[float]] = {}
    turns: dict[str, list[float]] = {}  # each setting against the first in the same turn: a slow minute hits both
    workers = [] if args.num_workers is None else ["--num-workers", str(args.num_workers)]
    names = args.settings.split(",")
    for turn in range(args.repeats):
        ran = {}  # this turn's rates
        for name in names:
            rate = _run(args, work, name, SETTINGS[name] + workers + args.extra.split(), log_every, turn)
            if rate is not None:
                rates.setdefault(name, []).append(rate)
                ran[name] = rate
        if names[0] in ran:
            paired = {n: ran[n] / ran[names[0]] for n in names[1:] if n in ran}
            for n, ratio in paired.items():
                turns.setdefault(n, []).append(ratio)
            if args.repeats > 1:
                print("  turn", turn + 1, "  ".join(f"{n} {ratio:.2f}x" for n, ratio in paired.items()))
    rates = {name: statistics.median(r) for name, r in rates.items()}
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{where}, {args.layers}x{args.hidden}, vocabulary {vocab:,}, micro batch {args.batch_size} x {args.seq} tokens"
    )
    first = next(iter(rates), None)
    for name, rate in rates.items():
        if name != first:
            paired = turns.get(name, [])
            paired = f", median of the turns' ratios {statistics.median(paired):.2f}x" if len(paired) > 1 else ""
            print(f"ratio {name} vs {first}: {rate / rates[first]:.2f}x (medians){paired}")


if __name__ == "__main__":
    main()
