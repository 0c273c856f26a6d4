"""What a trustworthy checkpoint costs: domainlm's save_checkpoint (Accelerate's save_state, fsync of every file,
a sha256 manifest, atomic rename) and its verification at resume, against a bare `accelerator.save_state`, the
baseline a careful Accelerate user writes. ERNIE 3.0 micro shape by default (4 layers, 384 wide, 40k vocab).

    flock /tmp/bench.lock python bench/checkpoint_bench.py [--layers 4 --hidden 384 --vocab 40000 --repeat 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--vocab", type=int, default=40000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    from transformers import BertConfig, BertForPreTraining

    from domainlm.precision import describe_cpu

    print(describe_cpu())
    from domainlm.pretrain.model import PretrainingModel
    from domainlm.train.checkpoint import TrainState, find_latest, save_checkpoint
    from domainlm.train.setup import build_optimizer, build_scheduler, make_accelerator

    accelerator = make_accelerator("fp32")
    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
    )
    model = PretrainingModel(BertForPreTraining(config), sop=True)
    optimizer = build_optimizer(model, 1e-4, 0.01)
    scheduler = build_scheduler(optimizer, 10, 0.1, 1e-4, 1e-5, "linear")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    for p_ in model.parameters():  # optimizer state as after a step
        p_.grad = torch.zeros_like(p_)
    optimizer.step()
    params = sum(p_.numel() for p_ in model.parameters())
    root = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    bare, ours, verify = [], [], []
    try:
        for i in range(args.repeat):
            t = time.perf_counter()
            accelerator.save_state(str(root / f"bare-{i}"), safe_serialization=True)
            bare.append(time.perf_counter() - t)
            t = time.perf_counter()
            saved = save_checkpoint(accelerator, root / "ours", TrainState(step=i + 1), keep_last=1)
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert find_latest(root / "ours") == saved
            verify.append(time.perf_counter() - t)
            shutil.rmtree(root / f"bare-{i}")
        size = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    b, o, v = min(bare), min(ours), min(verify)
    print(f"model {params / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB, best of {args.repeat}")
    print(f"bare accelerator.save_state: {b:.2f} s")
    print(f"domainlm save_checkpoint:    {o:.2f} s  ({o / b:.2f}x the bare save)")
    print(f"verify at resume (sha256):   {v:.2f} s")


if __name__ == "__main__":
    main()
