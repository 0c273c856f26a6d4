"""Cleaning, duplicates, sentence splitting and word segmentation."""

import numpy as np

from domainlm.data.clean import (
    Deduplicator,
    exact_key,
    minhash_signature,
    normalize_text,
    reflow_lines,
    strip_page_furniture,
)
from domainlm.data.segment import Segmenter
from domainlm.data.sentences import detect_language, split_en, split_zh
from tests.conftest import EN_DOCS, ZH_DOCS


def test_normalize_removes_control_invisible_and_extra_space_keeps_fullwidth():
    raw = "  质量\u200b验收\x07标准，\t\t严格！\r\n\r\n\u3000第二行  "
    assert normalize_text(raw) == "质量验收 标准， 严格！\n第二行"
    assert normalize_text("ＡＢＣ１２３", "NFKC") == "ABC123"
    assert normalize_text("ＡＢＣ", "NFC") == "ＡＢＣ"


def test_page_furniture_repeated_headers_and_numbers():
    bodies = [[doc[j : j + 6] for j in range(0, 30, 6)] for doc in ZH_DOCS]  # distinct lines per page
    pages = [["工程手册 第3版", *bodies[i - 1], f"第 {i} 页"] for i in range(1, 6)]
    pages = ["\n".join(p) for p in pages]
    cleaned = strip_page_furniture(pages)
    assert [p.split("\n") for p in cleaned] == bodies[:5]


def test_reflow_joins_wrapped_lines_only():
    page = (
        "工程进度计划必须在每个月的第一周内提交给项目\n经理审核，逾期将影响付款。\n第二章\n"
        "The schedule is reviewed by the site\nmanager every week."
    )
    out = reflow_lines(page).split("\n")
    assert out[0] == "工程进度计划必须在每个月的第一周内提交给项目经理审核，逾期将影响付款。"
    assert "第二章" in out
    assert "The schedule is reviewed by the site manager every week." in out


def test_duplicates_exact_ignores_whitespace_near_by_minhash():
    a = "".join(ZH_DOCS)
    near = a[:-8] + "以后一定再来。"
    other = "".join(reversed(EN_DOCS))
    d = Deduplicator(threshold=0.7, num_perm=64)
    assert d.check(exact_key(a), minhash_signature(a, 64)) is None
    assert d.check(exact_key(a.replace("，", "， ")), minhash_signature(a, 64)) == "exact"
    assert d.check(exact_key(near), minhash_signature(near, 64)) == "near"
    assert d.check(exact_key(other), minhash_signature(other, 64)) is None
    off = Deduplicator(threshold=0, num_perm=64)
    assert off.check(exact_key(a), None) is None and off.check(exact_key(near), None) is None


def test_minhash_estimates_jaccard():
    rng = np.random.default_rng(0)
    chars = [chr(c) for c in rng.integers(0x4E00, 0x4E00 + 3000, size=4000)]
    a = "".join(chars)
    b = "".join(chars[:2000]) + "".join(chr(c) for c in rng.integers(0x4E00, 0x9FFF, size=2000))
    agree = (minhash_signature(a, 256) == minhash_signature(b, 256)).mean()
    assert 0.2 < agree < 0.45  # true Jaccard of the 5-gram sets is ~1/3


def test_chinese_sentences_keep_closing_quotes_and_split_on_newline():
    text = "老师说：“机器学习很重要！”大家都同意。真的吗？是的……\n第二行没有标点；分号也断句"
    assert split_zh(text) == [
        "老师说：“机器学习很重要！”",
        "大家都同意。",
        "真的吗？",
        "是的……",
        "第二行没有标点；",
        "分号也断句",
    ]


def test_english_sentences_respect_abbreviations_and_decimals():
    text = "Dr. Smith measured 3.5 m on Jan. 5.\nThe report\nwas late. Was it? Yes."
    assert split_en(text) == ["Dr. Smith measured 3.5 m on Jan. 5.", "The report was late.", "Was it?", "Yes."]


def test_language_detection():
    assert detect_language("工程质量验收标准 ISO 9001") == "zh"
    assert detect_language("The quality acceptance standard 质量") == "en"


def test_segmenter_word_starts_and_user_dictionary(tmp_path):
    text = "我们在北京大学学习自然语言处理"
    starts = Segmenter("rjieba").word_starts(text)
    assert starts.shape == (len(text) + 1,)
    assert starts[0] and starts[3] and not starts[4]  # 北京大学 is one word
    assert Segmenter("jieba").word_starts(text)[0]
    d = tmp_path / "terms.txt"
    d.write_text("验收批次 10 n\n", encoding="utf-8")
    seg = Segmenter("rjieba", str(d))
    s = seg.word_starts("本验收批次合格")
    assert s[1] and not s[2] and not s[3] and not s[4] and s[5]
