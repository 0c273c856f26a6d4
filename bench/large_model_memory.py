"""Peak GPU memory of a full fine-tune of a 1.3B MegatronBert classifier (the shape of Erlangshen-MegatronBert-1.3B:
24 layers, 2048 wide, 8 heads, FFN 8192, 21,248 tokens), with and without gradient checkpointing: domainlm's
Classifier and AdamW (fp32 weights, bf16 autocast where the device has native bf16, betas 0.9/0.98, weight decay
0.1), a few optimizer steps of max-length rows, random weights (the memory does not depend on their values).

    python bench/large_model_memory.py [--batch 32,8 --length 512 --steps 3]   # on a GPU
    python bench/large_model_memory.py --quick                                 # a 2-layer shape, on any device
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def measure(config, batch: int, length: int, steps: int, checkpointing: bool, device: str, bf16: bool = True) -> dict:
    from transformers import MegatronBertForSequenceClassification

    from domainlm.classify.model import Classifier, enable_checkpointing
    from domainlm.train.setup import build_optimizer

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        hf = MegatronBertForSequenceClassification(config)
    if checkpointing:
        enable_checkpointing(hf)
    model = Classifier(hf, multilabel=False).train()
    optimizer = build_optimizer(model, 1e-5, 0.1, (0.9, 0.98), 1e-8)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (batch, length), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, config.num_labels, (batch,), device=device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    result = {
        "params": params,
        "batch": batch,
        "length": length,
        "gradient_checkpointing": checkpointing,
        "step_s": round(min(times), 3),
    }
    if device == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, hf, optimizer
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="32,8")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a 2-layer, 64-wide shape: checks the script runs")
    args = p.parse_args()
    from transformers import MegatronBertConfig

    shape = dict(
        vocab_size=21248,
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=8,
        intermediate_size=8192,
        max_position_embeddings=512,
    )
    if args.quick:
        shape.update(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        args.batch, args.length, args.steps = "2", 32, 1
    config = MegatronBertConfig(**shape, num_labels=34)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from domainlm.precision import describe_cpu, resolve

    precision, why = resolve("auto", device)  # bf16 autocast where the device has it natively, as `finetune` runs
    print(f"{describe_cpu()}; {device}, {precision} ({why})", flush=True)
    for batch in map(int, args.batch.split(",")):
        for checkpointing in (False, True):
            print(
                json.dumps(measure(config, batch, args.length, args.steps, checkpointing, device, precision == "bf16")),
                flush=True,
            )


if __name__ == "__main__":
    main()
