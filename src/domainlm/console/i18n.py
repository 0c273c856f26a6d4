"""The console's languages: English and Simplified Chinese, from one message catalogue per language.

locales/zh-CN.json maps each English text of the pages (labels, help, buttons, notices, errors) to its Chinese;
English is the key, so a text missing from a catalogue shows in English rather than not at all. A key may hold
`{name}` fields: `_("Model {id} was deleted.", id=3)` fills them, and a message made elsewhere ("job 4 has already
succeeded", "epochs = 99 is out of range [1, 50]") is matched against such keys and translated with its values
(a value that is itself a key, a field name or a status, is translated too).

The language: the `domainlm_lang` cookie the switch in the header sets, else the browser's Accept-Language. The
command line and the JSON API's field names stay English.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

LANGUAGES = {"en": "English", "zh-CN": "中文"}
DEFAULT = "en"
COOKIE = "domainlm_lang"
HERE = Path(__file__).parent / "locales"
FIELD = re.compile(r"\\\{([a-z_][a-z0-9_]*)\\\}")
# fields that hold one word (a number, an id, a value): matched without spaces, so that the field before them keeps
# its words ("max seq len 512 exceeds ..." -> field "max seq len", value "512")
ONE_WORD = {"value", "other_value", "n", "m", "p", "have", "limit", "id", "s", "mb", "line", "suffix", "status"}
# what console.js writes into pages itself (statuses, units, chart and button texts)
JS_KEYS = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "interrupted",
    "starting",
    "ready",
    "stopped",
    "steps",
    "cells",
    "step",
    "no points yet",
    "Classifying… (the first time loads the model)",
    "{metric} by step",
    "no GPU",
    "{used} of {total}",
    "free",
    "waiting",
    "n/a",
)


@functools.cache
def catalogue(lang: str) -> dict[str, str]:
    if lang == DEFAULT:
        return {}
    return json.loads((HERE / f"{lang}.json").read_text(encoding="utf-8"))


@functools.cache
def _patterns(lang: str) -> list[tuple[re.Pattern, str]]:
    """Keys with fields as regular expressions, the longest (most specific) first."""
    keys = sorted((k for k in catalogue(lang) if "{" in k), key=len, reverse=True)

    def group(m: re.Match) -> str:
        return f"(?P<{m.group(1)}>\\S+?)" if m.group(1) in ONE_WORD else f"(?P<{m.group(1)}>.+?)"

    return [(re.compile("^" + FIELD.sub(group, re.escape(k)) + "$", re.S), catalogue(lang)[k]) for k in keys]


def pick(cookie: str | None, accept_language: str | None) -> str:
    """The cookie's language if it is one of LANGUAGES, else the first of the browser's that is (by q), else English."""
    if cookie in LANGUAGES:
        return cookie  # type: ignore[return-value]
    wanted = []
    for i, part in enumerate((accept_language or "").split(",")):
        tag, _, q = part.strip().partition(";q=")
        try:
            weight = float(q) if q else 1.0
        except ValueError:
            weight = 0.0
        if tag:
            wanted.append((-weight, i, tag.strip().lower()))
    for _, _, tag in sorted(wanted):
        if tag.startswith("zh"):  # zh, zh-CN, zh-Hans, zh-SG... (traditional readers still read these pages)
            return "zh-CN"
        if tag.startswith("en"):
            return "en"
    return DEFAULT


def of(request) -> str:
    return pick(request.cookies.get(COOKIE), request.headers.get("accept-language"))


class Translator:
    """`_(text, **fields)`: a text of the pages in this language, its fields filled; `_.message(text)`: a message
    made elsewhere (an error, an event), matched against the keys with fields."""

    def __init__(self, lang: str):
        self.lang = lang if lang in LANGUAGES else DEFAULT
        self.table = catalogue(self.lang)

    def __call__(self, text, **fields) -> str:
        text = "" if text is None else str(text)
        out = self.table.get(text, text)
        return out.format(**fields) if fields else out

    def message(self, text) -> str:
        text = "" if text is None else str(text)
        if text in self.table or not self.table:
            return self.table.get(text, text)
        for pattern, target in _patterns(self.lang):
            m = pattern.match(text)
            if m:
                return target.format(**{k: self.table.get(v, v) for k, v in m.groupdict().items()})
        return text

    def js(self) -> dict[str, str]:
        return {k: self(k) for k in JS_KEYS}


def translator(lang: str) -> Translator:
    return _translators(lang if lang in LANGUAGES else DEFAULT)


@functools.cache
def _translators(lang: str) -> Translator:
    return Translator(lang)
