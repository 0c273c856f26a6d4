"""domainlm's pretraining step vs the one a careful user writes with transformers: same model, batches, optimizer.

Baseline ("HF tuned"): `ErnieForPreTraining(labels=..., next_sentence_label=...)` (SDPA attention, MLM logits at
every position), fused AdamW, gradient clipping, bf16 autocast where the device has native bf16 (a GPU, or a CPU with
AVX512_BF16 or AMX: --precision auto, what a careful user sets there), and `torch.compile` with --compile. Every
side runs at the same precision. The header names the CPU's features (AVX2, AVX-512, VNNI, BF16, AMX).
"domainlm padded": `PretrainingModel` on the same padded batches (MLM logits at masked positions only; what
`pretrain --no-unpad` runs). "domainlm": the same model on the packed stream of real tokens (what `pretrain` runs).
All three start from the same weights and train on the same samples, made by domainlm's own pipeline (store,
sample index, SOP pairs, whole-word masking) from People's Daily 1998 (--corpus news) or the demo's reviews
(--corpus reviews, MLM only: short texts, much padding). Prints real tokens/s, the ratio against the baseline,
MFU (useful FLOPs over a matmul peak measured in the same run) and, on a GPU, peak memory.

    python bench/pretrain_bench.py                                   # CPU: micro and medium shapes, ~4 minutes
    python bench/pretrain_bench.py --shapes micro --precision fp32   # fp32 on every side, whatever the CPU
    python bench/pretrain_bench.py --shapes micro --steps 24 --rounds 3   # every side 3 times in turns: medians
    python bench/pretrain_bench.py --corpus reviews --shapes micro   # CPU: short texts, where unpadding pays most
    python bench/pretrain_bench.py --device cuda --shapes base --seq 256 --batch 128 --compile   # one GPU
    python bench/pretrain_bench.py --save-samples S.npz ...          # build samples here, --samples S.npz elsewhere
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SHAPES = {
    "micro": dict(hidden_size=384, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1536),
    "mini": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "medium": dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
VOCAB = 21128  # the bert-base-chinese vocabulary the samples are tokenized with


def ernie(shape: str, seq: int):
    from transformers import ErnieConfig, ErnieForPreTraining

    torch.manual_seed(0)
    config = ErnieConfig(
        vocab_size=VOCAB,
        max_position_embeddings=max(512, seq),
        type_vocab_size=4,
        use_task_id=True,
        task_type_vocab_size=3,
        **SHAPES[shape],
    )
    return ErnieForPreTraining(config)


def matmul_peak_tflops(device: str, precision: str) -> float:
    """At the bench's precision: 8192^3 on a GPU, 2048^3 on the CPU (random data)."""
    n, reps = (8192, 20) if device == "cuda" else (2048, 10)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def useful_flops(config, lengths: list[np.ndarray], masked: int) -> float:
    """Training FLOPs (3x forward) on real tokens: the encoder's matmuls, attention within each sample
    (n^2 per sample), the MLM head at masked positions; SOP head and embeddings ignored."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    tokens = sum(int(x.sum()) for x in lengths)
    square = sum(int((x.astype(np.int64) ** 2).sum()) for x in lengths)
    encoder = layers * ((2 * 4 * h * h + 2 * 2 * h * inter) * tokens + 2 * 2 * h * square)
    return 3 * (encoder + 2 * (h * h + h * vocab) * masked)


def build_samples(corpus: str, n: int, seq: int, work: Path) -> list[dict]:
    """Masked samples through domainlm's pipeline (SOP pairs on news, MLM only on the reviews)."""
    from transformers import AutoTokenizer

    from domainlm.data.prepare import PrepareConfig, prepare
    from domainlm.data.store import Corpus
    from domainlm.demo import write_sample_data
    from domainlm.pretrain.dataset import PretrainDataset
    from domainlm.pretrain.masking import MaskingOptions, default_max_predictions
    from domainlm.pretrain.samples import build_samples as index

    data = write_sample_data(work / "data")
    store = work / f"store-{corpus}"
    if not (store / "meta.json").is_file():
        prepare(
            PrepareConfig(
                input=[str(data[corpus])], out=str(store), tokenizer=str(data["bert-base-chinese"]), segment=True
            ),
            progress=False,
        )
    store = Corpus(store)
    tok = AutoTokenizer.from_pretrained(str(data["bert-base-chinese"]))
    sop = corpus == "news"
    samples, _ = index(store, np.arange(store.n_documents), seq - (3 if sop else 2), 0.0, 2 if sop else 1, seed=0)
    special = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id}
    masking = MaskingOptions(max_predictions=default_max_predictions(seq, 0.15))
    ds = PretrainDataset(store, samples, "train", seq, sop, masking, special, len(tok), 0, True)
    started = time.perf_counter()
    items = [ds[i] for i in range(n)]
    print(
        f"domainlm data pipeline ({'SOP, ' if sop else ''}WWM masking, 1 process): "
        f"{n / (time.perf_counter() - started):,.0f} samples/s"
    )
    return items


def save_samples(items: list[dict], path: Path) -> None:
    lengths = np.array([len(x["input_ids"]) for x in items])
    np.savez_compressed(
        path,
        lengths=lengths,
        ids=np.concatenate([x["input_ids"] for x in items]).astype(np.int32),
        types=np.concatenate([x["token_type_ids"] for x in items]).astype(np.int8),
        labels=np.concatenate([x["labels"] for x in items]).astype(np.int32),
        sop=np.array([int(x.get("sop_labels", -1)) for x in items]),
    )


def load_samples(path: Path) -> list[dict]:
    z = np.load(path)
    cuts = np.cumsum(z["lengths"])[:-1]
    rows = zip(np.split(z["ids"], cuts), np.split(z["types"], cuts), np.split(z["labels"], cuts), z["sop"])
    return [
        {
            "input_ids": i.astype(np.int64),
            "token_type_ids": t.astype(np.int64),
            "labels": y.astype(np.int64),
            **({"sop_labels": np.int64(s)} if s >= 0 else {}),
        }
        for i, t, y, s in rows
    ]


def timed(step, batches: list[dict], warmup: int, device: str) -> float:
    for b in batches[:warmup]:
        step(b)
    sync(device)
    started = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    sync(device)
    return time.perf_counter() - started


def make_step(model, forward, device: str, precision: str, compiled: bool):
    from domainlm.train.loop import to_device
    from domainlm.train.setup import build_optimizer

    model.to(device).train()
    optimizer = build_optimizer(model, 1e-4, 0.01)  # fused AdamW, no decay on biases and norms: both sides
    run = torch.compile(forward) if compiled else forward
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch):
        batch = to_device(batch, device)
        with autocast:
            loss = run(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_shape(shape: str, items: list[dict], args, peak: float) -> dict:
    from domainlm.pretrain.dataset import collate, collate_packed
    from domainlm.pretrain.model import PretrainingModel

    b, sop = args.batch, "sop_labels" in items[0]
    groups = [items[i : i + b] for i in range(0, len(items) - b + 1, b)][: args.steps + args.warmup]
    padded = [collate(g, 0) for g in groups]
    packed = [collate_packed(g) for g in groups]
    if args.device == "cuda":
        padded = [{k: v.pin_memory() for k, v in x.items()} for x in padded]
        packed = [{k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in x.items()} for x in packed]
    timed_groups = groups[args.warmup :]
    lengths = [np.array([len(x["input_ids"]) for x in g]) for g in timed_groups]
    tokens = sum(int(x.sum()) for x in lengths)
    slots = sum(int(p["input_ids"].numel()) for p in padded[args.warmup :])
    masked = sum(int((x["labels"] >= 0).sum()) for g in timed_groups for x in g)
    hf = ernie(shape, args.seq)
    flops = useful_flops(hf.config, lengths, masked)

    def hf_forward(x):
        if sop:
            return hf(
                input_ids=x["input_ids"],
                attention_mask=x["attention_mask"],
                token_type_ids=x["token_type_ids"],
                labels=x["labels"],
                next_sentence_label=x["sop_labels"],
            ).loss
        # MLM only (the reviews): the loss ErnieForMaskedLM computes, on the same model's MLM logits
        logits = hf(
            input_ids=x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]
        ).prediction_logits
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]).float(), x["labels"].view(-1))

    ours = PretrainingModel(copy.deepcopy(hf), sop=sop)
    variants = {"HF tuned": (hf, hf_forward, padded), "domainlm padded": (ours, lambda x: ours(**x)[0], padded)}
    fast = PretrainingModel(copy.deepcopy(hf), sop=sop)
    variants["domainlm"] = (fast, lambda x: fast(**x)[0], packed)
    variants = {k: v for k, v in variants.items() if k not in args.skip.split(",")}
    runs, memory, steps, failed = {}, {}, {}, set()
    for _ in range(args.rounds):  # in turns: a noisy machine's slow minutes fall on every side
        for name, (model, forward, batches) in variants.items():
            if name in failed:
                continue
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if name in steps:
                model.to(args.device)  # back from the CPU, where the other sides' turns left it
            else:
                steps[name] = make_step(model, forward, args.device, args.precision, args.compile)
            try:
                runs.setdefault(name, []).append(timed(steps[name], batches, args.warmup, args.device))
            except Exception as e:  # report and go on: one failing variant must not hide the others' figures
                print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                failed.add(name)
                continue
            finally:
                model.to("cpu")
            if args.device == "cuda":
                memory[name] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.empty_cache()
    seconds = {name: float(np.median(times)) for name, times in runs.items()}
    base = seconds.get("HF tuned")
    label = f"{shape} seq {args.seq} x {b}{' compiled' if args.compile else ''}"
    print(f"{label}: padding {100 * (1 - tokens / slots):.0f}% of the padded batches' positions")
    if args.rounds > 1 and base:
        print(
            f"  median of {args.rounds} rounds in turns; ratio by round: "
            + "; ".join(
                f"{name} {', '.join(f'{b_ / s_:.2f}x' for b_, s_ in zip(runs['HF tuned'], times))}"
                for name, times in runs.items()
                if name != "HF tuned"
            )
        )
    for name, s in seconds.items():
        mfu = 100 * flops / s / 1e12 / peak
        mem = f" | peak {memory[name]:5.1f} GiB" if name in memory else ""
        ratio = f"{base / s:5.2f}x" if base else "  n/a"
        print(f"  {name:16} {tokens / s:>11,.0f} real tokens/s | ratio {ratio} | MFU {mfu:4.1f}%{mem}")
    return {"label": label, "tokens_per_s": {k: tokens / s for k, s in seconds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="micro,medium")
    parser.add_argument("--corpus", choices=["news", "reviews"], default="news")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="every side timed this many times in turns; medians")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "no"],
        default="auto",
        help="every side's: auto is bf16 where the device has native bf16, else fp32 (no: fp32)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every side's forward")
    parser.add_argument("--skip", default="", help="comma list of variants not to run (e.g. 'domainlm padded')")
    parser.add_argument("--samples", type=Path, help="samples saved by --save-samples (no corpus work here)")
    parser.add_argument("--save-samples", type=Path, help="build the samples, save them here and stop")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU is visible")
    from domainlm.precision import describe_cpu, resolve

    args.precision, why = resolve(args.precision, args.device)
    print(describe_cpu())
    need = (args.steps + args.warmup) * args.batch
    if args.samples:
        items = load_samples(args.samples)
        if len(items) < need:
            raise SystemExit(f"{args.samples} holds {len(items)} samples; --steps/--warmup/--batch need {need}")
    else:
        items = build_samples(
            args.corpus, need, args.seq, Path(args.work or tempfile.mkdtemp(prefix="domainlm-bench-"))
        )
    if args.save_samples:
        save_samples(items, args.save_samples)
        print(f"saved {len(items)} samples to {args.save_samples}")
        return
    peak = matmul_peak_tflops(args.device, args.precision)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{where}, torch {torch.__version__}, {args.precision} on every side ({why}); {args.precision} matmul peak "
        f"{peak:.3g} TFLOP/s measured here"
    )
    for shape in args.shapes.split(","):
        bench_shape(shape, items, args, peak)


if __name__ == "__main__":
    main()
