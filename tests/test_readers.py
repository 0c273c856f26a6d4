import gzip
import json
from collections import Counter

import pytest

from domainlm.data.readers import ReadOptions, discover, markdown_to_text, read_file
from domainlm.errors import DomainLMError
from tests.pdf import write_pdf


def read(path, **kw):
    counters = Counter()
    return list(read_file(path, ReadOptions(**kw), counters)), counters


def test_txt_blank_lines_separate_documents_and_lines_are_recorded(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("第一句。\n第二句。\n\n\n第二篇文档。\n", encoding="utf-8")
    docs, _ = read(p)
    assert [d.text for d in docs] == ["第一句。\n第二句。", "第二篇文档。"]
    assert [d.line for d in docs] == [1, 5]


def test_gbk_and_utf8_bom_and_gzip_are_decoded(tmp_path):
    text = "工程质量验收标准。\n\n成本数据统计。\n"
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(text.encode("gbk"))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    gz = tmp_path / "z.txt.gz"
    gz.write_bytes(gzip.compress(text.encode("utf-8")))
    for p in (gbk, bom, gz):
        docs, _ = read(p)
        assert [d.text for d in docs] == ["工程质量验收标准。", "成本数据统计。"], p


def test_binary_and_undecodable_files_are_errors_naming_file_and_line(tmp_path):
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DomainLMError, match=r"b\.txt.*binary"):
        read(binary)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("好的\n".encode() + b"ok\n\xff\xfe\xff\n")
    with pytest.raises(DomainLMError, match=r"bad\.txt:3: undecodable"):
        read(bad)


def test_jsonl_field_errors_and_skip(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"content": "甲"}) + "\n{broken\n" + json.dumps({"title": "x"}) + "\n", encoding="utf-8")
    docs, _ = read(p, text_field="content", skip_bad_lines=True)
    assert [d.text for d in docs] == ["甲"]
    with pytest.raises(DomainLMError, match=r"d\.jsonl:2: bad JSONL line"):
        read(p, text_field="content")
    with pytest.raises(DomainLMError, match=r"d\.jsonl:1: .*no field 'text'"):
        read(p)
    _, counters = read(p, text_field="content", skip_bad_lines=True)
    assert counters["bad_lines_skipped"] == 2


def test_markdown_keeps_text_drops_markup():
    md = "---\ntitle: x\n---\n# 标题\n\n- 列表项 [链接](http://a.b)\n\n```\ncode()\n```\n**粗体**正文。"
    text = markdown_to_text(md)
    assert "标题" in text and "列表项 链接" in text and "粗体正文。" in text
    assert "code()" not in text and "http" not in text and "#" not in text


def test_pdf_text_layer_headers_footers_page_numbers_removed(tmp_path):
    pages = [
        ["ACME Handbook", f"Chapter text on page {i} continues here.", "It ends.", f"- {i} -"] for i in range(1, 5)
    ]
    p = tmp_path / "h.pdf"
    write_pdf(p, pages)
    docs, _ = read(p)
    assert len(docs) == 1
    text = docs[0].text
    assert "ACME Handbook" not in text and "- 2 -" not in text
    assert "Chapter text on page 3 continues here." in text


def test_pdf_without_text_layer_is_an_error(tmp_path):
    p = tmp_path / "scan.pdf"
    write_pdf(p, [[], []])
    with pytest.raises(DomainLMError, match=r"scan\.pdf: the PDF has no text layer"):
        read(p)


def test_docx_paragraphs_and_tables(tmp_path):
    import docx

    d = docx.Document()
    d.add_paragraph("第一段。")
    table = d.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text = "单元"
    table.rows[0].cells[1].text = "格"
    p = tmp_path / "w.docx"
    d.save(p)
    docs, _ = read(p)
    assert docs[0].text == "第一段。\n单元 格"
    broken = tmp_path / "broken.docx"
    broken.write_bytes(b"not a zip")
    with pytest.raises(DomainLMError, match=r"broken\.docx: not a readable \.docx"):
        read(broken)


def test_discover_errors(tmp_path):
    with pytest.raises(DomainLMError, match="no input"):
        discover([])
    (tmp_path / "x.bin2").write_text("x")
    with pytest.raises(DomainLMError, match="holds no readable files"):
        discover([str(tmp_path)])
    with pytest.raises(DomainLMError, match="does not exist"):
        discover([str(tmp_path / "nope.txt")])
    with pytest.raises(DomainLMError, match="unsupported file type"):
        discover([str(tmp_path / "x.bin2")])
