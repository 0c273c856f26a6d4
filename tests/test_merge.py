"""Corpora prepared in shards (`prepare --shard I/N`) and joined by `domainlm merge`: byte for byte the store one
prepare of all the inputs writes, duplicates across shards included; stores prepared apart are concatenated; every
store that does not belong is refused in one line."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from domainlm.cli import main
from domainlm.data import shards
from domainlm.data.clean import Deduplicator, exact_key, minhash_signature
from domainlm.data.store import FILES, Corpus
from tests.conftest import EN_DOCS, ZH_DOCS, one_line

TIMINGS = ("seconds", "mb_per_second", "tokens_per_second")
CHARS = sorted(set("".join(ZH_DOCS)) - set("，。！？；：“”"))


def _text(rng: random.Random, n: int) -> str:
    out = []
    while sum(map(len, out)) < n:
        out.append("".join(rng.choice(CHARS) for _ in range(rng.randint(10, 20))) + "。")
    return "".join(out)


def _mutate(rng: random.Random, text: str, k: int) -> str:
    i = rng.randint(0, len(text) - k)
    return text[:i] + "".join(rng.choice(CHARS) for _ in range(k)) + text[i + k :]


def chain(threshold: float = 0.5, seed: int = 10) -> tuple[str, str, str]:
    """Z, Y, X: Y is a near duplicate of Z, X one of Y but not of Z. Alone, Y is kept and X dropped; after Z, Y is
    dropped and X kept (near duplicates are not transitive)."""
    rng = random.Random(seed)
    z = _text(rng, 240)
    y = _mutate(rng, z, 25)
    x = _mutate(rng, y, 25)

    def fates(docs):
        dedup = Deduplicator(threshold, 64)
        return [dedup.check(exact_key(t), minhash_signature(t, 64)) for t in docs]

    assert fates([y, x]) == [None, "near"] and fates([z, y, x]) == [None, "near", None]
    return z, y, x


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three files that three shards take one each: exact and near duplicates across them, a document that its own
    shard drops and one prepare keeps, an empty and a short one, and one English file."""
    root = tmp_path_factory.mktemp("inputs")
    z, y, x = chain()
    rng = random.Random(3)
    docs = [_text(rng, 80) for _ in range(12)]
    a = write_jsonl(root / "a.jsonl", [z, *docs[:4], "短", ZH_DOCS[0] * 4])
    b = write_jsonl(root / "b.jsonl", [docs[0], y, x, *docs[4:8], " \u200b "])
    c = root / "c.txt"
    c.write_text("\n\n".join([*EN_DOCS, *docs[8:], ZH_DOCS[0] * 4]) + "\n", encoding="utf-8")
    return [a, b, c]


def prepare(inputs, out, tokenizer_dir, *flags):
    args = [
        "prepare",
        *map(str, inputs),
        "--out",
        str(out),
        "--tokenizer",
        tokenizer_dir,
        "--workers",
        "0",
        "--near-dup-threshold",
        "0.5",
        "--segment",
        *flags,
    ]
    assert main(args) == 0
    return json.loads((out / "stats.json").read_text())


def assert_same_store(one, merged):
    for name in FILES:  # meta.json too: counts, vocabulary, fingerprint
        assert (one / name).read_bytes() == (merged / name).read_bytes(), name
    for path in sorted((one / "tokenizer").iterdir()):
        assert path.read_bytes() == (merged / "tokenizer" / path.name).read_bytes(), path.name
    a, b = (json.loads((d / "stats.json").read_text()) for d in (one, merged))
    assert b.pop("merged_from") > 1
    assert {k: v for k, v in a.items() if k not in TIMINGS} == {k: v for k, v in b.items() if k not in TIMINGS}
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in one.iterdir())  # no shard ledger


@pytest.mark.parametrize("count", [3, 2])
def test_shards_merged_are_byte_for_byte_one_prepare(tmp_path, inputs, tokenizer_dir, count, capsys):
    one = tmp_path / "one"
    stats = prepare(inputs, one, tokenizer_dir)
    assert stats["duplicates_exact"] == 2 and stats["duplicates_near"] == 1  # b's first, c's last; Y (after Z)
    parts = [tmp_path / f"shard{i}" for i in range(1, count + 1)]
    shard_stats = [prepare(inputs, part, tokenizer_dir, "--shard", f"{i}/{count}") for i, part in enumerate(parts, 1)]
    assert (
        sum(s["files"] for s in shard_stats) == 3
        and sum(s["documents_read"] for s in shard_stats) == stats["documents_read"]
    )
    if count == 3:  # the shard of b.jsonl alone: Y kept, X dropped as its near duplicate, and kept aside for the merge
        alone = next(
            s
            for s, part in zip(shard_stats, parts)
            if json.loads((part / shards.FOLDER / "shard.json").read_text())["taken"] == [1]
        )
        assert (alone["duplicates_near"], alone["duplicates_exact"]) == (1, 0)
        assert sum(Corpus(p / shards.FOLDER / "dropped").n_documents for p in parts) == 1
    prepare(inputs, parts[0], tokenizer_dir, "--shard", f"1/{count}")  # the same shard again: up to date
    assert "is up to date" in capsys.readouterr().err
    merged = tmp_path / "merged"
    assert main(["merge", *map(str, reversed(parts)), "--out", str(merged)]) == 0  # any order
    assert_same_store(one, merged)
    assert json.loads((merged / ".domainlm-out.json").read_text())["command"] == "merge"


def test_stores_prepared_apart_are_concatenated_in_the_order_given(tmp_path, inputs, tokenizer_dir, err):
    first, second = tmp_path / "first", tmp_path / "second"
    sa, sb = prepare(inputs[:1], first, tokenizer_dir), prepare(inputs[1:], second, tokenizer_dir)
    merged = tmp_path / "merged"
    assert main(["merge", str(first), str(second), "--out", str(merged)]) == 0
    a, b, m = Corpus(first), Corpus(second), Corpus(merged)
    assert m.n_documents == a.n_documents + b.n_documents and m.n_tokens == a.n_tokens + b.n_tokens
    assert np.asarray(m.tokens).tolist() == np.asarray(a.tokens).tolist() + np.asarray(b.tokens).tolist()
    assert np.asarray(m.words).tolist() == np.asarray(a.words).tolist() + np.asarray(b.words).tolist()
    assert m.document_sentences(a.n_documents) == range(a.n_sentences, a.n_sentences + b.document_sentences(0).stop)
    assert m.sentence_lengths().tolist() == a.sentence_lengths().tolist() + b.sentence_lengths().tolist()
    stats = json.loads((merged / "stats.json").read_text())
    for key in ("files", "documents_read", "duplicates_exact", "dropped_short", "sentences_cut"):
        assert stats[key] == sa[key] + sb[key], key
    assert stats["documents"] == m.n_documents and stats["merged_from"] == 2
    assert m.meta["vocab_hash"] == a.meta["vocab_hash"] and "shard" not in m.meta
    # the run folder: an earlier merge is replaced only when asked, whole
    before = (merged / "tokens.bin").read_bytes()
    line = one_line(err("merge", second, first, "--out", merged))
    assert line.startswith(f"error: --out {merged} holds an earlier finished `domainlm merge` run")
    assert (merged / "tokens.bin").read_bytes() == before
    assert main(["merge", str(second), str(first), "--out", str(merged), "--overwrite"]) == 0
    assert Corpus(merged).n_documents == m.n_documents and (merged / "tokens.bin").read_bytes() != before


def test_whole_files_are_dealt_largest_first_to_the_lightest_shard():
    # 50 -> 1, 40 -> 2, 30 -> 2 (40 < 50), 20 -> 1 (50 < 70), 10 -> 1 (70 = 70: the lower shard)
    assert shards.assign([10, 50, 30, 20, 40], 2) == [1, 1, 2, 1, 2]
    assert shards.assign([5, 5, 5], 3) == [1, 2, 3]
    assert shards.parse("2/4") == (2, 4)


def test_a_store_that_does_not_belong_is_refused_in_one_line(tmp_path, inputs, tokenizer_dir, err):
    from domainlm.vocab import train_wordpiece

    s1, s2, s3 = (tmp_path / f"s{i}" for i in (1, 2, 3))
    for i, part in enumerate((s1, s2), 1):
        prepare(inputs, part, tokenizer_dir, "--shard", f"{i}/2")
    other_options = tmp_path / "other-options"
    prepare(inputs, other_options, tokenizer_dir, "--shard", "2/2", "--min-doc-chars", "3")
    plain = tmp_path / "plain"
    prepare(inputs[:1], plain, tokenizer_dir)
    vocab = tmp_path / "vocab"
    train_wordpiece((ZH_DOCS + EN_DOCS) * 2, vocab, vocab_size=400)
    other_vocab = tmp_path / "other-vocab"
    prepare(inputs[:1], other_vocab, str(vocab))
    out = tmp_path / "merged"
    cases = [
        ([s1, s2, s2], "store {s2} is given twice: its documents would be merged twice"),
        ([s1], "shard(s) 2 of 2 missing (given: 1): give every shard of the run"),
        (
            [s1, other_options],
            f"store {other_options} was prepared with --min-doc-chars 3, store {s1} with "
            "--min-doc-chars 10: shards of one corpus share every option",
        ),
        (
            [s1, plain],
            f"store {s1} is a shard of a `prepare --shard` run and store {plain} is not: merge the shards of "
            "one run, or stores prepared apart, not both at once",
        ),
        ([plain, other_vocab], f"store {other_vocab} was tokenized with another vocabulary"),
        ([s1, tmp_path / "nothing"], f"store {tmp_path / 'nothing'}: {tmp_path / 'nothing'} is not a corpus store"),
    ]
    for stores, message in cases:
        line = one_line(err("merge", *stores, "--out", out))
        assert line.startswith("error: " + message.format(s2=s2)), line
        assert not out.exists()
    shutil.copytree(s2, s3)  # the same shard twice, under two names
    line = one_line(err("merge", s1, s2, s3, "--out", out))
    assert line == f"error: stores {s2} and {s3} are both shard 2 of 2: give each shard once\n"
    # a shard that takes no file
    line = one_line(err("prepare", *inputs, "--out", tmp_path / "s4", "--tokenizer", tokenizer_dir, "--shard", "4/4"))
    assert (
        line == "error: --shard 4/4: no input file falls to this shard (3 file(s) for 4 shards; a shard takes whole "
        "files): use at most 3 shards\n"
    )
    assert one_line(
        err("prepare", *inputs, "--out", tmp_path / "s5", "--tokenizer", tokenizer_dir, "--shard", "0/2")
    ).startswith("error: --shard '0/2': expected I/N with 1 <= I <= N")
