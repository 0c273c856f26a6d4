"""The bad-input catalogue, continued: data files, stdin, predict/serve/export/console options. Each case is run as a
user would type it and checks the one-line message (exit 2) or the visible warning, and that nothing was written."""

import io
import json
import shutil

import pytest

from domainlm.cli import main
from tests.conftest import one_line
from tests.test_bad_inputs import FAST, classifier, labelled  # noqa: F401 - shared module fixtures

# ---- data files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "t.jsonl",
            '{"text": "好", "label": "a"}\n{"text": "坏", "label": {"name": "b"}}\n',
            ':2: label is not a string or a list of strings ({"name": "b"})',
        ),
        ("t.tsv", "text\tlabel\n好\ta\n坏\tb\textra\n", ":3: more cells than the header has columns (1 extra"),
        ("t.jsonl", '{"text": "好", "label": "a"}\n{"body": "坏", "label": "b"}\n', ":2: no 'text' field"),
    ],
)
def test_rows_that_are_not_what_they_seem_are_named(tmp_path, tiny_model, name, content, expected, err):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    message = one_line(err("finetune", "--model", tiny_model, "--train", path, "--out", tmp_path / "o", *FAST))
    assert f"{path}{expected}" in message and not (tmp_path / "o").exists()


def test_thin_classes_are_warned_before_k_fold(capsys):
    """(--folds with --test predicts the test file with the fold ensemble: tests/test_ensemble.py.)"""
    from domainlm.classify.data import Dataset, Example, kfold

    data = Dataset("d.jsonl", [Example(str(i), ["a" if i < 8 else "b"]) for i in range(10)])
    kfold(data, 3, 0)
    assert "warning: d.jsonl: fewer rows than --folds 3 for b (2)" in capsys.readouterr().err


# ---- predict ----------------------------------------------------------------------------------------------


def test_predict_out_into_a_missing_folder_is_refused_before_predicting(tmp_path, classifier, labelled, err):
    target = tmp_path / "missing" / "p.jsonl"
    message = one_line(err("predict", "--model", classifier / "model", "--input", labelled["test"], "--out", target))
    assert f"--out {target}: the folder {target.parent} does not exist" in message and not target.parent.exists()


def test_predict_keeps_output_lines_aligned_with_blank_stdin_lines(classifier, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("电脑屏幕\n\n酒店房间\n  \n早餐\n".encode())))
    capsys.readouterr()
    assert main(["predict", "--model", str(classifier / "model")]) == 0
    captured = capsys.readouterr()
    texts = [json.loads(x)["text"] for x in captured.out.splitlines()]
    assert texts == ["电脑屏幕", "", "酒店房间", "", "早餐"]
    assert "<stdin>: 2 blank line(s) (2, 4) answered with no labels" in captured.err


# ---- export and serve ---------------------------------------------------------------------------------------


def test_export_refuses_a_label_map_of_another_size_and_a_failed_export_does_not_block_its_rerun(
    tmp_path, classifier, labelled, err
):
    model = tmp_path / "model"
    shutil.copytree(classifier / "model", model)
    labels_file = model / "domainlm_labels.json"
    meta = json.loads(labels_file.read_text())
    labels_file.write_text(json.dumps({**meta, "labels": [*meta["labels"], "extra"]}))
    message = one_line(err("export", model, "--out", tmp_path / "e"))
    assert (
        f"lists {len(meta['labels']) + 1} labels but the model in {model} has {len(meta['labels'])} outputs" in message
    )
    labels_file.write_text(json.dumps(meta))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "好", "label": "nowhere"}\n', encoding="utf-8")
    assert "never seen in training" in one_line(err("export", model, "--out", tmp_path / "e", "--data", bad))
    assert not (tmp_path / "e").exists()  # --data is checked before any export work
    assert "disagree" in err("export", model, "--out", tmp_path / "e", "--tolerance", "1e-30")  # fails midway
    err(
        "export", model, "--out", tmp_path / "e", "--data", labelled["test"], code=0
    )  # the failed one's folder: replaced
    assert json.loads((tmp_path / "e" / "export.json").read_text())["data_metrics"]["rows"] > 0


def test_serve_answers_deep_json_and_a_vanished_client_with_400():
    import asyncio

    from starlette.requests import Request

    from domainlm.serve.config import ServeConfig
    from domainlm.serve.requests import BadRequest, parse_request
    from domainlm.serve.requests import read_body as _read_body

    with pytest.raises(BadRequest) as deep:
        parse_request(b"[" * 100_000 + b"]" * 100_000, ServeConfig(model="m"))
    assert deep.value.status == 400 and "nests JSON too deeply" in deep.value.message

    async def gone():
        return {"type": "http.disconnect"}

    request = Request({"type": "http", "method": "POST", "headers": [(b"content-length", b"100")]}, gone)
    with pytest.raises(BadRequest) as vanished:
        asyncio.run(_read_body(request, 1000))
    assert vanished.value.status == 400 and "disconnected before the whole body arrived" in vanished.value.message


def test_serve_with_an_empty_token_and_console_on_a_file_are_refused(tmp_path, classifier, err):
    assert "--token is empty, which would serve without authentication" in one_line(
        err("serve", classifier / "model", "--token", "")
    )
    home = tmp_path / "home.txt"
    home.write_text("mine")
    assert f"--home {home} is an existing file" in one_line(err("console", "--home", home))
    assert home.read_text() == "mine"


# ---- report -------------------------------------------------------------------------------------------------


def test_report_on_an_empty_log_says_it_is_empty(tmp_path, err):
    (tmp_path / "log.jsonl").write_text("")
    assert f"{tmp_path / 'log.jsonl'} holds no records yet" in one_line(err("report", tmp_path))


# ---- the serve bench's accuracy check ---------------------------------------------------------------------


def test_serve_bench_fails_when_fp32_does_not_beat_the_majority_class(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("serve_bench", Path(__file__).parents[1] / "bench" / "serve_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"text": str(i), "label": "pos" if i < 6 else "neg"}) + "\n" for i in range(10)))
    assert bench.majority_share(test) == 0.6
    with pytest.raises(SystemExit, match="not above the majority class"):
        bench.check_learned({"fp32": {"accuracy": 0.6}, "int8": {"accuracy": 0.6}}, 0.6)
    bench.check_learned({"fp32": {"accuracy": 0.8}}, 0.6)


def test_the_consoles_try_refuses_more_texts_than_it_answers(tmp_path):
    pytest.importorskip("fastapi")
    from domainlm.console.app import Console
    from domainlm.console.db import Model
    from domainlm.console.settings import ConsoleConfig
    from domainlm.errors import DomainLMError

    console = Console(ConsoleConfig(home=str(tmp_path / "home"), token="t"))
    try:
        with pytest.raises(DomainLMError, match="10000 texts: try answers at most 100 at a time"):
            console.predict(Model(kind="classifier", name="m", path="m"), [f"text {i}" for i in range(10_000)])
    finally:
        console.stop()
