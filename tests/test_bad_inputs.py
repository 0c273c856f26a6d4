"""The bad-input catalogue: one test per bad input, each run as a user would type it. Each checks the exit status
(2), a message naming the file/line/field/flag, no traceback (main() would raise), nothing half-written that a
later stage could take for good output, and nothing of the user's deleted or changed."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from domainlm.cli import main
from tests.conftest import make_documents

FAST = ["--batch-size", "16", "--learning-rate", "2e-3", "--max-seq-len", "32", "--epochs", "1", "--logging-freq", "50"]


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath("src"), os.getcwd()]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from tests.test_classify import make_rows, write_jsonl

    root = tmp_path_factory.mktemp("labelled")
    return {
        "train": write_jsonl(root / "train.jsonl", make_rows(12, 1)),
        "test": write_jsonl(root / "test.jsonl", make_rows(4, 2)),
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model, labelled):
    out = tmp_path_factory.mktemp("clf") / "run"
    assert main(["finetune", "--model", tiny_model, "--train", labelled["train"], "--out", str(out), *FAST]) == 0
    return out


def snapshot(folder):
    """Every file under `folder` with its bytes: 'nothing changed' is equality of two snapshots."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- data loss ----------------------------------------------------------------------------------------------


def test_prepare_overwrite_replaces_only_a_corpus_store_or_an_empty_folder(tmp_path, zh_txt, tokenizer_dir, err):
    prep = ["prepare", zh_txt, "--tokenizer", tokenizer_dir, "--workers", "0", "--overwrite", "--out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_bytes(b"years of work")
    assert f"--out {mine} holds thesis.docx, not from `domainlm prepare`; prepare replaces the whole folder" in err(
        *prep, mine
    )
    assert snapshot(mine) == {"thesis.docx": b"years of work"}
    store = tmp_path / "store"
    err(*prep, store, code=0)
    (store / "notes.txt").write_text("mine")
    assert f"--out {store} holds notes.txt, not from `domainlm prepare`" in err(*prep, store, "--segment")
    assert (store / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    err(*prep, empty, code=0)
    assert (empty / "meta.json").is_file()


def test_prepare_input_inside_out_is_refused_and_a_store_inside_an_input_folder_is_not_read(
    tmp_path, tokenizer_dir, err
):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("\n\n".join(make_documents(20)), encoding="utf-8")
    before = snapshot(docs)
    message = err(
        "prepare", docs / "a.txt", "--out", docs, "--tokenizer", tokenizer_dir, "--workers", "0", "--overwrite"
    )
    assert f"--out {docs} holds the input {docs / 'a.txt'}, which would be replaced" in message
    assert snapshot(docs) == before
    # prepare docs/ --out docs/corpus: the store's own files (tokenizer/vocab.txt ...) are not documents
    args = ("prepare", docs, "--out", docs / "corpus", "--tokenizer", tokenizer_dir, "--workers", "0")
    err(*args, code=0)
    assert "up to date" in err(*args, code=0)


def test_predict_out_equal_to_input_is_refused(tmp_path, classifier, labelled, err):
    data = tmp_path / "data.jsonl"
    data.write_bytes(open(labelled["test"], "rb").read())
    before = data.read_bytes()
    assert f"--out {data} is --input" in err("predict", "--model", classifier / "model", "--input", data, "--out", data)
    assert data.read_bytes() == before
    folder = tmp_path / "folder"
    folder.mkdir()
    assert f"--out {folder} is a folder" in err(
        "predict", "--model", classifier / "model", "--input", data, "--out", folder
    )


def test_finetune_into_an_earlier_run_needs_overwrite_and_leaves_nothing_of_it(tmp_path, tiny_model, labelled, err):
    out = tmp_path / "run"
    base = ["finetune", "--model", tiny_model, "--train", labelled["train"], "--out", out, *FAST]
    err(*base, "--test", labelled["test"], code=0)
    (out / "my_notes.md").write_text("keep")
    before = snapshot(out)
    assert "holds an earlier finished `domainlm finetune` run" in err(*base)
    assert snapshot(out) == before
    err(*base, "--overwrite", code=0)  # no --test now: the old test outputs must not stay behind
    assert not list(out.glob("test_*")) and (out / "my_notes.md").read_text() == "keep"
    assert (out / "dev_predictions.jsonl").is_file() and "test" not in json.loads((out / "metrics.json").read_text())
    other = tmp_path / "pretrain-run"  # another command's folder: refused even with --overwrite
    other.mkdir()
    (other / "config.yaml").write_text("corpus: c\nmodel: m\nout: o\n")
    (other / "log.jsonl").write_text("")
    assert "not from `domainlm finetune`" in err(
        "finetune", "--model", tiny_model, "--train", labelled["train"], "--out", other, *FAST, "--overwrite"
    )
    assert sorted(p.name for p in other.iterdir()) == ["config.yaml", "log.jsonl"]


def test_extend_vocab_out_equal_to_model_or_an_existing_file_is_refused(tmp_path, tiny_model, err):
    from pathlib import Path

    terms = tmp_path / "terms.txt"
    terms.write_text("验收标准\n")
    model = Path(tiny_model)
    before = snapshot(model)
    assert "is (or contains) --model" in err("extend-vocab", "--model", model, "--tokens", terms, "--out", model)
    a_file = tmp_path / "report.pdf"
    a_file.write_bytes(b"%PDF")
    assert f"--out {a_file} is an existing file" in err(
        "extend-vocab", "--model", model, "--tokens", terms, "--out", a_file
    )
    assert a_file.read_bytes() == b"%PDF" and snapshot(model) == before


# ---- one run per output folder -------------------------------------------------------------------------------


def test_a_second_run_on_a_locked_out_stops_at_once_naming_the_holder(
    tmp_path, tokenizer_dir, tiny_model, zh_txt, labelled, err
):
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from domainlm import locks; locks.claim(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        live_partial = tmp_path / ".busy.partial"  # the holder's work in progress
        live_partial.mkdir()
        (live_partial / "tokens.bin").write_bytes(b"\x01\x02")
        expected = f"--out {out} is in use by another domainlm run (PID {holder.pid})"
        started = time.monotonic()
        assert expected in err("prepare", zh_txt, "--out", out, "--tokenizer", tokenizer_dir, "--workers", "0")
        assert expected in err("pretrain", "--corpus", tmp_path / "c", "--model", tiny_model, "--out", out)
        assert expected in err("finetune", "--model", tiny_model, "--train", labelled["train"], "--out", out, *FAST)
        assert expected in err("evaluate", "--model", tiny_model, "--data", labelled["test"], "--out", out)
        assert time.monotonic() - started < 30
        assert (live_partial / "tokens.bin").read_bytes() == b"\x01\x02" and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / ".busy.partial" / "tokens.bin").unlink()
    (tmp_path / ".busy.partial").rmdir()
    err("prepare", zh_txt, "--out", out, "--tokenizer", tokenizer_dir, "--workers", "0", code=0)  # the OS freed it
    assert not (tmp_path / ".busy.lock").exists()


def test_workers_are_capped_at_the_cores(capsys):
    from domainlm.data.prepare import _workers

    cores = len(os.sched_getaffinity(0))
    assert _workers(1000) == cores
    assert f"--workers 1000 is more than the {cores} cores available; using {cores}" in capsys.readouterr().err
    assert _workers(-1) == cores and _workers(0) == 0


def test_ctrl_c_in_prepare_prints_one_line_and_leaves_no_store(tmp_path, tokenizer_dir):
    src = tmp_path / "big.txt"
    src.write_text("\n\n".join(make_documents(40000)), encoding="utf-8")
    out = tmp_path / "store"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "domainlm.cli",
            "prepare",
            str(src),
            "--out",
            str(out),
            "--tokenizer",
            tokenizer_dir,
            "--workers",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,
    )  # its own process group: Ctrl-C reaches it and its workers
    partial = tmp_path / ".store.partial"
    tokens = partial / "tokens.bin"
    deadline = time.monotonic() + 120
    # wait until workers have returned encoded chunks: they are up and encoding when the signal arrives
    while proc.poll() is None and time.monotonic() < deadline and not (tokens.is_file() and tokens.stat().st_size):
        time.sleep(0.05)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.replace("\r", "\n").rstrip().splitlines()[-1] == "interrupted"
    assert not out.exists() and not partial.exists()


# ---- tracebacks that became messages -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stdin, message",
    [
        (b"", "<stdin> holds no text"),
        (b"\n  \n\t\n", "<stdin> holds no text"),
        ("电脑\n".encode() + b"\xff\xfe\xfd\n", "<stdin>:2: not text (neither UTF-8 nor GB18030)"),
    ],
)
def test_predict_on_bad_stdin(classifier, stdin, message, err, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert message in err("predict", "--model", classifier / "model")


def test_predict_reads_gbk_stdin(classifier, err, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("电脑屏幕电池键盘\n酒店房间早餐\n".encode("gbk"))))
    capsys.readouterr()
    assert main(["predict", "--model", str(classifier / "model")]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["电脑屏幕电池键盘", "酒店房间早餐"]


def test_max_seq_len_beyond_the_models_positions(tmp_path, tiny_model, classifier, labelled, err):
    out = tmp_path / "ft"
    message = err(
        "finetune", "--model", tiny_model, "--train", labelled["train"], "--out", out, *FAST, "--max-seq-len", "128"
    )
    assert "--max-seq-len 128 exceeds what the model" in message and "(64 positions); use --max-seq-len 64" in message
    assert not out.exists() or not any(out.iterdir())
    # evaluate / predict: the model fixes the limit and nothing is trained, so it is used, with a notice
    notice = err(
        "evaluate",
        "--model",
        classifier / "model",
        "--data",
        labelled["test"],
        "--out",
        tmp_path / "ev",
        "--max-seq-len",
        "4096",
        code=0,
    )
    assert "--max-seq-len 4096 is more than" in notice and "using 64" in notice
    assert "using 64" in err(
        "predict",
        "--model",
        classifier / "model",
        "--input",
        labelled["test"],
        "--out",
        tmp_path / "p.jsonl",
        "--max-seq-len",
        "4096",
        code=0,
    )


def test_out_that_is_an_existing_file(tmp_path, tiny_model, classifier, labelled, corpus_dir, err):
    f = tmp_path / "results.csv"
    f.write_text("a,b\n")
    expected = f"--out {f} is an existing file"
    assert expected in err("pretrain", "--corpus", corpus_dir, "--model", tiny_model, "--out", f)
    assert expected in err("finetune", "--model", tiny_model, "--train", labelled["train"], "--out", f, *FAST)
    assert expected in err("evaluate", "--model", classifier / "model", "--data", labelled["test"], "--out", f)
    assert expected in err("report", classifier, "--out", f)
    assert f.read_text() == "a,b\n"


def test_report_on_a_torn_log(tmp_path, classifier, err):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(classifier, run)
    log = run / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 99, "split": "tr')  # killed while writing
    assert "log.jsonl:" in err("report", run, code=0) and (run / "report" / "report.html").is_file()
    lines = log.read_text().splitlines()
    lines[1] = '{"step": 5, "spl'
    log.write_text("\n".join(lines) + "\n")
    assert f"{log}:2: damaged log record" in err("report", run, "--out", tmp_path / "r2")


def test_label_map_with_more_labels_than_the_models_outputs(tmp_path, classifier, labelled, err):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(classifier / "model", model)
    meta = json.loads((model / "domainlm_labels.json").read_text())
    meta["labels"].append("phantom")
    (model / "domainlm_labels.json").write_text(json.dumps(meta))
    expected = f"{model / 'domainlm_labels.json'} lists 4 labels but the model in {model} has 3 outputs"
    assert expected in err("evaluate", "--model", model, "--data", labelled["test"], "--out", tmp_path / "ev")
    assert not (tmp_path / "ev" / "metrics.json").exists()
    assert expected in err("predict", "--model", model, "--input", labelled["test"], "--out", tmp_path / "p.jsonl")
    assert not (tmp_path / "p.jsonl").exists()


def test_skip_bad_rows_is_reported_and_only_advised_where_accepted(tmp_path, tiny_model, classifier, labelled, err):
    from tests.test_classify import make_rows, write_jsonl

    rows = make_rows(12, 3)
    bad = write_jsonl(
        tmp_path / "bad.jsonl", rows[:2] + [{"text": "", "label": "pc"}, {"text": "好", "label": ""}] + rows[2:]
    )
    assert "bad.jsonl:3: empty text (pass --skip-bad-rows" in err(
        "evaluate", "--model", classifier / "model", "--data", bad, "--out", tmp_path / "ev"
    )
    report = err(
        "evaluate", "--model", classifier / "model", "--data", bad, "--out", tmp_path / "ev", "--skip-bad-rows", code=0
    )
    assert f"{bad}: skipped 2 bad rows (empty text: 1, no label: 1); {len(rows)} rows used" in report
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == len(rows)
    message = err("predict", "--model", classifier / "model", "--input", bad, "--out", tmp_path / "p.jsonl")
    assert "bad.jsonl:3: empty text" in message and "--skip-bad-rows" not in message
    report = err(
        "finetune", "--model", tiny_model, "--train", bad, "--out", tmp_path / "ft", *FAST, "--skip-bad-rows", code=0
    )
    assert "skipped 2 bad rows" in report


def test_metric_is_checked_before_any_training(tmp_path, tiny_model, labelled, err):
    out = tmp_path / "ft"
    message = err(
        "finetune", "--model", tiny_model, "--train", labelled["train"], "--out", out, *FAST, "--metric", "bogus"
    )
    assert "--metric 'bogus' is not computed for a multiclass task; choose one of accuracy" in message
    assert not out.exists()
    assert "'accuracy' is not computed for a multilabel task" in err(
        "finetune",
        "--model",
        tiny_model,
        "--train",
        labelled["train"],
        "--out",
        out,
        "--task",
        "multilabel",
        "--metric",
        "accuracy",
    )


def test_a_tokenizer_error_is_shown_whole(tmp_path, zh_txt, err, monkeypatch):
    import transformers

    def fail(*a, **k):
        raise ValueError(
            "Couldn't instantiate the backend tokenizer from one of:\n(1) a `tokenizers` library "
            "serialization file,\n(2) a slow tokenizer instance to convert or\n(3) an equivalent slow "
            "tokenizer class to instantiate and convert.\nYou need to have sentencepiece installed."
        )

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    message = err("prepare", zh_txt, "--out", tmp_path / "o", "--tokenizer", "some/model")
    assert (
        "could not be loaded: Couldn't instantiate" in message
        and "You need to have sentencepiece installed." in message
    )
    assert len(message.strip().splitlines()) == 1


def test_evaluate_into_a_finetune_run_or_its_model_folder_is_refused(tmp_path, classifier, labelled, err):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(classifier, run)
    before = snapshot(run)
    assert "holds the output of `domainlm finetune`" in err(
        "evaluate", "--model", run / "model", "--data", labelled["test"], "--out", run
    )
    assert "lies inside --model" in err(
        "evaluate", "--model", run / "model", "--data", labelled["test"], "--out", run / "model"
    )
    assert snapshot(run) == before
    ev = tmp_path / "ev"  # evaluating again into the same folder: only with --overwrite, which replaces its own files
    err("evaluate", "--model", run / "model", "--data", labelled["test"], "--out", ev, code=0)
    assert "pass --overwrite" in err("evaluate", "--model", run / "model", "--data", labelled["test"], "--out", ev)
    err("evaluate", "--model", run / "model", "--data", labelled["test"], "--out", ev, "--overwrite", code=0)


def test_an_imported_corpus_holding_special_ids_is_refused(tmp_path, tokenizer_dir, tokenizer, err):
    import numpy as np

    ids = np.array(tokenizer.encode("酒店很好。", add_special_tokens=True))  # [CLS] ... [SEP], as some tools write
    np.save(tmp_path / "pd_ids.npy", ids)
    np.savez(tmp_path / "pd_idx.npz", lens=np.array([len(ids)]), docs=np.array([0, 1]))
    message = err(
        "prepare", tmp_path / "pd_ids.npy", "--out", tmp_path / "c", "--tokenizer", tokenizer_dir, "--workers", "0"
    )
    assert f"pd_ids.npy: special token id {tokenizer.cls_token_id} at position 0 of document 1" in message
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.partial").exists()
