"""The corpus store and `domainlm prepare` / `inspect`, run through the real CLI."""

import json
import pickle

import numpy as np
import pytest

from domainlm.cli import main
from domainlm.data.prepare import PrepareConfig, prepare
from domainlm.data.store import Corpus, CorpusWriter, token_dtype, write_megatron
from domainlm.errors import DomainLMError
from tests.conftest import EN_DOCS, ZH_DOCS


def run_prepare(inputs, out, tokenizer_dir, *flags):
    return main(
        ["prepare", *map(str, inputs), "--out", str(out), "--tokenizer", tokenizer_dir, "--workers", "0", *flags]
    )


def test_store_round_trip_and_pickle_by_path(tmp_path):
    w = CorpusWriter(tmp_path / "c", vocab_size=100)
    w.add(np.array([5, 6, 7, 8]), np.array([3, 1]), np.array([1, 0, 1, 1], bool))
    w.add(np.array([9]), np.array([1]), np.array([1], bool))
    w.close({"tokenizer": "t"})
    c = Corpus(tmp_path / "c")
    assert (c.n_documents, c.n_sentences, c.n_tokens) == (2, 3, 5)
    assert c.sentence(0).tolist() == [5, 6, 7] and c.sentence_words(0).tolist() == [True, False, True]
    assert list(c.document_sentences(1)) == [2]
    c2 = pickle.loads(pickle.dumps(c))
    assert len(pickle.dumps(c)) < 200 and c2.sentence(2).tolist() == [9]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32
    with pytest.raises(DomainLMError, match="outside the vocabulary"):
        CorpusWriter(tmp_path / "d", vocab_size=10).add(np.array([10]), np.array([1]), np.array([1], bool))


def test_damaged_or_foreign_folders_are_not_corpora(tmp_path):
    with pytest.raises(DomainLMError, match="is not a corpus store"):
        Corpus(tmp_path)
    w = CorpusWriter(tmp_path / "c", vocab_size=100)
    w.add(np.array([1, 2]), np.array([2]), np.array([1, 1], bool))
    w.close({})
    (tmp_path / "c" / "tokens.bin").write_bytes(b"\x01")
    with pytest.raises(DomainLMError, match="damaged"):
        Corpus(tmp_path / "c")


def test_prepare_end_to_end_ids_and_word_flags_decode_back(tmp_path, zh_txt, tokenizer_dir, tokenizer, capsys):
    jsonl = tmp_path / "en.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in EN_DOCS), encoding="utf-8")
    out = tmp_path / "corpus"
    assert run_prepare([zh_txt, jsonl], out, tokenizer_dir, "--segment") == 0
    assert {p.name for p in out.iterdir()} >= {
        "tokens.bin",
        "words.bin",
        "sentences.bin",
        "documents.bin",
        "meta.json",
        "stats.json",
        "config.yaml",
        "tokenizer",
    }
    corpus = Corpus(out)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents"] == len(ZH_DOCS) + len(EN_DOCS) == corpus.n_documents
    assert stats["languages"] == {"zh": len(ZH_DOCS), "en": len(EN_DOCS)}
    assert stats["tokens"] == corpus.n_tokens
    assert stats["tokens_per_sentence"] == pytest.approx(corpus.n_tokens / corpus.n_sentences, abs=0.01)
    # Every document decodes back to its text (lower-cased, spaces aside), sentence by sentence.
    for j, text in enumerate(ZH_DOCS + EN_DOCS):
        decoded = "".join(tokenizer.decode(corpus.sentence(i).tolist()) for i in corpus.document_sentences(j))
        assert decoded.replace(" ", "") == text.lower().replace(" ", "")
    # Whole words from the segmenter: 北京大学 is one word of 4 tokens.
    doc = ZH_DOCS.index(next(d for d in ZH_DOCS if "北京大学" in d))
    first = corpus.document_sentences(doc)[0]
    tokens = tokenizer.convert_ids_to_tokens(corpus.sentence(first).tolist())
    k = tokens.index("北")
    assert corpus.sentence_words(first)[k : k + 4].tolist() == [True, False, False, False]
    assert corpus.meta["word_starts"] == "segmenter:rjieba"
    # inspect prints stats and sample sentences with boundaries
    assert main(["inspect", str(out), "--samples", "3"]) == 0
    printed = capsys.readouterr().out
    assert "tokens_per_sentence" in printed and "|" in printed


def test_rerun_is_a_no_op_different_corpus_refused_overwrite_replaces(tmp_path, zh_txt, tokenizer_dir, capsys):
    out = tmp_path / "corpus"
    assert run_prepare([zh_txt], out, tokenizer_dir) == 0
    before = (out / "tokens.bin").read_bytes()
    assert run_prepare([zh_txt], out, tokenizer_dir) == 0
    assert "up to date" in capsys.readouterr().err
    assert run_prepare([zh_txt], out, tokenizer_dir, "--segment") == 2
    assert (
        "holds an earlier finished `domainlm prepare` run (a corpus made from other inputs or options); pass "
        "--overwrite" in capsys.readouterr().err
    )
    assert (out / "tokens.bin").read_bytes() == before  # nothing already written was touched
    assert run_prepare([zh_txt], out, tokenizer_dir, "--segment", "--overwrite") == 0
    assert Corpus(out).meta["word_starts"] == "segmenter:rjieba"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_failed_run_leaves_no_partial_store_and_stale_partial_is_removed(tmp_path, tokenizer_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好的文档内容很长很长。"}\n{oops\n', encoding="utf-8")
    out = tmp_path / "corpus"
    (tmp_path / ".corpus.partial").mkdir()  # as left by a killed run
    assert run_prepare([bad], out, tokenizer_dir) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2: bad JSONL line" in err
    assert not out.exists() and not (tmp_path / ".corpus.partial").exists()


def test_drops_and_duplicates_are_counted(tmp_path, tokenizer_dir):
    docs = ZH_DOCS + [ZH_DOCS[0], ZH_DOCS[1][:-3] + "真不错。", "短", "\u200b\u3000"]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
    cfg = PrepareConfig(
        input=[str(p)], out=str(tmp_path / "c"), tokenizer=tokenizer_dir, workers=0, near_dup_threshold=0.5
    )
    stats = prepare(cfg, progress=False)
    assert stats["documents_read"] == len(docs)
    assert (stats["duplicates_exact"], stats["duplicates_near"]) == (1, 1)
    assert (stats["dropped_short"], stats["dropped_empty"]) == (1, 1)
    assert stats["documents"] == len(ZH_DOCS)


def test_over_long_sentences_are_cut_and_counted(tmp_path, tokenizer_dir):
    p = tmp_path / "long.txt"
    p.write_text("酒店" * 40 + "。短句。\n", encoding="utf-8")
    cfg = PrepareConfig(
        input=[str(p)], out=str(tmp_path / "c"), tokenizer=tokenizer_dir, workers=0, max_sentence_tokens=16
    )
    stats = prepare(cfg, progress=False)
    c = Corpus(tmp_path / "c")
    assert stats["sentences_cut"] == 1
    assert c.sentence_lengths().tolist() == [16] * 5 + [1, 3]


def test_worker_processes_give_the_same_store(tmp_path, zh_txt, tokenizer_dir):
    outs = []
    for workers in (0, 2):
        out = tmp_path / f"c{workers}"
        cfg = PrepareConfig(input=[str(zh_txt)], out=str(out), tokenizer=tokenizer_dir, workers=workers, segment=True)
        prepare(cfg, progress=False)
        outs.append(out)
    for name in ("tokens.bin", "words.bin", "sentences.bin", "documents.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_import_paddlenlp_and_megatron(tmp_path, tokenizer_dir, tokenizer):
    sents = [
        [tokenizer.encode(s, add_special_tokens=False) for s in ("酒店很好。", "服务周到。")],
        [tokenizer.encode("电脑不错。", add_special_tokens=False)],
    ]
    flat = np.array([t for d in sents for s in d for t in s])
    lens = np.array([len(s) for d in sents for s in d])
    np.save(tmp_path / "pd_ids.npy", flat)
    np.savez(tmp_path / "pd_idx.npz", lens=lens, docs=np.array([0, 2, 3]))
    write_megatron(tmp_path / "mg", sents)
    for name, source in (("a", "pd_ids.npy"), ("b", "mg.bin")):
        assert run_prepare([tmp_path / source], tmp_path / name, tokenizer_dir) == 0
        c = Corpus(tmp_path / name)
        assert (c.n_documents, c.n_sentences) == (2, 3)
        assert np.asarray(c.tokens).tolist() == flat.tolist()


def test_bad_inputs_have_clear_errors(tmp_path, tokenizer_dir, zh_txt, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_prepare([empty], tmp_path / "o", tokenizer_dir) == 2
    assert "holds no readable files" in capsys.readouterr().err
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n", encoding="utf-8")
    assert run_prepare([blank], tmp_path / "o", tokenizer_dir) == 2
    assert "no documents left" in capsys.readouterr().err
    assert run_prepare([zh_txt], tmp_path / "o", str(tmp_path / "no-such-tokenizer")) == 2
    assert "no-such-tokenizer: no such folder" in capsys.readouterr().err
    assert main(["prepare", str(zh_txt), "--out", str(tmp_path / "o")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert run_prepare([zh_txt], tmp_path / "o", tokenizer_dir, "--max-sentence-tokens", "2") == 2
    assert "--max-sentence-tokens = 2 is out of range" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert run_prepare([zh_txt], tmp_path / "other", tokenizer_dir) == 2
    assert "holds keep.txt, not from `domainlm prepare`" in capsys.readouterr().err
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    # a slow (Python) tokenizer cannot give offsets and word ids
    import transformers

    class Slow:
        is_fast = False

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Slow())
    assert run_prepare([zh_txt], tmp_path / "o", tokenizer_dir) == 2
    assert "is not a fast" in capsys.readouterr().err


def test_config_from_yaml_with_flag_override_and_unknown_key(tmp_path, zh_txt, tokenizer_dir, capsys):
    y = tmp_path / "prep.yaml"
    y.write_text(f"input: [{zh_txt}]\ntokenizer: {tokenizer_dir}\nout: {tmp_path / 'c'}\nsegment: true\nworkers: 0\n")
    assert main(["prepare", "--config", str(y), "--no-segment"]) == 0
    import yaml

    resolved = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert resolved["segment"] is False and resolved["input"] == [str(zh_txt)]
    y.write_text("segmnt: true\n")
    assert main(["prepare", "--config", str(y)]) == 2
    assert "unknown option 'segmnt'" in capsys.readouterr().err


def test_a_ctrl_c_that_something_swallowed_still_stops_the_encoding_at_the_next_chunk(tokenizer_dir):
    """Python prints and drops a KeyboardInterrupt raised inside a finalizer or a callback; the pool's handler
    remembers the Ctrl-C, so the next chunk stops the run anyway (and the handler is put back)."""
    import contextlib
    import os
    import signal
    from pathlib import Path

    from domainlm.data.prepare import _encode_all
    from domainlm.data.readers import Document
    from domainlm.data.tokenize import EncodeOptions

    options = EncodeOptions(tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"))
    chunks = ([Document(text=text, source="t.txt")] for text in ZH_DOCS * 4)
    before = signal.getsignal(signal.SIGINT)
    results = _encode_all(chunks, options, workers=1)
    next(results)
    with contextlib.suppress(KeyboardInterrupt):  # what a finalizer does with it
        os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        next(results)
    assert signal.getsignal(signal.SIGINT) is before
