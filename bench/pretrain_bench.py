"""domainlm's pretraining step vs the one a user would write with transformers, same model, data and batch.

Baseline: `ErnieForPreTraining(labels=..., next_sentence_label=...)` (MLM logits at every position) with the
default AdamW. domainlm: the same weights in `PretrainingModel` (MLM logits at masked positions only) with
its optimizer. Both train on identical batches made by domainlm's masking pipeline (timed separately).
Shapes: ERNIE 3.0 micro and medium (random weights, vocabulary 40000). Prints tokens/s, the ratio, and
achieved GFLOP/s against this machine's measured fp32 matmul peak.

    python bench/pretrain_bench.py                 # ~4 minutes on 2 cores
    python bench/pretrain_bench.py --shapes micro --steps 5
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


def ernie(shape: str, seq: int):
    from transformers import ErnieConfig, ErnieForPreTraining

    torch.manual_seed(0)
    config = ErnieConfig(vocab_size=40000, max_position_embeddings=max(512, seq), type_vocab_size=4,
                         use_task_id=True, task_type_vocab_size=3, **SHAPES[shape])
    return ErnieForPreTraining(config)


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e9


def model_flops(config, tokens: int, masked: int, seq: int) -> float:
    """Useful training FLOPs of one step (forward + backward = 3x forward): encoder, attention, MLM head
    at the masked positions, SOP head ignored."""
    h, layers, inter, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    per_token = layers * (2 * 4 * h * h + 2 * 2 * h * inter + 2 * 2 * seq * h)
    head = 2 * (h * h + h * vocab)
    return 3 * (per_token * tokens + head * masked)


def make_batches(n: int, batch: int, seq: int, work: Path):
    """Real Chinese samples through domainlm's own pipeline: store, sample index, SOP pairs, WWM masking."""
    from domainlm.data.prepare import PrepareConfig, prepare
    from domainlm.data.store import Corpus
    from domainlm.demo import write_sample_data
    from domainlm.pretrain.dataset import PretrainDataset, collate
    from domainlm.pretrain.masking import MaskingOptions, default_max_predictions
    from domainlm.pretrain.samples import build_samples

    data = write_sample_data(work / "data")
    store = work / "store"
    if not (store / "meta.json").is_file():
        prepare(PrepareConfig(input=[str(data["reviews"])], out=str(store), tokenizer=str(data["tokenizer"]), segment=True), progress=False)
    corpus = Corpus(store)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data["tokenizer"]))
    samples, _ = build_samples(corpus, np.arange(corpus.n_documents), seq - 3, 0.0, 2, seed=0)
    special = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id}
    masking = MaskingOptions(max_predictions=default_max_predictions(seq, 0.15))
    ds = PretrainDataset(corpus, samples, "train", seq, True, masking, special, len(tok), 0, True)
    started = time.perf_counter()
    batches = [collate([ds[i * batch + j] for j in range(batch)], tok.pad_token_id) for i in range(n)]
    data_rate = n * batch / (time.perf_counter() - started)
    return batches, data_rate


def time_steps(step, batches, warmup: int) -> float:
    for b in batches[:warmup]:
        step(b)
    started = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return time.perf_counter() - started


def bench_shape(shape: str, batches, seq: int, warmup: int, peak: float) -> None:
    from domainlm.pretrain.model import PretrainingModel
    from domainlm.train.loop import build_optimizer

    base_model = ernie(shape, seq)
    ours_model = PretrainingModel(copy.deepcopy(base_model), sop=True)
    base_opt = torch.optim.AdamW(base_model.parameters(), lr=1e-4, weight_decay=0.01)
    ours_opt = build_optimizer(ours_model, 1e-4, 0.01)

    def baseline_step(b):
        out = base_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                         labels=b["labels"], next_sentence_label=b["sop_labels"])
        out.loss.backward()
        base_opt.step()
        base_opt.zero_grad(set_to_none=True)

    def ours_step(b):
        loss, _ = ours_model(**b)
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    timed = batches[warmup:]
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    masked = sum(int((b["labels"] >= 0).sum()) for b in timed)
    base_s = time_steps(baseline_step, batches, warmup)
    ours_s = time_steps(ours_step, batches, warmup)
    flops = model_flops(base_model.config, tokens, masked, seq)
    print(f"{shape:>7} | baseline {tokens / base_s:8.0f} tok/s | domainlm {tokens / ours_s:8.0f} tok/s | "
          f"ratio {base_s / ours_s:4.2f}x | domainlm {flops / ours_s / 1e9:6.1f} GFLOP/s "
          f"({100 * flops / ours_s / 1e9 / peak:4.1f}% of matmul peak)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="micro,medium")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="domainlm-bench-"))
    batches, data_rate = make_batches(args.steps + args.warmup, args.batch, args.seq, work)
    peak = matmul_peak_gflops()
    print(f"CPU threads {torch.get_num_threads()}, fp32 matmul peak {peak:.0f} GFLOP/s; seq {args.seq}, micro batch "
          f"{args.batch}; domainlm data pipeline (SOP + WWM masking, 1 process) {data_rate:.0f} samples/s")
    for shape in args.shapes.split(","):
        bench_shape(shape, batches, args.seq, args.warmup, peak)


if __name__ == "__main__":
    main()
