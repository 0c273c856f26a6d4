"""The console in Chinese and English: one message catalogue, every text of the pages in it, the language chosen by
the browser and kept by the switch; the CLI's words stay English."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from domainlm.console import i18n, settings  # noqa: E402
from domainlm.console.app import Console  # noqa: E402
from domainlm.console.settings import ConsoleConfig  # noqa: E402
from domainlm.console.web import create_app  # noqa: E402
from tests.console_support import write_labelled  # noqa: E402

CONSOLE = Path(i18n.__file__).parent
LITERAL = re.compile(r"""_\(\s*(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)")""")
ZH = i18n.catalogue("zh-CN")


def page_texts() -> set[str]:
    """Every text the pages and notifications pass to _() literally, and the words they translate from data."""
    found = set()
    for path in [*sorted((CONSOLE / "templates").glob("*.html")), *sorted(CONSOLE.glob("*.py"))]:
        if path.name == "i18n.py":  # its docstring's example
            continue
        for m in LITERAL.finditer(path.read_text(encoding="utf-8")):
            text = m.group(1) if m.group(1) is not None else m.group(2)
            found.add(text.replace("\\'", "'").replace('\\"', '"'))
    from domainlm.console.compare import SETTINGS

    found |= set(i18n.JS_KEYS) | set(SETTINGS) | set(settings.TITLES.values())
    found |= {"queued", "running", "succeeded", "failed", "cancelled", "interrupted", "Retry", "Resume", "test", "dev"}
    found |= {
        "base",
        "snapshot",
        "final",
        "classifier",
        "linear",
        "export",
        "tokenizer",
        "labelled",
        "documents",
        "corpus",
    }
    for command in settings.job_types():
        found.add(command)
        found |= {title for title, _ in settings.sections(command)} | set(settings.presets(command))
        for spec in settings.field_specs(command).values():
            found |= {spec.name.replace("_", " "), spec.help}
            found |= {c for c in map(str, spec.choices) if not c.isdigit()}
    return found


def test_every_text_of_the_pages_is_in_the_chinese_catalogue():
    missing = sorted(t for t in page_texts() if t not in ZH)
    assert missing == []


def test_each_translation_keeps_the_fields_of_its_text():
    field = re.compile(r"\{([a-z_]+)\}")
    wrong = {k: v for k, v in ZH.items() if sorted(field.findall(k)) != sorted(field.findall(v))}
    assert wrong == {}
    assert all(
        v.strip() and v != k or k in ("AdamW beta1", "ONNX opset", "alpha") or k.isascii() and v.isascii()
        for k, v in ZH.items()
    )


@pytest.mark.parametrize(
    ("cookie", "header", "lang"),
    [
        (None, "zh-CN,zh;q=0.9,en;q=0.8", "zh-CN"),
        (None, "en-US,en;q=0.9", "en"),
        (None, "zh-TW", "zh-CN"),
        (None, "fr-FR, en;q=0.5, zh;q=0.7", "zh-CN"),
        (None, "fr-FR", "en"),
        (None, None, "en"),
        ("en", "zh-CN", "en"),
        ("zh-CN", "en-US", "zh-CN"),
        ("xx", "zh", "zh-CN"),
    ],
)
def test_the_language_is_the_switch_else_the_browsers(cookie, header, lang):
    assert i18n.pick(cookie, header) == lang


def test_messages_from_the_checks_are_translated_with_their_values():
    _ = i18n.translator("zh-CN")
    assert _.message("epochs = 99 is out of range [1, 50]") == "训练轮数 = 99 超出允许范围 [1, 50]"
    assert (
        _.message("max seq len 512 exceeds what the model demo-base (folder) can take (64 positions); use 64 or less")
        == "最大序列长度 512 超过了模型 demo-base (folder) 能接受的长度（64 个位置）；请使用 64 或更小的值"
    )
    assert _.message("job 4 has already succeeded") == "任务 4 已经成功"
    assert _.message("a sentence no key matches") == "a sentence no key matches"  # shown as it is, not lost
    assert _("Create job") == "新建任务" and i18n.translator("en")("Create job") == "Create job"
    assert _("{n} rows", n=32) == "32 行"


@pytest.fixture
def idle(tmp_path, tiny_model):
    home = tmp_path / "home"
    console = Console(ConsoleConfig(home=str(home), token="t", base_models=[tiny_model]))
    client = TestClient(create_app(console))
    client.get("/?token=t")
    train = client.post(
        "/api/datasets",
        headers={"X-CSRF-Token": console.csrf},
        files={"file": ("train.jsonl", open(write_labelled(tmp_path / "train.jsonl"), "rb"))},
    ).json()
    yield client, console, train, tiny_model
    console.stop()


def _visible(html: str) -> str:
    """The text a reader sees: no tags, scripts, attribute values, code or preformatted blocks, nor what is marked as
    English on purpose (the API's own reference)."""
    html = re.sub(r"<(script|style|code|pre|option)[^>]*>.*?</\1>", " ", html, flags=re.S)
    html = re.sub(r'<(table|section)[^>]* lang="en"[^>]*>.*?</\1>', " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_every_page_is_chinese_for_a_chinese_browser_and_english_after_the_switch(idle):
    client, console, train, tiny = idle
    zh = {"Accept-Language": "zh-CN,zh;q=0.9"}
    # texts of the catalogue that a Chinese page must not show (a command name such as `domainlm console` is quoted in
    # Chinese sentences too, so texts that a translation itself contains are not counted)
    words = " ".join(ZH.values())
    english = sorted(
        (k for k in ZH if "{" not in k and len(k) > 14 and " " in k and k not in words), key=len, reverse=True
    )
    pages = [
        "/jobs",
        "/models",
        "/datasets",
        f"/datasets/{train['id']}",
        "/resources",
        "/docs",
        *(f"/jobs/new?command={c}" for c in settings.job_types()),
    ]
    for url in pages:
        html = client.get(url, headers=zh).text
        assert '<html lang="zh-CN">' in html, url
        seen = _visible(html)
        left = [k for k in english if k in seen]
        assert left == [], f"{url}: English left: {left[:5]}"
    form = client.get("/jobs/new", headers=zh).text
    assert "训练轮数" in form and "遍历训练数据的轮数" in form and '<span class="option-name">epochs</span>' in form
    # a field error comes back in Chinese, with the CLI's range and the field's Chinese name
    r = client.post(
        "/jobs/new",
        headers=zh,
        data={
            "csrf": console.csrf,
            "command": "finetune",
            "model": tiny,
            "train": train["path"],
            "epochs": "99",
            "max_seq_len": "64",
        },
    )
    assert r.status_code == 422 and "训练轮数 = 99 超出允许范围 [1, 50]" in r.text and "任务未创建" in r.text
    # the switch: a cookie, then English whatever the browser says; back to the page it was pressed on
    r = client.get("/language/en?next=/models", headers=zh, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/models" and "domainlm_lang=en" in r.headers["set-cookie"]
    english_page = client.get("/jobs", headers=zh).text
    assert '<html lang="en">' in english_page and "Create job" in english_page
    assert client.get("/language/en?next=https://evil.example/", follow_redirects=False).headers["location"] == "/jobs"
    assert client.get("/language/fr").status_code == 404
    client.get("/language/zh-CN")
    blob = re.search(r'<script type="application/json" id="i18n">(.*?)</script>', client.get("/jobs").text).group(1)
    js = json.loads(blob)
    assert js["succeeded"] == "成功" and js["no GPU"] == "无 GPU"  # the texts console.js writes itself
    # the page that asks for the token too
    assert "需要访问令牌" in TestClient(client.app).get("/jobs", headers=zh).text
    # the API and the CLI stay English
    assert client.get("/api/models/999").json() == {"detail": "model 999 does not exist"}


def test_notifications_speak_the_language_of_whoever_created_the_job(idle):
    from domainlm.console.notify import email_text

    client, console, train, tiny = idle
    r = client.post(
        "/api/jobs",
        headers={"X-CSRF-Token": console.csrf, "Accept-Language": "zh-CN"},
        json={
            "command": "finetune",
            "name": "情感",
            "config": {"model": tiny, "train": train["path"], "max_seq_len": 64},
            "notify": {"webhook": "http://127.0.0.1:9/hook"},
        },
    )
    assert r.status_code == 201 and r.json()["notify"]["lang"] == "zh-CN"
    sent = []
    console.notifier.send = lambda payload, webhook=None, email=None: sent.append(payload)
    from domainlm.console.db import Job

    with console.sessions() as s:
        job = s.get(Job, r.json()["id"])
        job.status = "failed"
        console._notify(job, "failed", "job 1 has already succeeded")
    assert sent[0]["summary"] == "[domainlm] 任务 1“情感”失败: 任务 1 已经成功" and sent[0]["language"] == "zh-CN"
    assert "状态: 失败" in email_text(sent[0]) and "错误: 任务 1 已经成功" in email_text(sent[0])
