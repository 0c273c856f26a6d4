"""Where a CPU training step spends its time, op by op: torch.profiler over one pretraining step (ERNIE micro shape,
packed, the news samples of bench/pretrain_bench.py) and one fine-tuning step (BERT 4x256, packed, the reviews of
bench/finetune_bench.py), as `pretrain` and `finetune` run them (autocast at --precision, fused AdamW, clipping).

Prints each step's ops by self CPU time, before and after the CPU kernels of domainlm.encoder (SDPA and torch's
dropout against bf16 products and cheaper dropout masks: `kernels`), in one process, taking turns; and the dtype
conversions (aten::_to_copy) by input shape, so that an op falling back to fp32 under bf16 (a conversion each way
per call) shows. These are relative measures within one process: fine on a busy machine, where absolute times are
not.

    python bench/cpu_profile.py                        # bf16 where the CPU has it (auto), else fp32
    python bench/cpu_profile.py --precision fp32 --rows 40
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from domainlm.precision import describe_cpu

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benches' data and models


def pretraining_step(work: Path, precision: str, batch: int, seq: int):
    from pretrain_bench import build_samples, ernie

    from domainlm.pretrain.dataset import collate_packed
    from domainlm.pretrain.model import PretrainingModel

    items = build_samples("news", batch * 3, seq, work)
    model = PretrainingModel(ernie("micro", seq), sop=True)
    batches = [collate_packed(items[i : i + batch]) for i in range(0, len(items), batch)]
    return model, (lambda b: model(**b)[0]), batches


def finetuning_step(work: Path, precision: str, batch: int, seq: int):
    import json

    from finetune_bench import base_model, make_data
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from domainlm.classify.batching import collate, encode_texts
    from domainlm.classify.model import Classifier

    train, _, _, tokenizer_dir = make_data(work, batch * 3, 10)
    model_dir = base_model(work, tokenizer_dir, "4x256")
    hf = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(x) for x in train.read_text(encoding="utf-8").splitlines()]
    labels = sorted({r["label"] for r in rows})
    features = encode_texts(tok, [r["text"] for r in rows], None, seq)
    order = np.argsort([len(f["input_ids"]) for f in features], kind="stable")  # finetune's batches: like lengths
    model = Classifier(hf, multilabel=False)
    batches = []
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        batches.append(
            collate(
                [features[j] for j in idx],
                np.array([labels.index(rows[j]["label"]) for j in idx]),
                tok.pad_token_id,
                packed=True,
            )
        )
    return model, (lambda b: model(**b)[0]), batches


KERNELS = {
    "before": "SDPA for all attention on a CPU, torch's dropout",
    "after": "bf16 / training attention as two bf16 products, dropout masks of encoder.dropout",
}


@contextlib.contextmanager
def kernels(which: str):
    """`before`: the CPU kernels as they were (SDPA, F.dropout); `after`: as they are."""
    from domainlm.encoder import attention, packed

    saved = attention.bmm_usable, attention.dropout, packed.dropout
    if which == "before":
        attention.bmm_usable = lambda q, dropout_p=0.0: False
        attention.dropout = packed.dropout = torch.nn.functional.dropout
    try:
        yield
    finally:
        attention.bmm_usable, attention.dropout, packed.dropout = saved


def self_times(prof) -> dict[str, tuple[int, float]]:
    return {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}


def profile(
    name: str, model, forward, batches: list[dict], precision: str, rows: int, variants: list[str], rounds: int
) -> None:
    """Each variant's step profiled `rounds` times, the variants taking turns (so that a busy machine weighs on
    them alike); the tables show ms of self CPU time per step, and each op's share."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from domainlm.train.setup import build_optimizer

    model.train()
    optimizer = build_optimizer(model, 1e-4, 0.01)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(b):
        with autocast:
            loss = forward(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, dict[str, list]] = {v: {} for v in variants}
    conversions: dict[str, list] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants:
            with kernels(v):
                for b in batches[:-1]:  # warm-up: allocator, oneDNN primitives, optimizer state
                    step(b)
                with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=r == 0) as prof:
                    step(batches[-1])
            for key, (count, ms) in self_times(prof).items():
                entry = times[v].setdefault(key, [count, 0.0])
                entry[1] += ms / rounds
            if r == 0:
                conversions[v] = [
                    e
                    for e in prof.key_averages(group_by_input_shape=True)
                    if e.key == "aten::_to_copy" and e.input_shapes and e.input_shapes[0]
                ]
    totals = {v: sum(ms for _, ms in times[v].values()) for v in variants}
    print(f"\n== {name}, {precision}: self CPU time per step, mean of {rounds} ==")
    for v in variants:
        print(f"   {v}: {KERNELS[v]}: {totals[v]:.0f} ms")
    ops = sorted(
        {k for v in variants for k in times[v]}, key=lambda k: -max(times[v].get(k, [0, 0])[1] for v in variants)
    )
    head = "".join(f"{v + ' calls':>14}{v + ' ms':>11}{'%':>7}" for v in variants)
    print(f"{'op':44}{head}")
    for key in ops[:rows]:
        cells = ""
        for v in variants:
            count, ms = times[v].get(key, [0, 0.0])
            cells += f"{count:14d}{ms:11.1f}{100 * ms / totals[v]:6.1f}%"
        print(f"{key[:43]:44}{cells}")
    for v in variants:
        shown = sorted(conversions[v], key=lambda e: -e.cpu_time_total)[:8]
        print(
            f"-- {v}: dtype conversions (aten::_to_copy) by input shape: "
            + "; ".join(f"{e.count}x {e.input_shapes[0]} {e.cpu_time_total / 1e3:.1f} ms" for e in shown)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--steps", default="pretrain,finetune")
    parser.add_argument("--rows", type=int, default=25, help="table rows")
    parser.add_argument("--variants", default="before,after", help="CPU kernels to compare (see KERNELS)")
    parser.add_argument("--rounds", type=int, default=3, help="profiled steps of each variant")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    from domainlm.precision import resolve

    precision, why = resolve(args.precision, "cpu")
    print(describe_cpu())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, precision {precision} ({why})")
    work = Path(args.work or tempfile.mkdtemp(prefix="domainlm-profile-"))
    torch.manual_seed(0)
    if "pretrain" in args.steps:
        model, forward, batches = pretraining_step(work, precision, 16, 128)
        profile(
            "pretraining step, ERNIE micro, seq 128 x 16, packed",
            model,
            forward,
            batches,
            precision,
            args.rows,
            args.variants.split(","),
            args.rounds,
        )
    if "finetune" in args.steps:
        model, forward, batches = finetuning_step(work, precision, 32, 128)
        profile(
            "fine-tuning step, BERT 4x256, 32 reviews, packed",
            model,
            forward,
            batches,
            precision,
            args.rows,
            args.variants.split(","),
            args.rounds,
        )


if __name__ == "__main__":
    main()
