"""The cost of pretraining at scale on the data side: `domainlm merge` throughput, and the per-step overhead of several
corpora (`pretrain --corpus A:0.5 --corpus B:0.5`) against one.

Corpus: synthetic Chinese documents (sentences of characters drawn from a fixed pool, with a share of exact and near
duplicates across files), written as --files files of about --mb MB in all; a WordPiece vocabulary trained on them.
1. merge: `prepare --shard I/N` for each of --shards shards (timed apart), then `domainlm merge` of the shards (every
   duplicate decision taken again), and of the same number of stores prepared apart (concatenation). Prints seconds,
   MB/s of store data read, MB/s of the raw text behind it and documents/s; with --verify, also one `prepare` over all
   the inputs and whether the merged store is byte for byte that one.
2. several corpora: the same `pretrain` (model --shape, --steps steps after --warmup, global batch --batch) on one store
   and on two stores of the same documents blended 0.5/0.5. Prints the median tokens/s of the training windows (the
   loop's own measure, evaluation and checkpoints excluded) and the overhead of the blend. Also the data path alone
   (sample, mask, collate: a global batch's items) per step, for one corpus and two.

    python bench/corpora_bench.py --mb 2 --shards 2 --steps 10 --shape tiny        # a check that it runs, ~2 minutes
    python bench/corpora_bench.py --mb 200 --files 16 --shards 4 --verify          # merge at size
    python bench/corpora_bench.py --skip-merge --shape micro --steps 200 --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    "micro": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
POOL = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权"
    "收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信"
    "马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连"
    "断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存"
    "候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"
)


def documents(n_bytes: float, seed: int, dup_share: float) -> list[str]:
    """Documents of 3-12 sentences; a `dup_share` of them repeat an earlier one exactly or with one sentence changed."""
    rng = random.Random(seed)

    def sentence() -> str:
        return "".join(rng.choice(POOL) for _ in range(rng.randint(8, 30))) + rng.choice("。！？；")

    docs, size = [], 0
    while size < n_bytes:
        if docs and rng.random() < dup_share:
            earlier = rng.choice(docs).split("\n")
            if rng.random() < 0.5:
                earlier[rng.randrange(len(earlier))] = sentence()
            doc = "\n".join(earlier)
        else:
            doc = "\n".join(sentence() for _ in range(rng.randint(3, 12)))
        docs.append(doc)
        size += len(doc.encode("utf-8")) + 2
    return docs


def write_inputs(folder: Path, mb: float, files: int, dup_share: float) -> list[Path]:
    folder.mkdir(parents=True)
    docs = documents(mb * 1e6, 0, dup_share)
    per = -(-len(docs) // files)
    paths = []
    for i in range(files):
        path = folder / f"part-{i:03d}.txt"
        path.write_text("\n\n".join(docs[i * per : (i + 1) * per]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def cli(*args: str) -> float:
    """Run `domainlm ARGS` in a process of its own (imports included, as a user runs it); its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "domainlm.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"domainlm {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def store_mb(folder: Path) -> float:
    return sum((folder / n).stat().st_size for n in ("tokens.bin", "words.bin", "sentences.bin", "documents.bin")) / 1e6


def bench_merge(work: Path, inputs: list[Path], tokenizer: Path, shards: int, verify: bool, workers: int) -> dict:
    common = ["--tokenizer", str(tokenizer), "--workers", str(workers), "--segment"]
    raw_mb = sum(p.stat().st_size for p in inputs) / 1e6
    prepared = []
    for i in range(1, shards + 1):
        out = work / f"shard-{i}"
        seconds = cli("prepare", *map(str, inputs), "--out", str(out), "--shard", f"{i}/{shards}", *common)
        prepared.append(seconds)
    merged = work / "merged"
    merge_s = cli("merge", *(str(work / f"shard-{i}") for i in range(1, shards + 1)), "--out", str(merged))
    stats = json.loads((merged / "stats.json").read_text())
    shard_mb = sum(store_mb(work / f"shard-{i}") for i in range(1, shards + 1))
    result = {
        "raw_mb": round(raw_mb, 1),
        "shards": shards,
        "prepare_shard_s": [round(s, 1) for s in prepared],
        "merge_s": round(merge_s, 2),
        "merge_inner_s": stats["seconds"],
        "store_mb_read": round(shard_mb, 1),
        "merge_mb_per_s": round(shard_mb / merge_s, 1),
        "merge_raw_mb_per_s": round(raw_mb / merge_s, 1),
        "merge_documents_per_s": round(stats["documents"] / merge_s),
        "documents": stats["documents"],
        "duplicates_exact": stats["duplicates_exact"],
        "duplicates_near": stats["duplicates_near"],
    }
    # stores prepared apart (each shard's files as a corpus of its own): concatenated, no duplicate decisions
    apart = []
    for i in range(1, shards + 1):
        taken = json.loads((work / f"shard-{i}" / "shard" / "shard.json").read_text())["taken"]
        out = work / f"apart-{i}"
        cli("prepare", *(str(inputs[t]) for t in taken), "--out", str(out), *common)
        apart.append(out)
    concat_s = cli("merge", *map(str, apart), "--out", str(work / "concatenated"))
    apart_mb = sum(store_mb(p) for p in apart)
    result.update(concatenate_s=round(concat_s, 2), concatenate_mb_per_s=round(apart_mb / concat_s, 1))
    if verify:
        one = work / "one"
        result["prepare_all_s"] = round(cli("prepare", *map(str, inputs), "--out", str(one), *common), 1)
        result["byte_for_byte"] = all(
            (one / n).read_bytes() == (merged / n).read_bytes()
            for n in ("tokens.bin", "words.bin", "sentences.bin", "documents.bin", "meta.json")
        )
    return result


def tiny_model(folder: Path, tokenizer: Path, shape: str, seq: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForPreTraining

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    BertForPreTraining(
        BertConfig(vocab_size=len(tok), max_position_embeddings=max(512, seq), **SHAPES[shape])
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tokens_per_s(run: Path, skip: int) -> float:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if r["split"] == "train" and r["step"] > skip]
    return statistics.median(speeds)


def data_path_ms(corpora: list[str], model: Path, seq: int, batch: int, steps: int) -> float:
    """Milliseconds per global batch to draw, mask and collate its samples (pretrain's own datasets), no model."""
    from domainlm.pretrain.checks import check
    from domainlm.pretrain.command import _datasets
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.dataset import collate_packed
    from domainlm.pretrain.mixture import build, several
    from domainlm.train.setup import make_accelerator

    cfg = PretrainConfig(
        corpus=corpora if len(corpora) > 1 else corpora[0],
        model=str(model),
        out="unused",
        max_seq_len=seq,
        batch_size=batch,
    )
    found, errors = check(cfg)
    assert not errors, errors
    accelerator = make_accelerator("fp32")
    if several(cfg.corpus):
        mix = build(cfg, found.corpora, lambda c: _datasets(cfg, accelerator, c, found.tokenizer, found.special, 1))
        dataset = mix.datasets()["train"]
    else:
        dataset = _datasets(cfg, accelerator, found.corpus, found.tokenizer, found.special, batch)[0]["train"]
    started = time.perf_counter()
    for step in range(steps):
        collate_packed([dataset[g] for g in range(step * batch, (step + 1) * batch)])
    return (time.perf_counter() - started) / steps * 1e3


def bench_corpora(
    work: Path, store: Path, tokenizer: Path, shape: str, steps: int, warmup: int, batch: int, seq: int, device: str
) -> dict:
    model = tiny_model(work / f"model-{shape}", tokenizer, shape, seq)
    twin = work / "twin"  # the same documents as a second store: both runs see alike samples
    shutil.copytree(store, twin, ignore=shutil.ignore_patterns("cache"))
    common = [
        "--model",
        str(model),
        "--max-steps",
        str(warmup + steps),
        "--batch-size",
        str(batch),
        "--max-seq-len",
        str(seq),
        "--eval-steps",
        "0",
        "--checkpoint-steps",
        "0",
        "--logging-freq",
        "5",
        "--eval-iters",
        "1",
        "--test-iters",
        "1",
        "--split",
        "100,0,0",
        "--no-tensorboard",
        "--precision",
        "auto",
    ]
    one_s = cli("pretrain", "--corpus", str(store), "--out", str(work / "run-one"), *common)
    two_s = cli(
        "pretrain", "--corpus", f"{store}:0.5", "--corpus", f"{twin}:0.5", "--out", str(work / "run-two"), *common
    )
    one, two = tokens_per_s(work / "run-one", warmup), tokens_per_s(work / "run-two", warmup)
    data_one = data_path_ms([str(store)], model, seq, batch, 20)
    data_two = data_path_ms([f"{store}:0.5", f"{twin}:0.5"], model, seq, batch, 20)
    return {
        "shape": shape,
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "one_corpus_tokens_per_s": round(one),
        "two_corpora_tokens_per_s": round(two),
        "step_overhead_pct": round(100 * (one / two - 1), 2),
        "one_corpus_run_s": round(one_s, 1),
        "two_corpora_run_s": round(two_s, 1),
        "data_path_ms_per_batch_one": round(data_one, 2),
        "data_path_ms_per_batch_two": round(data_two, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50, help="raw text, MB")
    parser.add_argument("--files", type=int, default=8, help="input files (shards take whole files)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dup-share", type=float, default=0.05, help="share of documents that repeat an earlier one")
    parser.add_argument("--workers", type=int, default=-1, help="prepare's worker processes")
    parser.add_argument("--verify", action="store_true", help="also one prepare of all inputs; compare bytes")
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--skip-corpora", action="store_true")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="micro")
    parser.add_argument("--steps", type=int, default=100, help="timed pretraining steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where pretrain runs (it picks the GPU "
        "itself when there is one; both runs at auto's precision: bf16 where the device has it)",
    )
    parser.add_argument("--keep", help="keep the work folder here")
    args = parser.parse_args()
    from domainlm.precision import describe_cpu
    from domainlm.vocab import train_wordpiece

    print(describe_cpu(), flush=True)

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="corpora-bench-"))
    try:
        inputs = write_inputs(work / "inputs", args.mb, args.files, args.dup_share)
        tokenizer = work / "tokenizer"
        train_wordpiece(documents(2e5, 1, 0.0), tokenizer, vocab_size=2000)
        results = {}
        if not args.skip_merge:
            results["merge"] = bench_merge(work, inputs, tokenizer, args.shards, args.verify, args.workers)
            print(json.dumps(results["merge"]), flush=True)
        if not args.skip_corpora:
            store = work / "store-for-pretrain"
            cli(
                "prepare",
                *map(str, inputs),
                "--out",
                str(store),
                "--tokenizer",
                str(tokenizer),
                "--segment",
                "--workers",
                str(args.workers),
            )
            results["corpora"] = bench_corpora(
                work, store, tokenizer, args.shape, args.steps, args.warmup, args.batch, args.seq, args.device
            )
            print(json.dumps(results["corpora"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
